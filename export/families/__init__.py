"""Family adapters for the export: load a model, encode the prompt, choose LoRA targets.

Running embed / blocks / head lives in the runtime's torch families (shared with the device).
"""

from __future__ import annotations

from blockskip.export.families.base import LoadedModel, load_model, lora_target_names, wrap_model

__all__ = ["LoadedModel", "load_model", "lora_target_names", "wrap_model"]
