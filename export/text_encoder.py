"""The built-in tiny model's text encoder: deterministic, no weights, any word.

It ships with the model (``blockskip.export.tiny``); the pretraining data that taught the model these
words lives in ``tools/tiny_data.py``.
"""

from __future__ import annotations

import functools
import hashlib
import re

import torch


def words_of(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", prompt.lower())


class WordTextEncoder:
    """Deterministic text encoder: no weights, any word.

    Token i of a caption is ``(w(word_i) + b(word_{i-1} word_i) + p(i)) / sqrt(3)``, where w, b and p
    are unit-variance Gaussian vectors seeded from the SHA-256 of the word, the word pair and the
    position; the pair and position terms let the transformer tell "red circle on a blue background"
    from "blue circle on a red background" (FLUX gives text tokens no positions of their own). Unused
    tokens are zero. The pooled vector is the sum of per-word vectors divided by sqrt(#words).
    """

    def __init__(self, dim: int = 64, pooled_dim: int = 64, tokens: int = 16):
        self.dim, self.pooled_dim, self.tokens = dim, pooled_dim, tokens

    @staticmethod
    @functools.lru_cache(maxsize=65536)
    def _vec(key: str, dim: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % (2**63)
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        emb = torch.zeros(len(prompts), self.tokens, self.dim)
        pooled = torch.zeros(len(prompts), self.pooled_dim)
        for j, prompt in enumerate(prompts):
            words = words_of(prompt)[: self.tokens] or [""]
            prev = "<s>"
            for i, w in enumerate(words):
                emb[j, i] = (
                    self._vec("w:" + w, self.dim)
                    + self._vec(f"b:{prev} {w}", self.dim)
                    + self._vec(f"p:{i}", self.dim)
                ) / 3**0.5
                pooled[j] += self._vec("pool:" + w, self.pooled_dim)
                prev = w
            pooled[j] /= len(words) ** 0.5
        return {"prompt_embeds": emb, "pooled": pooled}

    def __call__(self, prompt: str) -> dict[str, torch.Tensor]:
        return self.encode([prompt])
