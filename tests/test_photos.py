"""The photo definition shared by the Python runtime (runtime/images.py) and the native runner
(device_train/native/images.cpp, ``blockskip-train-native photos``), docs/formats.md "Photos": the resize
against independent references, both sides against each other on PNG, BMP and JPEG, the refusals (the
same message on both sides), the user CLI on a refused folder, and the aarch64 build under qemu."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from blockskip.runtime.errors import ImageError
from blockskip.runtime.images import list_images, load_image, load_images, resize_coeffs, resize_square

ROOT = Path(__file__).resolve().parents[1]
ARM = ROOT / "build" / "native-aarch64" / "device_train" / "native" / "blockskip-train-native"
SYSROOT = Path("/usr/aarch64-linux-gnu")
PREFIX = "blockskip-train-native: error: "
# stb_image and libjpeg-turbo (Pillow) decode JPEG with different IDCT, chroma upsampling and colour
# conversion rounding: measured on photos and scenes (4:2:0, 4:2:2, 4:4:4, progressive, grayscale; quality
# 75 and 95; s == S, downscaled and upscaled) the largest difference is 3.6 levels of 255 and the mean
# 0.07 level; the bounds allow 4.5 levels and 0.1 level (docs/formats.md states these numbers). Except
# stb_image's 4:2:2 edge (test_jpeg_422_last_but_one_column).
JPEG_MAX = 4.5 / 127.5
JPEG_MEAN = 0.1 / 127.5


# ------------------------------------------------------------------------------------------ helpers


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like [h, w, 3] uint8 image: smooth colour gradients, hard-edged discs and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xx / max(h, w), yy / max(h, w)
    img = np.stack(
        [
            128 + 90 * np.sin(2 * np.pi * (fx * u + fy * v) + ph)
            for fx, fy, ph in rng.random((3, 3)) * [2, 2, 6]
        ],
        -1,
    )
    for _ in range(5):
        cy, cx, r = rng.random(3) * [h, w, min(h, w) / 3]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.random(3) * 255
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def native_photos(binary, folder: Path, size: int, out: Path, prefix=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    return subprocess.run(
        [*map(str, prefix), str(binary), "photos", str(folder), "--size", str(size), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def native_load(binary, folder: Path, size: int, out: Path, prefix=()) -> tuple[list[str], np.ndarray]:
    r = native_photos(binary, folder, size, out, prefix)
    assert r.returncode == 0, f"photos failed ({r.returncode}):\n{r.stderr}"
    with safe_open(str(out), "np") as f:
        return json.loads(f.metadata()["names"]), f.get_tensor("photos")


def both(binary, folder: Path, size: int, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    files, py = load_images(folder, size)
    names, cc = native_load(binary, folder, size, tmp_path / f"photos-{size}.safetensors")
    assert names == [p.name for p in files]
    assert cc.shape == py.shape == (len(files), 3, size, size) and cc.dtype == np.float32
    return py, cc


def refusal(binary, folder: Path, tmp_path: Path, size: int = 64) -> str:
    """The message both sides give for ``folder`` (asserted identical); the native runner exits 1 and
    writes nothing."""
    with pytest.raises(ImageError) as e:
        load_images(folder, size)
    out = tmp_path / "refused.safetensors"
    r = native_photos(binary, folder, size, out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(PREFIX), (r.returncode, r.stderr)
    assert lines[0][len(PREFIX) :] == str(e.value)
    assert not out.exists()
    return str(e.value)


# ------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("s,size", [(150, 64), (97, 64), (70, 128), (64, 200), (333, 100)])
def test_resize_matches_pillow_on_a_float_image(s, size):
    """Pillow's own BICUBIC resize of a mode 'F' image: the same coefficients, accumulated in float64
    and stored in float32 between and after the passes (so within ~1e-4 levels), never rounded to 8 bits."""
    rgb = np.random.default_rng(s).integers(0, 256, (s, s, 3), dtype=np.uint8)
    ours = resize_square(rgb, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float64
    for c in range(3):
        ref = np.asarray(
            Image.fromarray(rgb[..., c].astype(np.float32), "F").resize((size, size), Image.BICUBIC)
        )
        np.testing.assert_allclose(ours[..., c], ref, rtol=0, atol=2e-4)
    # and not what resizing the 8-bit image gives (rounded to whole levels)
    rounded = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC), np.float64)
    assert np.abs(ours - rounded).max() > 0.01


def test_resize_reproduces_a_linear_ramp_at_half_size():
    """Halving: output i is centred at input position 2i + 1, where a ramp v(x) = x (pixel x centred at
    x + 0.5) has the value 2i + 0.5; the cubic's weights (normalised) reproduce linear functions exactly,
    away from the borders where the support is cut."""
    s, size = 128, 64
    ramp = np.tile(np.arange(s, dtype=np.uint8)[None, :, None], (s, 1, 3))
    out = resize_square(ramp, size)
    interior = slice(2, size - 2)
    np.testing.assert_allclose(
        out[:, interior, 0],
        np.broadcast_to(2 * np.arange(size)[interior] + 0.5, (size, size - 4)),
        rtol=0,
        atol=1e-9,
    )
    assert np.ptp(out[..., 0], axis=0).max() < 1e-9  # constant down the columns
    index, weight = resize_coeffs(s, size)
    np.testing.assert_allclose(weight.sum(1), 1.0, rtol=0, atol=1e-12)
    assert index.min() >= 0 and index.max() < s


def test_same_size_is_not_filtered(tmp_path):
    a = scene(96, 120)
    Image.fromarray(a).save(tmp_path / "p.png")
    got = load_image(tmp_path / "p.png", 96)
    crop = a[:, 12:108]  # centre square: left = (120 - 96) // 2
    np.testing.assert_array_equal(got, (crop / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1))


# ---------------------------------------------------------------------------- Python against C++


def _png_variants(folder: Path) -> Path:
    """PNG colour types and bit depths, odd sizes, landscape and portrait."""
    folder.mkdir()
    a = scene(151, 203, 1)
    Image.fromarray(a).save(folder / "rgb_landscape.png")
    Image.fromarray(scene(211, 97, 2)).save(folder / "rgb_portrait.png")
    rgba = np.dstack(
        [scene(120, 130, 3), np.random.default_rng(3).integers(0, 256, (120, 130), dtype=np.uint8)]
    )
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(a).convert("L").save(folder / "gray.png")
    Image.fromarray(a).convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=200).save(folder / "palette.png")
    pal_t = Image.fromarray(scene(90, 110, 4)).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal_t.save(folder / "palette_4bit_transparent.png", bits=4, transparency=3)
    Image.fromarray(a).convert("1").save(folder / "bilevel.png")
    Image.fromarray(scene(96, 100, 5)).save(folder / "same_size.png")  # s == 96
    return folder


@pytest.mark.parametrize("size", [64, 96, 256])
def test_png_python_and_native_agree(runner, tmp_path, size):
    folder = _png_variants(tmp_path / "png")
    py, cc = both(runner, folder, size, tmp_path)
    d = np.abs(py - cc)
    print(f"PNG S={size}: max {d.max():.3g}, mean {d.mean():.3g}")
    assert d.max() <= 1e-5


def test_bmp_python_and_native_agree(runner, tmp_path):
    folder = tmp_path / "bmp"
    folder.mkdir()
    a = scene(133, 171, 6)
    Image.fromarray(a).save(folder / "rgb24.bmp")
    rgba = np.dstack([scene(101, 77, 7), np.full((101, 77), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba32.bmp")
    Image.fromarray(a).convert("L").save(folder / "gray8.bmp")
    Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=64).save(folder / "palette8.bmp")
    Image.fromarray(a).convert("1").save(folder / "bilevel1.bmp")
    for size in (64, 150):
        py, cc = both(runner, folder, size, tmp_path)
        d = np.abs(py - cc)
        print(f"BMP S={size}: max {d.max():.3g}, mean {d.mean():.3g}")
        assert d.max() <= 1e-5


def test_jpeg_python_and_native_agree_within_the_decoders_difference(runner, tmp_path):
    folder = tmp_path / "jpeg"
    folder.mkdir()
    for i, (h, w) in enumerate([(240, 320), (333, 250), (256, 256), (200, 300)]):
        img = Image.fromarray(scene(h, w, 10 + i))
        for sub in (0, 1, 2):  # 4:4:4, 4:2:2 (landscape only, see below), 4:2:0
            if sub != 1 or w > h:
                img.save(folder / f"s{i}_sub{sub}.jpg", quality=90, subsampling=sub)
        img.save(folder / f"s{i}_q75.jpeg", quality=75)
        img.save(folder / f"s{i}_progressive.jpg", quality=90, progressive=True)
        img.convert("L").save(folder / f"s{i}_gray.jpg", quality=90)
    worst, means = 0.0, []
    for size in (64, 256, 400):
        py, cc = both(runner, folder, size, tmp_path)
        d = np.abs(py - cc)
        worst = max(worst, float(d.max()))
        means.append(float(d.mean()))
        print(
            f"JPEG S={size}: max {d.max():.4f} ({d.max() * 127.5:.2f} levels), mean {d.mean() * 127.5:.3f} levels"
        )
    assert worst <= JPEG_MAX, worst * 127.5
    assert max(means) <= JPEG_MEAN, [m * 127.5 for m in means]
    assert worst > 0  # two decoders: if this ever reads 0 the bound above is stale


def test_jpeg_422_last_but_one_column(runner, tmp_path):
    """stb_image (2.27 and later) upsamples 4:2:2 (h2v1) chroma with the weights of the last two chroma
    samples swapped for the image's last-but-one column; libjpeg-turbo does not. A photo whose centre
    square reaches the right edge (portrait or square) differs there by more than the decoders' rounding;
    everywhere else it is within the bound."""
    folder = tmp_path / "jpeg422"
    folder.mkdir()
    w = 160
    img = scene(240, w, 30)
    img[:, w - 4 : w - 2] = (40, 40, 220)  # the last two chroma samples far apart: blue, then red
    img[:, w - 2 :] = (220, 40, 40)
    Image.fromarray(img).save(folder / "portrait.jpg", quality=90, subsampling=1)
    py, cc = both(runner, folder, w, tmp_path)  # s == S: the decoded pixels themselves
    d = np.abs(py - cc)[0]
    edge = d[:, :, w - 2]
    rest = np.delete(d, w - 2, axis=2)
    print(
        f"4:2:2 portrait: column w-2 max {edge.max() * 127.5:.1f} levels; elsewhere max {rest.max() * 127.5:.2f}"
    )
    assert rest.max() <= JPEG_MAX
    assert edge.max() > JPEG_MAX  # the stb behaviour documented in docs/formats.md; fails once stb fixes it


def test_demo_photos_load_on_both_sides(runner, tmp_path):
    from bench.make_demo_images import main as make_photos

    assert make_photos([str(tmp_path / "demo"), str(tmp_path / "heldout")]) == 0
    for folder in ("demo", "heldout"):
        py, cc = both(runner, tmp_path / folder, 64, tmp_path)
        assert np.abs(py - cc).max() <= 1e-5


def test_links_inside_the_folder_and_hidden_or_other_files(runner, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(scene(80, 90, 8)).save(folder / "sub" / "kept.PNG")
    os.symlink(folder / "sub" / "kept.PNG", folder / "b_link.png")
    os.symlink("sub/kept.PNG", folder / "c_relative_link.JPG")  # a PNG named .JPG: read by its content
    Image.fromarray(scene(70, 70, 9)).save(folder / "a.png")
    (folder / ".hidden.png").write_bytes(b"")  # ignored: hidden
    (folder / ".thumb.webp").write_bytes(b"")  # ignored: hidden, even with a refused extension
    (folder / "notes.txt").write_text("not a photo")
    (folder / "raw.cr2").write_bytes(b"\0" * 10)
    assert [p.name for p in list_images(folder)] == ["a.png", "b_link.png", "c_relative_link.JPG"]
    py, cc = both(runner, folder, 64, tmp_path)
    assert np.abs(py - cc).max() <= 1e-5
    np.testing.assert_array_equal(py[1], py[2])


# ----------------------------------------------------------------------------------------- refusals


def _png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def _sof_offset(jpeg: bytes) -> int:
    """Offset of the first SOF marker's code byte."""
    pos = 2
    while True:
        assert jpeg[pos] == 0xFF
        m = jpeg[pos + 1]
        if m in (0xC0, 0xC1, 0xC2):
            return pos + 1
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]


def _adobe_offset(jpeg: bytes) -> int:
    """Offset of the Adobe APP14 segment's marker (FF EE)."""
    pos = 2
    while True:
        assert jpeg[pos] == 0xFF
        if jpeg[pos + 1] == 0xEE:
            return pos
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]


def _cases() -> dict[str, tuple[str, str, bytes]]:
    """name -> (file name, expected message with {p} for the file's path, file content)."""
    good = Image.fromarray(scene(100, 120, 20))
    png, jpeg = _png_bytes(good), _jpeg_bytes(good, quality=90)
    bmp_buf = io.BytesIO()
    good.convert("P", palette=Image.ADAPTIVE).save(bmp_buf, "BMP")
    bmp = bmp_buf.getvalue()
    sof = _sof_offset(jpeg)
    twelve = bytearray(jpeg)
    twelve[sof + 3] = 12  # the frame header's sample precision
    arith = bytearray(jpeg)
    arith[sof] = 0xC9  # SOF9: arithmetic coding
    rle = bytearray(bmp)
    rle[30:34] = struct.pack("<I", 1)  # BI_RLE8
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # IHDR's checksum
    cmyk = _jpeg_bytes(good.convert("CMYK"))  # Pillow writes Adobe CMYK (APP14 transform 0): read
    app14 = _adobe_offset(cmyk)
    unmarked = cmyk[:app14] + cmyk[app14 + 2 + struct.unpack_from(">H", cmyk, app14 + 2)[0] :]
    ycck = bytearray(cmyk)
    ycck[app14 + 4 + 11] = 2  # the segment's colour transform: YCCK
    four = "{p} is a 4-channel JPEG other than Adobe CMYK (YCCK, or no Adobe marker); save it as an RGB JPEG or PNG"
    cannot = "cannot read image {p}: %s; remove or replace it"
    return {
        "empty": ("x.png", "{p} is empty; remove or replace it", b""),
        "text_as_jpeg": ("notes.jpg", cannot % "not a PNG, JPEG or BMP file", b"these are my notes\n" * 20),
        "truncated_png": ("cut.png", cannot % "truncated", png[: len(png) * 6 // 10]),
        "truncated_png_header": ("cut.png", cannot % "truncated", png[:20]),
        "truncated_jpeg": ("cut.jpg", cannot % "truncated", jpeg[: len(jpeg) * 6 // 10]),
        "jpeg_without_eoi": ("cut.jpg", cannot % "truncated", jpeg[:-2]),
        "truncated_bmp": ("cut.bmp", cannot % "truncated", bmp[:-300]),
        "bad_png_checksum": (
            "crc.png",
            cannot % "bad checksum in a PNG chunk before the image data",
            bytes(bad_crc),
        ),
        "one_pixel": (
            "dot.png",
            "{p} is too small (1x1); use photos of at least 64 px",
            _png_bytes(Image.new("RGB", (1, 1))),
        ),
        "63x100": (
            "thin.png",
            "{p} is too small (63x100); use photos of at least 64 px",
            _png_bytes(Image.new("RGB", (63, 100))),
        ),
        "huge": (
            "huge.png",
            "{p} is too large (6400x6400, more than 40 Mpx); downscale it first",
            _png_bytes(Image.new("1", (6400, 6400))),
        ),
        "small_png16": (
            "deep.png",
            "{p} is too small (10x10); use photos of at least 64 px",  # order of checks
            _png_bytes(Image.fromarray(np.full((10, 10), 40000, np.uint16))),
        ),
        "cmyk_without_adobe": ("print.jpg", four, unmarked),
        "ycck": ("print.jpg", four, bytes(ycck)),
        "jpeg12": ("deep.jpg", "{p} is a 12-bit JPEG; save it as an 8-bit JPEG or PNG", bytes(twelve)),
        "arithmetic": (
            "arith.jpg",
            cannot % "JPEG coding process SOF9 is not supported (only baseline and progressive)",
            bytes(arith),
        ),
        "rle_bmp": ("rle.bmp", cannot % "compressed BMP is not supported", bytes(rle)),
        "webp": (
            "photo.webp",
            "{p}: .webp photos are not supported; convert it to PNG or JPEG (or remove it)",
            b"RIFF\x24\0\0\0WEBPVP8 ",
        ),
        "heic": (
            "IMG_0001.HEIC",
            "{p}: .heic photos are not supported; convert it to PNG or JPEG (or remove it)",
            b"\0\0\0\x18ftypheic",
        ),
    }


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES)
def test_refused_photo_same_message_on_both_sides(runner, tmp_path, case):
    name, expected, content = _cases()[case]
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(scene(90, 90, 1)).save(folder / "0_good.png")  # a good photo first: the bad one is named
    (folder / name).write_bytes(content)
    assert refusal(runner, folder, tmp_path) == expected.format(p=folder / name)


def test_refused_folders_and_entries(runner, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = refusal(runner, empty, tmp_path)
    assert (
        msg
        == f"no images in {str(empty)!r} (looked for .bmp, .jpeg, .jpg, .png); add 3-10 photos of the subject"
    )

    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("x")
    (others / ".hidden.jpg").write_bytes(b"x")
    (others / "Makefile").write_text("x")
    assert refusal(runner, others, tmp_path).startswith(f"no images in {str(others)!r}")

    assert refusal(runner, tmp_path / "nope", tmp_path) == (
        f"image folder {str(tmp_path / 'nope')!r} does not exist; pass the folder of your photos with --images"
    )
    (tmp_path / "file.png").write_bytes(b"x")
    assert refusal(runner, tmp_path / "file.png", tmp_path).endswith(
        "is not a folder; pass the folder of your photos with --images"
    )

    outside = tmp_path / "elsewhere.png"
    Image.fromarray(scene(80, 80)).save(outside)
    for name, make, expected in [
        (
            "link.png",
            lambda p: os.symlink(outside, p),
            "{p} links outside the photo folder; copy the photo into the folder instead",
        ),
        (
            "up.png",
            lambda p: os.symlink("../elsewhere.png", p),
            "{p} links outside the photo folder; copy the photo into the folder instead",
        ),
        (
            "broken.jpg",
            lambda p: os.symlink(tmp_path / "missing.jpg", p),
            "{p} is a broken link; copy the photo into the folder instead",
        ),
        ("album.png", lambda p: p.mkdir(), "{p} is not a file; remove it from the photo folder"),
    ]:
        folder = tmp_path / f"case-{name}"
        folder.mkdir()
        Image.fromarray(scene(80, 80)).save(folder / "a.png")
        make(folder / name)
        assert refusal(runner, folder, tmp_path) == expected.format(p=folder / name)


def test_relative_folder_paths_read_the_same(runner, tmp_path):
    """Messages name the file as pathlib writes the folder: './x//y/' reads as 'x/y'."""
    folder = tmp_path / "x" / "y"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ImageError) as e:
            load_images("./x//y/", 64)
        r = native_photos(runner, Path("./x//y/"), 64, tmp_path / "o.safetensors")
    finally:
        os.chdir(cwd)
    assert str(e.value) == "x/y/a.png is empty; remove or replace it"
    assert r.stderr.strip() == PREFIX + str(e.value)


# -------------------------------------------------------------------------------------- user CLI


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting a bundle needs torch")
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    root = tmp_path_factory.mktemp("photo-cli")
    export_bundle(
        load_model("tiny-random"),
        Plan(front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=2, steps=2),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
    )
    return root / "bundle"


@pytest.mark.parametrize("case", ["truncated_jpeg", "ycck", "webp"])
def test_precompute_refuses_the_folder_and_writes_no_cache(bundle, tmp_path, capsys, case):
    from blockskip.device_train.cli import main as train_main

    name, expected, content = _cases()[case]
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(scene(90, 90, 1)).save(folder / "0_good.png")
    (folder / name).write_bytes(content)
    capsys.readouterr()
    rc = train_main(
        ["precompute", str(bundle), "--images", str(folder), "--cache", str(tmp_path / "cache"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip() == "device-train: error: " + expected.format(p=folder / name)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------- aarch64 build


@pytest.mark.slow
def test_aarch64_runner_reads_photos_as_python(runner, tmp_path):
    """The cross-built runner under qemu: PNG and BMP as Python reads them, JPEG as the x86 build
    decodes it (stb_image's SIMD paths, SSE2 there and NEON here, give the same pixels)."""
    q = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if q is None or not SYSROOT.is_dir():
        pytest.skip(
            "needs qemu-aarch64 and the aarch64 C++ runtime (apt-get install qemu-user g++-aarch64-linux-gnu)"
        )
    if not ARM.is_file():
        pytest.skip("the aarch64 runner is not built: make native-aarch64")
    qemu = (q, "-L", SYSROOT)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(scene(151, 203, 1)).save(folder / "rgb.png")
    Image.fromarray(scene(130, 97, 2)).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(scene(120, 110, 3)).save(folder / "rgb.bmp")
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    Image.fromarray(scene(200, 150, 4)).save(jpegs / "a.jpg", quality=85)
    Image.fromarray(scene(180, 240, 5)).save(jpegs / "b.jpg", quality=90, progressive=True)
    Image.fromarray(scene(180, 240, 6)).save(jpegs / "c.jpg", quality=90, subsampling=1)
    for size in (64, 160):
        files, py = load_images(folder, size)
        names, arm = native_load(ARM, folder, size, tmp_path / f"arm-{size}.safetensors", prefix=qemu)
        assert names == [p.name for p in files]
        print(f"aarch64 PNG/BMP S={size}: max {np.abs(arm - py).max():.3g}")
        assert np.abs(arm - py).max() <= 1e-5
        _, arm_j = native_load(ARM, jpegs, size, tmp_path / f"arm-j-{size}.safetensors", prefix=qemu)
        _, x86_j = native_load(runner, jpegs, size, tmp_path / f"x86-j-{size}.safetensors")
        print(f"aarch64 JPEG S={size}: max against the x86 build {np.abs(arm_j - x86_j).max():.3g}")
        assert np.abs(arm_j - x86_j).max() <= 1e-5
    # a refusal reads the same
    (folder / "cut.png").write_bytes((folder / "rgb.png").read_bytes()[:300])
    r = native_photos(ARM, folder, 64, tmp_path / "x.safetensors", prefix=qemu)
    assert r.returncode == 1
    assert (
        r.stderr.strip() == f"{PREFIX}cannot read image {folder / 'cut.png'}: truncated; remove or replace it"
    )
