"""A ``BlockBackend`` over exported programs (ONNX models, ExecuTorch programs).

Each program's calling convention is in the manifest (``stream.shapes[shape].programs[role]``: input
and output names, shapes and dtypes), so this class feeds any program by name and a subclass only
loads a file and runs it on a list of arrays. Programs whose runtime plans its memory at load time
(ExecuTorch) are kept loaded one at a time (``keep_loaded = False``), so the largest arena is all a
phase holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blockskip.runtime.bundle import Bundle
from blockskip.runtime.contract import Arrays
from blockskip.runtime.errors import BundleError
from blockskip.runtime.stream import CONST, GRAD, GRAD_IN, LORA, LORA_GRAD, OUT, STATE, WEIGHT, StreamSpec


class ProgramBackend:
    name = ""
    format = ""  # the manifest key of a program's file record: "onnx" or "pte"
    keep_loaded = True

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.spec = StreamSpec(bundle)
        self.loaded: dict[tuple[str, str], object] = {}
        self.loads = 0  # program loads (tests)

    # --- subclasses ----------------------------------------------------------------------------
    def load(self, path: Path) -> object:
        raise NotImplementedError

    def execute(self, handle: object, inputs: list[np.ndarray], io: dict[str, Any]) -> list[np.ndarray]:
        raise NotImplementedError

    # --- running -------------------------------------------------------------------------------
    def _program(self, shape: str, role: str) -> tuple[dict[str, Any], object]:
        io = self.spec.program(shape, role)
        key = (shape, role)
        if key not in self.loaded:
            rec = io.get(self.format)
            if not rec:
                raise BundleError(
                    f"the bundle has no {self.format} program for {role} of block shape {shape!r}; "
                    f"export it with --format {self.format}"
                )
            if not self.keep_loaded:
                self.loaded.clear()  # drop the previous program (and its planned memory) first
            self.loaded[key] = self.load(self.bundle.path(rec["file"]))
            self.loads += 1
        return io, self.loaded[key]

    def run(self, shape: str, role: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        io, handle = self._program(shape, role)
        args: list[np.ndarray] = []
        for rec in io["inputs"]:
            a = feed.get(rec["name"])
            if a is None:
                raise BundleError(
                    f"program {role} of {shape!r} needs input {rec['name']!r}, which the cache entry "
                    f"or the block's weights lack; the cache or bundle is from another export"
                )
            if list(a.shape) != list(rec["shape"]):
                raise BundleError(
                    f"input {rec['name']!r} of {role} program {shape!r} has shape {list(a.shape)}, "
                    f"the program takes {rec['shape']}; the cache or bundle is from another export"
                )
            args.append(a)
        outs = self.execute(handle, args, io)
        return {rec["name"]: o for rec, o in zip(io["outputs"], outs)}

    def release(self) -> None:
        self.loaded.clear()

    # --- BlockBackend ----------------------------------------------------------------------------
    @staticmethod
    def _feed(
        state: Arrays | None = None,
        consts: Arrays | None = None,
        grads: Arrays | None = None,
        weights: Arrays | None = None,
        lora: Arrays | None = None,
    ) -> Arrays:
        feed: Arrays = {}
        for prefix, d in ((STATE, state), (CONST, consts), (GRAD, grads), (WEIGHT, weights), (LORA, lora)):
            feed.update({prefix + k: v for k, v in (d or {}).items()})
        return feed

    def forward(
        self, shape: str, state: Arrays, consts: Arrays, weights: Arrays, lora: Arrays, *, keep: bool = False
    ) -> Arrays:
        # ``keep`` is a hint: the VJP programs recompute the forward (the arena is all a program holds)
        out = self.run(shape, "forward", self._feed(state, consts, None, weights, lora))
        return {k[len(OUT) :]: v for k, v in out.items()}

    def vjp(
        self, shape: str, state: Arrays, consts: Arrays, grads: Arrays, weights: Arrays, lora: Arrays
    ) -> tuple[Arrays, Arrays]:
        out = self.run(shape, "vjp", self._feed(state, consts, grads, weights, lora))
        g_in = {k[len(GRAD_IN) :]: v for k, v in out.items() if k.startswith(GRAD_IN)}
        g_lora = {k[len(LORA_GRAD) :]: v for k, v in out.items() if k.startswith(LORA_GRAD)}
        return g_in, g_lora

    def head(
        self, hidden: np.ndarray, consts: Arrays, target: np.ndarray, scale: float, weights: Arrays
    ) -> tuple[float, np.ndarray]:
        feed = self._feed({"hidden": hidden}, consts, None, weights)
        feed["target"] = target
        feed["loss_scale"] = np.array([scale], dtype=np.float32)
        out = self.run("head", "head", feed)
        return float(np.asarray(out["loss"]).reshape(-1)[0]), out[GRAD_IN + "hidden"]

    def precompute_block(self, shape: str, state: Arrays, consts: Arrays, weights: Arrays) -> Arrays:
        lora = {k: np.zeros(s, np.float32) for k, s in self.spec.lora_shapes(shape).items()}
        return self.forward(shape, state, consts, weights, lora)
