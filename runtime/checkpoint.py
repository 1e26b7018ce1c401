"""The shared checkpoint and the LoRA file, written and read with numpy only.

Checkpoint (``OUT/checkpoint/checkpoint.safetensors``; torch, executorch, the streamed span and the
native runner all write it, so each resumes the others' runs): float32 tensors ``param.<peft name>``,
``opt.exp_avg.<name>``, ``opt.exp_avg_sq.<name>``, ``opt.step.<name>`` ([1]), metadata ``step`` (the
optimizer steps done), ``log`` (JSON: losses, the cache identity ..., no timings) and ``sha256``, the
integrity record: sha256 of the file the same tensors and the other metadata make. A reader checks the
declared format, the record and that every value is finite before it resumes anything.

Both are written with ``tensorfile.write_tensors`` (the canonical form), so identical runs write
identical bytes.

LoRA (``OUT/lora.safetensors``): ``transformer.<peft name without .default>``, lora_B multiplied by
alpha/rank, metadata the bundle's ``lora.metadata`` (peft's config with alpha = rank), so
``load_lora_adapter`` applies the same scale with or without our metadata.

The names are declared in ``runtime.formats`` (schemas ``checkpoint``, ``train_log``, ``lora``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.files import atomic_write
from blockskip.runtime.formats import (
    CHECKPOINT,
    LORA_B,
    LORA_PREFIX,
    META_LOG,
    META_SHA256,
    META_STEP,
    PEFT_ADAPTER,
)
from blockskip.runtime.schema_check import check
from blockskip.runtime.tensorfile import TensorFile, canonical_digest, canonical_header, write_tensors

__all__ = [
    "CHECKPOINT",
    "checkpoint_metadata",
    "diffusers_name",
    "read_checkpoint",
    "write_checkpoint",
    "write_lora",
]


def checkpoint_metadata(tensors: Mapping[str, object], step: int, log: dict[str, Any]) -> dict[str, str]:
    """The checkpoint's metadata: ``step``, ``log`` and the integrity record ``sha256`` (of the file the
    same tensors and the other two make)."""
    meta = {META_STEP: str(int(step)), META_LOG: json.dumps(log, sort_keys=True, allow_nan=False)}
    return {**meta, META_SHA256: canonical_digest(tensors, meta)}


def write_checkpoint(path: Path, tensors: Mapping[str, object], step: int, log: dict[str, Any]) -> None:
    """Write the shared checkpoint atomically (numpy arrays or torch tensors), with its integrity record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = checkpoint_metadata(tensors, step, log)
    atomic_write(path, lambda tmp: write_tensors(tmp, tensors, meta))


def read_checkpoint(path: Path) -> tuple[dict[str, npt.NDArray[Any]], int, dict[str, Any]]:
    """(tensors, step, log) after checking the file's declared format, its integrity record and that every
    value is finite; anything else is a clear error (a checkpoint is never resumed on trust)."""
    start_over = f"delete {Path(path).parent} to start over"
    try:
        f = TensorFile(path)
    except BlockSkipError as e:
        raise BlockSkipError(f"checkpoint {path} is unreadable ({e}); {start_over}") from e
    header = {**f.header, "__metadata__": f.metadata}
    check("checkpoint", header, f"checkpoint {path}", BlockSkipError, start_over)
    meta = {k: v for k, v in f.metadata.items() if k != META_SHA256}
    entries = {k: f.header[k] for k in sorted(f.header)}
    h = hashlib.sha256()
    text = canonical_header(entries, meta)
    h.update(struct.pack("<Q", len(text)) + text)
    h.update(f.buffer.data[f.data_start :])
    if h.hexdigest() != f.metadata[META_SHA256]:
        raise BlockSkipError(
            f"checkpoint {path} does not match its integrity record ({META_SHA256}): it is corrupt; "
            f"{start_over}"
        )
    for name in sorted(f.arrays):
        a = f.float32(name) if f.dtypes[name] in ("float32", "float16", "bfloat16", "float64") else None
        if a is not None and not np.isfinite(a).all():
            raise BlockSkipError(
                f"checkpoint {path} holds NaN or Inf values ({name}); it cannot be resumed. "
                f"{start_over[0].upper()}{start_over[1:]}"
            )
    return f.arrays, int(f.metadata[META_STEP]), json.loads(f.metadata[META_LOG])


def diffusers_name(peft: str) -> str:
    return LORA_PREFIX + peft.replace(PEFT_ADAPTER, ".")


def write_lora(path: Path, tensors: Mapping[str, npt.ArrayLike], lora: dict[str, Any]) -> None:
    """The LoRA file from peft-named float32 tensors and the bundle's ``lora`` section."""
    scale = np.float32(lora["alpha"] / lora["rank"])
    out: dict[str, npt.NDArray[np.float32]] = {}
    for name, t in tensors.items():
        a = np.asarray(t, dtype=np.float32)
        out[diffusers_name(name)] = a * scale if LORA_B in name else a
    atomic_write(path, lambda tmp: write_tensors(tmp, out, dict(lora["metadata"])))
