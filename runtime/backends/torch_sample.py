"""Build one training sample from a schedule entry: crop, resize to s_min, noise, flow-matching target."""

from __future__ import annotations

import torch

from blockskip.runtime.backends.torch_families.base import CropGeometry
from blockskip.runtime.precompute import crop_resize
from blockskip.runtime.rng import normals
from blockskip.runtime.schedule import ScheduleEntry


def make_sample(latent: torch.Tensor, e: ScheduleEntry, s_min: int, s_max: int, vae_factor: int):
    """latent [C, L, L] of the s_max photo -> (x_t [1,C,l,l], target [1,C,l,l], sigma [1], geometry)."""
    f = vae_factor
    full, side, top, left, low = s_max // f, e.side // f, e.top // f, e.left // f, s_min // f
    x0 = torch.from_numpy(crop_resize(latent.float().numpy(), e, s_min, s_max, vae_factor))
    eps = torch.from_numpy(normals(e.noise_seed, x0.numel())).reshape(x0.shape)
    sigma = torch.tensor([e.sigma], dtype=torch.float32)
    x_t = (1 - sigma) * x0 + sigma * eps
    geom = CropGeometry(full=full, side=side, top=top, left=left, low=low)
    return x_t.to(latent.dtype), (eps - x0).to(latent.dtype), sigma, geom
