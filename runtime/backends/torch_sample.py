"""Build one training sample from a schedule entry: crop, resize to s_min, noise, flow-matching target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blockskip.runtime.backends.torch_families.base import CropGeometry
from blockskip.runtime.precompute import crop_resize
from blockskip.runtime.rng import normals
from blockskip.runtime.schedule import ScheduleEntry


def make_sample(
    latent: torch.Tensor, e: ScheduleEntry, s_min: int, s_max: int, vae_factor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CropGeometry]:
    """latent [C, L, L] of the s_max photo -> (x_t [1,C,l,l], target [1,C,l,l], sigma [1], geometry)."""
    f = vae_factor
    full, side, top, left, low = s_max // f, e.side // f, e.top // f, e.left // f, s_min // f
    if type(latent) is torch.Tensor:
        x0 = torch.from_numpy(crop_resize(latent.detach().float().cpu().numpy(), e, s_min, s_max, vae_factor))
    else:  # a fake tensor (the dry run traces shapes and sizes): the same area resize as torch ops
        crop = latent[None, :, top : top + side, left : left + side].float()
        x0 = crop if side == low else F.interpolate(crop, size=(low, low), mode="area")
    eps = torch.from_numpy(normals(e.noise_seed, x0.numel())).reshape(x0.shape)
    sigma = torch.tensor([e.sigma], dtype=torch.float32)
    x_t = (1 - sigma) * x0 + sigma * eps
    geom = CropGeometry(full=full, side=side, top=top, left=left, low=low)
    return x_t.to(latent.dtype), (eps - x0).to(latent.dtype), sigma, geom
