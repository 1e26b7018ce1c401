"""Backends behind one small interface; each is imported only when asked for."""

from __future__ import annotations

import logging

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


def get_backend(name: str):
    if name == "ort":
        try:
            from blockskip.runtime.backends import ort as backend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BlockSkipError(
                f"the ort backend needs onnxruntime-training-cpu==1.19.2, torch and diffusers ({e}); "
                "pip install 'dit-blockskip[torch,ort]'"
            ) from e
        return backend
    if name == "executorch":
        try:
            from blockskip.runtime.backends import executorch as backend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BlockSkipError(
                f"the executorch backend needs executorch==1.5.1, torch and diffusers ({e}); "
                "pip install 'dit-blockskip[torch,executorch]'"
            ) from e
        return backend
    if name == "torch":
        try:
            from blockskip.runtime.backends import torch as backend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BlockSkipError(
                f"the torch backend needs torch, diffusers and peft ({e}); pip install 'dit-blockskip[torch]'"
            ) from e
        return backend
    raise BlockSkipError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
