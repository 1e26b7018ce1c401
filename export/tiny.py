"""The built-in ``tiny`` model: a seeded small FLUX-architecture DiT, its latent mapping and text encoder.

Random weights for now (a pretrained one replaces them later); everything is built in-process from a
seed, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib

import torch

from blockskip.runtime.backends.torch_families.latent import TinyAutoencoder

TINY_FLUX = dict(
    patch_size=1, in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
TINY_LATENT = dict(factor=4, latent_channels=8)  # 128 px photo -> 8 x 32 x 32 latent
TEXT_TOKENS = 8


def build_tiny_transformer(seed: int = 0, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_FLUX).eval()
    with torch.no_grad():  # diffusers zero-initialises some output layers; give every path signal
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    if dtype != torch.float32:
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # .to() warns about fp32-kept modules; the tiny model has none
        model = model.to(dtype)
        dlogging.set_verbosity(level)
    return model


def build_tiny_encoder(seed: int = 0) -> TinyAutoencoder:
    return TinyAutoencoder(**TINY_LATENT, seed=seed).eval()


class TinyTextEncoder:
    """Deterministic text encoder: each word hashes to a seeded random vector; pooled = mean."""

    def __init__(self, dim: int = TINY_FLUX["joint_attention_dim"], pooled_dim: int = TINY_FLUX["pooled_projection_dim"],
                 tokens: int = TEXT_TOKENS):
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
