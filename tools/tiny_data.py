"""Captioned pretraining data for the built-in tiny model (research tooling; not shipped).

Everything comes from code or from images that ship inside packages, so pretraining runs offline and is
reproducible from a seed:

* procedural scenes: circles, squares, triangles, stars and diamonds in twelve named colours, at
  stated sizes, positions and counts, on plain, striped or gradient backgrounds, with captions built
  from the same words ("a big red circle on the left on a blue background", "three yellow stars on a
  black and white striped background", "a green square and a pink triangle on a gray background");
* photos bundled with scikit-image and scikit-learn (astronaut, coffee, rocket, motorcycle, temple,
  flower, moon, coins, ...), cut into random square crops, captioned "a photo of ..." / "a close up
  photo of ...". ``skimage.data.chelsea()`` (also ``cat()``) is left out on purpose: it is the
  held-out subject that personalisation teaches;
* scikit-learn's handwritten digits ("a handwritten digit seven") and the 100 faces of scikit-image's
  LFW subset ("a black and white photo of a face").

``TinyCaptionData(size, seed).batch(step, n)`` is a pure function of (seed, step, n): the same call
always gives the same images and captions, so a run can be repeated or resumed. ``WordTextEncoder``
turns a caption into FLUX-style text inputs (per-token embeddings and a pooled vector); it ships with the
model in ``blockskip.export.text_encoder`` and is re-exported here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw

from blockskip.export.text_encoder import WordTextEncoder, words_of

__all__ = ["GRID_CAPTIONS", "TinyCaptionData", "WordTextEncoder", "render_scene", "words_of"]

COLOURS = {
    "red": (220, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 25),
    "purple": (125, 45, 170),
    "pink": (245, 125, 185),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (115, 70, 35),
    "cyan": (40, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": (0.10, 0.15), "big": (0.30, 0.40), "": (0.12, 0.36)}  # radius / image side
POSITIONS = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}  # centre (x, y) / side
COUNTS = {2: "two", 3: "three", 4: "four"}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# (loader, caption, may be flipped left-right). Loaders are names in skimage.data or sklearn sample
# images; grey images are captioned "black and white".
PHOTOS = (
    ("skimage:astronaut", "a photo of an astronaut", True),
    ("skimage:coffee", "a photo of a cup of coffee", True),
    ("skimage:rocket", "a photo of a rocket", True),
    ("skimage:motorcycle", "a photo of a motorcycle", True),
    ("sklearn:china.jpg", "a photo of a temple", True),
    ("sklearn:flower.jpg", "a photo of a flower", True),
    ("skimage:hubble_deep_field", "a photo of galaxies in space", True),
    ("skimage:retina", "a photo of a retina", True),
    ("skimage:immunohistochemistry", "a microscope photo of tissue", True),
    ("skimage:colorwheel", "a color wheel", False),
    ("skimage:camera", "a black and white photo of a cameraman", True),
    ("skimage:coins", "a black and white photo of coins", True),
    ("skimage:moon", "a black and white photo of the moon", True),
    ("skimage:brick", "a black and white photo of a brick wall", True),
    ("skimage:grass", "a black and white photo of grass", True),
    ("skimage:gravel", "a black and white photo of gravel", True),
    ("skimage:clock", "a black and white photo of a clock", False),
    ("skimage:page", "a black and white page of text", False),
    ("skimage:cell", "a black and white microscope photo of a cell", True),
    ("skimage:horse", "a black horse on a white background", True),
)
HELD_OUT = ("chelsea", "cat")  # the personalisation subject never appears in pretraining

# Which kind of example a draw makes, with its probability.
MIX = (("scene", 0.55), ("photo", 0.33), ("digit", 0.08), ("face", 0.04))

# Fixed captions for sample grids: shapes, colours, layouts and photos from the training captions.
GRID_CAPTIONS = (
    "a red circle on a white background",
    "a big blue square on a yellow background",
    "a small green triangle on a black background",
    "a yellow star in the middle on a purple background",
    "an orange diamond on the left on a cyan background",
    "three white circles on a blue background",
    "a red square and a green circle on a white background",
    "a pink star on a black and white striped background",
    "a photo of an astronaut",
    "a photo of a cup of coffee",
    "a photo of a rocket",
    "a photo of a flower",
    "a black and white photo of the moon",
    "a black and white photo of coins",
    "a handwritten digit three",
    "a black and white photo of a face",
)

SUPERSAMPLE = 4  # scenes are drawn this much larger, then box-filtered (anti-aliasing)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _jitter(rng: np.random.Generator, rgb, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if kind == "triangle":
        return [
            (cx + r * np.cos(a), cy + 0.15 * r + r * np.sin(a)) for a in np.pi * (-0.5 + 2 / 3 * np.arange(3))
        ]
    if kind == "star":
        pts = []
        for i in range(10):
            a, rr = -np.pi / 2 + i * np.pi / 5, (r if i % 2 == 0 else r * 0.45)
            pts.append((cx + rr * np.cos(a), cy + 0.05 * r + rr * np.sin(a)))
        return pts
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rgb) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_shape_polygon(kind, cx, cy, r), fill=rgb)


def _background(rng: np.random.Generator, big: int, avoid: set[str]) -> tuple[Image.Image, str, set[str]]:
    names = [c for c in COLOURS if c not in avoid]
    style = rng.choice(3, p=[0.6, 0.2, 0.2])
    c1 = str(rng.choice(names))
    if style == 0:
        return (
            Image.new("RGB", (big, big), _jitter(rng, COLOURS[c1])),
            f"{_article(c1)} {c1} background",
            {c1},
        )
    c2 = str(rng.choice([c for c in names if c != c1]))
    a, b = np.array(_jitter(rng, COLOURS[c1]), float), np.array(_jitter(rng, COLOURS[c2]), float)
    coord = np.arange(big, dtype=float)
    if style == 1:  # stripes, horizontal or vertical
        period = big / rng.integers(3, 7)
        t = (np.floor(coord / (period / 2)) % 2)[:, None]
        desc = f"{_article(c1)} {c1} and {c2} striped background"
    else:  # gradient from top to bottom
        t = (coord / (big - 1))[:, None]
        desc = f"{_article(c1)} {c1} to {c2} gradient background"
    line = (1 - t) * a + t * b  # [big, 3]
    arr = np.broadcast_to(line[:, None, :], (big, big, 3))
    if style == 1 and rng.random() < 0.5:
        arr = arr.transpose(1, 0, 2)
    return Image.fromarray(np.ascontiguousarray(arr).astype(np.uint8)), desc, {c1, c2}


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One procedural scene: uint8 [size, size, 3] and its caption."""
    big = size * SUPERSAMPLE
    kind = rng.choice(3, p=[0.5, 0.25, 0.25])  # one shape / several alike / two different
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    if kind == 2:
        shape2 = str(rng.choice([s for s in SHAPES if s != shape]))
        colour2 = str(rng.choice(list(COLOURS)))
        used = {colour, colour2}
    else:
        used = {colour}
    bg, bg_desc, _ = _background(rng, big, used)
    draw = ImageDraw.Draw(bg)
    fill = _jitter(rng, COLOURS[colour])
    if kind == 0:
        size_word = str(rng.choice(list(SIZES), p=[0.3, 0.3, 0.4]))
        r = rng.uniform(*SIZES[size_word])
        if rng.random() < 0.6:
            pos_word = str(rng.choice(list(POSITIONS)))
            cx, cy = (np.array(POSITIONS[pos_word]) + rng.uniform(-0.05, 0.05, 2)).tolist()
        else:
            pos_word = ""
            cx, cy = rng.uniform(r + 0.02, 0.98 - r, 2).tolist()
        cx, cy = float(np.clip(cx, r, 1 - r)), float(np.clip(cy, r, 1 - r))
        _draw_shape(draw, shape, cx * big, cy * big, r * big, fill)
        words = [w for w in (_article(size_word or colour), size_word, colour, shape, pos_word) if w]
        caption = " ".join(words) + " on " + bg_desc
    elif kind == 1:
        n = int(rng.integers(2, 5))
        r = rng.uniform(0.09, 0.16)
        centres: list[np.ndarray] = []
        for _ in range(200):  # rejection sampling: keep shapes apart
            c = rng.uniform(r + 0.02, 0.98 - r, 2)
            if all(np.hypot(*(c - o)) > 2.1 * r for o in centres):
                centres.append(c)
                if len(centres) == n:
                    break
        n = len(centres)
        for c in centres:
            _draw_shape(draw, shape, c[0] * big, c[1] * big, r * big, fill)
        caption = (
            f"{COUNTS[n]} {colour} {shape}s on " if n > 1 else f"{_article(colour)} {colour} {shape} on "
        ) + bg_desc
    else:  # first named on the left, second on the right
        r = rng.uniform(0.13, 0.21)
        for k, (s, c) in enumerate(((shape, fill), (shape2, _jitter(rng, COLOURS[colour2])))):
            cx = (0.27 if k == 0 else 0.73) + rng.uniform(-0.04, 0.04)
            cy = rng.uniform(0.3, 0.7)
            _draw_shape(draw, s, cx * big, cy * big, r * big, c)
        caption = (
            f"{_article(colour)} {colour} {shape} and {_article(colour2)} {colour2} {shape2} on " + bg_desc
        )
    img = bg.resize((size, size), Image.BOX)
    return np.asarray(img), caption


def _load_photo(source: str) -> np.ndarray:
    lib, name = source.split(":")
    if any(h in name for h in HELD_OUT):
        raise ValueError(f"{name} is the held-out personalisation subject")
    if lib == "sklearn":
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(name)
    else:
        import skimage.data

        arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    return tuple(_load_photo(src) for src, _, _ in PHOTOS)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(int)


@functools.lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    import skimage.data

    return (skimage.data.lfw_subset()[:100] * 255).round().astype(np.uint8)  # the first 100 are faces


def photo_crop(rng: np.random.Generator, size: int, index: int | None = None) -> tuple[np.ndarray, str]:
    """A random square crop (50-100 % of the short side) of a bundled photo, resized to ``size``."""
    photos = _photos()
    i = int(rng.integers(len(PHOTOS))) if index is None else index
    arr, (_, caption, flip) = photos[i], PHOTOS[i]
    h, w = arr.shape[:2]
    frac = rng.uniform(0.5, 1.0) if rng.random() < 0.75 else 1.0
    side = max(size, int(min(h, w) * frac))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    img = Image.fromarray(arr[top : top + side, left : left + side]).resize((size, size), Image.BOX)
    out = np.asarray(img)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    if frac < 0.7 and caption.startswith(("a photo", "a black and white photo")):
        caption = caption.replace("photo", "close up photo", 1)
    return np.ascontiguousarray(out), caption


def digit_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    images, labels = _digits()
    i = int(rng.integers(len(images)))
    img = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC)
    arr = np.repeat(np.asarray(img)[..., None], 3, axis=2)
    return arr, f"a handwritten digit {DIGITS[labels[i]]}"


def face_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    faces = _faces()
    img = Image.fromarray(faces[int(rng.integers(len(faces)))]).resize((size, size), Image.BICUBIC)
    arr = np.repeat(np.asarray(img)[..., None], 3, axis=2)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr), "a black and white photo of a face"


class TinyCaptionData:
    """Seeded, endless captioned images. ``batch(step, n)`` depends only on (seed, step, n)."""

    def __init__(self, size: int = 64, seed: int = 0, mix=MIX):
        if size % 8:
            raise ValueError("size must be a multiple of 8 (4 px latent patches, 2 x 2 token packing)")
        self.size, self.seed = size, seed
        self.kinds = [k for k, _ in mix]
        p = np.array([w for _, w in mix], dtype=float)
        self.p = p / p.sum()

    def example(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.p))]
        if kind == "scene":
            return render_scene(rng, self.size)
        if kind == "photo":
            return photo_crop(rng, self.size)
        if kind == "digit":
            return digit_image(rng, self.size)
        if kind == "face":
            return face_image(rng, self.size)
        raise ValueError(f"unknown kind {kind!r}")

    def batch(self, step: int, n: int) -> tuple[torch.Tensor, list[str]]:
        """Images [n, 3, size, size] in [-1, 1] and their captions."""
        rng = np.random.default_rng([self.seed, step])
        imgs, caps = zip(*(self.example(rng) for _ in range(n)))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, list(caps)

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step, 1)
            step += 1
