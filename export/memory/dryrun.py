"""Trace every device phase on fake tensors: precompute, training steps, saving.

The phases call the torch backend's own functions (``encode_latents``, ``prompt_text``,
``compute_entries``, ``TrainedSpan``, AdamW, ``checkpoint_tensors``) over a ``FakeStore``, so the
prediction follows the code that runs on the device.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from blockskip.export.memory.fake_store import FakeStore
from blockskip.export.memory.tracer import CATEGORIES, MemoryTracer
from blockskip.runtime.backends.torch import (
    TrainedSpan,
    compute_entries,
    encode_latents,
    make_optimizer,
    prompt_text,
)
from blockskip.runtime.backends.torch_io import DTYPES
from blockskip.runtime.backends.torch_lora import checkpoint_tensors, lora_state_dict
from blockskip.runtime.plan import Plan
from blockskip.runtime.schedule import PatchSchedule

GIB = 1024**3

# Hidden workspace of quanto's quantised linears, bytes per weight element (largest weights measured by
# `python -m bench.quant_workspace`): the kernels unpack / dequantise a weight inside one op, out of
# the dispatcher's sight. The dry run adds it once, for the largest quantised weight of the span.
QUANT_WORKSPACE = {("float32", "int8"): 7.74, ("float32", "nf4"): 4.92,
                   ("bfloat16", "int8"): 3.91, ("bfloat16", "nf4"): 5.44,
                   ("float16", "int8"): 3.91, ("float16", "nf4"): 5.44}


@dataclass
class PhaseReport:
    phase: str
    tensors: dict[str, int]  # bytes per category at the phase's peak
    tensor_peak: int  # bytes of live tensors at the peak
    overhead: int  # fixed runtime overhead + allocator slack
    peak: int  # tensor_peak + overhead
    budget: int
    extra: dict = field(default_factory=dict)

    @property
    def headroom(self) -> int:
        return self.budget - self.peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_dict(self) -> dict:
        d = asdict(self)
        d["headroom"] = self.headroom
        d["fits"] = self.fits
        return d


@dataclass
class ModelSpec:
    """What the dry run needs to know of a model: no weights."""

    family: object  # TorchFamily
    encoder_spec: dict
    prompt_shapes: dict  # name -> shape (batch 1)
    vae_factor: int
    name: str = ""

    @property
    def granularity(self) -> int:
        return self.vae_factor * self.family.patch_size


@contextmanager
def _rebinding_apply():
    """``Module.to()`` cannot swap fake parameters in place; rebind them instead (fresh modules only)."""
    orig = nn.Module._apply

    def _apply(self, fn, recurse=True):
        if recurse:
            for m in self.children():
                m._apply(fn)
        for k, p in self._parameters.items():
            if p is not None:
                with torch.no_grad():
                    self._parameters[k] = nn.Parameter(fn(p), requires_grad=p.requires_grad)
        for k, b in self._buffers.items():
            if b is not None:
                self._buffers[k] = fn(b)
        return self

    nn.Module._apply = _apply
    try:
        yield
    finally:
        nn.Module._apply = orig


def _overheads(profile, tensor_peak: int) -> int:
    if profile is None:
        return 0
    return int(getattr(profile, "fixed_overhead_bytes", 0) + getattr(profile, "allocator_slack", 0.0) * tensor_peak)


def _report(name, tracer: MemoryTracer, profile, extra=None) -> PhaseReport:
    return _report_from(name, int(tracer.peak), tracer.peak_by_cat, profile, extra)


def _report_from(name, peak: int, by_cat: dict, profile, extra=None) -> PhaseReport:
    cats = {c: int(by_cat.get(c, 0)) for c in CATEGORIES}
    ov = _overheads(profile, peak)
    budget = int(profile.budget_gib * GIB) if profile is not None else 0
    return PhaseReport(name, cats, peak, ov, peak + ov, budget, extra or {})


def _round_to(profile) -> int:
    return int(getattr(profile, "alloc_round_bytes", 1) or 1) if profile is not None else 1


def _quant_workspace(model, fam, trained, plan: Plan) -> int:
    if plan.base_quant == "none":
        return 0
    paths = fam.block_paths()
    biggest = 0
    for i in trained:
        for mod in model.get_submodule(paths[i]).modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(mod, nn.Embedding):
                biggest = max(biggest, w.shape[0] * w.shape[1])
    return int(biggest * QUANT_WORKSPACE[(plan.dtype, plan.base_quant)])


class PrecomputeTrace(NamedTuple):
    """The torch precompute's trace: its peak, and the peaks of its two stages (the photo encoder; the
    prompt, embed and blocks after it), each with its bytes per category."""

    peak: int
    by_cat: dict
    entry_shapes: dict  # cache entry tensor name -> (shape, dtype)
    entry_bytes: int
    encoder_peak: int
    encoder_by_cat: dict
    blocks_peak: int
    blocks_by_cat: dict


def trace_precompute(spec: ModelSpec, plan: Plan, trained: list[int], profile=None, num_images: int = 4,
                     memo: dict | None = None) -> PrecomputeTrace:
    """The torch backend's precompute, traced: photos in memory, the encoder, then one frozen block at a
    time for a chunk of samples. It does not depend on LoRA, quantisation or checkpointing: a search
    traces it once per split (``memo``). Call it inside a ``FakeTensorMode``."""
    fam = spec.family
    dtype = DTYPES[plan.dtype]
    chunk = plan.precompute_chunk or plan.num_samples
    key = (tuple(trained), plan.s_min, plan.s_max, chunk, plan.dtype, num_images, plan.positions,
           plan.vae_tiling, _round_to(profile))
    hit = memo.get(key) if memo is not None else None
    if hit is not None:
        return hit
    schedule = PatchSchedule.build(num_images=num_images, num_samples=plan.num_samples, s_min=plan.s_min,
                                   s_max=plan.s_max, granularity=spec.granularity, seed=plan.seed,
                                   patch_sampling=plan.patch_sampling, shift=plan.timestep_shift)
    tr = MemoryTracer(_round_to(profile))
    with tr:
        store = FakeStore(fam, spec.encoder_spec, spec.prompt_shapes, dtype, tr)
        with tr.category("cache"):
            images = torch.empty(num_images, 3, plan.s_max, plan.s_max)
        latents = encode_latents(store, images, dtype, plan.vae_tiling)
        enc = (int(tr.peak), dict(tr.peak_by_cat))
        tr.reset_peak()
        text = prompt_text(store, dtype)
        entries = compute_entries(store, latents, text, schedule.entries[:chunk], plan, spec.vae_factor, trained)
        entry_shapes = {k: (tuple(v.shape), v.dtype) for k, v in entries[0].items()}
        entry_bytes = sum(v.numel() * v.element_size() for v in entries[0].values())
        del entries, latents, text, images
    blocks = (int(tr.peak), dict(tr.peak_by_cat))
    top = max(enc, blocks, key=lambda x: x[0])
    out = PrecomputeTrace(top[0], top[1], entry_shapes, entry_bytes, *enc, *blocks)
    if memo is not None:
        memo[key] = out
    return out


def dry_run(spec: ModelSpec, plan: Plan, lora: dict, profile=None, num_images: int = 4,
            train_steps: int = 1, precompute_memo: dict | None = None) -> list[PhaseReport]:
    """Predict the peak memory of precompute, a training step and saving for ``plan``."""
    fam = spec.family
    trained = plan.validate(fam.num_blocks, spec.granularity, fam.valid_targets())
    dtype = DTYPES[plan.dtype]
    chunk = plan.precompute_chunk or plan.num_samples
    reports = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        # 1. precompute
        pre = trace_precompute(spec, plan, trained, profile, num_images, precompute_memo)
        peak, by_cat, entry_shapes, entry_bytes = pre.peak, pre.by_cat, pre.entry_shapes, pre.entry_bytes
        reports.append(_report_from("precompute", peak, by_cat, profile,
                                    {"chunk": chunk, "cache_entry_bytes": entry_bytes,
                                     "cache_storage_bytes": entry_bytes * plan.num_samples}))
        # 2. training: trained span + head + LoRA + AdamW; step 2 has optimizer state
        tr = MemoryTracer(_round_to(profile))
        with tr:
            store = FakeStore(fam, spec.encoder_spec, spec.prompt_shapes, dtype, tr)
            store.category = "trained_base"
            # quantised base weights (base_quant) are made by ops, not loads: count them as trained_base
            with _rebinding_apply(), tr.category("trained_base"):
                span = TrainedSpan(store, trained, lora, plan.seed, base_quant=plan.base_quant,
                                   checkpointing=plan.checkpointing)
            for p in span.params:
                tr.retag(p, "lora")
                p.register_post_accumulate_grad_hook(lambda q: tr.retag(q.grad, "gradients"))
            with unset_fake_temporarily():  # bitsandbytes builds real lookup tables in its constructor
                opt = make_optimizer(span.params, plan)

            def fake_entry():
                with tr.category("cache"):
                    return {k: torch.empty(s, dtype=d) for k, (s, d) in entry_shapes.items()}

            # AdamW state exists from step 2 on: create it first, then trace steady-state steps
            for p in span.params:
                p.grad = torch.zeros_like(p)
            with tr.category("optimizer"):
                opt.step()
            opt.zero_grad(set_to_none=True)
            current, prefetched = fake_entry(), fake_entry()  # the step's entry + the one being prefetched
            step_peaks = []
            for _ in range(train_steps):
                for _ in range(plan.grad_accum):
                    loss = span.loss(current)
                    (loss / plan.grad_accum).backward()
                    current, prefetched = prefetched, fake_entry()
                with tr.category("optimizer"):
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step_peaks.append(tr.peak)
            ws = _quant_workspace(span.model, fam, trained, plan)
            if ws:
                tr.peak += ws
                tr.peak_by_cat["activations"] = tr.peak_by_cat.get("activations", 0) + ws
            reports.append(_report("train", tr, profile, {"step_peaks": step_peaks, "quant_workspace": ws,
                                                          "trained_blocks": len(trained)}))
            # 3. saving: LoRA copy + checkpoint copies while the model and optimizer stay resident
            tr.reset_peak()
            with torch.no_grad():
                ck = checkpoint_tensors(span.model, opt)
                sd = lora_state_dict(span.model)
            reports.append(_report("save", tr, profile))
            del ck, sd, span, opt, current, prefetched
    return reports
