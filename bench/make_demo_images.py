"""Write the demo subject photos: training views (crops, flips, scales) of skimage's chelsea cat, and
held-out views (other crops) for evaluation; a procedurally drawn scene stands in when scikit-image is
not installed. Usage: python -m bench.make_demo_images OUT_DIR [HELDOUT_DIR]"""

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
        print(
            "warning: scikit-image is not installed (pip install 'dit-blockskip[data]'); using a drawn "
            "stand-in subject instead of the chelsea cat",
            file=sys.stderr,
        )
        yy, xx = np.mgrid[0:300, 0:400]
        img = np.zeros((300, 400, 3), np.uint8)
        img[..., 0] = (xx * 255 // 400).astype(np.uint8)
        img[..., 1] = (yy * 255 // 300).astype(np.uint8)
        disk = (yy - 150) ** 2 + (xx - 200) ** 2 < 90**2
        img[disk] = (240, 200, 40)
        return img


def _square(im: Image.Image, cx: float, cy: float, frac: float) -> Image.Image:
    """A square crop of side ``frac`` * the short side, centred at (cx, cy) in [0, 1], kept inside."""
    w, h = im.size
    s = int(min(w, h) * frac)
    x = min(max(int(cx * w - s / 2), 0), w - s)
    y = min(max(int(cy * h - s / 2), 0), h - s)
    return im.crop((x, y, x + s, y + s))


def views(img: np.ndarray) -> list[Image.Image]:
    """Training views: the whole face at several scales and positions, and mirror images."""
    im = Image.fromarray(img)
    spec = [
        (0.5, 0.5, 1.0),
        (0.45, 0.45, 0.85),
        (0.55, 0.5, 0.8),
        (0.5, 0.55, 0.9),
        (0.4, 0.5, 0.95),
        (0.6, 0.45, 0.75),
    ]
    out = [_square(im, *s) for s in spec]
    out += [v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for v in out[:2]]
    return out


def heldout_views(img: np.ndarray) -> list[Image.Image]:
    """Held-out views: crops and a slight rotation the training views do not contain."""
    im = Image.fromarray(img)
    out = [_square(im, 0.35, 0.4, 0.7), _square(im, 0.65, 0.6, 0.7)]
    out.append(_square(im.rotate(8, resample=Image.BICUBIC), 0.5, 0.5, 0.8))
    out.append(_square(im, 0.5, 0.5, 0.65).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return out


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    out = Path(argv[0] if argv else "out/demo/photos")
    out.mkdir(parents=True, exist_ok=True)
    img = subject()
    train = views(img)
    for i, v in enumerate(train):
        v.save(out / f"view_{i}.png")
    msg = f"{len(train)} photos in {out}"
    if len(argv) > 1:
        held = Path(argv[1])
        held.mkdir(parents=True, exist_ok=True)
        hv = heldout_views(img)
        for i, v in enumerate(hv):
            v.save(held / f"heldout_{i}.png")
        msg += f", {len(hv)} held-out views in {held}"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
