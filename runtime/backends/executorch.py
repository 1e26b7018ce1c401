"""ExecuTorch backend: precompute with per-block inference programs, train with the bundle's training program.

Precompute streams ``pte/blocks/block_*.pte`` (one program loaded at a time) and encodes photos with
``pte/encoder.pte``; the sample construction (crop, resize, noise) and the small embed layers run through
the same torch code as the torch backend, so both backends write the same cache. Training runs the joint
forward-backward program ``pte/train/span.pte`` (its LoRA weights in ``span.ptd``) through ExecuTorch's
training module: each call returns the loss and the LoRA gradients, and AdamW (PyTorch's formulation)
updates the program's own weight memory in place.

The checkpoint is the torch backend's (``checkpoint/checkpoint.safetensors``: LoRA weights, AdamW
moments and step count), so a run started with one of these two backends resumes with the other.

The Python-side loader warnings (torchao's optional kernels, experimental-API notices) are silenced here,
and so are the few ``cpuinfo`` lines the native runtime writes to stderr when its thread pool starts;
any other native log line still reaches stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import weakref
from pathlib import Path

import numpy as np

from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.errors import BlockSkipError, BundleError
from blockskip.runtime.files import atomic_write, ensure_writable_dir
from blockskip.runtime.memory import peak_rss_mib
from blockskip.runtime.native_log import fd2_filtered
from blockskip.runtime.progress import Progress
from blockskip.runtime.train_loop import run_steps

CHECKPOINT = "checkpoint.safetensors"  # inside OUT/checkpoint/: the torch backend's file and format


@contextlib.contextmanager
def quiet():
    """executorch/torchao (and torch.export, when exporting) log optional-kernel failures and API
    deprecations on import, load and export."""
    names = ("torchao", "executorch", "torch._export", "torch.export", "torch.utils._pytree", "root")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_NATIVE_NOISE = ("[cpuinfo_utils.cpp:",)


def _native_log():
    """Run a program with the native runtime's stderr (fd 2) captured, then pass its lines on, less the
    ones ExecuTorch logs once when its thread pool starts (how it read the CPU description): they are
    no fault and would break into the progress bars. Other lines are kept (printed after the call)."""
    return fd2_filtered(lambda line, failed: not line.startswith(_NATIVE_NOISE))


def _et():
    """ExecuTorch's program loader and training module."""
    try:
        with quiet(), _native_log():
            from executorch.extension.pybindings.portable_lib import _load_for_executorch
            from executorch.extension.training import TrainingModule
    except ImportError as e:
        raise BlockSkipError(
            f"the executorch backend needs executorch==1.5.1 ({e}); pip install 'dit-blockskip[torch,executorch]'"
        ) from e
    return _load_for_executorch, TrainingModule


def _load_program(path: Path, data: Path | None = None):
    load, _ = _et()
    with quiet(), _native_log():
        return load(str(path), str(data)) if data is not None else load(str(path))


def formats_of(bundle: Bundle) -> list[str]:
    return list(bundle.manifest.get("formats", ["torch"]))


def _section(bundle: Bundle) -> dict:
    sec = bundle.manifest.get("pte")
    if not sec:
        raise BundleError(
            f"bundle {bundle.root} has no ExecuTorch programs (formats: {', '.join(formats_of(bundle))}); "
            "export it with --format pte (or --format torch,pte) for --backend executorch"
        )
    return sec


# --------------------------------------------------------------------------------------------
# precompute


def _store(bundle: Bundle):
    """A BlockStore whose blocks are ExecuTorch programs (loaded on load, dropped on free)."""
    from blockskip.runtime.backends.torch_io import BlockStore

    sec = _section(bundle)

    class EtBlockStore(BlockStore):
        def __init__(self):
            super().__init__(bundle)
            self.programs: dict[int, object] = {}
            self._program_refs: list[weakref.ref] = []

        def load_block(self, i):
            if i >= len(sec["blocks"]):
                raise BundleError(f"the bundle has no ExecuTorch program for block {i}; export it again")
            rel = sec["blocks"][i]["file"]
            self.programs[i] = _load_program(bundle.path(rel))
            self.loaded.append(rel)
            self._program_refs.append(weakref.ref(self.programs[i]))
            alive = sum(r() is not None for r in self._program_refs)
            self.max_resident = max(self.max_resident, alive)
            return [f"__et_block__.{i}"]

        def free(self, names):
            blocks = [n for n in names if n.startswith("__et_block__.")]
            for n in blocks:
                self.programs.pop(int(n.rsplit(".", 1)[1]), None)
            rest = [n for n in names if n not in blocks]
            if rest:
                super().free(rest)

        def run_block(self, i, state, consts):
            spec = sec["blocks"][i]
            feed = [state[n].detach().float().contiguous() for n in spec["state"]]
            feed += [consts[n].detach().float().contiguous() for n in spec["consts"]]
            with _native_log():
                outs = self.programs[i].forward(feed)
            new = {n: None for n in spec["state"]}
            new.update(dict(zip(spec["outputs"], outs)))
            return new

    return EtBlockStore()


def encode_latents(bundle: Bundle, images: np.ndarray):
    """Photos [N,3,S,S] in [-1,1] -> latents, with the encoder program (loaded only here)."""
    import torch

    sec = _section(bundle)["encoder"]
    prog = _load_program(bundle.path(sec["file"]))
    want = list(sec["input"][1:])
    out = []
    for im in images:
        if list(im.shape) != want:
            raise BlockSkipError(f"photo tensor {list(im.shape)} does not match the exported encoder input {want}")
        with _native_log():
            out.append(prog.forward([torch.from_numpy(np.ascontiguousarray(im[None], dtype=np.float32))])[0])
    del prog
    return torch.cat(out)


def precompute(bundle: Bundle, images: np.ndarray, cache_dir, *, source: dict, progress: Progress | None = None):
    import torch

    from blockskip.runtime.backends.torch import precompute_with

    _section(bundle)
    return precompute_with(bundle, images, cache_dir, source=source, progress=progress,
                           make_store=lambda: _store(bundle), encode=lambda store: encode_latents(bundle, images),
                           dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# train


class AdamW:
    """AdamW as ``torch.optim.AdamW(foreach=False)`` computes it, on tensors updated in place: decoupled
    weight decay first, then the moments, then the bias-corrected step. The state (``step``,
    ``exp_avg``, ``exp_avg_sq`` per tensor) has torch's names, shapes and dtypes, so checkpoints move
    between this and torch's optimizer."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), \
            float(weight_decay)
        self.state: dict[str, dict] = {}

    def step(self, params: dict, grads: dict) -> None:
        import torch

        b1, b2 = self.betas
        lr, wd = self.lr, self.weight_decay
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n]
                st = self.state.get(n)
                if st is None:
                    st = self.state[n] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                          "exp_avg_sq": torch.zeros_like(p)}
                st["step"] += 1
                t = float(st["step"].item())
                if wd != 0:
                    p.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(g, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5).add_(self.eps)
                p.addcdiv_(st["exp_avg"], denom, value=-(lr / (1 - b1**t)))


class EtTrainer:
    """The bundle's training program, loaded: :meth:`loss_and_grad` per micro-step, :meth:`update` per
    optimizer step. The LoRA tensors of :meth:`parameters` are the program's own weights."""

    def __init__(self, bundle: Bundle):
        import torch

        self.bundle, self.sec = bundle, _section(bundle)["train"]
        _, training_module = _et()
        if "data" not in self.sec:
            raise BundleError(f"bundle {bundle.root} has no LoRA weights (.ptd) for its training program; export again")
        program = _load_program(bundle.path(self.sec["file"]), bundle.path(self.sec["data"]))
        with quiet():
            self.module = training_module(program)
        self.inputs = list(self.sec["inputs"])
        self.shapes = {n: list(s) for n, s in self.sec["shapes"].items()}
        opt = self.sec["optimizer"]
        if opt.get("type", "adamw") != "adamw":
            raise BundleError(f"the training program was exported for optimizer {opt.get('type')!r}; expected adamw")
        self.optimizer = AdamW(bundle.plan.lr, opt["betas"], opt["eps"], opt["weight_decay"])
        self.grad_sum: dict[str, torch.Tensor] | None = None

    def feed(self, entry: dict, scale: float) -> list:
        import torch

        missing = [n for n in self.inputs[:-1] if n not in entry]
        if missing:
            raise BlockSkipError(f"cache entry lacks {missing}; the cache was made for another bundle")
        out = []
        for n in self.inputs[:-1]:
            t = torch.as_tensor(entry[n]).float().contiguous()
            if list(t.shape) != self.shapes[n]:
                raise BlockSkipError(f"cache tensor {n} has shape {list(t.shape)}, the training program takes "
                                     f"{self.shapes[n]}; the cache was made for another bundle")
            out.append(t)
        return out + [torch.tensor([scale], dtype=torch.float32)]

    def _run(self, entry: dict, scale: float):
        feed = self.feed(entry, scale)
        with quiet(), _native_log():
            return self.module.forward_backward("forward", feed)

    def parameters(self) -> dict:
        """LoRA name -> the program's weight tensor (writes change what the program computes)."""
        if self.module.named_params is None:
            # the training module hands out its parameters only after a first run: a zero input with
            # loss scale 0 (its outputs are dropped; a run never changes the weights)
            import torch

            self._run({n: torch.zeros(s) for n, s in self.shapes.items()}, 0.0)
        params = self.module.named_parameters()
        names = list(self.sec["lora"])
        if sorted(params) != sorted(names):
            raise BundleError("the training program's parameters differ from the manifest's LoRA list; export again")
        return {n: params[n] for n in names}

    def loss_and_grad(self, entry: dict, scale: float = 1.0) -> float:
        """Forward + backward of one entry (loss times ``scale``); gradients add up until :meth:`update`.
        Returns the unscaled loss."""
        out = self._run(entry, scale)
        grads = self.module.named_gradients()
        if self.grad_sum is None:
            self.grad_sum = {n: grads[n].clone() for n in self.sec["lora"]}
        else:
            for n in self.grad_sum:
                self.grad_sum[n] += grads[n]
        return float(out[0].reshape(-1)[0]) / scale

    def grads(self) -> dict:
        if self.grad_sum is None:
            raise RuntimeError("no gradients yet: call loss_and_grad first")
        return self.grad_sum

    def update(self) -> None:
        self.optimizer.step(self.parameters(), self.grads())
        self.grad_sum = None

    def lora(self) -> dict:
        """Copies of the LoRA tensors (peft names) as they are now."""
        return {n: p.detach().clone() for n, p in self.parameters().items()}

    # checkpoints: the torch backend's tensors and metadata

    def checkpoint_tensors(self) -> dict:
        import torch

        tensors = {}
        for n, st in self.optimizer.state.items():
            for k, v in st.items():
                t = torch.as_tensor(v).detach().clone()
                tensors[f"opt.{k}.{n}"] = t.reshape(-1) if t.dim() == 0 else t
        for n, p in self.parameters().items():
            tensors[f"param.{n}"] = p.detach().clone()
        return tensors

    def save(self, ckpt_dir: Path, step: int, log: dict) -> None:
        from safetensors.torch import save_file

        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tensors = self.checkpoint_tensors()
        # which backend ran is the resuming run's to say: the torch backend takes the saved log as its own
        saved = {k: v for k, v in log.items() if k not in ("backend", "delegate")}
        meta = {"step": str(step), "log": json.dumps(saved)}
        atomic_write(ckpt_dir / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def restore(self, path: Path, tensors: dict) -> None:
        """Load LoRA weights and AdamW state from checkpoint tensors (either backend's)."""
        import torch

        params = self.parameters()
        saved = {k[6:] for k in tensors if k.startswith("param.")}
        if saved != set(params):
            raise BlockSkipError(f"checkpoint {path} does not belong to this bundle's plan; use another -o")
        with torch.no_grad():
            for n, p in params.items():
                v = tensors[f"param.{n}"]
                if list(v.shape) != list(p.shape):
                    raise BlockSkipError(f"checkpoint {path} does not belong to this bundle's plan; use another -o")
                p.copy_(v)
        self.optimizer.state = {}
        for n in params:
            keys = {k: f"opt.{k}.{n}" for k in ("step", "exp_avg", "exp_avg_sq")}
            if all(key in tensors for key in keys.values()):
                self.optimizer.state[n] = {
                    "step": tensors[keys["step"]].float().reshape(()).clone(),
                    "exp_avg": tensors[keys["exp_avg"]].float().clone(),
                    "exp_avg_sq": tensors[keys["exp_avg_sq"]].float().clone(),
                }


def _read_checkpoint(path: Path) -> tuple[dict, dict, int]:
    """(tensors, log, step) of a checkpoint file; a torn or corrupt one is a clear error."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        return tensors, json.loads(meta["log"]), int(meta["step"])
    except Exception as e:  # safetensors raises several types on a torn/corrupt file
        raise BlockSkipError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from e


def checkpoint_source(out_dir) -> str | None:
    """The cache source recorded in OUT's checkpoint (None: no checkpoint)."""
    path = Path(out_dir) / "checkpoint" / CHECKPOINT
    if not path.is_file():
        return None
    return _read_checkpoint(path)[1].get("cache_source")


def _load_entry(cache: ResidualCache, k: int) -> dict:
    from safetensors.torch import load_file

    return load_file(cache.path(k))


def train(bundle: Bundle, cache_dir, out_dir, *, progress: Progress | None = None, stop_after: int | None = None):
    """Train the LoRA with ExecuTorch; resume from ``out_dir/checkpoint`` if present. Returns the log dict."""
    plan = bundle.plan
    progress = progress or Progress(quiet=True)
    sec = _section(bundle)
    cache = ResidualCache(cache_dir)
    cache.check_complete({"bundle": bundle.manifest_sha256})
    out = ensure_writable_dir(out_dir)
    ckpt_dir = out / "checkpoint"
    ckpt = ckpt_dir / CHECKPOINT
    log = {"plan": plan.to_dict(), "backend": "executorch", "losses": [], "step_seconds": [], "resumed_from": 0,
           "cache_source": cache.source_sha256()}
    trainer = EtTrainer(bundle)
    start = 0
    if ckpt.is_file():
        tensors, saved, start = _read_checkpoint(ckpt)
        if saved.get("cache_source") != log["cache_source"]:
            raise BlockSkipError(
                f"{ckpt} belongs to a training run on other photos or another bundle; use a new output "
                f"folder (-o), or delete {ckpt_dir} to start over")
        trainer.restore(ckpt, tensors)
        del tensors
        log.update(saved)
        log["backend"] = "executorch"
    log["resumed_from"] = start
    log["delegate"] = sec.get("delegate", "none")
    if start:
        progress.log(f"resuming from step {start} ({ckpt_dir})")
    bar = progress.bar(plan.steps, "train", initial=start)
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)

    run_steps(cache, plan, log, bar, start=start, end=end, load_entry=_load_entry,
              micro_step=lambda entry: trainer.loss_and_grad(entry, 1.0 / plan.grad_accum),
              update=trainer.update, save_checkpoint=lambda step: trainer.save(ckpt_dir, step, log))
    bar.close()
    log["peak_rss_mib"] = peak_rss_mib()
    if end == plan.steps:
        from blockskip.runtime.backends.torch_lora import save_lora_tensors

        save_lora_tensors(out / "lora.safetensors", trainer.lora(), bundle.manifest["lora"])
        log["lora"] = str(out / "lora.safetensors")
    atomic_write(out / "train_log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))
    return log
