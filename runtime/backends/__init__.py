"""Backends behind one small interface; each is imported only when asked for."""

from __future__ import annotations

import logging
from types import ModuleType

from blockskip.runtime.errors import BlockSkipError

# bitsandbytes (imported by peft when installed) warns on every import that an optional CPU kernel
# package is missing; it falls back by itself, so the line only confuses users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# torchao (installed with executorch, imported by diffusers) warns about optional CUDA kernels it cannot
# load on a CPU machine, diffusers then about torchao, torch about enum registration: none of it
# concerns this project, and it buries the CLI output.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

BACKENDS = ("torch", "ort", "executorch")


# backend -> (what it needs, the extras that install it)
_NEEDS = {
    "torch": ("torch, diffusers and peft", "torch"),
    "ort": ("onnxruntime-training-cpu==1.19.2, torch and diffusers", "torch,ort"),
    "executorch": ("executorch==1.5.1, torch and diffusers", "torch,executorch"),
}


def get_backend(name: str) -> ModuleType:
    if name in _NEEDS:
        import importlib

        try:
            return importlib.import_module(f"blockskip.runtime.backends.{name}")
        except ImportError as e:  # pragma: no cover - depends on the environment
            needs, extras = _NEEDS[name]
            raise BlockSkipError(
                f"the {name} backend needs {needs} ({e}); pip install 'dit-blockskip[{extras}]'"
            ) from e
    raise BlockSkipError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
