"""Torch backend: precompute the frozen segments and train the LoRA span.

Precompute streams every block once per chunk of samples (block-major), so at most one block's
weights are resident. Train loads only the trained blocks and the head; skipped blocks stay on the
meta device and their files are never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from blockskip.runtime.backends.torch_families.latent import enable_tiling, encode_images
from blockskip.runtime.backends.torch_io import DTYPES, BlockStore
from blockskip.runtime.backends.torch_lora import (
    inject_lora,
    load_checkpoint,
    lora_parameters,
    save_checkpoint,
    save_lora,
)
from blockskip.runtime.backends.torch_quant import quantize_frozen
from blockskip.runtime.backends.torch_sample import make_sample
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.errors import BlockSkipError, CacheError
from blockskip.runtime.files import atomic_write, ensure_writable_dir
from blockskip.runtime.memory import peak_rss_mib
from blockskip.runtime.progress import Progress
from blockskip.runtime.train_loop import run_steps

torch_dtype = DTYPES.__getitem__


def gaps(trained: list[int], num_blocks: int) -> list[tuple[int, int]]:
    """Skipped spans [a, b) after the first trained block (the front span is stored exactly)."""
    out = [(a + 1, b) for a, b in zip(trained, trained[1:]) if b - a > 1]
    if trained[-1] < num_blocks - 1:
        out.append((trained[-1] + 1, num_blocks))
    return out


def blocks_to_run(trained: list[int], num_blocks: int, back_residual: bool = True) -> int:
    """Precompute runs blocks [0, this): up to the first trained block, and on to the end of the last
    skipped span (nothing after the last trained block is needed when there is no back skip, or when
    the back span is dropped rather than replaced by its residual)."""
    g = residual_gaps(trained, num_blocks, back_residual)
    return max(trained[0], g[-1][1] if g else 0)


def residual_gaps(trained: list[int], num_blocks: int, back_residual: bool = True) -> list[tuple[int, int]]:
    """The skipped spans [a, b) after the first trained block whose residual the cache holds."""
    return [(a, b) for a, b in gaps(trained, num_blocks) if back_residual or b != num_blocks]


# --------------------------------------------------------------------------------------------
# precompute


def require_torch_format(bundle: Bundle) -> None:
    formats = bundle.manifest.get("formats", ["torch"])
    if "torch" not in formats:
        raise BlockSkipError(
            f"bundle {bundle.root} was exported for {', '.join(formats)} only; use --backend ort, or export "
            "it again with --format torch (or --format torch,onnx) for the torch backend"
        )


def precompute(bundle: Bundle, images: np.ndarray, cache_dir, *, source: dict, progress: Progress | None = None):
    require_torch_format(bundle)
    plan = bundle.plan
    return precompute_with(bundle, images, cache_dir, source=source, progress=progress,
                           make_store=lambda: BlockStore(bundle), dtype=torch_dtype(plan.dtype),
                           encode=lambda store: encode_latents(store, images, torch_dtype(plan.dtype), plan.vae_tiling))


def precompute_with(bundle: Bundle, images: np.ndarray, cache_dir, *, source: dict, progress: Progress | None,
                    make_store, encode, dtype):
    """The precompute loop every backend shares: ``make_store()`` gives the BlockStore whose blocks it
    streams (safetensors, ORT sessions, ExecuTorch programs), ``encode(store)`` the photos' latents."""
    plan = bundle.plan
    schedule = bundle.schedule(len(images))
    cache = ResidualCache.create(cache_dir, source=source, schedule=schedule)
    todo = [k for k in range(len(schedule)) if not _valid_shard(cache, k)]
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
        entries = compute_entries(store, latents, text, [schedule[k] for k in ks], plan,
                                  bundle.manifest["vae_factor"], bundle.trained, bar)
        for k, tensors in zip(ks, entries):
            atomic_write(cache.root / cache.shard_name(k), lambda tmp, t=tensors: save_file(t, tmp))
            cache.record(k)
            cache.flush()
            bar.update(1, entry=k)
        del entries
    bar.close()
    cache.index["max_resident_blocks"] = store.max_resident
    cache.index["peak_rss_mib"] = peak_rss_mib()  # this process's, up to the end of precompute
    cache.flush()
    return cache


def encode_latents(store: BlockStore, images, dtype, tiling: bool = False) -> torch.Tensor:
    """Photos [N,3,S,S] in [-1,1] -> latents; the encoder is resident only here."""
    enc, spec = store.load_encoder()
    if tiling:
        enable_tiling(enc, spec)
    with torch.no_grad():
        latents = torch.cat([encode_images(enc, spec, torch.as_tensor(im[None]).float()) for im in images])
    del enc
    return latents.to(dtype)


def prompt_text(store: BlockStore, dtype) -> dict:
    """Prompt embeddings -> the family's per-run text inputs (e.g. context_embedder output)."""
    prompt = store.load_prompt(dtype)
    names = store.load_part("embed")
    with torch.no_grad():
        text = store.family.prepare_text(store.model, prompt)
    store.free(names)
    return text


def compute_entries(store: BlockStore, latents, text, entries, plan, vae_factor: int, trained: list[int],
                    bar=None) -> list[dict]:
    """Cache tensors for a chunk of schedule entries, streaming every block once (block-major)."""
    fam, model = store.family, store.model
    L = fam.num_blocks
    gap_list = residual_gaps(trained, L, plan.back_residual)
    states, consts, targets = [], [], []
    with torch.no_grad():
        names = store.load_part("embed")
        for e in entries:
            x_t, target, sigma, geom = make_sample(latents[e.image], e, plan.s_min, plan.s_max, vae_factor)
            st, cs = fam.embed(model, x_t, sigma, text, geom, plan.positions, plan.guidance)
            states.append(st), consts.append(cs), targets.append(fam.to_tokens(target))
        store.free(names)
        saved: list[dict] = [{} for _ in entries]
        stop = blocks_to_run(trained, L, plan.back_residual)
        for i in range(stop):
            names = store.load_block(i)
            for j in range(len(entries)):
                _record_boundary(saved[j], states[j], i, trained, gap_list, L, before=True)
                states[j] = store.run_block(i, states[j], consts[j])
                _record_boundary(saved[j], states[j], i, trained, gap_list, L, before=False)
            store.free(names)
            del names
            if bar is not None:
                bar.update(1, block=i)
        if stop == trained[0]:  # nothing is skipped after the span: its exact input is all we need
            for j in range(len(entries)):
                _record_boundary(saved[j], states[j], stop, trained, gap_list, L, before=True)
    out = []
    for j in range(len(entries)):
        tensors = dict(saved[j])
        tensors.update({f"c.{n}": v for n, v in consts[j].items()})
        tensors["target"] = targets[j]
        out.append({n: v.contiguous() for n, v in tensors.items()})
    return out


def _valid_shard(cache: ResidualCache, k: int) -> bool:
    if not cache.has(k):
        return False
    try:
        cache.path(k)
        return True
    except CacheError:
        return False  # corrupt: recompute it


def _record_boundary(saved, state, i, trained, gap_list, L, before):
    """Keep the exact input of the first trained block and the residual of every skipped span."""
    if before and i == trained[0]:
        saved.update({f"in.{n}": v.clone() for n, v in state.items() if v is not None})
    for a, b in gap_list:
        if before and i == a:
            saved.update({f"tmp.{a}.{n}": v.clone() for n, v in state.items() if v is not None})
        if not before and i == b - 1:
            # only the hidden residual of the back span reaches the head
            keys = ["hidden"] if b == L else [n for n, v in state.items() if v is not None]
            for n in keys:
                if f"tmp.{a}.{n}" in saved:
                    saved[f"delta.{a}.{n}"] = state[n] - saved[f"tmp.{a}.{n}"]
            for n in [x for x in saved if x.startswith(f"tmp.{a}.")]:
                del saved[n]


# --------------------------------------------------------------------------------------------
# train


def make_optimizer(params, plan) -> torch.optim.Optimizer:
    """AdamW (the paper's optimizer), or bitsandbytes' 8-bit AdamW (block-quantised moments)."""
    if plan.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise BlockSkipError("optimizer adamw8bit needs bitsandbytes: pip install 'dit-blockskip[quant]'") from e
        return bnb.optim.AdamW8bit(params, lr=plan.lr, weight_decay=plan.weight_decay)
    return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay, foreach=False)


class TrainedSpan:
    """The trained blocks (LoRA on frozen base) + the residual adds + the head."""

    def __init__(self, store: BlockStore, trained: list[int], lora: dict, seed: int, base_quant: str | None = None,
                 checkpointing: bool | None = None):
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

    def forward(self, entry: dict) -> torch.Tensor:
        return span_forward(self.fam, self.model, self.trained, self.gaps, entry, self.checkpointing)

    def loss(self, entry: dict) -> torch.Tensor:
        return span_loss(self.forward(entry), entry)


def span_forward(fam, model, trained: list[int], gap_list, entry: dict, checkpointing: bool = False) -> torch.Tensor:
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


def span_loss(pred: torch.Tensor, entry: dict) -> torch.Tensor:
    """The flow-matching loss: MSE against ``eps - x0`` (computed in float32)."""
    return torch.nn.functional.mse_loss(pred.float(), entry["target"].float())


def _load_entry(cache: ResidualCache, k: int) -> dict:
    return load_file(cache.path(k))


def train(bundle: Bundle, cache_dir, out_dir, *, progress: Progress | None = None, stop_after: int | None = None):
    """Train the LoRA; resume from ``out_dir/checkpoint`` if present. Returns the log dict."""
    require_torch_format(bundle)
    plan = bundle.plan
    progress = progress or Progress(quiet=True)
    cache = ResidualCache(cache_dir)
    cache.check_complete({"bundle": bundle.manifest_sha256})
    out = ensure_writable_dir(out_dir)
    store = BlockStore(bundle)
    span = TrainedSpan(store, bundle.trained, bundle.manifest["lora"], plan.seed, base_quant=plan.base_quant)
    opt = make_optimizer(span.params, plan)
    ckpt_dir = out / "checkpoint"
    log = {"plan": plan.to_dict(), "backend": "torch", "losses": [], "step_seconds": [], "resumed_from": 0,
           "cache_source": cache.source_sha256()}
    start = load_checkpoint(ckpt_dir, span.model, opt, log)
    log["resumed_from"] = start
    if start:
        progress.log(f"resuming from step {start} ({ckpt_dir})")
    bar = progress.bar(plan.steps, "train", initial=start)
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)

    def micro_step(entry) -> float:
        loss = span.loss(entry)
        (loss / plan.grad_accum).backward()
        return loss.item()

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    run_steps(cache, plan, log, bar, start=start, end=end, load_entry=_load_entry, micro_step=micro_step,
              update=update, save_checkpoint=lambda step: save_checkpoint(ckpt_dir, span.model, opt, step, log))
    bar.close()
    log["peak_rss_mib"] = peak_rss_mib()
    log["blocks_loaded"] = [r for r in store.loaded if r.startswith("model/blocks/")]
    if end == plan.steps:
        save_lora(out / "lora.safetensors", span.model, bundle.manifest["lora"])
        log["lora"] = str(out / "lora.safetensors")
    atomic_write(out / "train_log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))
    return log

