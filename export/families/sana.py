"""SANA export adapter: SanaTransformer2DModel, Gemma text encoder, AutoencoderDC.

Running and LoRA targets are in ``blockskip.runtime.backends.torch_families.sana``.
"""

from __future__ import annotations

from blockskip.runtime.backends.torch_families.sana import SanaFamily

PIPELINE = "SanaPipeline"
Family = SanaFamily


def encode_prompt(pipe, prompt: str) -> dict:
    pe, _mask, _neg, _neg_mask = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    return {"prompt_embeds": pe}
