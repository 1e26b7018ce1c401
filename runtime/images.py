"""Load the user's photos: square centre crop, resized to s_max, as float32 in [-1, 1] (numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blockskip.runtime.errors import ImageError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise ImageError(f"image folder {str(folder)!r} does not exist; pass the folder of your photos with --images")
    if not folder.is_dir():
        raise ImageError(f"{str(folder)!r} is not a folder; pass the folder of your photos with --images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ImageError(
            f"no images in {str(folder)!r} (looked for {', '.join(sorted(EXTENSIONS))}); add 3-10 photos of the subject"
        )
    return files


def load_image(path: Path, size: int) -> np.ndarray:
    """Return [3, size, size] float32 in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            if s < 8:
                raise ImageError(f"{path} is too small ({w}x{h}); use photos of at least 64 px")
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}; remove or replace it") from e
    return (a / 127.5 - 1.0).transpose(2, 0, 1).copy()


def load_images(folder: str | Path, size: int) -> tuple[list[Path], np.ndarray]:
    files = list_images(folder)
    return files, np.stack([load_image(p, size) for p in files])
