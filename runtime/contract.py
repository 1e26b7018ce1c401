"""The two contracts every backend implements (typed Protocols; numpy arrays in and out).

* ``BlockBackend``: what block-streamed training and streamed precompute need from a runtime: run a
  block's forward, run a block's VJP, run the head, precompute a block. ``runtime.stream`` drives it
  (order, weight streaming and prefetch, the boundary stash, AdamW), for torch, ONNX Runtime and
  ExecuTorch alike; the native runner mirrors that driver in C++.
* ``Trainer``: what the training driver (``runtime.driver``) needs of whatever computes a step: the
  streamed span (over any ``BlockBackend``) or a resident span (torch + peft, an ExecuTorch training
  program, ONNX Runtime training artifacts). The driver owns entry order, prefetch, resume, refusals,
  numerics checks, logs and the LoRA file.

Array names: ``state`` keys are the family's boundary state (``hidden``, ``encoder``), ``consts`` the
step constants of a cache entry (``temb``, ``rope_cos`` ...), ``weights`` the stored frozen tensors of
one block by relative name (``attn.to_q.weight_q8``), ``lora`` the block's LoRA by relative name
(``attn.to_q.lora_A``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

Arrays = dict[str, np.ndarray]


class BlockBackend(Protocol):
    name: str

    def forward(
        self, shape: str, state: Arrays, consts: Arrays, weights: Arrays, lora: Arrays, *, keep: bool = False
    ) -> Arrays:
        """The block's next state (outputs that do not exist, like SD3's last text state, are absent).

        ``keep``: this block's ``vjp`` on the same arrays comes next (after the head): a backend may keep
        what it needs for it instead of recomputing the forward there (the torch backend keeps the
        block's autograd graph), and drops it at that ``vjp`` or at the next ``forward``. The caller
        must not change the arrays in between."""
        ...

    def vjp(
        self, shape: str, state: Arrays, consts: Arrays, grads: Arrays, weights: Arrays, lora: Arrays
    ) -> tuple[Arrays, Arrays]:
        """(gradient at each state input, gradient of each LoRA tensor) for the output gradients."""
        ...

    def head(
        self, hidden: np.ndarray, consts: Arrays, target: np.ndarray, scale: float, weights: Arrays
    ) -> tuple[float, np.ndarray]:
        """(flow-matching loss times ``scale``, its gradient at ``hidden``)."""
        ...

    def precompute_block(self, shape: str, state: Arrays, consts: Arrays, weights: Arrays) -> Arrays:
        """The frozen block's next state (no LoRA)."""
        ...

    def release(self) -> None:
        """Drop loaded programs / sessions (called between phases)."""
        ...


class Trainer(Protocol):
    backend: str  # what train_log.json records
    checkpoint_file: str  # its file name inside OUT/checkpoint/

    def load_entry(self, path: Path) -> dict[str, Any]:
        """One cache shard's tensors in the form ``loss_and_grad`` takes."""
        ...

    def loss_and_grad(self, entry: dict[str, Any], scale: float) -> float:
        """Forward and backward of one entry with the loss times ``scale``; gradients add up until
        ``update``. Returns the unscaled loss."""
        ...

    def update(self) -> None:
        """One AdamW step with the summed gradients, which are then cleared."""
        ...

    def lora(self) -> Arrays:
        """The LoRA tensors by peft name, float32, as they are now (lora_B not yet scaled)."""
        ...

    def save_checkpoint(self, path: Path, step: int, log: dict[str, Any]) -> None:
        """Write LoRA + optimizer state atomically to ``path``."""
        ...

    def load_checkpoint(self, path: Path) -> tuple[int, dict[str, Any]]:
        """Restore from ``path``; return (step, saved log)."""
        ...
