"""One harness per backend for the shared contract suite (tests/test_contract.py).

Each harness says which bundle format and delegate it runs, how to precompute and train with it, and,
for the Python backends, how to build its Trainer and reach the LoRA and gradients inside it (what a
test needs to compare one step with the torch reference).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from blockskip.device_train.app import run_precompute, run_train
from blockskip.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "build" / "native" / "device_train" / "native" / "blockskip-train-native"


class Harness:
    name = ""  # test id
    backend = ""  # device-train --backend
    format = ""  # the bundle format it needs
    delegate = "none"
    python = True  # a Python backend: its Trainer is reachable

    def precompute(self, bundle_dir, photos, cache_dir):
        return run_precompute(bundle_dir, photos, cache_dir, backend=self.backend, quiet=True)

    def train(self, bundle_dir, cache_dir, out_dir, stop_after=None) -> dict:
        return run_train(
            bundle_dir, cache_dir, out_dir, backend=self.backend, quiet=True, stop_after=stop_after
        )

    def command(self, bundle_dir, cache_dir, out_dir) -> list[str]:
        """The training command line (a fresh process: the kill -9 test)."""
        return [
            sys.executable,
            "-m",
            "blockskip.device_train.cli",
            "train",
            str(bundle_dir),
            "--cache",
            str(cache_dir),
            "-o",
            str(out_dir),
            "--backend",
            self.backend,
            "--quiet",
        ]

    def trainer(self, bundle_dir, out_dir):
        from blockskip.runtime.backends import get_backend

        return get_backend(self.backend).make_trainer(Bundle(bundle_dir), Path(out_dir))


class TorchHarness(Harness):
    name = backend = format = "torch"


class OrtHarness(Harness):
    name, backend, format = "ort", "ort", "onnx"


class EtHarness(Harness):
    name, backend, format = "executorch", "executorch", "pte"


class XnnpackHarness(EtHarness):
    name, delegate = "executorch-xnnpack", "xnnpack"


class NativeHarness(Harness):
    """The C++ runner trains; precompute (Python until the runner does its own) uses the executorch backend."""

    name, backend, format, python = "native", "executorch", "pte", False

    def train(self, bundle_dir, cache_dir, out_dir, stop_after=None) -> dict:
        import json

        extra = ["--stop-after", str(stop_after)] if stop_after is not None else []
        r = subprocess.run(
            self.command(bundle_dir, cache_dir, out_dir) + extra, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, f"native runner failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        return json.loads((Path(out_dir) / "train_log.json").read_text())

    def command(self, bundle_dir, cache_dir, out_dir) -> list[str]:
        return [str(NATIVE), str(bundle_dir), "--cache", str(cache_dir), "-o", str(out_dir), "--quiet"]


HARNESSES = {
    h.name: h for h in (TorchHarness(), OrtHarness(), EtHarness(), XnnpackHarness(), NativeHarness())
}


def native_available() -> bool:
    return NATIVE.is_file() and os.access(NATIVE, os.X_OK)


# --------------------------------------------------------------------------------------------
# reaching inside each kind of Trainer


def lora_of(trainer) -> dict[str, np.ndarray]:
    return trainer.lora()


def set_lora(trainer, values: dict[str, np.ndarray]) -> None:
    from blockskip.runtime.backends.executorch import EtTrainer
    from blockskip.runtime.backends.ort import OrtTrainer
    from blockskip.runtime.backends.torch import TorchTrainer
    from blockskip.runtime.stream import StreamedSpan

    if isinstance(trainer, StreamedSpan):
        for n, v in values.items():
            trainer.params[n][...] = v
    elif isinstance(trainer, TorchTrainer):
        params = dict(trainer.span.model.named_parameters())
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(torch.from_numpy(v))
    elif isinstance(trainer, EtTrainer):
        for n, p in trainer.parameters().items():
            p.numpy()[...] = values[n]
    elif isinstance(trainer, OrtTrainer):
        for n, v in values.items():
            trainer.state.parameters[n] = v
    else:
        raise TypeError(type(trainer))


def grads_of(trainer) -> dict[str, np.ndarray]:
    from blockskip.runtime.backends.torch import TorchTrainer
    from blockskip.runtime.stream import StreamedSpan

    if isinstance(trainer, StreamedSpan):
        return {n: g.copy() for n, g in trainer.grads.items()}
    if isinstance(trainer, TorchTrainer):
        return {n: p.grad.numpy().copy() for n, p in trainer.span.model.named_parameters() if ".lora_" in n}
    return {n: np.array(g) for n, g in trainer.grads().items()}
