"""How to run each model family with torch: embed, any block, head, crop positions.

Shared by the desktop export (``blockskip.export.families``) and the torch runtime backend. A family
works on a *skeleton*: the full diffusers model built on the meta device, whose tensors are
materialised by name from safetensors only where a phase needs them.
"""

from __future__ import annotations

from typing import Any

from blockskip.runtime.backends.torch_families.base import TorchFamily
from blockskip.runtime.errors import ModelError

FAMILY_NAMES = ("flux", "sd3", "sana")


def get_family(name: str, config: dict[str, Any]) -> TorchFamily:
    cls: type[TorchFamily]
    if name == "flux":
        from blockskip.runtime.backends.torch_families.flux import FluxFamily

        cls = FluxFamily
    elif name == "sd3":
        from blockskip.runtime.backends.torch_families.sd3 import SD3Family

        cls = SD3Family
    elif name == "sana":
        from blockskip.runtime.backends.torch_families.sana import SanaFamily

        cls = SanaFamily
    else:
        raise ModelError(f"unknown model family {name!r}; supported: {', '.join(FAMILY_NAMES)}")
    return cls(config)


def family_of_class(class_name: str) -> str:
    table = {
        "FluxTransformer2DModel": "flux",
        "SD3Transformer2DModel": "sd3",
        "SanaTransformer2DModel": "sana",
    }
    if class_name not in table:
        raise ModelError(
            f"unsupported transformer class {class_name!r}; supported: {', '.join(sorted(table))}"
        )
    return table[class_name]
