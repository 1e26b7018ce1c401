"""ONNX Runtime backend: precompute with per-block inference sessions, train with ORT's training API.

Precompute streams ``onnx/blocks/block_*.onnx`` (one session alive at a time) and encodes photos with
``onnx/encoder.onnx``; the sample construction (crop, resize, noise) and the small embed layers run
through the same torch code as the torch backend, so both backends write the same cache. Training runs
the bundle's training artifacts with ``onnxruntime.training.api`` (Module, Optimizer, CheckpointState)
from that cache and writes the same diffusers-named LoRA.

ONNX Runtime training was deprecated after 1.19.2 (the last release of onnxruntime-training-cpu); its
Python API imports torch, so this backend needs torch too. It must not share an environment with the
plain ``onnxruntime`` package (both own the ``onnxruntime/`` folder).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np

from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.errors import BlockSkipError, BundleError
from blockskip.runtime.files import atomic_write, ensure_writable_dir
from blockskip.runtime.memory import peak_rss_mib
from blockskip.runtime.progress import Progress
from blockskip.runtime.train_loop import run_steps

CHECKPOINT = "ort_checkpoint"  # inside OUT/checkpoint/


def _ort():
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


def _section(bundle: Bundle) -> dict:
    sec = bundle.manifest.get("onnx")
    if not sec:
        raise BundleError(
            f"bundle {bundle.root} has no ONNX artifacts (formats: {', '.join(formats_of(bundle))}); "
            "export it with --format onnx (or --format torch,onnx) for --backend ort"
        )
    return sec


def formats_of(bundle: Bundle) -> list[str]:
    return list(bundle.manifest.get("formats", ["torch"]))


def _session(path: Path):
    ort, _ = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# precompute


def _store(bundle: Bundle):
    """A BlockStore whose blocks are ORT sessions (created on load, dropped on free)."""
    import torch

    from blockskip.runtime.backends.torch_io import BlockStore

    sec = _section(bundle)

    class OrtBlockStore(BlockStore):
        def __init__(self):
            super().__init__(bundle)
            self.sessions: dict[int, object] = {}
            self._session_refs: list[weakref.ref] = []

        def load_block(self, i):
            if i >= len(sec["blocks"]):
                raise BundleError(f"the bundle has no ONNX model for block {i}; export it again")
            rel = sec["blocks"][i]["file"]
            self.sessions[i] = _session(bundle.path(rel))
            self.loaded.append(rel)
            self._session_refs.append(weakref.ref(self.sessions[i]))
            alive = sum(r() is not None for r in self._session_refs)
            self.max_resident = max(self.max_resident, alive)
            return [f"__ort_block__.{i}"]

        def free(self, names):
            blocks = [n for n in names if n.startswith("__ort_block__.")]
            for n in blocks:
                self.sessions.pop(int(n.rsplit(".", 1)[1]), None)
            rest = [n for n in names if n not in blocks]
            if rest:
                super().free(rest)

        def run_block(self, i, state, consts):
            spec = sec["blocks"][i]
            feed = {f"state.{n}": state[n].detach().float().numpy() for n in spec["state"]}
            feed.update({f"c.{n}": consts[n].detach().float().numpy() for n in spec["consts"]})
            outs = self.sessions[i].run([f"out.{n}" for n in spec["outputs"]], feed)
            new = {n: None for n in spec["state"]}
            new.update({n: torch.from_numpy(o) for n, o in zip(spec["outputs"], outs)})
            return new

    return OrtBlockStore()


def encode_latents(bundle: Bundle, images: np.ndarray):
    """Photos [N,3,S,S] in [-1,1] -> latents, with the ONNX encoder (resident only here)."""
    import torch

    sec = _section(bundle)["encoder"]
    sess = _session(bundle.path(sec["file"]))
    want = list(sec["input"][1:])
    out = []
    for im in images:
        if list(im.shape) != want:
            raise BlockSkipError(f"photo tensor {list(im.shape)} does not match the exported encoder input {want}")
        out.append(sess.run(None, {"images": im[None].astype(np.float32)})[0])
    del sess
    return torch.from_numpy(np.concatenate(out))


def precompute(bundle: Bundle, images: np.ndarray, cache_dir, *, source: dict, progress: Progress | None = None):
    import torch

    from blockskip.runtime.backends.torch import precompute_with

    _section(bundle)
    return precompute_with(bundle, images, cache_dir, source=source, progress=progress,
                           make_store=lambda: _store(bundle), encode=lambda store: encode_latents(bundle, images),
                           dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# train


class OrtTrainer:
    """The training artifacts of a bundle, loaded: one ``step`` per optimizer update."""

    def __init__(self, bundle: Bundle, checkpoint: Path | None = None, threads: int | None = None):
        """``threads``: ORT intra-op threads (default: ORT's, one per core)."""
        ort, api = _ort()
        self.bundle, self.sec = bundle, _section(bundle)["train"]
        files = self.sec["files"]
        ckpt = checkpoint if checkpoint is not None else bundle.path(files["checkpoint"])
        self.state = api.CheckpointState.load_checkpoint(str(ckpt))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.module = api.Module(str(bundle.path(files["training"])), self.state,
                                 str(bundle.path(files["eval"])), device="cpu", session_options=opts)
        self.optimizer = api.Optimizer(str(bundle.path(files["optimizer"])), self.module)
        self.optimizer.set_learning_rate(bundle.plan.lr)
        self.inputs = list(self.sec["inputs"])
        self.module.train()

    def feed(self, entry: dict, scale: float) -> list[np.ndarray]:
        missing = [n for n in self.inputs[:-1] if n not in entry]
        if missing:
            raise BlockSkipError(f"cache entry lacks {missing}; the cache was made for another bundle")
        return [np.ascontiguousarray(entry[n], dtype=np.float32) for n in self.inputs[:-1]] + \
            [np.array([scale], np.float32)]

    def loss_and_grad(self, entry: dict, scale: float = 1.0) -> float:
        """Forward + backward of one entry; gradients accumulate until :meth:`update`. Returns the loss."""
        out = self.module(*self.feed(entry, scale))
        return float(np.asarray(out).reshape(-1)[0]) / scale

    def update(self) -> None:
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def lora(self) -> dict[str, np.ndarray]:
        """The LoRA tensors (peft names) as they are now."""
        return {n: self.state.parameters[n].data for n in self.sec["lora"]}

    def grads(self) -> dict[str, np.ndarray]:
        return {n: self.state.parameters[n].grad for n in self.sec["lora"]}

    def save(self, path: Path, step: int, log: dict) -> None:
        _, api = _ort()
        self.state.properties["step"] = int(step)
        self.state.properties["log"] = json.dumps(log)
        atomic_write(path, lambda tmp: api.CheckpointState.save_checkpoint(self.state, tmp,
                                                                           include_optimizer_state=True))


def checkpoint_source(out_dir) -> str | None:
    """The cache source recorded in OUT's checkpoint (None: no checkpoint)."""
    path = Path(out_dir) / "checkpoint" / CHECKPOINT
    if not path.is_file():
        return None
    return _read_checkpoint_log(path).get("cache_source")


def _read_checkpoint_log(path: Path) -> dict:
    _, api = _ort()
    try:
        st = api.CheckpointState.load_checkpoint(str(path))
        return json.loads(st.properties["log"])
    except Exception as e:  # ORT raises plain RuntimeErrors on a torn/corrupt file
        raise BlockSkipError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from e


def _load_entry(cache: ResidualCache, k: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(cache.path(k))


def train(bundle: Bundle, cache_dir, out_dir, *, progress: Progress | None = None, stop_after: int | None = None):
    """Train the LoRA with ORT; resume from ``out_dir/checkpoint`` if present. Returns the log dict."""
    plan = bundle.plan
    progress = progress or Progress(quiet=True)
    _section(bundle)
    cache = ResidualCache(cache_dir)
    cache.check_complete({"bundle": bundle.manifest_sha256})
    out = ensure_writable_dir(out_dir)
    ckpt_dir = out / "checkpoint"
    ckpt = ckpt_dir / CHECKPOINT
    log = {"plan": plan.to_dict(), "backend": "ort", "losses": [], "step_seconds": [], "resumed_from": 0,
           "cache_source": cache.source_sha256()}
    start = 0
    if ckpt.is_file():
        saved = _read_checkpoint_log(ckpt)
        if saved.get("cache_source") != log["cache_source"]:
            raise BlockSkipError(
                f"{ckpt} belongs to a training run on other photos or another bundle; use a new output "
                f"folder (-o), or delete {ckpt_dir} to start over")
        log.update(saved)
        start = len(log["losses"])
    trainer = OrtTrainer(bundle, ckpt if start else None)
    log["resumed_from"] = start
    if start:
        progress.log(f"resuming from step {start} ({ckpt_dir})")
    bar = progress.bar(plan.steps, "train", initial=start)
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)

    def _save(step):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        trainer.save(ckpt, step, log)

    run_steps(cache, plan, log, bar, start=start, end=end, load_entry=_load_entry,
              micro_step=lambda entry: trainer.loss_and_grad(entry, 1.0 / plan.grad_accum),
              update=trainer.update, save_checkpoint=_save)
    bar.close()
    log["peak_rss_mib"] = peak_rss_mib()
    if end == plan.steps:
        save_lora(out / "lora.safetensors", trainer.lora(), bundle.manifest["lora"])
        log["lora"] = str(out / "lora.safetensors")
    atomic_write(out / "train_log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))
    return log


def save_lora(path, tensors: dict[str, np.ndarray], lora: dict) -> None:
    import torch

    from blockskip.runtime.backends.torch_lora import save_lora_tensors

    save_lora_tensors(path, {n: torch.from_numpy(np.array(v)) for n, v in tensors.items()}, lora)

