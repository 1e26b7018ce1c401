"""Photo -> latent encoders that run on the device during precompute.

``TinyAutoencoder`` is the built-in tiny model's fixed latent mapping: non-overlapping f x f patches
projected by an orthonormal matrix (seeded) to C channels; decoding is the transpose (a projection).
Real models use their diffusers VAE encoder (AutoencoderKL for FLUX/SD3, AutoencoderDC for SANA).
"""

from __future__ import annotations

import torch
from torch import nn

from blockskip.runtime.errors import ModelError


class TinyAutoencoder(nn.Module):
    def __init__(self, factor: int = 4, latent_channels: int = 8, seed: int = 0):
        super().__init__()
        self.factor, self.latent_channels = factor, latent_channels
        d = 3 * factor * factor
        if latent_channels > d:
            raise ValueError("latent_channels must be <= 3 * factor^2")
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        w = q[:, :latent_channels].T.reshape(latent_channels, 3, factor, factor)  # orthonormal rows
        self.enc = nn.Conv2d(3, latent_channels, factor, stride=factor, bias=False)
        self.enc.weight.data.copy_(w.float())

    @property
    def config(self) -> dict:
        return {"factor": self.factor, "latent_channels": self.latent_channels}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.enc(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv_transpose2d(latents, self.enc.weight, stride=self.factor)


ENCODER_CLASSES = ("TinyAutoencoder", "AutoencoderKL", "AutoencoderDC")
ENCODER_PREFIXES = {"TinyAutoencoder": ["enc"], "AutoencoderKL": ["encoder", "quant_conv"],
                    "AutoencoderDC": ["encoder"]}


def build_encoder_skeleton(spec: dict) -> nn.Module:
    cls = spec["class"]
    if cls not in ENCODER_CLASSES:
        raise ModelError(f"unsupported encoder class {cls!r}; supported: {', '.join(ENCODER_CLASSES)}")
    with torch.device("meta"):
        if cls == "TinyAutoencoder":
            return TinyAutoencoder(**spec["config"])
        import diffusers

        return getattr(diffusers, cls).from_config(spec["config"]).eval()


TILE = 256  # px: tiled encoding keeps the encoder's activations to about one tile


def enable_tiling(encoder: nn.Module, spec: dict) -> None:
    """Encode in overlapping tiles (diffusers' own tiled encode); the tiny mapping needs none."""
    cls = spec["class"]
    if cls == "AutoencoderKL":
        encoder.enable_tiling()
        encoder.tile_sample_min_size = TILE
        encoder.tile_latent_min_size = TILE // 2 ** (len(encoder.config.block_out_channels) - 1)
    elif cls == "AutoencoderDC":
        encoder.enable_tiling(tile_sample_min_height=TILE, tile_sample_min_width=TILE,
                              tile_sample_stride_height=TILE * 7 // 8, tile_sample_stride_width=TILE * 7 // 8)


def encode_images(encoder: nn.Module, spec: dict, images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> scaled latents [B,C,H/f,W/f]."""
    cls = spec["class"]
    if cls == "TinyAutoencoder":
        return encoder.encode(images)
    if cls == "AutoencoderKL":
        z = encoder.encode(images).latent_dist.mode()
    else:
        z = encoder.encode(images).latent
    shift = spec.get("shift_factor") or 0.0
    return (z - shift) * spec.get("scaling_factor", 1.0)
