"""Flow-matching Euler sampling with the full model (any family), with or without a LoRA.

The sampler runs the family's own embed / block / head code (the code the device trains with) on the
full model, so what is sampled is exactly the function that was trained: ``x_t = (1 - s) x0 + s eps``,
the model predicts ``v = eps - x0``, and Euler steps go from ``s = 1`` to ``0``.
"""

from __future__ import annotations

import contextlib

import torch

from blockskip.runtime.backends.torch_families.base import CropGeometry, TorchFamily
from blockskip.runtime.schedule import shift_sigma


def sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` noise levels from 1 to 0 (shifted like training's timestep shift)."""
    return [shift_sigma(1 - i / steps, shift) if i < steps else 0.0 for i in range(steps + 1)]


def sampling_defaults(lm) -> dict:
    """How to sample a model unless told otherwise: ``cfg`` (classifier-free guidance scale; 1 = off) and
    ``frame`` (RoPE positions of the whole photo frame ``frame`` times the sample side, as the runtime's
    "crop" positions give a training crop that covers the whole s_max photo; 1 = the plain grid).

    The built-in ``tiny`` model was pretrained with 10 % empty captions (so guidance works) and with
    positions of crops of a frame twice the image side (the s_min = 64 / s_max = 128 plan): it samples
    best with guidance 2 and, after a LoRA trained with crop positions, at the whole 2x frame's
    positions. Other models: no guidance (FLUX-dev is guidance-distilled) and the plain grid."""
    if lm.name == "tiny":
        return {"cfg": 2.0, "frame": 2}
    return {"cfg": 1.0, "frame": 1}


@torch.no_grad()
def sample_latents(
    family: TorchFamily,
    model,
    text: dict,
    *,
    latent_side: int,
    channels: int,
    seeds: list[int],
    steps: int = 20,
    shift: float = 1.0,
    guidance: float = 3.5,
    dtype=torch.float32,
    cfg: float = 1.0,
    uncond: dict | None = None,
    frame: int = 1,
) -> torch.Tensor:
    """One latent per seed for the prompt embeddings ``text`` -> [len(seeds), C, side, side].

    ``cfg`` != 1 mixes in the prediction for ``uncond`` (the empty prompt's embeddings):
    ``v = v_uncond + cfg (v_text - v_uncond)``. ``frame``: see ``sampling_defaults``."""
    if cfg != 1.0 and uncond is None:
        raise ValueError("classifier-free guidance needs the empty prompt's embeddings (uncond)")
    prepared = family.prepare_text(model, {k: v.to(dtype) for k, v in text.items()})
    prepared_u = (
        family.prepare_text(model, {k: v.to(dtype) for k, v in uncond.items()})
        if cfg != 1.0 and uncond is not None  # (cfg != 1 without uncond is refused above)
        else None
    )
    geom = CropGeometry(full=latent_side * frame, side=latent_side * frame, top=0, left=0, low=latent_side)
    out = []
    levels = sigmas(steps, shift)
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        x = torch.randn(1, channels, latent_side, latent_side, generator=g).to(dtype)
        for s, s_next in zip(levels, levels[1:]):
            v = velocity(family, model, x, s, prepared, geom, guidance)
            if prepared_u is not None:
                vu = velocity(family, model, x, s, prepared_u, geom, guidance)
                v = vu + cfg * (v - vu)
            x = x + (s_next - s) * v.to(x.dtype)
        out.append(x.float())
    return torch.cat(out)


def velocity(family: TorchFamily, model, x, s: float, prepared: dict, geom: CropGeometry, guidance: float):
    state, consts = family.embed(
        model, x, torch.tensor([s], dtype=torch.float32), prepared, geom, "crop", guidance
    )
    for i in range(family.num_blocks):
        state = family.run_block(model, i, state, consts)
    return family.from_tokens(family.head(model, state, consts), x.shape[-2], x.shape[-1])


def decode(encoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] with the model's latent mapping (the built-in mappings decode by
    their transpose)."""
    if not hasattr(encoder, "decode"):
        from blockskip.runtime.errors import ModelError

        raise ModelError(
            f"the photo encoder {type(encoder).__name__} has no decoder: sampling to images needs "
            "a model with the built-in latent mapping"
        )
    with torch.no_grad():
        return encoder.decode(latents.float()).clamp(-1, 1)


def to_uint8(images: torch.Tensor):
    """[B,3,H,W] in [-1,1] -> numpy [B,H,W,3] uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(rows: list, path, labels: list[str] | None = None, scale: int = 2) -> None:
    """Write rows of uint8 images [N,H,W,3] as one PNG grid (rows top to bottom)."""
    import numpy as np
    from PIL import Image

    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    pad = 2
    label_w = 0
    if labels:
        label_w = 8 * max(len(s) for s in labels) + 6
    grid = np.full((len(rows) * (h + pad) + pad, label_w + cols * (w + pad) + pad, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for c, im in enumerate(imgs):
            y, x = pad + r * (h + pad), label_w + pad + c * (w + pad)
            grid[y : y + h, x : x + w] = im
    img = Image.fromarray(grid)
    if labels:
        from PIL import ImageDraw

        d = ImageDraw.Draw(img)
        for r, s in enumerate(labels):
            d.text((3, pad + r * (h + pad) + h // 2 - 5), s, fill=(0, 0, 0))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)


@contextlib.contextmanager
def lora_loaded(model, lora_path: str | None, adapter: str = "subject"):
    """The LoRA file applied to the full diffusers model for the duration (no-op without a path)."""
    if lora_path is None:
        yield model
        return
    model.load_lora_adapter(str(lora_path), adapter_name=adapter, prefix="transformer")
    try:
        yield model
    finally:
        model.delete_adapters(adapter)
