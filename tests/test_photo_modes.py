"""How a photo's pixels are read (docs/formats.md, "Photos", "Decoding"), on the Python reader
(runtime/images.py) and the native runner's (device_train/native/images.cpp): the EXIF orientation, every
colour mode (16-bit samples, alpha and transparency composited on white, Adobe CMYK), the modes and
variants refused, the pixel limit read from the header before decoding, and the minimum size.

The expected pixels are computed here independently of the readers; the native runner must give the same
values as Python (exactly for PNG and BMP; within the decoders' difference for JPEG)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_photos import JPEG_MAX, JPEG_MEAN, both, refusal, scene

from blockskip.runtime import formats
from blockskip.runtime.errors import ImageError
from blockskip.runtime.images import MAX_PIXELS, MIN_SIDE, _Header, _to_rgb, exif_orientation, load_image

CANNOT = "cannot read image {p}: %s; remove or replace it"


# ------------------------------------------------------------------------------------------ helpers


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(
    samples: np.ndarray, color: int, depth: int, before_idat: bytes = b"", after_idat: bytes = b""
) -> bytes:
    """A PNG written here (not by Pillow): [h, w] or [h, w, c] samples of colour type ``color`` and bit
    depth ``depth``, filter 0, with extra chunks before and after the image data."""
    h, w = samples.shape[:2]
    flat = samples.reshape(h, -1).astype(np.uint32)
    rows = []
    for row in flat:
        if depth == 16:
            data = row.astype(">u2").tobytes()
        elif depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:  # pack 8 / depth samples a byte, first sample in the high bits
            per = 8 // depth
            padded = np.zeros(-(-len(row) // per) * per, np.uint32)
            padded[: len(row)] = row
            groups = padded.reshape(-1, per)
            shifts = depth * np.arange(per - 1, -1, -1, dtype=np.uint32)
            data = (groups << shifts).sum(1).astype(np.uint8).tobytes()
        rows.append(b"\0" + data)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
        + before_idat
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + after_idat
        + chunk(b"IEND", b"")
    )


def on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha compositing on white, rounded to the nearest level (float64: never exactly half way)."""
    c, a = rgba[..., :3].astype(np.float64), rgba[..., 3:4].astype(np.float64)
    return np.rint((c * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)


def expected(rgb: np.ndarray) -> np.ndarray:
    """What load_image gives for an [s, s, 3] uint8 image at size s (no resampling)."""
    return (rgb / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1)


def centre(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    return rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def exif_bytes(orientation: int) -> Image.Exif:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex


def tiff_ifd0(entries: list[tuple[int, int, int, bytes]], order: str = "<") -> bytes:
    """A TIFF header and IFD0 with (tag, type, count, 4-byte value field) entries."""
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8)
    body = struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack(order + "HHI", tag, kind, count) + value
    return head + body + b"\0\0\0\0"


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """The JPEG with an APP1 segment of ``payload`` right after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def one_photo(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


def png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


# ---------------------------------------------------------------------------------- orientation


def test_exif_orientation_parser():
    six = struct.pack("<HH", 6, 0)
    assert exif_orientation(tiff_ifd0([(0x0112, 3, 1, six)])) == 6
    assert exif_orientation(tiff_ifd0([(0x0112, 3, 1, struct.pack(">HH", 8, 0))], ">")) == 8  # big-endian
    assert (
        exif_orientation(tiff_ifd0([(0x010F, 2, 4, b"Acme"), (0x0112, 3, 1, six)])) == 6
    )  # not the first entry
    assert exif_orientation(tiff_ifd0([(0x010F, 2, 4, b"Acme")])) == 1  # no orientation
    assert exif_orientation(tiff_ifd0([(0x0112, 4, 1, struct.pack("<I", 6))])) == 1  # a LONG, not a SHORT
    assert exif_orientation(tiff_ifd0([(0x0112, 3, 2, six)])) == 1  # two values
    assert exif_orientation(tiff_ifd0([(0x0112, 3, 1, struct.pack("<HH", 9, 0))])) == 1  # out of range
    assert exif_orientation(tiff_ifd0([(0x0112, 3, 1, struct.pack("<HH", 0, 0))])) == 1
    assert exif_orientation(tiff_ifd0([(0x0112, 3, 1, six)])[:16]) == 1  # the entry cut off
    assert exif_orientation(b"II\x2b\x00" + tiff_ifd0([(0x0112, 3, 1, six)])[4:]) == 1  # bad magic
    assert exif_orientation(b"II*\0\xff\xff\xff\xff") == 1  # IFD0 beyond the end
    assert exif_orientation(b"") == 1
    # what Pillow writes
    assert exif_orientation(exif_bytes(6).tobytes()[6:]) == 6


def test_png_exif_orientations_match_pillows_exif_transpose(runner, tmp_path):
    """All eight orientations of a non-square PNG (eXIf chunk): exactly Pillow's exif_transpose of the
    same file, on both sides, at the pixels themselves and resized."""
    stored = scene(90, 130, 40)
    folder = tmp_path / "png"
    folder.mkdir()
    for o in range(1, 9):
        Image.fromarray(stored).save(folder / f"o{o}.png", exif=exif_bytes(o))
    readings = {}
    for o in range(1, 9):
        with Image.open(folder / f"o{o}.png") as im:
            assert im.getexif().get(0x0112) == o  # Pillow wrote the tag
            upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert upright.shape[:2] == ((90, 130) if o <= 4 else (130, 90))
        readings[o] = load_image(folder / f"o{o}.png", 90)
        np.testing.assert_array_equal(readings[o], expected(centre(upright)))
    assert not np.array_equal(readings[1], readings[6]) and not np.array_equal(readings[6], readings[8])
    for size in (90, 64, 128):
        py, cc = both(runner, folder, size, tmp_path)
        assert np.abs(py - cc).max() <= 1e-5, size


def test_phone_jpeg_orientation_6_reads_upright(runner, tmp_path):
    """A phone's upright portrait photo, stored turned (orientation 6): read as the upright image. The
    same decoder's pixels turned by Pillow's exif_transpose and saved as PNG read exactly the same; the
    upright original is within JPEG's loss, the stored turned pixels are far; the native runner agrees
    within the decoders' difference."""
    upright = scene(160, 120, 41)  # portrait
    stored = np.rot90(upright)  # turned 90 degrees counter-clockwise: orientation 6 turns it back
    folder = tmp_path / "phone"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "IMG_0001.jpg", quality=95, exif=exif_bytes(6))
    with Image.open(folder / "IMG_0001.jpg") as im:
        turned = np.asarray(ImageOps.exif_transpose(im))
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.fromarray(turned).save(ref / "upright_decoded.png")
    Image.fromarray(upright).save(ref / "upright_original.png")
    Image.fromarray(stored).save(ref / "stored.png")
    for size in (120, 64):
        got = load_image(folder / "IMG_0001.jpg", size)
        np.testing.assert_array_equal(got, load_image(ref / "upright_decoded.png", size))
        # measured: 3.1 levels from the original (JPEG's loss, 4:2:0), 62 from the stored pixels
        assert np.abs(got - load_image(ref / "upright_original.png", size)).mean() * 127.5 < 5.0
        assert np.abs(got - load_image(ref / "stored.png", size)).mean() * 127.5 > 30.0
        py, cc = both(runner, folder, size, tmp_path)
        assert np.abs(py - cc).max() <= JPEG_MAX and np.abs(py - cc).mean() <= JPEG_MEAN


def test_jpeg_orientations_and_exif_variants_native_matches_python(runner, tmp_path):
    """Eight orientations of a JPEG, a big-endian EXIF block, and EXIF blocks that are not applied (a
    malformed one, one after the first scan is not looked for): both sides read the same image."""
    stored = scene(100, 140, 42)
    folder = tmp_path / "jpeg"
    folder.mkdir()
    for o in range(1, 9):
        Image.fromarray(stored).save(folder / f"o{o}.jpg", quality=92, exif=exif_bytes(o))
    plain = jpeg_bytes(Image.fromarray(stored), quality=92)
    big = b"Exif\0\0" + tiff_ifd0([(0x0112, 3, 1, struct.pack(">HH", 8, 0))], ">")
    (folder / "big_endian_8.jpg").write_bytes(with_app1(plain, big))
    broken = b"Exif\0\0" + tiff_ifd0([(0x0112, 3, 1, struct.pack("<HH", 6, 0))])[:14]
    (folder / "broken_exif.jpg").write_bytes(with_app1(plain, broken))
    py, cc = both(runner, folder, 100, tmp_path)
    d = np.abs(py - cc)
    assert d.max() <= JPEG_MAX and d.mean() <= JPEG_MEAN
    names = sorted(p.name for p in folder.iterdir())
    at = {n: py[i] for i, n in enumerate(names)}
    np.testing.assert_array_equal(at["big_endian_8.jpg"], at["o8.jpg"])
    np.testing.assert_array_equal(at["broken_exif.jpg"], at["o1.jpg"])
    assert np.abs(at["o6.jpg"] - at["o1.jpg"]).mean() * 127.5 > 10.0


# ------------------------------------------------------------------------------------------- modes


def _mode_cases() -> dict[str, tuple[str, bytes, np.ndarray]]:
    """name -> (file name, content, the [h, w, 3] uint8 pixels it must read as)."""
    rng = np.random.default_rng(7)
    h, w = 72, 80
    rgb = scene(h, w, 43)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[:8] = 0
    alpha[8:16] = 255
    rgba = np.dstack([rgb, alpha])
    v16 = rng.integers(0, 65536, (h, w, 4)).astype(np.uint16)
    hi = (v16 >> 8).astype(np.uint8)
    gray = rgb[..., 1]
    rep3 = lambda g: np.repeat(g[..., None], 3, axis=2)  # noqa: E731
    cases = {}

    # 16-bit samples: their high byte
    cases["gray16"] = ("gray16.png", raw_png(v16[..., 0], 0, 16), rep3(hi[..., 0]))
    levels = (rng.integers(0, 6, (h, w)) * 13000).astype(np.uint16)  # 0, 13000, ... 65000
    key16 = rep3((levels >> 8).astype(np.uint8))
    key16[levels == 26000] = 255
    cases["gray16_transparent_colour"] = (
        "gray16_key.png",
        raw_png(levels, 0, 16, chunk(b"tRNS", struct.pack(">H", 26000))),
        key16,
    )
    cases["gray16_alpha"] = (
        "la16.png",
        raw_png(v16[..., :2], 4, 16),
        on_white(np.dstack([rep3(hi[..., 0]), hi[..., 1]])),
    )
    cases["rgb16"] = ("rgb16.png", raw_png(v16[..., :3], 2, 16), hi[..., :3])
    cases["rgba16"] = ("rgba16.png", raw_png(v16, 6, 16), on_white(hi))

    # alpha and transparency, composited on white
    cases["rgba"] = ("rgba.png", png_bytes(Image.fromarray(rgba, "RGBA")), on_white(rgba))
    cases["gray_alpha"] = (
        "la.png",
        png_bytes(Image.fromarray(np.dstack([gray, alpha]), "LA")),
        on_white(np.dstack([rep3(gray), alpha])),
    )
    pal_img = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32)
    pal_rgb = np.asarray(pal_img.convert("RGB"))
    idx = np.asarray(pal_img)
    alphas = bytes(rng.integers(0, 256, 20, dtype=np.uint8))  # the first 20 entries; the rest opaque
    pal_alpha = np.full(256, 255, np.uint8)
    pal_alpha[:20] = np.frombuffer(alphas, np.uint8)
    cases["palette_alphas"] = (
        "palette_alpha.png",
        png_bytes(pal_img, transparency=alphas),
        on_white(np.dstack([pal_rgb, pal_alpha[idx]])),
    )
    one = pal_rgb.copy()
    one[idx == 5] = 255
    cases["palette_one_transparent"] = ("palette_index.png", png_bytes(pal_img, transparency=5), one)
    g8 = (rng.integers(0, 5, (h, w)) * 60).astype(np.uint8)
    key8 = rep3(g8)
    key8[g8 == 120] = 255
    cases["gray_transparent_colour"] = (
        "gray_key.png",
        raw_png(g8, 0, 8, chunk(b"tRNS", struct.pack(">H", 120))),
        key8,
    )
    g2 = rng.integers(0, 4, (h, w))
    key2 = rep3((g2 * 0x55).astype(np.uint8))
    key2[g2 == 1] = 255
    cases["gray2_transparent_colour"] = (
        "gray2_key.png",
        raw_png(g2, 0, 2, chunk(b"tRNS", struct.pack(">H", 1))),
        key2,
    )
    g1 = rng.integers(0, 2, (h, w))
    key1 = rep3((g1 * 255).astype(np.uint8))
    key1[g1 == 0] = 255  # black is the transparent colour
    cases["bilevel_transparent_colour"] = (
        "bilevel_key.png",
        raw_png(g1, 0, 1, chunk(b"tRNS", struct.pack(">H", 0))),
        key1,
    )
    c3 = (rng.integers(0, 3, (h, w, 3)) * 100).astype(np.uint8)
    key3 = c3.copy()
    key3[np.all(c3 == (100, 0, 200), axis=-1)] = 255
    c3[:4, :4] = (100, 0, 200)  # present for sure
    key3[:4, :4] = 255
    cases["rgb_transparent_colour"] = (
        "rgb_key.png",
        raw_png(c3, 2, 8, chunk(b"tRNS", struct.pack(">HHH", 100, 0, 200))),
        key3,
    )

    # BMP: a V5 header's alpha mask is alpha; a 40-byte header's fourth byte is reserved, not alpha
    cases["bmp_v5_alpha"] = ("v5_alpha.bmp", bmp_v5(rgba), on_white(rgba))
    b = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(b, "BMP")
    cases["bmp_fourth_byte_reserved"] = ("bgrx.bmp", b.getvalue(), rgb)
    return cases


def bmp_v5(rgba: np.ndarray) -> bytes:
    """A 32-bit BMP with a 124-byte header and bit fields B, G, R, A (masks 00FF0000 .. FF000000)."""
    h, w = rgba.shape[:2]
    pixels = rgba[::-1][..., [2, 1, 0, 3]].tobytes()  # bottom-up rows of BGRA
    header = struct.pack("<IiiHHIIiiII", 124, w, h, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    header += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"sRGB" + b"\0" * 48
    header += b"\0" * (124 - len(header))
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + pixels


MODE_CASES = list(_mode_cases())


@pytest.mark.parametrize("case", MODE_CASES)
def test_mode_reads_as_defined_on_both_sides(runner, tmp_path, case):
    name, content, pixels = _mode_cases()[case]
    folder = tmp_path / "photos"
    path = one_photo(folder, name, content)
    s = min(pixels.shape[:2])
    np.testing.assert_array_equal(load_image(path, s), expected(centre(pixels)))
    for size in (s, 64, 100):
        py, cc = both(runner, folder, size, tmp_path)
        assert np.abs(py - cc).max() <= 1e-5, size


def test_sixteen_bit_gray_is_not_clipped():
    """Pillow's own convert of a 16-bit gray image clips at 255 (almost all white); ours takes the
    high byte."""
    name, content, pixels = _mode_cases()["gray16"]
    with Image.open(io.BytesIO(content)) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))
    assert (clipped == 255).mean() > 0.99
    assert 100 < pixels.mean() < 155


def test_adobe_cmyk_jpeg(runner, tmp_path):
    """An Adobe CMYK JPEG (as Photoshop and Pillow write them) reads through Pillow's CMYK -> RGB and
    stb_image's (the same formula, rounded differently: within the decoders' difference) close to the
    RGB it was made from, not inverted."""
    rgb = scene(90, 110, 44)
    folder = tmp_path / "cmyk"
    folder.mkdir()
    Image.fromarray(rgb).convert("CMYK").save(folder / "print.jpg", quality=95)
    with Image.open(folder / "print.jpg") as im:
        assert im.mode == "CMYK" and im.info.get("adobe_transform") == 0
        ref = np.asarray(im.convert("RGB"))
    got = load_image(folder / "print.jpg", 90)
    np.testing.assert_array_equal(got, expected(centre(ref)))
    assert np.abs(got - expected(centre(rgb))).mean() * 127.5 < 4.0
    py, cc = both(runner, folder, 90, tmp_path)
    assert np.abs(py - cc).max() <= JPEG_MAX and np.abs(py - cc).mean() <= JPEG_MEAN


@pytest.mark.parametrize("mode", ["F", "I", "I;16", "LAB", "HSV"])
def test_modes_without_an_8_bit_reading_are_refused(mode):
    """A float, 32-bit integer or other image a PNG, JPEG or BMP never decodes to (a float TIFF, say)
    has no defined 8-bit reading: refused with a typed error, never guessed."""
    im = Image.new(mode, (70, 70))
    with pytest.raises(ImageError) as e:
        _to_rgb(Path("x.png"), im, _Header("PNG", 70, 70))
    assert str(e.value) == (
        f"x.png decodes to Pillow mode {mode!r}, which has no defined 8-bit RGB reading; "
        "save it as an 8-bit PNG or JPEG"
    )


def test_float_tiff_refused_on_both_sides(runner, tmp_path):
    """A float TIFF is refused by its extension, and by its content under a photo's extension."""
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).random((80, 80), np.float32), "F").save(b, "TIFF")
    folder = tmp_path / "tif"
    path = one_photo(folder, "scan.tif", b.getvalue())
    assert refusal(runner, folder, tmp_path) == (
        f"{path}: .tif photos are not supported; convert it to PNG or JPEG (or remove it)"
    )
    folder = tmp_path / "renamed"
    path = one_photo(folder, "scan.png", b.getvalue())
    assert refusal(runner, folder, tmp_path) == CANNOT.format(p=path) % "not a PNG, JPEG or BMP file"


def _refused_variants() -> dict[str, tuple[str, bytes, str]]:
    """name -> (file name, content, reason): transparency and BMP variants read differently by the
    decoders, refused on both sides."""
    rng = np.random.default_rng(9)
    g8 = rng.integers(0, 256, (70, 70)).astype(np.uint8)
    rgb16 = rng.integers(0, 65536, (70, 70, 3)).astype(np.uint16)
    rgba = rng.integers(0, 256, (70, 70, 4)).astype(np.uint8)
    pal = Image.fromarray(scene(70, 70, 45)).convert("P", palette=Image.ADAPTIVE, colors=8)
    pal_png = png_bytes(pal)
    plte = pal_png.index(b"PLTE") - 4
    plte_end = plte + 12 + struct.unpack_from(">I", pal_png, plte)[0]
    trns = lambda body: chunk(b"tRNS", body)  # noqa: E731
    v4 = bytearray(bmp_v5(rgba))
    v4[14 + 52 : 14 + 56] = struct.pack("<I", 0x0F000000)  # the alpha mask: not 0 or FF000000
    v56 = bytearray(bmp_v5(rgba))
    v56[14:18] = struct.pack("<I", 56)
    return {
        "rgb16_transparent_colour": (
            "rgb16.png",
            raw_png(rgb16, 2, 16, trns(struct.pack(">HHH", 1, 2, 3))),
            "16-bit RGB PNG with a transparent colour (tRNS) is not supported",
        ),
        "transparency_on_rgba": (
            "rgba.png",
            raw_png(rgba, 6, 8, trns(struct.pack(">HHH", 1, 2, 3))),
            "PNG transparency chunk (tRNS) on an image with an alpha channel",
        ),
        "transparency_after_idat": (
            "gray.png",
            raw_png(g8, 0, 8, after_idat=trns(struct.pack(">H", 7))),
            "PNG transparency chunk (tRNS) after the image data",
        ),
        "two_transparency_chunks": (
            "gray.png",
            raw_png(g8, 0, 8, trns(struct.pack(">H", 7)) * 2),
            "PNG with more than one transparency chunk (tRNS)",
        ),
        "transparency_wrong_length": (
            "gray.png",
            raw_png(g8, 0, 8, trns(struct.pack(">HH", 7, 7))),
            "PNG transparency chunk (tRNS) of the wrong length",
        ),
        "transparent_colour_out_of_range": (
            "gray.png",
            raw_png(g8, 0, 8, trns(struct.pack(">H", 256))),
            "PNG transparent colour (tRNS) out of range for the bit depth",
        ),
        "palette_transparency_too_long": (
            "pal.png",
            pal_png[:plte_end] + trns(b"\x80" * 9) + pal_png[plte_end:],
            "PNG transparency chunk (tRNS) longer than the palette",
        ),
        "palette_transparency_first": (
            "pal.png",
            pal_png[:plte] + trns(b"\x80") + pal_png[plte:],
            "PNG transparency chunk (tRNS) before the palette",
        ),
        "bmp_unusual_alpha_mask": ("odd.bmp", bytes(v4), "BMP with unusual bit fields is not supported"),
        "bmp_56_byte_header": (
            "v56.bmp",
            bytes(v56),
            "BMP with a 56-byte header and bit fields is not supported",
        ),
    }


@pytest.mark.parametrize("case", list(_refused_variants()))
def test_variants_refused_on_both_sides(runner, tmp_path, case):
    name, content, reason = _refused_variants()[case]
    folder = tmp_path / "photos"
    path = one_photo(folder, name, content)
    assert refusal(runner, folder, tmp_path) == CANNOT.format(p=path) % reason


# ------------------------------------------------------------------------------- sizes from the header


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h and holds almost no data (a decompression bomb's header)."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def _jpeg_declaring(w: int, h: int) -> bytes:
    jpeg = bytearray(jpeg_bytes(Image.fromarray(scene(80, 80, 46)), quality=80))
    pos = 2
    while jpeg[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]
    jpeg[pos + 5 : pos + 9] = struct.pack(">HH", h, w)
    return bytes(jpeg)


def _bmp_declaring(w: int, h: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + header + b"\0" * 64


@pytest.mark.parametrize(
    "name,content,wxh",
    [
        ("bomb.png", _png_header_only(100_000, 100_000), "100000x100000"),
        ("bomb.png", _png_header_only(2**31 - 1, 2**31 - 1), "2147483647x2147483647"),
        ("bomb.png", _png_header_only(8000, 5001), "8000x5001"),  # one row over the limit
        ("bomb.jpg", _jpeg_declaring(65535, 65535), "65535x65535"),
        ("bomb.bmp", _bmp_declaring(50_000, 50_000), "50000x50000"),
    ],
)
def test_decompression_bomb_refused_from_the_header(runner, tmp_path, name, content, wxh):
    """Refused from the declared size, before any decoding, with the typed message (never Pillow's
    DecompressionBombError or an allocation)."""
    folder = tmp_path / "photos"
    path = one_photo(folder, name, content)
    mpx = formats.PHOTO_MAX_PIXELS // 1_000_000
    assert (
        refusal(runner, folder, tmp_path)
        == f"{path} is too large ({wxh}, more than {mpx} Mpx); downscale it first"
    )


def test_pixel_limit_is_inclusive_and_declared_once(runner, tmp_path):
    """8000 x 5000 is exactly the limit: not refused as too large (this header-only file is then refused
    as truncated); the limit and the minimum side are runtime/formats.py's, which formats.h carries."""
    assert MAX_PIXELS == formats.PHOTO_MAX_PIXELS == 8000 * 5000 and MIN_SIDE == formats.PHOTO_MIN_SIDE
    header = (Path(__file__).resolve().parents[1] / formats.HEADER).read_text()
    assert f"kPhotoMaxPixels = {formats.PHOTO_MAX_PIXELS};" in header
    assert f"kPhotoMinSide = {formats.PHOTO_MIN_SIDE};" in header
    folder = tmp_path / "photos"
    path = one_photo(folder, "edge.png", _png_header_only(8000, 5000)[:-12])  # without IEND
    assert refusal(runner, folder, tmp_path) == CANNOT.format(p=path) % "truncated"


# ------------------------------------------------------------------------------------ minimum size


@pytest.mark.parametrize("w,h", [(16, 16), (1, 1), (63, 64), (200, 63)])
def test_below_the_minimum_side_refused(runner, tmp_path, w, h):
    folder = tmp_path / "photos"
    path = one_photo(folder, "small.png", png_bytes(Image.fromarray(scene(h, w, 47))))
    assert refusal(runner, folder, tmp_path) == (
        f"{path} is too small ({w}x{h}); use photos of at least {formats.PHOTO_MIN_SIDE} px"
    )


def test_minimum_side_accepted_and_orientation_does_not_change_it(runner, tmp_path):
    """64 x 64 is read (and upscaled as asked); a 63-px side is refused whichever way the photo is turned,
    named by its stored size."""
    folder = tmp_path / "ok"
    one_photo(folder, "edge.png", png_bytes(Image.fromarray(scene(64, 64, 48))))
    py, cc = both(runner, folder, 128, tmp_path)
    assert py.shape == (1, 3, 128, 128) and np.abs(py - cc).max() <= 1e-5
    folder = tmp_path / "turned"
    path = one_photo(folder, "thin.jpg", jpeg_bytes(Image.fromarray(scene(100, 63, 49)), exif=exif_bytes(6)))
    assert refusal(runner, folder, tmp_path) == f"{path} is too small (63x100); use photos of at least 64 px"


# ------------------------------------------------------------------------------ the cache, upright


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting a bundle needs torch")
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    root = tmp_path_factory.mktemp("photo-modes")
    export_bundle(
        load_model("tiny-random"),
        Plan(front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=2, steps=2),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
    )
    return root / "bundle"


def test_precompute_of_an_orientation_6_jpeg_equals_the_upright_png(bundle, tmp_path):
    """device-train precompute on a phone JPEG stored turned with orientation 6 writes the same cache
    entries as on the PNG of its upright pixels."""
    from safetensors.numpy import load_file

    from blockskip.device_train.app import run_precompute

    upright = scene(96, 72, 50)
    phone = tmp_path / "phone"
    phone.mkdir()
    Image.fromarray(np.rot90(upright)).save(phone / "IMG_0001.jpg", quality=95, exif=exif_bytes(6))
    with Image.open(phone / "IMG_0001.jpg") as im:
        turned = np.asarray(ImageOps.exif_transpose(im))
    png = tmp_path / "png"
    png.mkdir()
    Image.fromarray(turned).save(png / "IMG_0001.png")
    stored = tmp_path / "stored"
    stored.mkdir()
    with Image.open(phone / "IMG_0001.jpg") as im:
        Image.fromarray(np.asarray(im)).save(stored / "IMG_0001.png")  # the pixels as stored, no tag
    shards = {}
    for name, folder in (("phone", phone), ("png", png), ("stored", stored)):
        run_precompute(bundle, folder, tmp_path / f"cache-{name}", quiet=True)
        files = sorted((tmp_path / f"cache-{name}").glob(f"{formats.SHARD_PREFIX}*{formats.SHARD_SUFFIX}"))
        shards[name] = [load_file(str(f)) for f in files]
    assert len(shards["phone"]) == len(shards["png"]) > 0
    for a, b in zip(shards["phone"], shards["png"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    differs = any(
        not np.array_equal(a[k], b[k])
        for a, b in zip(shards["phone"], shards["stored"], strict=True)
        for k in a
        if k.startswith(formats.ENTRY_IN) or k == formats.ENTRY_TARGET
    )
    assert differs  # the stored (sideways) pixels would have given another cache
