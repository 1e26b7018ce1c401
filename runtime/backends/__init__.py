"""Backends behind one small interface; each is imported only when asked for."""

from __future__ import annotations

from blockskip.runtime.errors import BlockSkipError

BACKENDS = ("torch",)


def get_backend(name: str):
    if name == "torch":
        try:
            from blockskip.runtime.backends import torch as backend
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BlockSkipError(
                f"the torch backend needs torch, diffusers and peft ({e}); pip install 'dit-blockskip[torch]'"
            ) from e
        return backend
    raise BlockSkipError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
