"""SD3 / SD3.5 export adapter: SD3Transformer2DModel, CLIP-L + CLIP-G + T5 text encoders, AutoencoderKL.

Running and LoRA targets (SD3.5 dual attention included) are in
``blockskip.runtime.backends.torch_families.sd3``.
"""

from __future__ import annotations

from blockskip.runtime.backends.torch_families.sd3 import SD3Family

PIPELINE = "StableDiffusion3Pipeline"
Family = SD3Family


def encode_prompt(pipe, prompt: str) -> dict:
    pe, _neg, pooled, _neg_pooled = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
    return {"prompt_embeds": pe, "pooled": pooled}
