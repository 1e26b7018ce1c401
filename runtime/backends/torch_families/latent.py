"""Photo -> latent encoders that run on the device during precompute.

``TinyAutoencoder`` is the built-in tiny model's fixed latent mapping: non-overlapping f x f patches
projected by an orthonormal matrix (seeded) to C channels; decoding is the transpose (a projection).
``PatchDCTAutoencoder`` is a fixed mapping suited to natural images: an opponent-colour transform and the
lowest-frequency 2-D DCT coefficients of each 4 x 4 patch, normalised per channel (see its docstring).
Real models use their diffusers VAE encoder (AutoencoderKL for FLUX/SD3, AutoencoderDC for SANA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blockskip.runtime.backends.torch_families.base import DiffusersModel
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
    def config(self) -> dict[str, Any]:
        return {"factor": self.factor, "latent_channels": self.latent_channels}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.enc(images)
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv_transpose2d(latents, self.enc.weight, stride=self.factor)


# Orthonormal opponent colours (rows): luma, blue-yellow, red-green; roughly the principal axes of
# natural-image colour, so most of the energy sits in luma.
DCT_COLOURS = ((1 / 3**0.5,) * 3, (-1 / 6**0.5, -1 / 6**0.5, 2 / 6**0.5), (1 / 2**0.5, -1 / 2**0.5, 0.0))
# The 16 2-D DCT frequencies (u = vertical, v = horizontal) of a 4 x 4 patch, lowest first: by u + v,
# then by max(u, v), then vertical before horizontal. A colour keeps a prefix of this list.
DCT_ORDER = (
    (0, 0),
    (0, 1),
    (1, 0),
    (1, 1),
    (0, 2),
    (2, 0),
    (1, 2),
    (2, 1),
    (0, 3),
    (3, 0),
    (2, 2),
    (1, 3),
    (3, 1),
    (2, 3),
    (3, 2),
    (3, 3),
)
# Standard deviation of each (colour, u, v) coefficient for images in [-1, 1]: geometric mean of the
# values at 64 and 128 px over 320 random square crops (30-100 % of the short side, box-resized) of the
# photos astronaut, coffee, rocket, stereo_motorcycle (scikit-image) and china, flower (scikit-learn),
# symmetrised in (u, v) and rounded. Dividing by it gives latents of about unit variance.
DCT_STD = (
    ((3.3, 0.65, 0.33, 0.20), (0.65, 0.33, 0.21, 0.14), (0.33, 0.21, 0.15, 0.12), (0.20, 0.14, 0.12, 0.095)),
    (
        (1.2, 0.17, 0.079, 0.047),
        (0.17, 0.079, 0.049, 0.032),
        (0.079, 0.049, 0.035, 0.026),
        (0.047, 0.032, 0.026, 0.021),
    ),
    (
        (1.1, 0.16, 0.075, 0.043),
        (0.16, 0.079, 0.048, 0.031),
        (0.075, 0.048, 0.035, 0.025),
        (0.043, 0.031, 0.025, 0.020),
    ),
)
# Mean of the DC coefficients (luma, blue-yellow, red-green) on the same crops (photos are a little dark
# and warm); the other coefficients have mean ~0 by symmetry.
DCT_DC_MEAN = (-1.25, -0.55, 0.55)


class PatchDCTAutoencoder(nn.Module):
    """Fixed photo <-> latent mapping for the built-in tiny model (no learned VAE is needed).

    Each non-overlapping 4 x 4 patch of an RGB image in [-1, 1] is split into opponent colours
    (``DCT_COLOURS``) and transformed by the orthonormal 2-D DCT-II; the ``luma`` lowest frequencies of
    luma and the ``chroma`` lowest of each chroma colour (``DCT_ORDER``) are kept, ``luma + 2 * chroma``
    channels in the order luma, blue-yellow, red-green. The kept basis vectors are orthonormal rows of
    one stride-4 convolution, so decoding is its transpose (the least-squares reconstruction). Channel
    ``c`` is then normalised, ``z = (coef - latent_shift[c]) / latent_scale[c]``, with the constants
    ``DCT_DC_MEAN`` and ``DCT_STD`` measured on natural photos, so latents have about unit variance.

    The default 10 + 3 + 3 = 16 channels (all luma frequencies with u + v <= 3, chroma u + v <= 1) make
    FLUX's 2 x 2 packing 64 wide; a 64 px photo is a 16 x 16 latent. Reconstruction is about 31 dB PSNR
    at 64 px and 33 dB at 128 px on those photos: luma keeps detail down to ~2 px, colour is ~4 px.
    """

    factor = 4
    latent_shift: torch.Tensor  # buffers
    latent_scale: torch.Tensor

    def __init__(self, luma: int = 10, chroma: int = 3):
        super().__init__()
        if not (1 <= luma <= 16 and 0 <= chroma <= 16):
            raise ValueError("need 1 <= luma <= 16 and 0 <= chroma <= 16 frequencies")
        self.luma, self.chroma = luma, chroma
        self.latent_channels = luma + 2 * chroma
        f = self.factor
        n = torch.arange(f, dtype=torch.float64)
        k = torch.arange(f, dtype=torch.float64)[:, None]
        dct = torch.cos(torch.pi * (2 * n + 1) * k / (2 * f)) * (2.0 / f) ** 0.5  # [k, n]
        dct[0] /= 2**0.5
        rows, shift, scale = [], [], []
        for ci, kept in enumerate((luma, chroma, chroma)):
            colour = torch.tensor(DCT_COLOURS[ci], dtype=torch.float64)
            for j, (u, v) in enumerate(DCT_ORDER[:kept]):
                rows.append(colour[:, None, None] * dct[u][None, :, None] * dct[v][None, None, :])
                shift.append(DCT_DC_MEAN[ci] if j == 0 else 0.0)
                scale.append(DCT_STD[ci][u][v])
        self.enc = nn.Conv2d(3, self.latent_channels, f, stride=f, bias=False)
        self.enc.weight.data.copy_(torch.stack(rows).float())
        self.register_buffer("latent_shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("latent_scale", torch.tensor(scale, dtype=torch.float32))

    @property
    def config(self) -> dict[str, Any]:
        return {"luma": self.luma, "chroma": self.chroma}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] (H, W multiples of 4) -> [B,C,H/4,W/4] normalised latents."""
        coef: torch.Tensor = self.enc(images)
        return (coef - self.latent_shift[:, None, None]) / self.latent_scale[:, None, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> [B,3,H,W] (not clamped)."""
        coef = latents * self.latent_scale[:, None, None] + self.latent_shift[:, None, None]
        return nn.functional.conv_transpose2d(coef, self.enc.weight, stride=self.factor)


ENCODER_CLASSES = ("TinyAutoencoder", "PatchDCTAutoencoder", "AutoencoderKL", "AutoencoderDC")
ENCODER_PREFIXES = {
    "TinyAutoencoder": ["enc"],
    "PatchDCTAutoencoder": ["enc", "latent_shift", "latent_scale"],
    "AutoencoderKL": ["encoder", "quant_conv"],
    "AutoencoderDC": ["encoder"],
}
FIXED_ENCODERS: dict[str, type[nn.Module]] = {
    "TinyAutoencoder": TinyAutoencoder,
    "PatchDCTAutoencoder": PatchDCTAutoencoder,
}


def build_encoder_skeleton(spec: dict[str, Any]) -> nn.Module:
    cls = spec["class"]
    if cls not in ENCODER_CLASSES:
        raise ModelError(f"unsupported encoder class {cls!r}; supported: {', '.join(ENCODER_CLASSES)}")
    with torch.device("meta"):
        if cls in FIXED_ENCODERS:
            return FIXED_ENCODERS[cls](**spec["config"])
        import diffusers

        vae: nn.Module = getattr(diffusers, cls).from_config(spec["config"]).eval()
        return vae


from blockskip.runtime.tiles import STRIDES, TILE  # noqa: E402  (px: one tile's activations, not the photo's)


def enable_tiling(encoder: DiffusersModel, spec: dict[str, Any]) -> None:
    """Encode in overlapping tiles (diffusers' own tiled encode); the fixed patch mappings need none."""
    cls = spec["class"]
    if cls == "AutoencoderKL":
        encoder.enable_tiling()
        encoder.tile_sample_min_size = TILE
        encoder.tile_latent_min_size = TILE // 2 ** (len(encoder.config.block_out_channels) - 1)
        encoder.tile_overlap_factor = 1 - STRIDES[cls] / TILE  # the program backends' stride (runtime.tiles)
    elif cls == "AutoencoderDC":
        encoder.enable_tiling(
            tile_sample_min_height=TILE,
            tile_sample_min_width=TILE,
            tile_sample_stride_height=STRIDES[cls],
            tile_sample_stride_width=STRIDES[cls],
        )


def encode_images(encoder: DiffusersModel, spec: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> scaled latents [B,C,H/f,W/f]."""
    cls = spec["class"]
    if cls in FIXED_ENCODERS:  # patch-local and already scaled
        latent: torch.Tensor = encoder.encode(images)
        return latent
    if cls == "AutoencoderKL":
        z = encoder.encode(images).latent_dist.mode()
    else:
        z = encoder.encode(images).latent
    shift = spec.get("shift_factor") or 0.0
    scaled: torch.Tensor = (z - shift) * spec.get("scaling_factor", 1.0)
    return scaled
