"""ONNX Runtime backend: block models for precompute and the streamed span, training artifacts for the
resident span.

Precompute (``runtime.precompute``) encodes photos with ``onnx/encoder.onnx``, builds each sample with
the embed model (``stream/embed.embed.onnx``) and streams each block's stored weights through its
shape's forward model (``stream/<shape>.forward.onnx``, an ordinary ``InferenceSession``). A streamed
span runs the forward / VJP / head models under ``runtime.stream``: plain inference sessions, no
training API, and the shared checkpoint. A resident span runs the bundle's training artifacts with
``onnxruntime.training.api`` (Module, Optimizer, CheckpointState) and keeps ORT's own checkpoint.

ONNX Runtime training was deprecated after 1.19.2 (the last release of onnxruntime-training-cpu); its
Python API imports torch, so this backend needs torch too. It must not share an environment with the
plain ``onnxruntime`` package (both own the ``onnxruntime/`` folder).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blockskip.runtime.backends.programs import ProgramBackend
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.contract import Arrays, Trainer
from blockskip.runtime.errors import BlockSkipError, BundleError
from blockskip.runtime.files import atomic_write
from blockskip.runtime.formats import META_SHA256, canonical_json
from blockskip.runtime.progress import Progress

if TYPE_CHECKING:
    from blockskip.runtime.cache import ResidualCache

CHECKPOINT = "ort_checkpoint"  # inside OUT/checkpoint/


def _ort() -> tuple[Any, Any]:
    """The ``onnxruntime`` module and its training API (``onnxruntime.training.api``); both untyped."""
    try:
        import onnxruntime
        from onnxruntime.training import api
    except ImportError as e:
        raise BlockSkipError(
            f"the ort backend needs onnxruntime-training-cpu==1.19.2 ({e}); pip install 'dit-blockskip[ort]'. "
            "If plain onnxruntime is installed in the same environment, uninstall both and reinstall "
            "onnxruntime-training-cpu alone: they share the onnxruntime/ folder"
        ) from e
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime, api


def _section(bundle: Bundle) -> dict[str, Any]:
    sec: dict[str, Any] | None = bundle.manifest.get("onnx")
    if not sec:
        raise BundleError(
            f"bundle {bundle.root} has no ONNX artifacts (formats: {', '.join(formats_of(bundle))}); "
            "export it with --format onnx (or --format torch,onnx) for --backend ort"
        )
    return sec


def formats_of(bundle: Bundle) -> list[str]:
    return list(bundle.manifest.get("formats", ["torch"]))


def _session(path: Path) -> Any:  # an onnxruntime.InferenceSession
    ort, _ = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no arena: what a run allocates is returned when it ends, so loaded sessions cost no activation memory
    opts.enable_cpu_mem_arena = False
    # no memory pattern either: it plans one block per run for all intermediates, ~35% above the live peak
    # (FLUX-like single block forward at 1024 tokens: 146 vs 108 MiB)
    opts.enable_mem_pattern = False
    # no buffer reuse either: ORT's planner gives a later output the buffer of an earlier dead value of the same
    # size, and that buffer stays allocated from the first value's death until the later value is consumed,
    # e.g. a VJP's attention scores (dead after the forward softmax) held for their gradient in the backward:
    # FLUX-like single block VJP at 768 tokens, 179 MiB with reuse, 119 MiB without (values freed at last use)
    opts.enable_mem_reuse = False
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtPrograms(ProgramBackend):
    """The block backend over the bundle's ONNX stream models (inference sessions, kept loaded: without
    ORT's memory arena a session holds no activation memory between runs)."""

    name = "ort"
    format = "onnx"
    keep_loaded = True

    def load(self, path: Path) -> Any:
        return _session(path)

    def execute(self, handle: Any, inputs: list[np.ndarray], io: dict[str, Any]) -> list[np.ndarray]:
        ort, _ = _ort()
        feed: dict[str, object] = {}
        for a, rec in zip(inputs, io["inputs"]):
            if rec["dtype"] == "bfloat16":  # numpy has no bfloat16: hand ORT the raw bits with the type
                feed[rec["name"]] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(a), 16
                )
            else:
                feed[rec["name"]] = np.ascontiguousarray(a)
        outs: list[np.ndarray] = handle.run([r["name"] for r in io["outputs"]], feed)
        return outs


# --------------------------------------------------------------------------------------------
# precompute


def encode_latents(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """Photos [N,3,S,S] in [-1,1] -> latents, with the ONNX encoder (in tiles when exported so; loaded only
    here)."""
    from blockskip.runtime.tiles import encode_photos

    def run(sess: Any, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = sess.run(None, {"images": x})[0]
        return out

    return encode_photos(
        _section(bundle)["encoder"],
        images,
        lambda rel: _session(bundle.path(rel)),
        run,
    )


def precompute(
    bundle: Bundle,
    images: np.ndarray,
    cache_dir: str | Path,
    *,
    source: dict[str, Any],
    progress: Progress | None = None,
) -> ResidualCache:
    from blockskip.runtime.precompute import precompute as run

    _section(bundle)
    return run(
        bundle,
        images,
        cache_dir,
        source=source,
        backend=OrtPrograms(bundle),
        progress=progress,
        encode=lambda ims: encode_latents(bundle, ims),
    )


# --------------------------------------------------------------------------------------------
# train


class OrtTrainer:
    """The resident span's training artifacts, loaded (a ``runtime.contract.Trainer`` with ORT's own
    checkpoint, which holds the optimizer state)."""

    backend = "ort"
    checkpoint_file = CHECKPOINT

    def __init__(self, bundle: Bundle, checkpoint: Path | None = None, threads: int | None = None):
        """``threads``: ORT intra-op threads (default: ORT's, one per core)."""
        self.bundle, self.threads = bundle, threads
        sec: dict[str, Any] | None = _section(bundle).get("train")
        if not sec:
            raise BundleError(
                f"bundle {bundle.root} has no ONNX Runtime training artifacts (its span is "
                f"{bundle.plan.span}); export it again with --format onnx"
            )
        self.sec = sec
        self.inputs: list[str] = list(self.sec["inputs"])
        self._open(checkpoint)

    def _open(self, checkpoint: Path | None) -> None:
        ort, api = _ort()
        files = self.sec["files"]
        ckpt = checkpoint if checkpoint is not None else self.bundle.path(files["checkpoint"])
        self.state: Any = api.CheckpointState.load_checkpoint(str(ckpt))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
        self.module: Any = api.Module(
            str(self.bundle.path(files["training"])),
            self.state,
            str(self.bundle.path(files["eval"])),
            device="cpu",
            session_options=opts,
        )
        self.optimizer: Any = api.Optimizer(str(self.bundle.path(files["optimizer"])), self.module)
        self.optimizer.set_learning_rate(self.bundle.plan.lr)
        self.module.train()

    def load_entry(self, path: Path) -> Arrays:
        from safetensors.numpy import load_file

        return load_file(path)

    def feed(self, entry: Arrays, scale: float) -> list[np.ndarray]:
        missing = [n for n in self.inputs[:-1] if n not in entry]
        if missing:
            raise BlockSkipError(f"cache entry lacks {missing}; the cache was made for another bundle")
        return [np.ascontiguousarray(entry[n], dtype=np.float32) for n in self.inputs[:-1]] + [
            np.array([scale], np.float32)
        ]

    def loss_and_grad(self, entry: Arrays, scale: float = 1.0) -> float:
        """Forward + backward of one entry; gradients accumulate until :meth:`update`. Returns the loss."""
        out = self.module(*self.feed(entry, scale))
        return float(np.asarray(out).reshape(-1)[0]) / scale

    def update(self) -> None:
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def lora(self) -> dict[str, np.ndarray]:
        """The LoRA tensors (peft names) as they are now."""
        return {n: np.array(self.state.parameters[n].data) for n in self.sec["lora"]}

    def grads(self) -> dict[str, np.ndarray]:
        return {n: self.state.parameters[n].grad for n in self.sec["lora"]}

    def save_checkpoint(self, path: Path, step: int, log: dict[str, Any]) -> None:
        _, api = _ort()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.state.properties["step"] = int(step)
        self.state.properties["log"] = json.dumps(log)
        self.state.properties[META_SHA256] = _record(self.state, self.sec["lora"])
        atomic_write(
            path,
            lambda tmp: api.CheckpointState.save_checkpoint(self.state, tmp, include_optimizer_state=True),
        )

    def load_checkpoint(self, path: Path) -> tuple[int, dict[str, Any]]:
        log = _read_checkpoint_log(path, self.sec["lora"])
        self._open(path)
        return int(self.state.properties["step"]), log


def _record(state: Any, names: Sequence[str]) -> str:
    """An ORT checkpoint's integrity record: sha256 over the canonical JSON of its step and log, then each
    LoRA tensor's name and float32 bytes in name order (what ORT's Python API exposes of the file)."""
    h = hashlib.sha256(
        canonical_json({"step": int(state.properties["step"]), "log": state.properties["log"]})
    )
    for n in sorted(names):
        h.update(n.encode() + b"\0")
        h.update(np.ascontiguousarray(state.parameters[n].data, dtype=np.float32).tobytes())
    return h.hexdigest()


def checkpoint_source(path: Path) -> str | None:
    """The cache source recorded in an ORT checkpoint."""
    return _read_checkpoint_log(path).get("cache_source")


def _read_checkpoint_log(path: Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The log of an ORT checkpoint; with the LoRA's ``names``, after checking its integrity record and that
    every LoRA value is finite."""
    _, api = _ort()
    start_over = f"delete {Path(path).parent} to start over"
    try:
        st = api.CheckpointState.load_checkpoint(str(path))
        log = json.loads(st.properties["log"])
        if names is not None:
            recorded = st.properties[META_SHA256] if META_SHA256 in st.properties else None
            actual = _record(st, names)
    except Exception as e:  # ORT raises plain RuntimeErrors on a torn/corrupt file
        raise BlockSkipError(f"checkpoint {path} is unreadable ({e}); {start_over}") from e
    if not isinstance(log, dict):
        raise BlockSkipError(f"checkpoint {path} is unreadable (its log is not a JSON object); {start_over}")
    if names is not None:
        if recorded != actual:
            raise BlockSkipError(
                f"checkpoint {path} does not match its integrity record ({META_SHA256}): it is "
                f"corrupt; {start_over}"
            )
        bad = [n for n in names if not np.isfinite(np.asarray(st.parameters[n].data)).all()]
        if bad:
            raise BlockSkipError(
                f"checkpoint {path} holds NaN or Inf values ({bad[0]}); it cannot be resumed. "
                f"Delete {Path(path).parent} to start over"
            )
    return log


def make_trainer(bundle: Bundle, out: Path) -> Trainer:
    if bundle.plan.span == "streamed":
        from blockskip.runtime.stream import StreamedSpan

        return StreamedSpan(bundle, OrtPrograms(bundle), stash_dir=out / "stash")
    return OrtTrainer(bundle)


def train(
    bundle: Bundle,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the LoRA with ORT; resume from ``out_dir/checkpoint`` if present. Returns the log dict."""
    from blockskip.runtime.driver import train as drive

    _section(bundle)
    return drive(
        bundle,
        cache_dir,
        out_dir,
        lambda out: make_trainer(bundle, out),
        progress=progress,
        stop_after=stop_after,
    )
