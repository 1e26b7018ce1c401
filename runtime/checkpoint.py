"""The shared checkpoint and the LoRA file, written and read with numpy only.

Checkpoint (``OUT/checkpoint/checkpoint.safetensors``; torch, executorch, the streamed span and the
native runner all write it, so each resumes the others' runs): float32 tensors ``param.<peft name>``,
``opt.exp_avg.<name>``, ``opt.exp_avg_sq.<name>``, ``opt.step.<name>`` ([1]), metadata ``step`` (the
optimizer steps done) and ``log`` (JSON: losses, the cache identity ..., no timings).

Both are written with ``tensorfile.write_tensors`` (the canonical form), so identical runs write
identical bytes.

LoRA (``OUT/lora.safetensors``): ``transformer.<peft name without .default>``, lora_B multiplied by
alpha/rank, metadata the bundle's ``lora.metadata`` (peft's config with alpha = rank), so
``load_lora_adapter`` applies the same scale with or without our metadata.

The names are declared in ``runtime.formats`` (schemas ``checkpoint``, ``train_log``, ``lora``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.files import atomic_write
from blockskip.runtime.formats import CHECKPOINT, LORA_B, LORA_PREFIX, META_LOG, META_STEP, PEFT_ADAPTER
from blockskip.runtime.tensorfile import TensorFile, write_tensors

__all__ = ["CHECKPOINT", "diffusers_name", "read_checkpoint", "write_checkpoint", "write_lora"]


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray], step: int, log: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {META_STEP: str(int(step)), META_LOG: json.dumps(log, sort_keys=True)}
    atomic_write(path, lambda tmp: write_tensors(tmp, tensors, meta))


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], int, dict]:
    """(tensors, step, log); a torn or corrupt file is a clear error."""
    try:
        f = TensorFile(path)
        step = int(f.metadata[META_STEP])
        log = json.loads(f.metadata[META_LOG])
        if not isinstance(log, dict) or step < 0:
            raise ValueError("malformed step/log")
    except Exception as e:  # BundleError, KeyError, ValueError, JSONDecodeError
        raise BlockSkipError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from e
    return f.arrays, step, log


def diffusers_name(peft: str) -> str:
    return LORA_PREFIX + peft.replace(PEFT_ADAPTER, ".")


def write_lora(path: Path, tensors: dict[str, np.ndarray], lora: dict) -> None:
    """The LoRA file from peft-named float32 tensors and the bundle's ``lora`` section."""
    scale = np.float32(lora["alpha"] / lora["rank"])
    out = {}
    for name, t in tensors.items():
        a = np.asarray(t, dtype=np.float32)
        out[diffusers_name(name)] = a * scale if LORA_B in name else a
    atomic_write(path, lambda tmp: write_tensors(tmp, out, dict(lora["metadata"])))
