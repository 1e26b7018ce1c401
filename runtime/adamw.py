"""AdamW on the LoRA, in numpy: the same formula as ``torch.optim.AdamW(foreach=False)`` and the native
runner's ``adamw.h``, in float32.

Per step t (1-based), hyper-parameter expressions in float64 and applied as float32 scalars:

    p  *= 1 - lr * wd
    m   = lerp(m, g, 1 - b1)                    (torch's lerp: m + w (g - m) for w < 0.5, fused)
    v   = v * b2 + (1 - b2) * g * g             (the last add fused)
    p  += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The fused multiply-adds are computed exactly in float64 and rounded once to float32 (the product of
two float32 values is exact in float64), so this follows the C++ runner bit for bit except in rare
double-rounding cases. The state (``step``, ``exp_avg``, ``exp_avg_sq``) has torch's names, so
checkpoints move between backends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass
class AdamWConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def _fma(a: npt.ArrayLike, b: npt.ArrayLike, c: npt.ArrayLike) -> F32:
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(
        np.float32
    )


class AdamW:
    def __init__(self, cfg: AdamWConfig):
        self.cfg = cfg
        self.state: dict[str, dict[str, F32]] = {}

    def step(self, params: Mapping[str, F32], grads: Mapping[str, npt.ArrayLike]) -> None:
        """Update every parameter in place (float32 arrays) with its gradient."""
        c = self.cfg
        f32 = np.float32
        for name, p in params.items():
            g = np.asarray(grads[name], dtype=f32)
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {
                    "step": np.zeros(1, f32),
                    "exp_avg": np.zeros_like(p, f32),
                    "exp_avg_sq": np.zeros_like(p, f32),
                }
            st["step"] += f32(1)
            t = float(st["step"][0])
            bc1, bc2 = 1.0 - c.beta1**t, 1.0 - c.beta2**t
            w1, b2, w2 = f32(1.0 - c.beta1), f32(c.beta2), f32(1.0 - c.beta2)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            if c.weight_decay != 0.0:
                np.multiply(p, f32(1.0 - c.lr * c.weight_decay), out=p)
            d = g - m
            m[...] = _fma(w1, d, m) if abs(w1) < 0.5 else _fma(w1 - f32(1), d, g)
            v[...] = _fma(w2 * g, g, v * b2)
            denom = np.sqrt(v) / f32(math.sqrt(bc2)) + f32(c.eps)
            p += f32(-(c.lr / bc1)) * m / denom
