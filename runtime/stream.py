"""Block-streamed training: the driver that every block backend runs under (numpy only).

Per micro-step: a forward sweep over the trained blocks that keeps only each block's input (the
boundary stash, in memory or spilled to disk), the head program for the loss and its gradient, and a
backward sweep, last block first, in which each block's VJP program recomputes the block and returns
the gradient at its input and its LoRA gradients. Frozen weights are read from the bundle's block
files in their storage dtype, one block at a time with the next one read on a second thread, or kept
resident when the plan says so. AdamW on the LoRA runs here (``runtime.adamw``), so a streamed run's
checkpoint is the shared one and any backend resumes it.

The native runner (``device_train/native/stream.cpp``) does the same in the same order.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from blockskip.runtime.adamw import AdamW, AdamWConfig
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.checkpoint import read_checkpoint, write_checkpoint
from blockskip.runtime.contract import Arrays, BlockBackend
from blockskip.runtime.errors import BlockSkipError, BundleError
from blockskip.runtime.formats import (  # the programs' calling convention; the block backends import it from here
    ADAM_STEP,
    ADAMW_STATE,
    CHECKPOINT,
    CONST,
    ENTRY_CONST,
    ENTRY_IN,
    ENTRY_TARGET,
    GRAD,
    GRAD_IN,
    LORA,
    LORA_GRAD,
    OUT,
    PARAM,
    STATE,
    STATE_HIDDEN,
    WEIGHT,
    delta_key,
    opt_key,
)
from blockskip.runtime.tensorfile import TensorFile

__all__ = [
    "CONST",
    "GRAD",
    "GRAD_IN",
    "LORA",
    "LORA_GRAD",
    "OUT",
    "STATE",
    "WEIGHT",
    "StreamSpec",
    "StreamedSpan",
    "Stash",
    "WeightSource",
    "peft_name",
    "strip",
]


class StreamSpec:
    """The manifest's ``stream`` section: shapes, their programs, and which block runs which."""

    def __init__(self, bundle: Bundle):
        sec = bundle.manifest.get("stream")
        if not sec:
            raise BundleError(f"bundle {bundle.root} has no block-stream section; export it again")
        self.bundle = bundle
        self.sec: dict[str, Any] = sec
        self.storage: str = sec["storage"]
        self.shapes: dict[str, dict[str, Any]] = sec["shapes"]
        self.paths: list[str] = sec["block_paths"]
        self.files: list[str | None] = bundle.manifest["model"]["blocks"]
        self.train: list[tuple[int, str]] = [(int(b), s) for b, s in sec["train"]]
        self.precompute: list[tuple[int, str]] = [(int(b), s) for b, s in sec["precompute"]]
        for _, s in self.train + self.precompute:
            if s not in self.shapes:
                raise BundleError(
                    f"the bundle's stream section names an unknown block shape {s!r}; export again"
                )

    def program(self, shape: str, role: str) -> dict[str, Any]:
        try:
            record: dict[str, Any] = self.shapes[shape]["programs"][role]
            return record
        except KeyError:
            raise BundleError(
                f"the bundle has no {role} program for block shape {shape!r}; export again"
            ) from None

    def lora_rel(self, shape: str) -> list[str]:
        return [
            r["name"][len(LORA) :]
            for r in self.program(shape, "forward")["inputs"]
            if r["name"].startswith(LORA)
        ]

    def lora_shapes(self, shape: str) -> dict[str, list[int]]:
        return {
            r["name"][len(LORA) :]: r["shape"]
            for r in self.program(shape, "forward")["inputs"]
            if r["name"].startswith(LORA)
        }

    def block_file(self, i: int) -> str:
        rel = self.files[i] if i < len(self.files) else None
        if not rel:
            raise BundleError(f"the bundle has no weights for block {i}; export it again")
        return rel


def peft_name(block_path: str, rel: str) -> str:
    """``attn.to_q.lora_A`` of ``transformer_blocks.3`` -> ``transformer_blocks.3.attn.to_q.lora_A.default.weight``."""
    module, _, ab = rel.rpartition(".")
    return f"{block_path}.{module}.{ab}.default.weight"


def strip(arrays: dict[str, np.ndarray], prefix: str) -> Arrays:
    """Block-file tensors (full names) -> relative names."""
    p = prefix + "." if prefix else ""
    return {k[len(p) :]: v for k, v in arrays.items() if k.startswith(p)}


class WeightSource:
    """Frozen block weights in storage layout, by relative name.

    ``streamed``: one block's file in memory at a time, the next one in the access order read on a
    second thread while the current block runs (``prefetch``), so at most two files are resident.
    ``resident``: every block it is asked for is read once and kept."""

    def __init__(self, spec: StreamSpec, resident: bool, prefetch: bool = True):
        self.spec, self.resident, self.prefetch = spec, resident, prefetch
        self.kept: dict[int, Arrays] = {}
        self.current: tuple[int, Arrays] | None = None
        self.pending: tuple[int, Future[Arrays]] | None = None
        self.order: list[int] = []
        self.pos = 0
        self.pool = ThreadPoolExecutor(1) if prefetch and not resident else None
        self.reads = 0  # block files read (tests and the log)

    def _read(self, i: int) -> Arrays:
        path = self.spec.bundle.path(self.spec.block_file(i))
        self.reads += 1
        return strip(TensorFile(path).arrays, self.spec.paths[i])

    def plan(self, order: list[int]) -> None:
        """The blocks the next calls of ``get`` will ask for, in order (for prefetching)."""
        self.order, self.pos = list(order), 0

    def get(self, i: int) -> Arrays:
        if self.resident:
            if i not in self.kept:
                self.kept[i] = self._read(i)
            return self.kept[i]
        if self.current is not None and self.current[0] == i:
            w = self.current[1]
        else:
            self.current = None  # drop it before the next one arrives: at most two files resident
            if self.pending is not None and self.pending[0] == i:
                w = self.pending[1].result()
            else:
                w = self._read(i)
            self.pending = None
            self.current = (i, w)
        while self.pos < len(self.order) and self.order[self.pos] == i:
            self.pos += 1
        nxt = self.order[self.pos] if self.pos < len(self.order) else None
        if self.pool is not None and nxt is not None and nxt != i and self.pending is None:
            self.pending = (nxt, self.pool.submit(self._read, nxt))
        return w

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.current = self.pending = None
        self.kept.clear()


class Stash:
    """The boundary activations (each trained block's input) between the forward and backward sweep."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.mem: dict[int, Arrays] = {}
        self.names: dict[int, list[str]] = {}

    def put(self, k: int, state: Arrays) -> None:
        if self.folder is None:
            self.mem[k] = state
            return
        for name, a in state.items():
            np.save(self.folder / f"{k}.{name}.npy", a, allow_pickle=False)
        self.names[k] = list(state)

    def pop(self, k: int) -> Arrays:
        if self.folder is None:
            return self.mem.pop(k)
        out = {}
        for name in self.names.pop(k):
            p = self.folder / f"{k}.{name}.npy"
            out[name] = np.load(p, allow_pickle=False)
            p.unlink()
        return out


class StreamedSpan:
    """The trained span, block-streamed over a ``BlockBackend``: a ``runtime.contract.Trainer``."""

    checkpoint_file = CHECKPOINT

    def __init__(self, bundle: Bundle, backend: BlockBackend, stash_dir: Path | None = None):
        plan = bundle.plan
        self.bundle, self.be, self.backend = bundle, backend, f"{backend.name} (streamed)"
        self.spec = StreamSpec(bundle)
        self.weights = WeightSource(self.spec, resident=plan.weights == "resident", prefetch=plan.prefetch)
        self.head_w = strip(TensorFile(bundle.path(bundle.manifest["model"]["head"])).arrays, "")
        init = TensorFile(bundle.path(self.spec.sec["lora_init"])).arrays
        self.params: dict[str, np.ndarray] = {k: np.array(v, dtype=np.float32) for k, v in init.items()}
        self.blocks: list[tuple[int, str, dict[str, str]]] = []  # (block, shape, {rel: peft name})
        for i, sid in self.spec.train:
            names = {rel: peft_name(self.spec.paths[i], rel) for rel in self.spec.lora_rel(sid)}
            missing = [n for n in names.values() if n not in self.params]
            if missing:
                raise BundleError(f"the bundle's initial LoRA lacks {missing[:2]}; export it again")
            self.blocks.append((i, sid, names))
        listed = {n for _, _, names in self.blocks for n in names.values()}
        if listed != set(self.params):
            raise BundleError("the bundle's initial LoRA does not match its trained blocks; export it again")
        self.grads: dict[str, np.ndarray] | None = None
        o = plan
        self.optimizer = AdamW(
            AdamWConfig(lr=o.lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=o.weight_decay)
        )
        self.stash_dir = stash_dir if plan.stash == "disk" else None
        if self.stash_dir is not None and self.stash_dir.is_dir():  # a killed run's leftovers
            for old in self.stash_dir.glob("stash-*"):
                shutil.rmtree(old, ignore_errors=True)

    # --- Trainer ---------------------------------------------------------------------------
    def load_entry(self, path: Path) -> Arrays:
        f = TensorFile(path)
        return {k: f.float32(k) for k in f.arrays}

    def _lora(self, names: dict[str, str]) -> Arrays:
        return {rel: self.params[p] for rel, p in names.items()}

    def loss_and_grad(self, entry: Arrays, scale: float) -> float:
        state = {k[len(ENTRY_IN) :]: v for k, v in entry.items() if k.startswith(ENTRY_IN)}
        consts = {k[len(ENTRY_CONST) :]: v for k, v in entry.items() if k.startswith(ENTRY_CONST)}
        seq = [i for i, _, _ in self.blocks]
        self.weights.plan(seq + seq[::-1])
        folder = None
        if self.stash_dir is not None:
            self.stash_dir.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="stash-", dir=self.stash_dir))
        stash = Stash(folder)
        try:
            w = None
            for k, (i, sid, names) in enumerate(self.blocks):
                w = None
                w = self.weights.get(i)
                stash.put(k, state)
                # the last block's VJP follows the head: the backend may keep its forward for it
                last = k == len(self.blocks) - 1 and self.stash_dir is None
                state = self.be.forward(sid, state, consts, w, self._lora(names), keep=last)
                for name in list(state):  # a skipped span after block i: add its precomputed residual
                    d = entry.get(delta_key(i + 1, name))
                    if d is not None:
                        state[name] = state[name] + d
            loss, g_hidden = self.be.head(
                state[STATE_HIDDEN], consts, entry[ENTRY_TARGET], scale, self.head_w
            )
            grads = {
                name: (g_hidden if name == STATE_HIDDEN else np.zeros_like(v)) for name, v in state.items()
            }
            del state
            acc = self.grads if self.grads is not None else {}
            for k in range(len(self.blocks) - 1, -1, -1):
                i, sid, names = self.blocks[k]
                w = None
                w = self.weights.get(i)
                x = stash.pop(k)
                grads, g_lora = self.be.vjp(sid, x, consts, grads, w, self._lora(names))
                del x
                for rel, g in g_lora.items():
                    p = names[rel]
                    if p in acc:
                        acc[p] += g
                    else:
                        acc[p] = np.array(g, dtype=np.float32)
            self.grads = acc
            w = None
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        return float(loss) / scale

    def eval_loss(self, entry: Arrays) -> float:
        """The loss of one entry with the current LoRA (forward sweep and head only)."""
        state = {k[len(ENTRY_IN) :]: v for k, v in entry.items() if k.startswith(ENTRY_IN)}
        consts = {k[len(ENTRY_CONST) :]: v for k, v in entry.items() if k.startswith(ENTRY_CONST)}
        self.weights.plan([i for i, _, _ in self.blocks])
        for i, sid, names in self.blocks:
            state = self.be.forward(sid, state, consts, self.weights.get(i), self._lora(names))
            for name in list(state):
                d = entry.get(delta_key(i + 1, name))
                if d is not None:
                    state[name] = state[name] + d
        loss, _ = self.be.head(state[STATE_HIDDEN], consts, entry[ENTRY_TARGET], 1.0, self.head_w)
        return float(loss)

    def update(self) -> None:
        if self.grads is None:
            raise RuntimeError("no gradients yet: call loss_and_grad first")
        self.optimizer.step(self.params, self.grads)
        self.grads = None

    def lora(self) -> Arrays:
        return {k: v.copy() for k, v in self.params.items()}

    def checkpoint_tensors(self) -> dict[str, np.ndarray]:
        out = {PARAM + n: p.copy() for n, p in self.params.items()}
        for n, st in self.optimizer.state.items():
            for k, v in st.items():
                out[opt_key(k, n)] = np.array(v, dtype=np.float32).reshape(-1) if k == ADAM_STEP else v.copy()
        return out

    def restore(self, tensors: dict[str, np.ndarray], path: str | Path) -> None:
        saved = {k[len(PARAM) :] for k in tensors if k.startswith(PARAM)}
        if saved != set(self.params):
            raise BlockSkipError(f"checkpoint {path} does not belong to this bundle's plan; use another -o")
        for n, p in self.params.items():
            v = tensors[PARAM + n]
            if v.shape != p.shape:
                raise BlockSkipError(
                    f"checkpoint {path} does not belong to this bundle's plan; use another -o"
                )
            p[...] = v
            keys = [opt_key(k, n) for k in ADAMW_STATE]
            if all(k in tensors for k in keys):
                self.optimizer.state[n] = {
                    "step": np.array(tensors[keys[0]], np.float32).reshape(1),
                    "exp_avg": np.array(tensors[keys[1]], np.float32),
                    "exp_avg_sq": np.array(tensors[keys[2]], np.float32),
                }

    def info(self) -> dict[str, Any]:
        return {
            "span": "streamed",
            "block_backend": self.be.name,
            "weight_file_reads": self.weights.reads,
            "storage": self.spec.storage,
        }

    def save_checkpoint(self, path: Path, step: int, log: dict[str, Any]) -> None:
        write_checkpoint(path, self.checkpoint_tensors(), step, log)

    def load_checkpoint(self, path: Path) -> tuple[int, dict[str, Any]]:
        tensors, step, log = read_checkpoint(path)
        self.restore(tensors, path)
        return step, log

    def close(self) -> None:
        self.weights.close()
        self.be.release()
