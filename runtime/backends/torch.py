"""Torch backend: precompute the frozen segments and train the LoRA span.

Precompute streams every block once per chunk of samples (block-major), so at most one block's
weights are resident. Train loads only the trained blocks and the head; skipped blocks stay on the
meta device and their files are never opened.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from blockskip.runtime.backends.torch_families.latent import enable_tiling, encode_images
from blockskip.runtime.backends.torch_io import DTYPES, BlockStore
from blockskip.runtime.backends.torch_lora import (
    inject_lora,
    lora_parameters,
    restore_checkpoint,
    save_checkpoint,
)
from blockskip.runtime.backends.torch_quant import quantize_frozen
from blockskip.runtime.backends.torch_sample import make_sample
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.checkpoint import CHECKPOINT
from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.files import atomic_write
from blockskip.runtime.memory import peak_rss_mib
from blockskip.runtime.precompute import blocks_to_run, gaps, record_boundary, residual_gaps, valid_shard
from blockskip.runtime.progress import Progress
from blockskip.runtime.tensorfile import write_tensors

if TYPE_CHECKING:
    from blockskip.runtime.backends.torch_families.base import State, TorchFamily
    from blockskip.runtime.contract import Arrays, Trainer
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.schedule import ScheduleEntry

    # a block's forward with autograd recording (``torch_stream.block_graph``): (state leaves, LoRA
    # leaves, outputs)
    _Graph = tuple[State, State, State]

torch_dtype = DTYPES.__getitem__


class _BlockBar(Protocol):
    """What ``run_entries`` reports to: a ``progress.Bar``, or the dry run's per-block hook."""

    def update(self, n: int, *, block: int) -> None: ...


# --------------------------------------------------------------------------------------------
# precompute


def require_torch_format(bundle: Bundle) -> None:
    formats = bundle.manifest.get("formats", ["torch"])
    if "torch" not in formats:
        raise BlockSkipError(
            f"bundle {bundle.root} was exported for {', '.join(formats)} only; use --backend ort, or export "
            "it again with --format torch (or --format torch,onnx) for the torch backend"
        )


def precompute(
    bundle: Bundle,
    images: np.ndarray,
    cache_dir: str | Path,
    *,
    source: dict[str, Any],
    progress: Progress | None = None,
) -> ResidualCache:
    require_torch_format(bundle)
    plan = bundle.plan
    return precompute_with(
        bundle,
        images,
        cache_dir,
        source=source,
        progress=progress,
        make_store=lambda: BlockStore(bundle),
        dtype=torch_dtype(plan.dtype),
        encode=lambda store: encode_latents(store, images, torch_dtype(plan.dtype), plan.vae_tiling),
    )


def precompute_with(
    bundle: Bundle,
    images: np.ndarray,
    cache_dir: str | Path,
    *,
    source: dict[str, Any],
    progress: Progress | None,
    make_store: Callable[[], BlockStore],
    encode: Callable[[BlockStore], torch.Tensor],
    dtype: torch.dtype,
) -> ResidualCache:
    """The precompute loop every backend shares: ``make_store()`` gives the BlockStore whose blocks it
    streams (safetensors, ORT sessions, ExecuTorch programs), ``encode(store)`` the photos' latents."""
    plan = bundle.plan
    schedule = bundle.schedule(len(images))
    cache = ResidualCache.create(cache_dir, source=source, schedule=schedule)
    todo = [k for k in range(len(schedule)) if not valid_shard(cache, k)]
    progress = progress or Progress(quiet=True)
    if not todo:
        progress.log(f"cache complete: {len(schedule)} entries in {cache.root}")
        return cache

    store = make_store()
    latents = encode(store)
    text = prompt_text(store, dtype)
    chunk = plan.precompute_chunk or len(todo)
    passes = (len(todo) + chunk - 1) // chunk
    stop = blocks_to_run(bundle.trained, store.family.num_blocks, bundle.plan.back_residual)
    bar = progress.bar(len(todo) + passes * stop, "precompute")
    for c0 in range(0, len(todo), chunk):
        ks = todo[c0 : c0 + chunk]
        entries = compute_entries(
            store,
            latents,
            text,
            [schedule[k] for k in ks],
            plan,
            bundle.manifest["vae_factor"],
            bundle.trained,
            bar,
        )
        for k, tensors in zip(ks, entries):
            atomic_write(cache.root / cache.shard_name(k), functools.partial(write_tensors, tensors=tensors))
            cache.record(k)
            cache.flush()
            bar.update(1, entry=k)
        del entries
    bar.close()
    close = getattr(store, "close", None)
    if close is not None:
        close()
    cache.index["max_resident_blocks"] = store.max_resident
    cache.index["peak_rss_mib"] = peak_rss_mib()  # this process's, up to the end of precompute
    cache.flush()
    return cache


def encode_latents(
    store: BlockStore, images: np.ndarray | torch.Tensor, dtype: torch.dtype, tiling: bool = False
) -> torch.Tensor:
    """Photos [N,3,S,S] in [-1,1] -> latents; the encoder is resident only here."""
    enc, spec = store.load_encoder()
    if tiling:
        enable_tiling(enc, spec)
    with torch.no_grad():
        latents = torch.cat([encode_images(enc, spec, torch.as_tensor(im[None]).float()) for im in images])
    del enc
    return latents.to(dtype)


def prompt_text(store: BlockStore, dtype: torch.dtype) -> State:
    """Prompt embeddings -> the family's per-run text inputs (e.g. context_embedder output)."""
    prompt = store.load_prompt(dtype)
    names = store.load_part("embed")
    with torch.no_grad():
        text = store.family.prepare_text(store.model, prompt)
    store.free(names)
    return text


def compute_entries(
    store: BlockStore,
    latents: torch.Tensor,
    text: State,
    entries: list[ScheduleEntry],
    plan: Plan,
    vae_factor: int,
    trained: list[int],
    bar: _BlockBar | None = None,
) -> list[State]:
    """Cache tensors for a chunk of schedule entries, streaming every block once (block-major)."""
    states, consts, targets = embed_entries(store, latents, text, entries, plan, vae_factor)
    return run_entries(store, states, consts, targets, plan, trained, bar)


def embed_entries(
    store: BlockStore,
    latents: torch.Tensor,
    text: State,
    entries: list[ScheduleEntry],
    plan: Plan,
    vae_factor: int,
) -> tuple[list[State], list[State], list[torch.Tensor]]:
    """The first half of ``compute_entries``: each entry's noised crop embedded (its state, constants and
    target tokens)."""
    fam, model = store.family, store.model
    states: list[State] = []
    consts: list[State] = []
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        names = store.load_part("embed")
        for e in entries:
            x_t, target, sigma, geom = make_sample(latents[e.image], e, plan.s_min, plan.s_max, vae_factor)
            st, cs = fam.embed(model, x_t, sigma, text, geom, plan.positions, plan.guidance)
            states.append(st)
            consts.append(cs)
            targets.append(fam.to_tokens(target))
        store.free(names)
    return states, consts, targets


def run_entries(
    store: BlockStore,
    states: list[State],
    consts: list[State],
    targets: list[torch.Tensor],
    plan: Plan,
    trained: list[int],
    bar: _BlockBar | None = None,
) -> list[State]:
    """The second half of ``compute_entries``: every block streamed once over the embedded entries
    (``states`` is advanced in place), and each entry's cache tensors."""
    L = store.family.num_blocks
    gap_list = residual_gaps(trained, L, plan.back_residual)
    count = len(states)
    with torch.no_grad():
        saved: list[State] = [{} for _ in range(count)]
        stop = blocks_to_run(trained, L, plan.back_residual)
        for i in range(stop):
            names = store.load_block(i)
            for j in range(count):
                _record_boundary(saved[j], states[j], i, trained, gap_list, L, before=True)
                states[j] = store.run_block(i, states[j], consts[j])
                _record_boundary(saved[j], states[j], i, trained, gap_list, L, before=False)
            store.free(names)
            del names
            if bar is not None:
                bar.update(1, block=i)
        if stop == trained[0]:  # nothing is skipped after the span: its exact input is all we need
            for j in range(count):
                _record_boundary(saved[j], states[j], stop, trained, gap_list, L, before=True)
    out: list[State] = []
    for j in range(count):
        tensors = dict(saved[j])
        tensors.update({f"c.{n}": v for n, v in consts[j].items()})
        tensors["target"] = targets[j]
        out.append({n: v.contiguous() for n, v in tensors.items()})
    return out


def _record_boundary(
    saved: State,
    state: State,
    i: int,
    trained: list[int],
    gap_list: list[tuple[int, int]],
    L: int,
    before: bool,
) -> None:
    record_boundary(saved, state, i, trained, gap_list, L, before, copy=lambda v: v.clone())


# --------------------------------------------------------------------------------------------
# train


def make_optimizer(params: list[torch.nn.Parameter], plan: Plan) -> torch.optim.Optimizer:
    """AdamW (the paper's optimizer), or bitsandbytes' 8-bit AdamW (block-quantised moments)."""
    if plan.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise BlockSkipError(
                "optimizer adamw8bit needs bitsandbytes: pip install 'dit-blockskip[quant]'"
            ) from e
        adamw8bit: Any = bnb.optim.AdamW8bit  # bitsandbytes is unannotated
        opt: torch.optim.Optimizer = adamw8bit(params, lr=plan.lr, weight_decay=plan.weight_decay)
        return opt
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay, foreach=False)


class TrainedSpan:
    """The trained blocks (LoRA on frozen base) + the residual adds + the head."""

    def __init__(
        self,
        store: BlockStore,
        trained: list[int],
        lora: dict[str, Any],
        seed: int,
        base_quant: str | None = None,
        checkpointing: bool | None = None,
    ) -> None:
        """``base_quant`` ("none", "int8", "nf4") and ``checkpointing`` (recompute each trained block's
        activations in backward): None means the bundle plan's (off without a bundle)."""
        self.store, self.fam, self.model = store, store.family, store.model
        self.trained = trained
        plan = store.bundle.plan if store.bundle is not None else None
        if base_quant is None:
            base_quant = plan.base_quant if plan is not None else "none"
        self.checkpointing = checkpointing if checkpointing is not None else bool(plan and plan.checkpointing)
        self.base_quant = base_quant
        paths = self.fam.block_paths()
        for i in trained:
            store.load_block(i)
            if base_quant != "none":  # block by block: at most one block is resident in full precision
                quantize_frozen(self.model, [paths[i]], base_quant, lora["targets"])
        store.load_part("head")
        self.gaps = gaps(trained, self.fam.num_blocks)
        torch.manual_seed(seed)
        inject_lora(self.model, lora)
        self.params = lora_parameters(self.model)

    def forward(self, entry: State) -> torch.Tensor:
        return span_forward(self.fam, self.model, self.trained, self.gaps, entry, self.checkpointing)

    def loss(self, entry: State) -> torch.Tensor:
        return span_loss(self.forward(entry), entry)


def span_forward(
    fam: TorchFamily,
    model: torch.nn.Module,
    trained: list[int],
    gap_list: list[tuple[int, int]],
    entry: State,
    checkpointing: bool = False,
) -> torch.Tensor:
    """Cache entry -> head output: the trained blocks, each skipped span's residual added after it."""
    state = {n[3:]: v for n, v in entry.items() if n.startswith("in.")}
    consts = {n[2:]: v for n, v in entry.items() if n.startswith("c.")}
    starts = {a: b for a, b in gap_list}
    for i in trained:
        if checkpointing and torch.is_grad_enabled():
            state = checkpoint(fam.run_block, model, i, state, consts, use_reentrant=False)
        else:
            state = fam.run_block(model, i, state, consts)
        if i + 1 in starts:
            a = i + 1
            for n in list(state):
                d = entry.get(f"delta.{a}.{n}")
                if d is not None:
                    state[n] = state[n] + d
    return fam.head(model, state, consts)


def span_loss(pred: torch.Tensor, entry: State) -> torch.Tensor:
    """The flow-matching loss: MSE against ``eps - x0`` (computed in float32)."""
    return torch.nn.functional.mse_loss(pred.float(), entry["target"].float())


class TorchTrainer:
    """The resident span (peft LoRA on the loaded trained blocks) with torch's optimizer: a Trainer."""

    backend = "torch"
    checkpoint_file = CHECKPOINT

    def __init__(self, bundle: Bundle) -> None:
        plan = bundle.plan
        self.store = BlockStore(bundle)
        self.span = TrainedSpan(
            self.store, bundle.trained, bundle.manifest["lora"], plan.seed, base_quant=plan.base_quant
        )
        self.opt = make_optimizer(self.span.params, plan)

    def load_entry(self, path: Path) -> State:
        return load_file(path)

    def loss_and_grad(self, entry: State, scale: float) -> float:
        loss = self.span.loss(entry)
        (loss * scale).backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
        return loss.item()

    def eval_loss(self, entry: State) -> float:
        with torch.no_grad():
            return self.span.loss(entry).item()

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def lora(self) -> Arrays:
        return {
            n: p.detach().float().numpy().copy()
            for n, p in self.span.model.named_parameters()
            if ".lora_" in n
        }

    def info(self) -> dict[str, Any]:
        return {"blocks_loaded": [r for r in self.store.loaded if r.startswith("model/blocks/")]}

    def save_checkpoint(self, path: Path, step: int, log: dict[str, Any]) -> None:
        save_checkpoint(path, self.span.model, self.opt, step, log)

    def load_checkpoint(self, path: Path) -> tuple[int, dict[str, Any]]:
        return restore_checkpoint(path, self.span.model, self.opt)


class TorchBlocks:
    """The block backend for a streamed span on torch: each shape's stream module run eagerly (autograd
    inside one block at a time), the same modules the programs are traced from."""

    name = "torch"

    def __init__(self, bundle: Bundle) -> None:
        from blockskip.runtime.backends.torch_families import get_family
        from blockskip.runtime.stream import StreamSpec

        self.bundle, self.spec = bundle, StreamSpec(bundle)
        self.fam = get_family(bundle.family, bundle.manifest["model"]["config"])
        self.skeleton = self.fam.skeleton()
        self.lora_cfg = bundle.manifest["lora"]
        self.modules: dict[str, torch.nn.Module] = {}
        # (shape, state, lora, graph) of a forward run with keep=True
        self.kept: tuple[str, Arrays, Arrays, _Graph] | None = None

    def _module(self, shape: str) -> torch.nn.Module:
        from blockskip.runtime.backends import torch_stream as ts

        if shape not in self.modules:
            if shape == "head":
                self.modules[shape] = ts.head_module(self.fam, self.skeleton, self.spec.storage)
            else:
                rec = self.spec.shapes[shape]
                self.modules[shape] = ts.shape_module(
                    self.fam,
                    self.skeleton,
                    rec["example_block"],
                    rec["targets"],
                    self.spec.storage,
                    self.lora_cfg,
                )
        return self.modules[shape]

    @staticmethod
    def _t(arrays: Arrays) -> State:
        out: State = {}
        for k, a in arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(a))
            out[k] = t.view(torch.bfloat16) if a.dtype == np.uint16 else t
        return out

    @staticmethod
    def _np(tensors: State) -> Arrays:
        return {k: v.detach().numpy() for k, v in tensors.items()}

    def forward(
        self, shape: str, state: Arrays, consts: Arrays, weights: Arrays, lora: Arrays, *, keep: bool = False
    ) -> Arrays:
        from blockskip.runtime.backends import torch_stream as ts

        self.kept = None
        if keep:  # the block's autograd graph stays for the VJP that follows (no recomputed forward)
            graph = ts.block_graph(
                self.fam,
                self._module(shape),
                self._t(state),
                self._t(consts),
                self._t(weights),
                self._t(lora),
            )
            self.kept = (shape, dict(state), dict(lora), graph)
            return self._np({k: v.detach() for k, v in graph[2].items()})
        with torch.no_grad():
            return self._np(
                ts.block_forward(
                    self.fam,
                    self._module(shape),
                    self._t(state),
                    self._t(consts),
                    self._t(weights),
                    self._t(lora),
                )
            )

    def _kept_for(self, shape: str, state: Arrays, lora: Arrays) -> _Graph | None:
        kept, self.kept = self.kept, None
        if kept is None or kept[0] != shape:
            return None

        def same(a: Arrays, b: Arrays) -> bool:
            return a.keys() == b.keys() and all(a[k] is b[k] for k in a)

        return kept[3] if same(kept[1], state) and same(kept[2], lora) else None

    def vjp(
        self, shape: str, state: Arrays, consts: Arrays, grads: Arrays, weights: Arrays, lora: Arrays
    ) -> tuple[Arrays, Arrays]:
        from blockskip.runtime.backends import torch_stream as ts

        graph = self._kept_for(shape, state, lora)
        if graph is None:
            graph = ts.block_graph(
                self.fam,
                self._module(shape),
                self._t(state),
                self._t(consts),
                self._t(weights),
                self._t(lora),
            )
        g_in, g_lora = ts.graph_vjp(graph, self._t(grads))
        return self._np(g_in), self._np(g_lora)

    def head(
        self, hidden: np.ndarray, consts: Arrays, target: np.ndarray, scale: float, weights: Arrays
    ) -> tuple[float, np.ndarray]:
        from blockskip.runtime.backends import torch_stream as ts

        loss, g = ts.head_loss_grad(
            self.fam,
            self._module("head"),
            torch.from_numpy(hidden),
            self._t(consts),
            torch.from_numpy(target),
            torch.tensor([scale], dtype=torch.float32),
            self._t(weights),
        )
        return float(loss.reshape(-1)[0]), g.numpy()

    def precompute_block(self, shape: str, state: Arrays, consts: Arrays, weights: Arrays) -> Arrays:
        lora = {k: np.zeros(s, np.float32) for k, s in self.spec.lora_shapes(shape).items()}
        return self.forward(shape, state, consts, weights, lora)

    def release(self) -> None:
        self.kept = None


def make_trainer(bundle: Bundle, out: Path) -> Trainer:
    """The Trainer a bundle's plan asks for on this backend."""
    if bundle.plan.span == "streamed":
        from blockskip.runtime.stream import StreamedSpan

        return StreamedSpan(bundle, TorchBlocks(bundle), stash_dir=out / "stash")
    return TorchTrainer(bundle)


def train(
    bundle: Bundle,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the LoRA; resume from ``out_dir/checkpoint`` if present. Returns the log dict."""
    from blockskip.runtime.driver import train as drive

    require_torch_format(bundle)
    log = drive(
        bundle,
        cache_dir,
        out_dir,
        lambda out: make_trainer(bundle, out),
        progress=progress,
        stop_after=stop_after,
    )
    return log
