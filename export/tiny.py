"""The built-in models, built in-process (nothing is downloaded).

* ``tiny`` (the default): a pretrained text-to-image DiT shipped in the repo. A diffusers
  ``FluxTransformer2DModel`` (3 double + 6 single blocks, width 192, 7.6 M parameters) with the fixed
  ``PatchDCTAutoencoder`` latent mapping (64 px image <-> 16 x 16 x 16 latent) and the weightless
  ``WordTextEncoder``; weights in ``export/weights/tiny-flux.safetensors``, made by
  ``python -m tools.pretrain_tiny`` (the exact command is in the file's metadata).
* ``tiny-random``: a seeded random FLUX-architecture DiT with 6 small blocks, the seeded
  ``TinyAutoencoder`` and ``TinyTextEncoder``; fast, for tests and benchmarks of the mechanics.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from blockskip.runtime.backends.torch_families.latent import PatchDCTAutoencoder, TinyAutoencoder
from blockskip.runtime.errors import ModelError

BUILTIN_MODELS = ("tiny", "tiny-random")

# tiny: the pretrained model's architecture, text encoder and latent mapping (pretrain_tiny trains it)
TINY_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=3,
    num_single_layers=6,
    attention_head_dim=32,
    num_attention_heads=6,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(4, 14, 14),
)
TEXT = dict(dim=64, pooled_dim=64, tokens=16)  # WordTextEncoder, matching the two text dims above
LATENT = dict(luma=10, chroma=3)  # PatchDCTAutoencoder: 16 channels
TINY_SIZE = 64  # px, the image side it was pretrained at (RoPE positions also of crops of a 2x frame)
WEIGHTS = Path(__file__).resolve().parent / "weights" / "tiny-flux.safetensors"

# tiny-random
TINY_FLUX: dict[str, Any] = dict(
    patch_size=1,
    in_channels=32,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
TINY_LATENT = dict(factor=4, latent_channels=8)  # 128 px photo -> 8 x 32 x 32 latent
TEXT_TOKENS = 8


def weights_metadata(path: Path = WEIGHTS) -> dict:
    """The pretrained weights' safetensors metadata (config, command, seed, losses), header only."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(
            f"the built-in tiny model's weights are missing ({path}); reinstall the package or "
            "recreate them with python -m tools.pretrain_tiny"
        )
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def pretrained_config(path: Path = WEIGHTS) -> dict:
    cfg = json.loads(weights_metadata(path)["config"])
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return cfg


def load_pretrained_transformer(dtype=torch.float32, path: Path = WEIGHTS):
    """The pretrained tiny FluxTransformer2DModel (EMA weights), in ``dtype``."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from blockskip.runtime.backends.torch_families.base import DiffusersModel

    cfg = pretrained_config(path)
    model: DiffusersModel = FluxTransformer2DModel(**cfg)
    state = load_file(str(path))
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ModelError(
            f"{path} does not match the tiny model's architecture ({len(missing)} tensor names "
            f"differ, e.g. {sorted(missing)[0]!r})"
        )
    model.load_state_dict(state)  # copies (and casts) into the float32 parameters
    return _cast(model, dtype).eval()


def _cast(model, dtype):
    if dtype == torch.float32:
        return model
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # .to() warns about fp32-kept modules; the tiny models have none
    try:
        return model.to(dtype)
    finally:
        dlogging.set_verbosity(level)


def build_pretrained_encoder() -> PatchDCTAutoencoder:
    return PatchDCTAutoencoder(**LATENT).eval()


def build_text_encoder():
    from blockskip.export.text_encoder import WordTextEncoder

    return WordTextEncoder(**TEXT)


def build_tiny_transformer(seed: int = 0, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    from blockskip.runtime.backends.torch_families.base import DiffusersModel

    torch.manual_seed(seed)
    model: DiffusersModel = FluxTransformer2DModel(**TINY_FLUX)
    model.eval()
    with torch.no_grad():  # diffusers zero-initialises some output layers; give every path signal
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return _cast(model, dtype)


def build_tiny_encoder(seed: int = 0) -> TinyAutoencoder:
    return TinyAutoencoder(**TINY_LATENT, seed=seed).eval()


class TinyTextEncoder:
    """Deterministic text encoder: each word hashes to a seeded random vector; pooled = mean."""

    def __init__(
        self,
        dim: int = TINY_FLUX["joint_attention_dim"],
        pooled_dim: int = TINY_FLUX["pooled_projection_dim"],
        tokens: int = TEXT_TOKENS,
    ):
        self.dim, self.pooled_dim, self.tokens = dim, pooled_dim, tokens

    def _vec(self, word: str, dim: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") % (2**63)
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, prompt: str) -> dict[str, torch.Tensor]:
        words = prompt.lower().split()[: self.tokens] or [""]
        emb = torch.zeros(1, self.tokens, self.dim)
        for i, w in enumerate(words):
            emb[0, i] = self._vec(w, self.dim)
        pooled = torch.stack([self._vec("pool:" + w, self.pooled_dim) for w in words]).mean(0, keepdim=True)
        return {"prompt_embeds": emb, "pooled": pooled}
