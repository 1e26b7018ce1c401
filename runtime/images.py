"""Load the user's photos: upright (EXIF orientation), square centre crop, resized to s_max, as float32 in
[-1, 1] (numpy + Pillow).

The definition is shared with the native runner (``device_train/native/images.cpp``) and written down in
docs/formats.md ("Photos"): which files of a folder are photos, which photos are refused and with what
message (in the same order of checks), how they decode to 8-bit RGB (16-bit samples to their high byte,
alpha composited on white, CMYK through Pillow's and stb_image's same formula), the orientation, and the
resize. Pillow only decodes; the header checks (sizes, pixel limit, EXIF orientation, transparency) and
the resize are ours, so both sides compute the same floats.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blockskip.runtime.errors import ImageError
from blockskip.runtime.formats import PHOTO_MAX_PIXELS, PHOTO_MIN_SIDE

if TYPE_CHECKING:
    from PIL import Image

SUPPORTED = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
# other image formats: refused with a message rather than silently left out
REFUSED = frozenset({".webp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif"})
MIN_SIDE = PHOTO_MIN_SIDE  # declared once in runtime/formats.py (formats.h for the native runner)
MAX_PIXELS = PHOTO_MAX_PIXELS


# ---------------------------------------------------------------------------------------------- listing


def _suffix(name: str) -> str:
    """pathlib's suffix, lower-cased in ASCII only (as the native runner does)."""
    i = name.rfind(".")
    ext = name[i:] if 0 < i < len(name) - 1 else ""
    return ext.lower() if ext.isascii() else ext


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root if root.endswith("/") else root + "/")


def list_images(folder: str | Path) -> list[Path]:
    """The photos of ``folder`` in name order; refuses the first entry (in that order) that cannot be used."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageError(
            f"image folder {str(folder)!r} does not exist; pass the folder of your photos with --images"
        )
    if not folder.is_dir():
        raise ImageError(f"{str(folder)!r} is not a folder; pass the folder of your photos with --images")
    root = os.path.realpath(folder)
    files = []
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise ImageError(
            f"cannot list the image folder {str(folder)!r}: {e.strerror}; "
            "pass the folder of your photos with --images"
        ) from e
    for name in names:
        if name.startswith("."):
            continue
        ext = _suffix(name)
        path = folder / name
        if ext in REFUSED:
            raise ImageError(
                f"{path}: {ext} photos are not supported; convert it to PNG or JPEG (or remove it)"
            )
        if ext not in SUPPORTED:
            continue
        if os.path.islink(path):
            try:
                real = os.path.realpath(path, strict=True)
            except OSError:
                raise ImageError(f"{path} is a broken link; copy the photo into the folder instead") from None
            if not _inside(real, root):
                raise ImageError(
                    f"{path} links outside the photo folder; copy the photo into the folder instead"
                )
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            regular = False
        if not regular:
            raise ImageError(f"{path} is not a file; remove it from the photo folder")
        files.append(path)
    if not files:
        raise ImageError(
            f"no images in {str(folder)!r} (looked for {', '.join(sorted(SUPPORTED))}); add 3-10 photos of the subject"
        )
    return files


# ------------------------------------------------------------------------------------- header checks


class _Unreadable(Exception):
    """The header cannot be read; the argument is the reason."""


@dataclass
class _Header:
    kind: str  # "PNG", "JPEG" or "BMP"
    width: int  # as stored (before the orientation)
    height: int
    png_depth: int = 8
    png_color: int = 2  # the PNG colour type
    png_key: tuple[int, ...] | None = None  # a gray or RGB PNG's transparent colour, as decoded samples
    alpha: bool = False  # the photo has an alpha channel or a transparency chunk: composited on white
    jpeg_components: int = 3
    jpeg_precision: int = 8
    jpeg_adobe_cmyk: bool = False  # 4 components are Adobe CMYK (APP14 "Adobe" transform 0): decoded
    orientation: int = 1  # EXIF orientation 1-8 (1: as stored)
    unsupported: str = ""  # a variant neither side decodes the same way: why
    truncated: bool = False

    def refuse(self, why: str) -> None:
        """The first unsupported variant found is the one named."""
        if not self.unsupported:
            self.unsupported = why


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _probe(d: bytes) -> _Header:
    if d.startswith(_PNG_SIGNATURE):
        return _probe_png(d)
    if d[:3] == b"\xff\xd8\xff":
        return _probe_jpeg(d)
    if d[:2] == b"BM":
        return _probe_bmp(d)
    raise _Unreadable("not a PNG, JPEG or BMP file")


def exif_orientation(tiff: bytes) -> int:
    """The orientation (tag 0x0112 of IFD0, one SHORT, 1-8) of an EXIF block (a TIFF header and its
    IFDs); 1 when the block is malformed, has no such entry, or holds another value."""
    n = len(tiff)
    if n < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    if struct.unpack_from(e + "H", tiff, 2)[0] != 42:
        return 1
    ifd = struct.unpack_from(e + "I", tiff, 4)[0]
    if ifd + 2 > n:
        return 1
    for i in range(struct.unpack_from(e + "H", tiff, ifd)[0]):
        at = ifd + 2 + 12 * i
        if at + 12 > n:
            return 1
        tag, kind, count = struct.unpack_from(e + "HHI", tiff, at)
        if tag == 0x0112:
            value = struct.unpack_from(e + "H", tiff, at + 8)[0]
            return value if kind == 3 and count == 1 and 1 <= value <= 8 else 1
    return 1


_EXIF = b"Exif\0\0"


def _probe_png(d: bytes) -> _Header:
    n = len(d)
    if n < 33:  # signature + the IHDR chunk
        raise _Unreadable("truncated")
    if d[12:16] != b"IHDR" or struct.unpack_from(">I", d, 8)[0] != 13:
        raise _Unreadable("the PNG does not start with its header (IHDR)")
    w, h = struct.unpack_from(">II", d, 16)
    head = _Header("PNG", w, h, png_depth=d[24], png_color=d[25], truncated=True)
    head.alpha = head.png_color in (4, 6)
    # every chunk whole, up to IEND; the checksums of the chunks before the image data (Pillow checks
    # them, stb_image does not); no critical chunk stb_image does not know (Pillow skips them)
    pos, idat, palette, trns, exif = 8, False, -1, False, False
    while pos + 8 <= n:
        length = struct.unpack_from(">I", d, pos)[0]
        end = pos + 12 + length
        if end > n:
            break
        kind = d[pos + 4 : pos + 8]
        if kind == b"IEND":
            head.truncated = False
            break
        idat = idat or kind == b"IDAT"
        if not idat and zlib.crc32(d[pos + 4 : end - 4]) != struct.unpack_from(">I", d, end - 4)[0]:
            raise _Unreadable("bad checksum in a PNG chunk before the image data")
        if not kind[0] & 0x20 and kind not in (b"IHDR", b"PLTE", b"IDAT"):
            head.refuse("PNG with an unknown critical chunk")
        body = d[pos + 8 : end - 4]
        if kind == b"PLTE" and not idat and palette < 0:
            palette = length // 3
        elif kind == b"eXIf" and not idat and not exif:
            exif = True
            head.orientation = exif_orientation(body[6:] if body.startswith(_EXIF) else body)
        elif kind == b"tRNS":
            _png_transparency(head, body, idat, trns, palette)
            trns = True
        pos = end
    return head


def _png_transparency(head: _Header, body: bytes, idat: bool, again: bool, palette: int) -> None:
    """A tRNS chunk: the palette's alphas, or the one transparent gray / RGB colour. The variants the two
    decoders read differently (or one refuses) are refused."""
    if idat:
        return head.refuse("PNG transparency chunk (tRNS) after the image data")
    if again:
        return head.refuse("PNG with more than one transparency chunk (tRNS)")
    color, depth = head.png_color, head.png_depth
    if color == 3:
        if palette < 0:
            return head.refuse("PNG transparency chunk (tRNS) before the palette")
        if len(body) > palette:
            return head.refuse("PNG transparency chunk (tRNS) longer than the palette")
        head.alpha = True
    elif color in (0, 2):
        channels = 1 if color == 0 else 3
        if len(body) != 2 * channels:
            return head.refuse("PNG transparency chunk (tRNS) of the wrong length")
        key = struct.unpack(f">{channels}H", body)
        if depth not in (1, 2, 4, 8, 16) or max(key) >= 1 << depth:
            return head.refuse("PNG transparent colour (tRNS) out of range for the bit depth")
        if depth == 16 and color == 2:
            return head.refuse("16-bit RGB PNG with a transparent colour (tRNS) is not supported")
        scale = {1: 0xFF, 2: 0x55, 4: 0x11}.get(depth, 1)  # low bit depths decode scaled to 0..255
        head.png_key = tuple(k * scale for k in key)
        head.alpha = True
    else:
        head.refuse("PNG transparency chunk (tRNS) on an image with an alpha channel")


def _probe_jpeg(d: bytes) -> _Header:
    n = len(d)
    pos = 2
    head: _Header | None = None
    sof = 0
    truncated = True
    scanned = False  # an SOS seen: the segments after it are not the header's
    orientation = 0  # 0: no EXIF segment yet
    adobe: list[int] = []  # the colour transform of each Adobe APP14 segment (-1: unreadable), in file order
    adobe_before_scan = False
    while True:
        pos = d.find(b"\xff", pos)  # bytes between segments are skipped, as decoders do
        if pos < 0:
            break
        while pos < n and d[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        m = d[pos]
        pos += 1
        if m == 0xD9:  # EOI
            truncated = False
            break
        if 0xD0 <= m <= 0xD8 or m == 0x01:  # RSTn, SOI, TEM: no length
            continue
        if pos + 2 > n:
            break
        length = struct.unpack_from(">H", d, pos)[0]
        if length < 2:
            raise _Unreadable("corrupt JPEG marker segment")
        if pos + length > n:
            break
        if m in _SOF and head is None:
            if length < 8:
                raise _Unreadable("corrupt JPEG frame header")
            h, w = struct.unpack_from(">HH", d, pos + 3)
            head = _Header("JPEG", w, h, jpeg_components=d[pos + 7], jpeg_precision=d[pos + 2])
            sof = m - 0xC0
        body = d[pos + 2 : pos + length]
        if m == 0xE1 and not scanned and not orientation and body.startswith(_EXIF):
            orientation = exif_orientation(body[6:])
        elif m == 0xEE and body.startswith(b"Adobe"):
            adobe.append(body[11] if len(body) >= 12 and body[5] == 0 else -1)
            adobe_before_scan = adobe_before_scan or not scanned
        pos += length
        if m == 0xDA:  # SOS: skip the entropy-coded data to the next marker that is not FF00 or RSTn
            if head is None:
                raise _Unreadable("no JPEG frame header (SOF) before the image data")
            scanned = True
            while True:
                pos = d.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    pos = n
                    break
                b = d[pos + 1]
                if b == 0x00 or 0xD0 <= b <= 0xD7:
                    pos += 2
                elif b == 0xFF:
                    pos += 1
                else:
                    break
    if head is None:
        if truncated:
            raise _Unreadable("truncated")
        raise _Unreadable("no JPEG frame header (SOF)")
    head.truncated = truncated
    head.orientation = orientation or 1
    head.jpeg_adobe_cmyk = adobe_before_scan and set(adobe) == {0}
    if sof not in (0, 1, 2):
        head.unsupported = f"JPEG coding process SOF{sof} is not supported (only baseline and progressive)"
    elif head.jpeg_components not in (1, 3, 4):
        head.unsupported = f"JPEG with {head.jpeg_components} color components is not supported"
    return head


def _probe_bmp(d: bytes) -> _Header:
    n = len(d)
    if n < 26:  # file header + the smallest (OS/2) info header
        raise _Unreadable("truncated")
    offset, hsz = struct.unpack_from("<II", d, 10)
    if hsz == 12:
        w, h, _, bpp = struct.unpack_from("<HHHH", d, 18)
        compression = 0
    elif hsz in (40, 56, 108, 124):
        if n < 14 + 40:
            raise _Unreadable("truncated")
        w, h, _, bpp, compression = struct.unpack_from("<iiHHI", d, 18)
        if w < 0:
            raise _Unreadable("corrupt BMP header (negative width)")
        h = abs(h)  # negative: rows stored top-down
    else:
        raise _Unreadable(f"unsupported BMP header ({hsz} bytes)")
    head = _Header("BMP", w, h)
    if bpp not in (1, 4, 8, 24, 32):
        head.unsupported = f"{bpp}-bit BMP is not supported"
    elif compression == 3 and bpp == 32:
        if n < 14 + 40 + (16 if hsz > 40 else 12):
            raise _Unreadable("truncated")
        # the masks follow a 40-byte header, or are in the larger ones (with the alpha mask after them)
        if hsz == 56:  # stb_image reads the masks of this header from the wrong place
            head.unsupported = "BMP with a 56-byte header and bit fields is not supported"
        elif struct.unpack_from("<III", d, 54) != (0xFF0000, 0xFF00, 0xFF) or (
            hsz > 40 and struct.unpack_from("<I", d, 66)[0] not in (0, 0xFF000000)
        ):
            head.unsupported = "BMP with unusual bit fields is not supported"
        else:
            head.alpha = hsz > 40 and struct.unpack_from("<I", d, 66)[0] == 0xFF000000
    elif compression != 0:
        head.unsupported = "compressed BMP is not supported"
    stride = (w * bpp + 31) // 32 * 4
    head.truncated = offset + stride * h > n
    return head


def _check(path: Path, data: bytes) -> _Header:
    """The checks before decoding, in their order (docs/formats.md, "Photos")."""
    if not data:
        raise ImageError(f"{path} is empty; remove or replace it")
    try:
        head = _probe(data)
    except _Unreadable as e:
        raise ImageError(f"cannot read image {path}: {e}; remove or replace it") from None
    w, h = head.width, head.height
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{path} is too small ({w}x{h}); use photos of at least {MIN_SIDE} px")
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{path} is too large ({w}x{h}, more than {MAX_PIXELS // 1_000_000} Mpx); downscale it first"
        )
    if head.kind == "JPEG" and head.jpeg_components == 4 and not head.jpeg_adobe_cmyk:
        raise ImageError(
            f"{path} is a 4-channel JPEG other than Adobe CMYK (YCCK, or no Adobe marker); "
            "save it as an RGB JPEG or PNG"
        )
    if head.kind == "JPEG" and head.jpeg_precision != 8:
        raise ImageError(f"{path} is a {head.jpeg_precision}-bit JPEG; save it as an 8-bit JPEG or PNG")
    if head.unsupported:
        raise ImageError(f"cannot read image {path}: {head.unsupported}; remove or replace it")
    if head.truncated:
        raise ImageError(f"cannot read image {path}: truncated; remove or replace it")
    return head


# the Pillow modes a PNG, JPEG or BMP decodes to, read through convert("RGB") / convert("RGBA")
_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr"})
_GRAY16 = frozenset({"I;16", "I;16B", "I;16L", "I"})  # a 16-bit gray PNG


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[h, w, 4] uint8 -> [h, w, 3] uint8: round((c a + 255 (255 - a)) / 255), in integers (half up)."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _to_rgb(path: Path, im: Image.Image, head: _Header) -> np.ndarray:
    """[h, w, 3] uint8 of a decoded image (docs/formats.md, "Photos", "Decoding")."""
    if im.mode in _GRAY16 and head.kind == "PNG" and head.png_color == 0 and head.png_depth == 16:
        v = np.asarray(im)  # 0..65535
        gray = (v >> 8).astype(np.uint8)  # the high byte, as stb_image and Pillow's other 16-bit modes
        if head.png_key is not None:
            gray[v == head.png_key[0]] = 255  # the transparent colour, composited on white
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode not in _MODES:  # e.g. a float or 32-bit integer image: no defined 8-bit reading
        raise ImageError(
            f"{path} decodes to Pillow mode {im.mode!r}, which has no defined 8-bit RGB reading; "
            "save it as an 8-bit PNG or JPEG"
        )
    if head.png_key is not None:  # gray or RGB with a transparent colour: our comparison, as stb_image's
        rgb = np.array(im.convert("RGB"), dtype=np.uint8)
        samples = rgb[..., :1] if head.png_color == 0 else rgb
        rgb[np.all(samples == np.asarray(head.png_key, np.uint8), axis=-1)] = 255
        return rgb
    if head.alpha:
        return composite_on_white(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """[h, w, c] as stored -> upright, for EXIF orientation 1-8 (what ImageOps.exif_transpose does)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:  # rotated 90 degrees clockwise to be upright
        return a[::-1].transpose(1, 0, 2)
    if orientation == 7:
        return a[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return a[:, ::-1].transpose(1, 0, 2)
    return a


def _decode_rgb(path: Path, data: bytes, head: _Header) -> np.ndarray:
    """[h, w, 3] uint8, upright: Pillow decodes, :func:`_to_rgb` makes 8-bit RGB, :func:`orient`."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's about metadata we do not read (e.g. corrupt EXIF)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "BMP"]) as im:
                if im.format not in ("PNG", "JPEG", "MPO", "BMP") or im.size != (head.width, head.height):
                    raise ValueError(f"decoded as {im.format} {im.size[0]}x{im.size[1]}")
                rgb = _to_rgb(path, im, head)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as e:
        reason = "truncated" if "truncated" in str(e) else (str(e) or type(e).__name__)
        raise ImageError(f"cannot read image {path}: {reason}; remove or replace it") from e
    return orient(rgb, head.orientation)


# -------------------------------------------------------------------------------------------- resize


def _cubic(x: float) -> float:
    """Keys' cubic convolution kernel, a = -0.5 (Pillow's bicubic_filter, operation for operation)."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def resize_coeffs(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs for the bicubic filter: for each output the first input index and the
    normalised weights, as ([n_out, taps] input indices, [n_out, taps] float64 weights), padded with zero
    weights (pointing at a valid input) to the widest output."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    rows = []
    for i in range(n_out):
        center = (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        ws = [_cubic((x + xmin - center + 0.5) * ss) for x in range(xmax - xmin)]
        total = 0.0
        for w in ws:  # in order, as the native runner sums them
            total += w
        if total != 0.0:
            ws = [w / total for w in ws]
        rows.append((xmin, ws))
    taps = max(len(ws) for _, ws in rows)
    index = np.empty((n_out, taps), np.intp)
    weight = np.zeros((n_out, taps), np.float64)
    for i, (xmin, ws) in enumerate(rows):
        index[i] = xmin + np.minimum(np.arange(taps), max(len(ws) - 1, 0))
        weight[i, : len(ws)] = ws
    return index, weight


def _resample_axis1(a: np.ndarray, index: np.ndarray, weight: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[rows, n_in, 3] -> [rows, n_out, 3] float64: for each output, sum over its taps in order of
    weight * input (each product rounded, then added: the native runner's loop without FMA)."""
    rows, n_out = a.shape[0], index.shape[0]
    out = np.empty((rows, n_out, a.shape[2]), np.float64)
    for r in range(0, rows, chunk):
        block = a[r : r + chunk]
        acc = np.zeros((block.shape[0], n_out, a.shape[2]), np.float64)
        for t in range(index.shape[1]):
            acc += weight[None, :, t, None] * block[:, index[:, t], :]
        out[r : r + chunk] = acc
    return out


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """[s, s, 3] uint8 -> [size, size, 3] float64 levels (0..255, not rounded): separable bicubic,
    horizontal pass first; no filtering when s == size."""
    s = rgb.shape[0]
    if s == size:
        return rgb.astype(np.float64)
    index, weight = resize_coeffs(s, size)
    across = _resample_axis1(rgb, index, weight)  # [s, size, 3]
    down = _resample_axis1(across.transpose(1, 0, 2), index, weight)  # [size (x), size (y), 3]
    return down.transpose(1, 0, 2)


# ------------------------------------------------------------------------------------------- loading


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Return [3, size, size] float32 in [-1, 1]."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror or e}; remove or replace it") from e
    head = _check(path, data)
    rgb = _decode_rgb(path, data, head)
    h, w = rgb.shape[:2]
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    v = resize_square(rgb[top : top + s, left : left + s], size)
    return (v / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1).copy()


def load_images(folder: str | Path, size: int) -> tuple[list[Path], np.ndarray]:
    files = list_images(folder)
    return files, np.stack([load_image(p, size) for p in files])
