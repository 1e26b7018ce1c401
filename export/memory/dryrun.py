"""Trace every device phase on fake tensors: precompute, training steps, saving.

The phases call the torch backend's own functions (``encode_latents``, ``prompt_text``,
``embed_entries``, ``run_entries``, ``TrainedSpan``, AdamW, ``checkpoint_tensors``) over a ``FakeStore``, so the
prediction follows the code that runs on the device.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
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
    embed_entries,
    encode_latents,
    make_optimizer,
    prompt_text,
    run_entries,
)
from blockskip.runtime.backends.torch_families.base import TorchFamily
from blockskip.runtime.backends.torch_io import DTYPES
from blockskip.runtime.backends.torch_lora import checkpoint_tensors, lora_state_dict
from blockskip.runtime.plan import Plan
from blockskip.runtime.schedule import PatchSchedule

GIB = 1024**3

# Hidden workspace of quanto's quantised linears, bytes per weight element (largest weights measured by
# `python -m bench.quant_workspace`): the kernels unpack / dequantise a weight inside one op, out of
# the dispatcher's sight. The dry run adds it once, for the largest quantised weight of the span.
QUANT_WORKSPACE = {
    ("float32", "int8"): 7.74,
    ("float32", "nf4"): 4.92,
    ("bfloat16", "int8"): 3.91,
    ("bfloat16", "nf4"): 5.44,
    ("float16", "int8"): 3.91,
    ("float16", "nf4"): 5.44,
}


@dataclass
class PhaseReport:
    phase: str
    tensors: dict[str, int]  # bytes per category at the phase's peak
    tensor_peak: int  # bytes of live tensors at the peak
    overhead: int  # fixed runtime overhead + allocator slack + the profile's safety margin
    peak: int  # tensor_peak + overhead: what must stay within the budget
    budget: int
    extra: dict = field(default_factory=dict)
    # the phase's ops (``cost.op_cost``) by unit (``photo``, ``sample``, ``step``): (ops, bytes read or
    # written in line with them, bytes read ahead on a second thread while they run); what the time
    # prediction is computed from (``timing``)
    cost: dict = field(default_factory=dict, repr=False, compare=False)
    margin: int = 0  # the profile's safety margin, inside ``overhead``: kept free, not used by the process

    @property
    def process_peak(self) -> int:
        """The process's predicted peak: ``peak`` less the safety margin."""
        return self.peak - self.margin

    @property
    def headroom(self) -> int:
        return self.budget - self.peak

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cost")
        d["process_peak"] = self.process_peak
        d["headroom"] = self.headroom
        d["fits"] = self.fits
        return d


def timing(reports: list[PhaseReport], profile, fmt: str) -> dict[str, float]:
    """Predicted seconds per unit of each phase on ``profile`` (``cost.seconds``: a roofline per op, plus
    the storage reads): precompute per photo (encoding) and per sample (the frozen blocks), train per
    optimizer step, save per checkpoint. Empty without a profile that has throughput figures."""
    from blockskip.export.memory.cost import engine_for, read_seconds, seconds

    if profile is None or not getattr(profile, "throughput", None):
        return {}
    engine = engine_for(fmt, profile)
    runtime = "torch" if fmt == "torch" else "program"
    out = {}
    for r in reports:
        for unit, (cost, read, prefetched) in r.cost.items():
            # what a second thread reads while the ops run (the next block's weights, the next cache
            # entry) costs time only where it outlasts them
            out[f"{r.phase}_per_{unit}"] = max(
                seconds(cost, profile, engine, runtime), read_seconds(prefetched, profile)
            ) + read_seconds(read, profile)
    return out


def total_seconds(times: dict[str, float], plan: Plan, photos: int) -> float:
    """The whole run: ``photos`` photos encoded, K samples precomputed, the plan's steps, a checkpoint
    every ``checkpoint_every`` steps and the LoRA at the end."""
    saves = plan.steps // max(1, plan.checkpoint_every) + 1
    return (
        photos * times.get("precompute_per_photo", 0.0)
        + plan.num_samples * times.get("precompute_per_sample", 0.0)
        + plan.steps * times.get("train_per_step", 0.0)
        + saves * times.get("save_per_checkpoint", 0.0)
    )


@dataclass
class ModelSpec:
    """What the dry run needs to know of a model: no weights."""

    family: TorchFamily
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

    nn.Module._apply = _apply  # type: ignore[method-assign]  # (torch's method, patched while tracing)
    try:
        yield
    finally:
        nn.Module._apply = orig  # type: ignore[method-assign]


def _overheads(profile, tensor_peak: int) -> int:
    if profile is None:
        return 0
    return int(
        getattr(profile, "fixed_overhead_bytes", 0) + getattr(profile, "allocator_slack", 0.0) * tensor_peak
    )


def _report_from(name, peak: int, by_cat: dict, profile, extra=None) -> PhaseReport:
    cats = {c: int(by_cat.get(c, 0)) for c in CATEGORIES}
    ov = _overheads(profile, peak)
    budget = int(profile.budget_gib * GIB) if profile is not None else 0
    margin = int(getattr(profile, "safety_margin_mib", 0.0) * 2**20) if profile is not None else 0
    return PhaseReport(name, cats, peak, ov, peak + ov, budget, extra or {}, margin=margin)


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
    encoder_cost: Counter | None = None  # the ops encoding the ``num_images`` photos (``cost.op_cost``)
    blocks_cost: Counter | None = None  # the ops of one chunk: prompt, embed, the frozen blocks
    chunk: int = 1


#: samples of a chunk a composed precompute trace streams the blocks over (``trace_precompute``): one run
#: with this many, one with one more, extrapolated to the chunk
COMPOSE_SAMPLES = 1


def trace_precompute(
    spec: ModelSpec,
    plan: Plan,
    trained: list[int],
    profile=None,
    num_images: int = 4,
    memo: dict | None = None,
    compose: bool = True,
) -> PrecomputeTrace:
    """The torch backend's precompute, traced: photos in memory, the encoder, then one frozen block at a
    time for a chunk of samples. It does not depend on LoRA, quantisation or checkpointing: a search
    traces it once per split (``memo``). Call it inside a ``FakeTensorMode``.

    ``compose``: the chunk's samples are embedded as the device does (their crops differ), but the blocks
    are streamed over ``COMPOSE_SAMPLES`` of them and over one more, and each block's peak and the ops
    are extrapolated to the chunk: every embedded sample has the same shapes, so the bytes live while a
    block runs, and its ops, are affine in the count of samples. Equal to the whole trace to the byte
    (tested on every family)."""
    chunk = plan.precompute_chunk or plan.num_samples
    key = (
        tuple(trained),
        plan.s_min,
        plan.s_max,
        chunk,
        plan.dtype,
        num_images,
        plan.positions,
        plan.vae_tiling,
        _round_to(profile),
    )
    hit = memo.get(key) if memo is not None else None
    if hit is not None:
        return hit
    schedule = PatchSchedule.build(
        num_images=num_images,
        num_samples=plan.num_samples,
        s_min=plan.s_min,
        s_max=plan.s_max,
        granularity=spec.granularity,
        seed=plan.seed,
        patch_sampling=plan.patch_sampling,
        shift=plan.timestep_shift,
    )
    entries = schedule.entries[:chunk]
    k = len(entries)

    def run(samples, blocks: bool = True, latents=None) -> dict:
        return _precompute_run(spec, plan, trained, profile, num_images, samples, blocks, compose, latents)

    blocks: tuple[int, dict]  # (peak, bytes per category)
    if not compose or k <= COMPOSE_SAMPLES + 1:
        whole = run(entries)
        blocks, loop_cost = whole["blocks"], whole["loop_cost"]
    else:
        from blockskip.export.memory.cost import combine

        whole = run(entries, blocks=False)  # the encoder, the prompt and every sample embedded
        # the block runs start from what the encoder left (its latents): it is traced once, above
        few = run(entries[:COMPOSE_SAMPLES], latents=whole["latents"])
        more = run(entries[: COMPOSE_SAMPLES + 1], latents=whole["latents"])
        steps = k - COMPOSE_SAMPLES
        blocks = whole["head"]
        for seg, (p0, cats0) in few["segments"].items():
            p1, cats1 = more["segments"][seg]
            peak = p0 + steps * (p1 - p0)
            if peak > blocks[0]:
                names = set(cats0) | set(cats1)
                blocks = (
                    peak,
                    {c: cats0.get(c, 0) + steps * (cats1.get(c, 0) - cats0.get(c, 0)) for c in names},
                )
        loop_cost = combine(few["loop_cost"], [(more["loop_cost"], steps)])
        whole = {**whole, "entry_shapes": few["entry_shapes"], "entry_bytes": few["entry_bytes"]}
    encoder: tuple[int, dict] = whole["encoder"]
    top = max(encoder, blocks, key=lambda x: x[0])
    out = PrecomputeTrace(
        top[0],
        top[1],
        whole["entry_shapes"],
        whole["entry_bytes"],
        *encoder,
        *blocks,
        whole["encoder_cost"],
        whole["head_cost"] + loop_cost,
        k,
    )
    if memo is not None:
        memo[key] = out
    return out


def _precompute_run(
    spec: ModelSpec,
    plan: Plan,
    trained,
    profile,
    num_images: int,
    entries,
    blocks: bool,
    compose: bool,
    latents_like: tuple | None = None,
) -> dict:
    """One traced precompute of ``entries`` (``trace_precompute``): the encoder's peak and ops, the
    prompt's and embedding's ("head"), then (``blocks``) the peak of each segment of streaming the blocks
    over them (``("block", i)``: block i loaded and run; ``("after", i)``: from its release to the next
    load, or to the cache tensors at the end), the blocks' ops, and the whole phase's peak after the
    encoder. ``latents_like``: (shape, dtype) of an earlier run's latents: the encoder is not traced again,
    its one output tensor is allocated instead (all the encoder leaves live; its peak and ops are then
    not reported)."""
    fam = spec.family
    dtype = DTYPES[plan.dtype]
    tr = MemoryTracer(_round_to(profile))
    tr.cost = Counter()
    out: dict = {}
    with tr:
        store = FakeStore(fam, spec.encoder_spec, spec.prompt_shapes, dtype, tr)
        with tr.category("cache"):
            images = torch.empty(num_images, 3, plan.s_max, plan.s_max)
        if latents_like is None:
            latents = encode_latents(store, images, dtype, plan.vae_tiling)
            out["encoder"] = (int(tr.peak), dict(tr.peak_by_cat))
            out["encoder_cost"], tr.cost = tr.cost, Counter()
        else:
            latents = torch.empty(latents_like[0], dtype=latents_like[1])
        out["latents"] = (tuple(latents.shape), latents.dtype)
        tr.reset_peak()
        text = prompt_text(store, dtype)
        states, consts, targets = embed_entries(store, latents, text, entries, plan, spec.vae_factor)
        out["head"] = (int(tr.peak), dict(tr.peak_by_cat))
        out["head_cost"], tr.cost = tr.cost, Counter()
        seg_cost: dict = {}
        if blocks:
            load_block, run_block = store.load_block, store.run_block
            elide = _elided_blocks(store.model, fam, trained, plan) if compose else {}

            def segment(key) -> None:
                tr.set_segment(key)
                tr.cost = seg_cost.setdefault(key, Counter())

            def seg_load(i):
                segment(("block", i))
                return [] if i in elide else load_block(i)

            def seg_run(i, state, consts):
                return state if i in elide else run_block(i, state, consts)

            class AfterBlock:  # run_entries' progress bar: the rest of the run after block i
                def update(self, n, block):
                    segment(("after", block))

            # instance attributes shadowing the methods while tracing
            store.load_block, store.run_block = seg_load, seg_run  # type: ignore[method-assign]
            segment("entries")  # no block at all when the span starts at block 0
            cached = run_entries(store, states, consts, targets, plan, trained, AfterBlock())
            out["entry_shapes"] = {k: (tuple(v.shape), v.dtype) for k, v in cached[0].items()}
            out["entry_bytes"] = sum(v.numel() * v.element_size() for v in cached[0].values())
            del cached
            # an elided block's segments are its representative's: the same shapes live, the same ops
            for i, rep in elide.items():
                for kind in ("block", "after"):
                    tr.segment_peaks[kind, i] = tr.segment_peaks[kind, rep]
                    seg_cost[kind, i] = seg_cost[kind, rep]
        del states, consts, targets, latents, text, images
    out["blocks"] = (int(tr.peak), dict(tr.peak_by_cat))
    out["segments"] = dict(tr.segment_peaks)
    out["loop_cost"] = sum(seg_cost.values(), tr.cost if not blocks else Counter())
    return out


def _elided_blocks(model: nn.Module, fam, trained: list[int], plan: Plan) -> dict[int, int]:
    """Blocks a composed precompute trace need not run, each with the block whose segments it repeats:
    inside a run of consecutive blocks of one structure (class, stored tensors' shapes) that saves
    nothing (no cache boundary is recorded at it: ``record_boundary``), every block after the second
    sees the same shapes live and runs the same ops. The first two and the last of each run are run."""
    from blockskip.runtime.precompute import blocks_to_run, residual_gaps

    L = fam.num_blocks
    stop = blocks_to_run(trained, L, plan.back_residual)
    boundary = {trained[0]}
    for a, b in residual_gaps(trained, L, plan.back_residual):
        boundary |= {a, b - 1}
    paths = fam.block_paths()

    def signature(i: int) -> tuple:
        mod = model.get_submodule(paths[i])
        return (
            type(mod).__name__,
            tuple((n, tuple(t.shape)) for n, t in mod.state_dict(keep_vars=True).items()),
        )

    elide: dict[int, int] = {}
    run: list[int] = []
    for i in [*range(stop), None]:
        if i is not None and i not in boundary and run and signature(i) == signature(run[0]):
            run.append(i)
            continue
        for j in run[2:-1]:
            elide[j] = run[1]
        run = [i] if i is not None and i not in boundary else []
    return elide


class TrainTrace(NamedTuple):
    """A training trace: the train phase's peak and bytes per category, the peak after each step, the
    save phase's, and the peak of each segment of the run (``_trace_train``)."""

    peak: int
    by_cat: dict
    step_peaks: list
    save_peak: int
    save_by_cat: dict
    segments: dict
    step_cost: Counter  # the ops of one optimizer step (``cost.op_cost``)


def _trace_train(
    spec: ModelSpec, plan: Plan, trained: list[int], lora: dict, entry_shapes: dict, profile, train_steps: int
) -> TrainTrace:
    """The torch backend's resident span over ``trained`` (any subset of the plan's, in order), traced:
    its weights, LoRA and AdamW, ``train_steps`` steady-state steps, then saving. The run is cut into
    segments, each with its peak: (step, "load", i) loading (and quantising) block i, (step, "fwd", i)
    block i's forward and the residual added after it, (step, "bwd", i) its backward (from the gradient
    of its output on, its recomputed forward included), (step, "head") the head, loss and the head's
    backward, (step, "post") the rest of the step, the optimizer's included; step -1 is the setup.
    Call it inside a ``FakeTensorMode``."""
    fam = spec.family
    dtype = DTYPES[plan.dtype]
    prefixes = tuple(fam.block_paths()[i] + "." for i in trained)
    lora = {**lora, "targets": [t for t in lora["targets"] if t.startswith(prefixes)]}
    tr = MemoryTracer(_round_to(profile))
    step, backward = -1, False
    run_block, head = fam.run_block, fam.head

    def seg_block(model, i, state, consts):
        if backward:  # a checkpointed block's forward, recomputed in its backward
            return run_block(model, i, state, consts)
        tr.set_segment((step, "fwd", i))
        out = run_block(model, i, state, consts)
        for t in out.values():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g, i=i, s=step: tr.set_segment((s, "bwd", i)))
        return out

    def seg_head(model, state, consts):
        tr.set_segment((step, "head"))
        return head(model, state, consts)

    # instance attributes shadowing the methods while tracing (deleted below)
    fam.run_block, fam.head = seg_block, seg_head  # type: ignore[method-assign]
    try:
        with tr:
            tr.set_segment((step, "setup"))
            store = FakeStore(fam, spec.encoder_spec, spec.prompt_shapes, dtype, tr)
            store.category = "trained_base"
            load_block, load_part = store.load_block, store.load_part

            def seg_load(i):
                tr.set_segment((step, "load", i))
                return load_block(i)

            def seg_part(part):
                tr.set_segment((step, "setup", part))
                return load_part(part)

            store.load_block, store.load_part = seg_load, seg_part  # type: ignore[method-assign]
            # quantised base weights (base_quant) are made by ops, not loads: count them as trained_base
            with _rebinding_apply(), tr.category("trained_base"):
                span = TrainedSpan(
                    store,
                    trained,
                    lora,
                    plan.seed,
                    base_quant=plan.base_quant,
                    checkpointing=plan.checkpointing,
                )
            for p in span.params:
                tr.retag(p, "lora")
                p.register_post_accumulate_grad_hook(lambda q: tr.retag(q.grad, "gradients"))
            with unset_fake_temporarily():  # bitsandbytes builds real lookup tables in its constructor
                opt = make_optimizer(span.params, plan)

            def fake_entry():
                with tr.category("cache"):
                    return {k: torch.empty(s, dtype=d) for k, (s, d) in entry_shapes.items()}

            # AdamW state exists from step 2 on: create it first, then trace steady-state steps
            tr.set_segment((step, "optimizer"))
            for p in span.params:
                p.grad = torch.zeros_like(p)
            with tr.category("optimizer"):
                opt.step()
            opt.zero_grad(set_to_none=True)
            current, prefetched = fake_entry(), fake_entry()  # the step's entry + the one being prefetched
            step_peaks = []
            for step in range(train_steps):
                if step == train_steps - 1:  # the steady state's ops: the time prediction
                    tr.cost = Counter()
                for _ in range(plan.grad_accum):
                    tr.set_segment((step, "post"))
                    loss = span.loss(current)
                    backward = True
                    (loss / plan.grad_accum).backward()
                    backward = False
                    tr.set_segment((step, "post"))
                    current, prefetched = prefetched, fake_entry()
                with tr.category("optimizer"):
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step_peaks.append(int(tr.peak))
            train = (int(tr.peak), dict(tr.peak_by_cat))
            segments = dict(tr.segment_peaks)
            step_cost, tr.cost = tr.cost, None
            assert step_cost is not None  # the last step's ops (``train_steps`` >= 1)
            # saving: LoRA copy + checkpoint copies while the model and optimizer stay resident
            tr.segment = None
            tr.reset_peak()
            with torch.no_grad():
                ck = checkpoint_tensors(span.model, opt)
                sd = lora_state_dict(span.model)
            out = TrainTrace(*train, step_peaks, int(tr.peak), dict(tr.peak_by_cat), segments, step_cost)
            del ck, sd, span, opt, current, prefetched
    finally:
        del fam.run_block, fam.head  # the instance attributes: the class's methods again
    return out


#: blocks of each shape a composed training trace runs (``compose_train``): the first, a second (the
#: first of a shape may differ: the span's first block computes no input gradient) and one more
COMPOSE_BLOCKS = 2


def _block_signature(fam, skeleton, i: int) -> tuple:
    """What a trained block's memory depends on besides its place: its class, stored tensors, LoRA
    targets and text-only targets."""
    from blockskip.runtime.backends.torch_stream import layout

    module = skeleton.get_submodule(fam.block_paths()[i])
    return (
        type(module).__name__,
        tuple(layout(module, "float32").items()),
        tuple(fam.lora_targets(i)),
        tuple(fam.text_output_only(i)),
    )


def train_groups(fam, trained: list[int], skeleton=None) -> list[list[int]] | None:
    """The trained blocks as runs of one block signature, the last block a run of its own (its text-only
    targets carry no LoRA); None when the span is not contiguous (then it is traced whole)."""
    if any(b - a != 1 for a, b in zip(trained, trained[1:])):
        return None
    skeleton = skeleton if skeleton is not None else fam.skeleton()
    groups: list[list[int]] = []
    last = None
    for i in trained[:-1]:
        sig = _block_signature(fam, skeleton, i)
        if groups and sig == last:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = sig
    return groups + [[trained[-1]]]


def _roles(groups: list[list[int]], counts: list[int]) -> dict[int, list[tuple]]:
    """Block -> its roles in a span running the first ``counts[j]`` blocks of each group: (group, "first"),
    (group, "second"), (group, "last")."""
    roles: dict[int, list[tuple]] = {}
    for j, g in enumerate(groups):
        run = g[: counts[j]]
        for name, i in (("first", run[0]), ("second", run[min(1, len(run) - 1)]), ("last", run[-1])):
            roles.setdefault(i, []).append((j, name))
    return roles


def _role_segments(segments: dict, roles: dict[int, list[tuple]]) -> dict:
    """Segment peaks keyed by role instead of block: a block segment counts for each role its block has."""
    out: dict = {}
    for key, rec in segments.items():
        if len(key) == 3:
            for role in roles.get(key[2], []):
                out[(key[0], key[1], role)] = rec
        else:
            out[key] = rec
    return out


def compose_train(
    spec: ModelSpec,
    plan: Plan,
    trained: list[int],
    lora: dict,
    entry_shapes: dict,
    profile,
    train_steps: int,
    memo: dict | None = None,
    skeleton=None,
) -> TrainTrace:
    """The training trace of the whole span, composed from short ones. The span's blocks come in a few
    shapes (FLUX.1-dev: 19 double and 38 single blocks); a block's tensors, saved activations, LoRA,
    gradients and AdamW state do not depend on where it sits, so the bytes live at any point of the run
    are affine in the count of each shape, and so is every segment's peak (``_trace_train``). Trace a
    span with ``COMPOSE_BLOCKS`` blocks of each shape and the last block, then once more with one block
    more of each shape, and extrapolate each segment's peak to the whole span's counts; the peak is the
    largest segment's. Inside a run of equal blocks a segment's peak is affine in the block's place, so it
    is largest at an end of the run: the first, second (the span's first block is unlike the others: it
    computes no input gradient) and last block of each run stand for all of them. Equal to the whole
    span's trace to the byte (tested on every family, quantised, checkpointed, accumulating); the short
    traces are memoised in ``memo``, and splits whose spans have the same shapes share them."""
    groups = train_groups(spec.family, trained, skeleton)
    if groups is None or all(len(g) <= COMPOSE_BLOCKS + 1 for g in groups):
        return _trace_train(spec, plan, trained, lora, entry_shapes, profile, train_steps)
    counts = [min(len(g), COMPOSE_BLOCKS) for g in groups]

    def sub(extra: int | None) -> tuple[list[int], list[int]]:
        c = [n + (1 if j == extra else 0) for j, n in enumerate(counts)]
        return [i for j, g in enumerate(groups) for i in g[: c[j]]], c

    def traced(extra: int | None) -> tuple[TrainTrace, dict]:
        blocks, c = sub(extra)
        key = (
            "train",
            tuple(blocks),
            repr(dataclasses.replace(plan, front_skip=0, back_skip=0)),
            tuple(sorted(entry_shapes.items(), key=str)),
            _round_to(profile),
            train_steps,
            lora["rank"],
            lora.get("alpha"),
            tuple(
                t
                for t in lora["targets"]
                if t.startswith(tuple(spec.family.block_paths()[i] + "." for i in blocks))
            ),
        )
        hit = memo.get(key) if memo is not None else None
        if hit is None:
            hit = _trace_train(spec, plan, blocks, lora, entry_shapes, profile, train_steps)
            if memo is not None:
                memo[key] = hit
        return hit, _role_segments(hit.segments, _roles(groups, c))

    base, base_roles = traced(None)
    more = [(traced(j), len(g) - counts[j]) for j, g in enumerate(groups) if len(g) > counts[j]]

    def comb(get):
        return get(base, base_roles) + sum(k * (get(t, r) - get(base, base_roles)) for (t, r), k in more)

    segs = {}
    for key in base_roles:  # in the order they first ran
        value = comb(lambda t, r, key=key: r[key][0])
        cats = {c: comb(lambda t, r, key=key, c=c: r[key][1].get(c, 0)) for c in CATEGORIES}
        segs[key] = (value, cats)

    def top(keys):
        best = None
        for k in keys:  # the first of equal peaks, as the tracer keeps it
            if best is None or segs[k][0] > segs[best][0]:
                best = k
        return segs[best]

    peak, by_cat = top(list(segs))
    step_peaks = [top([k for k in segs if k[0] <= s])[0] for s in range(train_steps)]
    save_peak = comb(lambda t, r: t.save_peak)
    save_by_cat = {c: comb(lambda t, r, c=c: t.save_by_cat.get(c, 0)) for c in CATEGORIES}
    from blockskip.export.memory.cost import combine

    cost = combine(base.step_cost, [(t.step_cost, k) for (t, _), k in more])
    return TrainTrace(peak, by_cat, step_peaks, save_peak, save_by_cat, segs, cost)


def dry_run(
    spec: ModelSpec,
    plan: Plan,
    lora: dict,
    profile=None,
    num_images: int = 4,
    train_steps: int = 1,
    precompute_memo: dict | None = None,
    compose: bool = True,
    skeleton=None,
) -> list[PhaseReport]:
    """Predict the peak memory of precompute, a training step and saving for ``plan``. ``compose``: the
    training trace composed from short spans (``compose_train``) and precompute from a few samples
    (``trace_precompute``), else the whole span and chunk traced."""
    fam = spec.family
    trained = plan.validate(fam.num_blocks, spec.granularity, fam.valid_targets())
    chunk = plan.precompute_chunk or plan.num_samples
    reports = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        # 1. precompute
        pre = trace_precompute(spec, plan, trained, profile, num_images, precompute_memo, compose)
        peak, by_cat, entry_shapes, entry_bytes = pre.peak, pre.by_cat, pre.entry_shapes, pre.entry_bytes
        reports.append(
            _report_from(
                "precompute",
                peak,
                by_cat,
                profile,
                {
                    "chunk": chunk,
                    "cache_entry_bytes": entry_bytes,
                    "cache_storage_bytes": entry_bytes * plan.num_samples,
                },
            )
        )
        reports[-1].cost = precompute_cost(
            spec, plan, trained, pre, num_images, entry_bytes, plan.storage_dtype
        )
        # 2. training: trained span + head + LoRA + AdamW; step 2 has optimizer state
        tt = (
            compose_train(
                spec, plan, trained, lora, entry_shapes, profile, train_steps, precompute_memo, skeleton
            )
            if compose
            else _trace_train(spec, plan, trained, lora, entry_shapes, profile, train_steps)
        )
        peak, by_cat = tt.peak, dict(tt.by_cat)
        ws = _quant_workspace(skeleton if skeleton is not None else fam.skeleton(), fam, trained, plan)
        if ws:
            peak += ws
            by_cat["activations"] = by_cat.get("activations", 0) + ws
        reports.append(
            _report_from(
                "train",
                peak,
                by_cat,
                profile,
                {"step_peaks": tt.step_peaks, "quant_workspace": ws, "trained_blocks": len(trained)},
            )
        )
        # the step's ops; each micro-step reads a cache entry
        reports[-1].cost = {"step": (tt.step_cost, 0, entry_bytes * plan.grad_accum)}  # entries read ahead
        # 3. saving: LoRA copy + checkpoint copies while the model and optimizer stay resident
        reports.append(_report_from("save", tt.save_peak, tt.save_by_cat, profile))
        lora_bytes = tt.by_cat.get("lora", 0)
        reports[-1].cost = {"checkpoint": (Counter(), 4 * lora_bytes, 0)}  # LoRA + AdamW moments written
    for r in reports:
        r.extra["seconds"] = {k: round(v, 4) for k, v in timing([r], profile, "torch").items()}
    return reports


def precompute_cost(
    spec: ModelSpec,
    plan: Plan,
    trained: list[int],
    pre: PrecomputeTrace,
    num_images: int,
    entry_bytes: int,
    storage: str,
) -> dict:
    """Precompute's ops and storage reads per photo (the encoder) and per sample (a chunk's prompt, embed
    and frozen blocks shared by its samples; each pass over the frozen blocks reads them from the bundle
    in ``storage`` layout; each sample's entry is written)."""
    from blockskip.export.memory.cost import scaled
    from blockskip.export.memory.streamed import _nbytes
    from blockskip.runtime.backends import torch_stream as ts
    from blockskip.runtime.precompute import blocks_to_run

    fam = spec.family
    skeleton = fam.skeleton()
    stop = blocks_to_run(trained, fam.num_blocks, plan.back_residual)
    frozen = sum(_nbytes(ts.block_specs(fam, skeleton, i, storage)) for i in range(stop))
    chunk = max(1, pre.chunk)
    ahead = frozen / chunk if plan.prefetch else 0  # the next block's weights read while one runs
    return {
        "photo": (scaled(pre.encoder_cost or {}, 1 / num_images), 0, 0),
        "sample": (
            scaled(pre.blocks_cost or {}, 1 / chunk),
            frozen / chunk - ahead + entry_bytes,
            ahead,
        ),
    }
