"""FLUX export adapter: FluxTransformer2DModel, its pipeline's text encoders (CLIP + T5), AutoencoderKL.

Block running, positions and LoRA targets are in ``blockskip.runtime.backends.torch_families.flux``
(shared with the device); this module adds what only the desktop needs.
"""

from __future__ import annotations

from blockskip.runtime.backends.torch_families.flux import FluxFamily

PIPELINE = "FluxPipeline"
Family = FluxFamily


def encode_prompt(pipe, prompt: str) -> dict:
    prompt_embeds, pooled, _text_ids = pipe.encode_prompt(prompt, prompt_2=None)
    return {"prompt_embeds": prompt_embeds, "pooled": pooled}
