"""ExecuTorch backend: block programs for precompute and the streamed span, a training program for the
resident span.

Precompute (``runtime.precompute``) encodes photos with ``pte/encoder.pte``, builds each sample with
the embed program (``stream/embed.embed.pte``) and streams each block's stored weights through its
shape's forward program (``stream/<shape>.forward.pte``), as the native runner does. A streamed span runs the forward / VJP / head programs
under ``runtime.stream`` (one program loaded at a time: its planned arena is all it holds). A resident
span runs the joint forward-backward program ``pte/train/span.pte`` (its LoRA weights in ``span.ptd``)
through ExecuTorch's training module: each call returns the loss and the LoRA gradients, and AdamW
(``runtime.adamw``) updates the program's own weight memory in place.

Either way the checkpoint is the shared one (``checkpoint/checkpoint.safetensors``), so a run started
with one backend resumes with another.

The Python-side loader warnings (torchao's optional kernels, experimental-API notices) are silenced here,
and so are the few ``cpuinfo`` lines the native runtime writes to stderr when its thread pool starts;
any other native log line still reaches stderr.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blockskip.runtime.adamw import AdamW, AdamWConfig
from blockskip.runtime.backends.programs import ProgramBackend
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.checkpoint import CHECKPOINT, read_checkpoint, write_checkpoint
from blockskip.runtime.contract import Arrays, Trainer
from blockskip.runtime.errors import BlockSkipError, BundleError
from blockskip.runtime.native_log import fd2_filtered
from blockskip.runtime.progress import Progress

if TYPE_CHECKING:
    import torch

    from blockskip.runtime.cache import ResidualCache


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def _native_log() -> contextlib.AbstractContextManager[None]:
    """Run a program with the native runtime's stderr (fd 2) captured, then pass its lines on, less the
    ones ExecuTorch logs once when its thread pool starts (how it read the CPU description): they are
    no fault and would break into the progress bars. Other lines are kept (printed after the call)."""
    return fd2_filtered(lambda line, failed: not line.startswith(_NATIVE_NOISE))


def _et() -> tuple[Any, Any]:
    """ExecuTorch's program loader and training module (both untyped)."""
    try:
        with quiet(), _native_log():
            from executorch.extension.pybindings.portable_lib import _load_for_executorch
            from executorch.extension.training import TrainingModule
    except ImportError as e:
        raise BlockSkipError(
            f"the executorch backend needs executorch==1.5.1 ({e}); pip install 'dit-blockskip[torch,executorch]'"
        ) from e
    return _load_for_executorch, TrainingModule


def _load_program(path: Path, data: Path | None = None) -> Any:  # an ExecuTorch program module
    load, _ = _et()
    with quiet(), _native_log():
        return load(str(path), str(data)) if data is not None else load(str(path))


def formats_of(bundle: Bundle) -> list[str]:
    return list(bundle.manifest.get("formats", ["torch"]))


def _section(bundle: Bundle) -> dict[str, Any]:
    sec: dict[str, Any] | None = bundle.manifest.get("pte")
    if not sec:
        raise BundleError(
            f"bundle {bundle.root} has no ExecuTorch programs (formats: {', '.join(formats_of(bundle))}); "
            "export it with --format pte (or --format torch,pte) for --backend executorch"
        )
    return sec


# --------------------------------------------------------------------------------------------
# precompute


def encode_latents(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """Photos [N,3,S,S] in [-1,1] -> latents, with the encoder program(s) (in tiles when exported so;
    loaded only here)."""
    import torch

    from blockskip.runtime.tiles import encode_photos

    def run(prog: Any, x: np.ndarray) -> np.ndarray:
        with _native_log():
            out: np.ndarray = prog.forward([torch.from_numpy(x)])[0].numpy()
            return out

    return encode_photos(
        _section(bundle)["encoder"], images, lambda rel: _load_program(bundle.path(rel)), run
    )


class EtPrograms(ProgramBackend):
    """The block backend over the bundle's ExecuTorch stream programs (Python bindings)."""

    name = "executorch"
    format = "pte"
    keep_loaded = False  # a loaded program holds its planned arena: one at a time

    def load(self, path: Path) -> Any:
        return _load_program(path)

    def execute(self, handle: Any, inputs: list[np.ndarray], io: dict[str, Any]) -> list[np.ndarray]:
        import torch

        feed: list[torch.Tensor] = []
        for a, rec in zip(inputs, io["inputs"]):
            t = torch.from_numpy(np.ascontiguousarray(a))
            feed.append(t.view(torch.bfloat16) if rec["dtype"] == "bfloat16" else t)
        with _native_log():
            outs = handle.forward(feed)
        return [o.numpy() for o in outs]


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
        backend=EtPrograms(bundle),
        progress=progress,
        encode=lambda ims: encode_latents(bundle, ims),
    )


# --------------------------------------------------------------------------------------------
# train


class EtTrainer:
    """The bundle's resident training program, loaded (a ``runtime.contract.Trainer``). The LoRA tensors
    of :meth:`parameters` are the program's own weights."""

    backend = "executorch"
    checkpoint_file = CHECKPOINT

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        sec: dict[str, Any] | None = _section(bundle).get("train")
        if not sec:
            raise BundleError(
                f"bundle {bundle.root} has no ExecuTorch training program (its span is "
                f"{bundle.plan.span}); export it again with --format pte"
            )
        self.sec = sec
        _, training_module = _et()
        if "data" not in self.sec:
            raise BundleError(
                f"bundle {bundle.root} has no LoRA weights (.ptd) for its training program; export again"
            )
        program = _load_program(bundle.path(self.sec["file"]), bundle.path(self.sec["data"]))
        with quiet():
            self.module: Any = training_module(program)
        self.inputs: list[str] = list(self.sec["inputs"])
        self.shapes: dict[str, list[int]] = {n: list(s) for n, s in self.sec["shapes"].items()}
        opt = self.sec["optimizer"]
        if opt.get("type", "adamw") != "adamw":
            raise BundleError(
                f"the training program was exported for optimizer {opt.get('type')!r}; expected adamw"
            )
        self.optimizer = AdamW(
            AdamWConfig(
                lr=bundle.plan.lr,
                beta1=opt["betas"][0],
                beta2=opt["betas"][1],
                eps=opt["eps"],
                weight_decay=opt["weight_decay"],
            )
        )
        self.grad_sum: dict[str, np.ndarray] | None = None

    def load_entry(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(path)

    def feed(self, entry: dict[str, Any], scale: float) -> list[torch.Tensor]:
        import torch

        missing = [n for n in self.inputs[:-1] if n not in entry]
        if missing:
            raise BlockSkipError(f"cache entry lacks {missing}; the cache was made for another bundle")
        out = []
        for n in self.inputs[:-1]:
            t = torch.as_tensor(entry[n]).float().contiguous()
            if list(t.shape) != self.shapes[n]:
                raise BlockSkipError(
                    f"cache tensor {n} has shape {list(t.shape)}, the training program takes "
                    f"{self.shapes[n]}; the cache was made for another bundle"
                )
            out.append(t)
        return out + [torch.tensor([scale], dtype=torch.float32)]

    def _run(self, entry: dict[str, Any], scale: float) -> Any:  # the program's outputs (loss first)
        feed = self.feed(entry, scale)
        with quiet(), _native_log():
            return self.module.forward_backward("forward", feed)

    def parameters(self) -> dict[str, torch.Tensor]:
        """LoRA name -> the program's weight tensor (writes change what the program computes)."""
        if self.module.named_params is None:
            # the training module hands out its parameters only after a first run: a zero input with
            # loss scale 0 (its outputs are dropped; a run never changes the weights)
            import torch

            self._run({n: torch.zeros(s) for n, s in self.shapes.items()}, 0.0)
        params = self.module.named_parameters()
        names = list(self.sec["lora"])
        if sorted(params) != sorted(names):
            raise BundleError(
                "the training program's parameters differ from the manifest's LoRA list; export again"
            )
        return {n: params[n] for n in names}

    def loss_and_grad(self, entry: dict[str, Any], scale: float = 1.0) -> float:
        """Forward + backward of one entry (loss times ``scale``); gradients add up until :meth:`update`.
        Returns the unscaled loss."""
        out = self._run(entry, scale)
        grads = self.module.named_gradients()
        if self.grad_sum is None:
            self.grad_sum = {n: grads[n].numpy().copy() for n in self.sec["lora"]}
        else:
            for n in self.grad_sum:
                self.grad_sum[n] += grads[n].numpy()
        return float(out[0].reshape(-1)[0]) / scale

    def eval_loss(self, entry: dict[str, Any]) -> float:
        out = self._run(entry, 1.0)  # gradients of this run are not kept
        return float(out[0].reshape(-1)[0])

    def grads(self) -> Arrays:
        if self.grad_sum is None:
            raise RuntimeError("no gradients yet: call loss_and_grad first")
        return self.grad_sum

    def update(self) -> None:
        self.optimizer.step({n: p.numpy() for n, p in self.parameters().items()}, self.grads())
        self.grad_sum = None

    def lora(self) -> Arrays:
        """Copies of the LoRA tensors (peft names) as they are now."""
        return {n: p.detach().numpy().copy() for n, p in self.parameters().items()}

    def save_checkpoint(self, path: Path, step: int, log: dict[str, Any]) -> None:
        tensors = {f"param.{n}": a for n, a in self.lora().items()}
        for n, st in self.optimizer.state.items():
            for k, v in st.items():
                tensors[f"opt.{k}.{n}"] = v.copy()
        write_checkpoint(path, tensors, step, log)

    def load_checkpoint(self, path: Path) -> tuple[int, dict[str, Any]]:
        tensors, step, log = read_checkpoint(path)
        params = self.parameters()
        saved = {k[6:] for k in tensors if k.startswith("param.")}
        if saved != set(params):
            raise BlockSkipError(f"checkpoint {path} does not belong to this bundle's plan; use another -o")
        for n, p in params.items():
            v = tensors[f"param.{n}"]
            if list(v.shape) != list(p.shape):
                raise BlockSkipError(
                    f"checkpoint {path} does not belong to this bundle's plan; use another -o"
                )
            p.numpy()[...] = v
        self.optimizer.state = {}
        for n in params:
            keys = {k: f"opt.{k}.{n}" for k in ("step", "exp_avg", "exp_avg_sq")}
            if all(key in tensors for key in keys.values()):
                self.optimizer.state[n] = {
                    k: np.array(tensors[key], np.float32).reshape(-1 if k == "step" else tensors[key].shape)
                    for k, key in keys.items()
                }
        return step, log

    def info(self) -> dict[str, Any]:
        return {"delegate": _section(self.bundle).get("delegate", "none")}


def make_trainer(bundle: Bundle, out: Path) -> Trainer:
    if bundle.plan.span == "streamed":
        from blockskip.runtime.stream import StreamedSpan

        return StreamedSpan(bundle, EtPrograms(bundle), stash_dir=out / "stash")
    return EtTrainer(bundle)


def train(
    bundle: Bundle,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the LoRA with ExecuTorch; resume from ``out_dir/checkpoint`` if present. Returns the log dict."""
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
