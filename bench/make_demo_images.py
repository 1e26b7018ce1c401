"""Write the demo subject photos: views (crops, flips, scales) of skimage's chelsea cat if scikit-image
is installed, else of a procedurally drawn scene. Usage: python -m bench.make_demo_images OUT_DIR"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def subject() -> np.ndarray:
    try:
        from skimage import data

        return data.chelsea()
    except ImportError:
        yy, xx = np.mgrid[0:300, 0:400]
        img = np.zeros((300, 400, 3), np.uint8)
        img[..., 0] = (xx * 255 // 400).astype(np.uint8)
        img[..., 1] = (yy * 255 // 300).astype(np.uint8)
        disk = (yy - 150) ** 2 + (xx - 200) ** 2 < 90**2
        img[disk] = (240, 200, 40)
        return img


def views(img: np.ndarray) -> list[Image.Image]:
    im = Image.fromarray(img)
    w, h = im.size
    s = min(w, h)
    out = [im.crop(((w - s) // 2, 0, (w - s) // 2 + s, s))]
    out.append(out[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    out.append(im.crop((0, 0, int(s * 0.85), int(s * 0.85))))
    out.append(im.crop((w - int(s * 0.9), h - int(s * 0.9), w, h)))
    out.append(out[0].resize((s // 2, s // 2)))
    return out


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    out = Path(argv[0] if argv else "out/demo/photos")
    out.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(views(subject())):
        v.save(out / f"view_{i}.png")
    print(f"{len(views(subject()))} photos in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
