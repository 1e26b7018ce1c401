"""The dry run of a block-streamed span, for the backend that will run it.

A streamed step holds: the LoRA with its gradients and AdamW state (float32, in the runtime), the frozen
weights of one block in storage layout (two with prefetch, every trained block when the plan keeps them
resident) and the head's, the cache entry (float32), the boundary stash (each trained block's input; one
state when it spills to disk), the state and gradient being carried, and the program that runs. The
cache entry counts twice: every runtime reads the next one while a step runs. The
programs are the very graphs the export lowers (``stream_export``), traced on fake tensors:

* ``pte``: the program's memory-planned ExecuTorch arena (``inference_program`` on fake inputs, inputs
  not planned, as exported). Lowering takes seconds per program, so the search ranks plans with the
  traced live-tensor peak (near the arena: FLUX single block at 256 px, int8: forward 268 vs 176 MiB,
  VJP 510 vs 446 MiB; the tiny test model's VJP 62 vs 65 KiB) and checks the plan it picks with the
  arenas;
* ``onnx`` and ``torch``: the live-tensor peak of the graph run op by op on fake tensors, dead values
  freed as soon as their last reader has run (ONNX Runtime without its arena, memory pattern and buffer
  reuse frees the same way); for ``onnx`` the views ONNX computes as copies (a weight's Transpose before
  its MatMul, Slice, Expand, ...) count as new tensors.

Precompute runs the torch precompute trace (encoder, prompt, one block at a time for a chunk of
samples) with its block weights at their storage size. For ``pte`` checked with the arenas, the photo
encoder stage is the encoder program's instead (``encoder_stage``: its weights, arena and XNNPACK
workspace); the torch trace's eager encoder holds far less than that program (SANA-1.6B's DC-AE at
1024 px: 1.5 GiB less).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import torch

from blockskip.export import stream_export as se
from blockskip.export.memory.dryrun import ModelSpec, PhaseReport, _report_from, _round_to, trace_precompute
from blockskip.export.memory.tracer import CATEGORIES, MemoryTracer
from blockskip.runtime.backends import torch_stream as ts
from blockskip.runtime.plan import Plan
from blockskip.runtime.precompute import blocks_to_run

#: plan formats -> the profile backends (``[backends] available``) that run them
FORMAT_BACKENDS = {
    "pte": ("executorch-xnnpack",),
    "onnx": ("onnxruntime-training",),
    "torch": ("torch-cpu", "torch-cuda"),
}


def formats_for(profile) -> list[str]:
    """The formats a profile's backends run, in the profile's order."""
    out: list[str] = []
    for b in profile.backends:
        for fmt, names in FORMAT_BACKENDS.items():
            if b in names and fmt not in out:
                out.append(fmt)
    return out


def _nbytes(specs: dict[str, tuple], round_to: int = 1) -> int:
    total = 0
    for shape, dtype in specs.values():
        n = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            n *= int(d)
        total += (n + round_to - 1) // round_to * round_to
    return total


def _cache_file() -> Path:
    root = os.environ.get("BLOCKSKIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blockskip")
    return Path(root) / "program_peaks.json"


#: changes with how the export lowers a program (memoised arenas of an earlier lowering are not reused)
LOWERING = "sunk-weights-3"


class ProgramPeaks:
    """Peak bytes of a traced program, memoised in-process and on disk (keyed by the graph's code and
    input shapes): a search asks for the same programs many times, a second search for none."""

    def __init__(self, persist: bool = True):
        self.mem: dict[str, int] = {}
        # a program's workspace grow points (``pte_export.workspace_grow_points``), in a file of their own
        self.grow: dict[str, list] = {}
        self.path = _cache_file() if persist else None
        self.grow_path = self.path.with_name("program_growth.json") if self.path is not None else None
        if self.path is not None and self.path.is_file():
            try:
                self.mem.update({k: int(v) for k, v in json.loads(self.path.read_text()).items()})
            except (OSError, ValueError):
                pass
        self.costs: dict[str, Counter] = {}
        self.cost_path = self.path.with_name("program_costs.json") if self.path is not None else None
        if self.cost_path is not None and self.cost_path.is_file():
            try:
                self.costs.update(
                    {
                        k: Counter({(str(d), int(f), int(b)): n for d, f, b, n in v})
                        for k, v in json.loads(self.cost_path.read_text()).items()
                    }
                )
            except (OSError, ValueError, TypeError):
                pass
        if self.grow_path is not None and self.grow_path.is_file():
            try:
                self.grow.update(
                    {
                        k: [(int(n), [(int(a), int(b)) for a, b in r]) for n, r in v]
                        for k, v in json.loads(self.grow_path.read_text()).items()
                    }
                )
            except (OSError, ValueError, TypeError):
                pass

    def _save(self) -> None:
        if self.path is None:
            return
        assert self.grow_path is not None  # set with ``path``
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for path, data in ((self.path, self.mem), (self.grow_path, self.grow)):
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)
        except OSError:
            pass

    def _key(self, traced: se.Traced, how: str, round_to: int) -> str:
        from blockskip.export.memory.cost import COUNTING

        version = f"{LOWERING}|{COUNTING}" if how == "cost" else LOWERING
        return hashlib.sha256(
            f"{version}|{how}|{round_to}|{traced.inputs}|{traced.gm.code}".encode()
        ).hexdigest()

    def get(self, traced: se.Traced, how: str, round_to: int) -> int:
        """``how``: "live", "onnx", or "arena:<delegate>" (the planned arena of the pte program lowered with
        that delegate; the delegate's own workspace is ``workspace``)."""
        key = self._key(traced, how, round_to)
        if key not in self.mem:
            if how.startswith("arena"):
                arena, workspace, grow = program_bytes(traced, how.split(":", 1)[1])
                self.mem[key] = arena
                self.mem[self._key(traced, "workspace" + how[len("arena") :], round_to)] = workspace
                self.grow[self._key(traced, "grow" + how[len("arena") :], round_to)] = grow
            else:
                self.mem[key] = live_peak(traced, round_to, onnx=how == "onnx")
            self._save()
        return self.mem[key]

    def workspace(self, traced: se.Traced, how: str, round_to: int) -> int:
        """The delegate's workspace of the program (beside its arena); 0 unless lowered."""
        if not how.startswith("arena"):
            return 0
        key = self._key(traced, "workspace" + how[len("arena") :], round_to)
        if key not in self.mem:
            self.mem.pop(self._key(traced, how, round_to), None)
            self.get(traced, how, round_to)
        return self.mem[key]

    def grow_points(self, traced: se.Traced, how: str, round_to: int) -> list:
        """The program's workspace grow points (``pte_export.workspace_grow_points``); none unless lowered."""
        if not how.startswith("arena"):
            return []
        key = self._key(traced, "grow" + how[len("arena") :], round_to)
        if key not in self.grow:
            self.mem.pop(self._key(traced, how, round_to), None)
            self.get(traced, how, round_to)
        return self.grow[key]

    def cost(self, traced: se.Traced) -> Counter:
        """The program's ops (``cost.op_cost``: dtype, FLOPs, bytes), running its graph on fake inputs;
        memoised like the peaks (``program_costs.json``)."""
        key = self._key(traced, "cost", 1)
        if key not in self.costs:
            from blockskip.export.memory.cost import CostCounter

            args = traced.example_args(fake=True)
            counter = CostCounter()
            with args[0].fake_mode, counter:
                torch.fx.Interpreter(traced.gm, garbage_collect_values=True).run(*args)
            self.costs[key] = counter.cost
            if self.cost_path is not None:
                try:
                    tmp = self.cost_path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(
                        json.dumps({k: [[*kk, n] for kk, n in v.items()] for k, v in self.costs.items()})
                    )
                    os.replace(tmp, self.cost_path)
                except OSError:
                    pass
        return self.costs[key]

    def encoder(self, encoder_spec: dict, shape: tuple, delegate: str) -> tuple[int, int]:
        """(arena, delegate workspace) of the photo encoder program for inputs of ``shape``."""
        from executorch import version as et_version

        key = hashlib.sha256(
            f"{LOWERING}|{ENCODER_LOWERING}|{delegate}|{tuple(shape)}|{et_version.__version__}|"
            f"{json.dumps(encoder_spec, sort_keys=True, default=str)}".encode()
        ).hexdigest()
        if key not in self.mem or key + ":workspace" not in self.mem:
            self.mem[key], self.mem[key + ":workspace"] = encoder_program_bytes(encoder_spec, shape, delegate)
            self._save()
        return self.mem[key], self.mem[key + ":workspace"]


#: changes with how the export writes the encoder program or how its XNNPACK memory is counted
ENCODER_LOWERING = "encoder-delegable-ops-1"


def encoder_program_bytes(encoder_spec: dict, shape: tuple, delegate: str) -> tuple[int, int]:
    """(ExecuTorch arena, delegate workspace) of the photo encoder program, lowered as the export lowers it
    (``xnnpack_encoder.encoder_program``: the float32 encoder, its weights constants of the program) over
    zero weights: the plan does not depend on their values. Seconds to a minute and the encoder's weights
    twice in memory (SANA's DC-AE at 1024 px: 25 s, 552 MiB of weights), so ``ProgramPeaks`` keeps the
    result. With XNNPACK the workspace is what its calls hold beside the arena: the shared workspace as
    XNNPACK's planner lays it out, grown call by call (``xnnpack_encoder.workspace_bytes``), and the
    convolutions' indirection buffers (``xnnpack_encoder.indirection_bytes``)."""
    from blockskip.export.pte_export import planned_arena_bytes
    from blockskip.export.xnnpack_encoder import encoder_program, indirection_bytes, workspace_bytes
    from blockskip.runtime.backends.torch_families.latent import ENCODER_PREFIXES, build_encoder_skeleton

    enc = build_encoder_skeleton(encoder_spec)
    prefixes = ENCODER_PREFIXES[encoder_spec["class"]]
    for name, _ in list(enc.named_children()):  # the decoder: not part of the program
        if not any(p == name or p.startswith(name + ".") for p in prefixes):
            setattr(enc, name, None)
    enc = enc.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(enc.parameters()) + list(enc.buffers()):
            t.zero_()
    prog = encoder_program(enc.float().eval(), encoder_spec, shape, delegate)
    if delegate != "xnnpack":
        return planned_arena_bytes(prog), 0
    return planned_arena_bytes(prog), workspace_bytes(prog) + indirection_bytes(prog)


_aten = torch.ops.aten
#: ATen views that an ONNX graph computes as copies (Transpose, Slice, Gather, Expand, Split); ONNX Runtime
#: aliases only Reshape, Squeeze, Unsqueeze and Flatten, which are the remaining views
ONNX_COPIES = {
    _aten.permute.default,
    _aten.transpose.int,
    _aten.t.default,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.expand.default,
    _aten.split.Tensor,
    _aten.split_with_sizes.default,
    _aten.unbind.int,
    _aten.diagonal.default,
    _aten.as_strided.default,
}


class _CopyingViews(torch.fx.Interpreter):
    """Runs a graph with the views ONNX copies materialised (``ONNX_COPIES``)."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target in ONNX_COPIES:
            out = [t.clone() for t in out] if isinstance(out, list | tuple) else out.clone()
        return out


def live_peak(traced: se.Traced, round_to: int = 1, onnx: bool = False) -> int:
    """Peak bytes of the values a program computes (inputs not counted, outputs counted), running its
    graph op by op on fake tensors and freeing each value after its last use. ``onnx``: views that an
    ONNX graph copies count as new tensors."""
    args = traced.example_args(fake=True)
    mode = args[0].fake_mode
    tr = MemoryTracer(round_to)
    interp = (_CopyingViews if onnx else torch.fx.Interpreter)(traced.gm, garbage_collect_values=True)
    with mode, tr:
        out = interp.run(*args)
    del out
    return int(tr.peak)


def program_bytes(traced: se.Traced, delegate: str = "none") -> tuple[int, int, list]:
    """(ExecuTorch memory-planned arena, delegate workspace, workspace grow points) of the program as the
    export lowers it (inputs not planned). Lowered to XNNPACK the arena differs (the delegate calls group
    independent ops: a block's q, k and v projections, so their dequantised weights live together) and the
    values inside a delegate call are XNNPACK's own (``pte_export.delegate_workspace_bytes``); the grow
    points are ``pte_export.workspace_grow_points``."""
    from blockskip.export.pte_export import (
        delegate_workspace_bytes,
        inference_program,
        planned_arena_bytes,
        workspace_grow_points,
    )

    prog = inference_program(
        traced.gm,
        traced.example_args(fake=True),
        delegate,
        plan_inputs=False,
        weights=traced.weight_positions(),
    )
    return planned_arena_bytes(prog), delegate_workspace_bytes(prog), workspace_grow_points(prog)


def workspace_growth(programs: list[tuple[int, list]]) -> int:
    """The most the programs' one arena and XNNPACK's shared workspace hold resident together while these
    programs run for the first time, in this order; each program is (its planned arena, its workspace grow
    points: ``pte_export.workspace_grow_points``). The native runner gives every program one arena (the
    largest program's, from offset 0), resident only as far as programs have touched it; XNNPACK's
    workspace is shared by every delegate call of every program and grown to the largest call's need. A
    call that needs more than the workspace has grows it: XNNPACK allocates the larger workspace
    (zero-filled, so resident at once) and frees the old one only after (``initialize_workspace_values``
    in its runtime.c), so at that moment old + new are held beside the arena as far as it is touched
    then: every earlier program's arena (taken as touched from 0 to its size) and the values the growing
    program computed before that call (their planned ranges). A program is taken to grow it once, at its
    first call that needs more than the workspace has, to its largest call's need: the per-call needs
    are estimates, and the tiny span's VJP, estimated at 78.91 then 79.69 MiB in two calls, grew it once
    (to 80.31 MiB). After the grows, the largest arena with the one workspace. Measured by tracing the native runner's allocations at its peak RSS: SANA-1.6B's
    streamed int8 step grew the workspace from the forward program's 124.58 MiB to the VJP's 146.46 MiB
    with the arena already touched through by the forward programs (244.7 MiB allocated, 240.6 resident;
    the run's peak was 90 MiB above a dry run counting one workspace), and a tiny FLUX-like span from
    40.24 to 81.09 MiB. FLUX.1-dev's single-block VJP grows it from the forward's 140.31 to 585.98 MiB at
    its attention backward with 576 of its 816 MiB arena touched (the planned ranges, with the forward's
    369 MiB below them): 1302 MiB then, under the steady 816 + 586; counting its whole arena with both
    workspaces had predicted the measured step 7.4% over, the steady state predicts it 1.4% over."""
    from blockskip.export.pte_export import merged_ranges

    cur = touched = held = 0
    for arena, points in programs:
        ranges = next((r for need, r in points if need > cur), None)
        if ranges is not None:
            need = points[-1][0]
            resident = sum(hi - lo for lo, hi in merged_ranges([(0, touched), *ranges]))
            held = max(held, resident + cur + need)
            cur = need
        touched = max(touched, arena)
    return max(held, touched + cur)


def streamed_dry_run(
    spec: ModelSpec,
    plan: Plan,
    lora: dict,
    profile=None,
    fmt: str = "pte",
    num_images: int = 4,
    exact: bool = False,
    precompute_memo: dict | None = None,
    peaks: ProgramPeaks | None = None,
    skeleton=None,
    delegate: str = "none",
) -> list[PhaseReport]:
    """Predict precompute, a training step and saving of a block-streamed plan run by ``fmt``'s backend.
    ``exact``: pte programs by their planned arena as lowered with ``delegate`` (slower: each program is
    lowered), else by the traced live peak."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fam = spec.family
    trained = plan.validate(fam.num_blocks, spec.granularity, fam.valid_targets())
    storage = plan.storage_dtype
    rt = _round_to(profile)
    peaks = peaks if peaks is not None else ProgramPeaks()
    skeleton = skeleton if skeleton is not None else fam.skeleton()
    how = f"arena:{delegate}" if (fmt == "pte" and exact) else "onnx" if fmt == "onnx" else "live"

    with FakeTensorMode(allow_non_fake_inputs=True):
        pre = trace_precompute(spec, plan, trained, profile, num_images, precompute_memo)
    entry_shapes, entry_bytes = pre.entry_shapes, pre.entry_bytes
    # the runtime reads entries as float32
    f32 = {k: (s, torch.float32 if d.is_floating_point else d) for k, (s, d) in entry_shapes.items()}
    entry32 = _nbytes(f32, rt)
    state, consts, target = se.entry_io(f32)
    state_bytes = _nbytes(state, rt)

    stop = blocks_to_run(trained, fam.num_blocks, plan.back_residual)
    layout = se.stream_layout(fam, trained, lora["targets"], stop)
    prog: dict[tuple[str, str], int] = {}
    work: dict[tuple[str, str], int] = {}  # a delegate's own workspace (XNNPACK), beside the arena
    traced_of: dict[tuple[str, str], se.Traced] = {}
    lora_bytes = 0
    # a search evaluates plans that share programs (the same shapes and storage, e.g. a plan checked
    # again with its planned arenas): trace each once (``precompute_memo`` is the search's memo)
    memo = precompute_memo if precompute_memo is not None else {}
    io_key = (repr(sorted(state.items())), repr(sorted(consts.items())), storage, id(fam))
    lora_key = (lora["rank"], lora.get("alpha"), tuple(lora["targets"]))
    for sid, shape in layout.shapes.items():
        with_vjp = any(s == sid for _, s in layout.train)
        key: tuple = (
            "stream-shape",
            shape.kind,
            tuple(shape.targets),
            shape.example_block,
            with_vjp,
            io_key,
            lora_key,
        )
        if key not in memo:
            memo[key] = se.trace_shape(
                fam, skeleton, shape, storage, lora, state, consts, fake=True, vjp=with_vjp
            )
        traced = memo[key]
        for role, t in traced.items():
            traced_of[sid, role] = t
            prog[sid, role] = peaks.get(t, how, rt)
            work[sid, role] = peaks.workspace(t, how, rt)
        if with_vjp:
            n_blocks = sum(1 for _, s in layout.train if s == sid)
            lo = {n: (s, d) for n, s, d in traced["forward"].inputs if n.startswith(se.LORA)}
            lora_bytes += n_blocks * _nbytes(lo, rt)
    key = ("stream-head", repr(target), io_key)
    if key not in memo:
        memo[key] = se.trace_head(fam, skeleton, storage, state["hidden"], consts, target, fake=True)
    head = memo[key]
    traced_of["head", "head"] = head
    prog["head", "head"] = peaks.get(head, how, rt)
    work["head", "head"] = peaks.workspace(head, how, rt)

    block_w = {i: _nbytes(ts.block_specs(fam, skeleton, i, storage), rt) for i in range(fam.num_blocks)}
    head_w = _nbytes(ts.head_specs(fam, skeleton, storage), rt)
    train_w = [block_w[i] for i in trained]
    if plan.weights == "resident":
        weights = sum(train_w)
    else:
        weights = max(train_w) * (2 if plan.prefetch and len(train_w) > 1 else 1)
    stash = state_bytes * (len(trained) if plan.stash == "memory" else 1)
    train_progs = [
        v for (sid, role), v in prog.items() if sid == "head" or sid in {s for _, s in layout.train}
    ]
    run_peak = max(train_progs)
    # the delegate's workspace is shared by every loaded program and kept at the largest one's need beside
    # the largest arena; where a later program's call needs more, the old and the grown workspace are both
    # held for a moment beside the arena as far as it is touched then (``workspace_growth``). A step runs
    # the forward programs in span order, the head, then the VJPs in reverse (the first step: an evaluation
    # sweep before it, in the same order). Counted with the AdamW moments, which a fresh run's first step
    # does not hold yet but a resumed run's does. ``train_work``: what this adds to the largest arena.
    run_order = (
        [(s, "forward") for s in dict.fromkeys(s for _, s in layout.train)]
        + [("head", "head")]
        + [(s, "vjp") for s in dict.fromkeys(s for _, s in reversed(layout.train))]
    )
    grown = workspace_growth([(prog[k], peaks.grow_points(traced_of[k], how, rt)) for k in run_order])
    train_work = max(max((work[k] for k in run_order), default=0), grown - run_peak)
    if fmt == "torch" and plan.stash == "memory" and layout.train:
        # the torch backend keeps the last block's autograd graph from the forward sweep through the head
        # (no recomputed forward in its VJP): bounded by that block's VJP peak
        run_peak = max(run_peak, prog[layout.train[-1][1], "vjp"] + prog["head", "head"])
    cats = dict.fromkeys(CATEGORIES, 0)
    cats.update(
        lora=lora_bytes,
        gradients=lora_bytes,
        optimizer=2 * lora_bytes,
        frozen_weights=weights + head_w,
        cache=2 * entry32 + stash,
        activations=2 * state_bytes + run_peak + train_work,
    )
    reports = []

    # precompute, blocks stage: the torch trace's (its eager blocks' activations stand for the forward
    # programs' arenas), block weights at their storage size, two of them with prefetch, and the delegate's
    # workspace beside the arenas (the frozen blocks' forward programs; the embed program's is small)
    pre_w = max(block_w[i] for i, _ in layout.precompute) if layout.precompute else 0
    pre_cats = {c: int(pre.blocks_by_cat.get(c, 0)) for c in CATEGORIES}
    more = max(0, pre_w * (2 if plan.prefetch else 1) - pre_cats["frozen_weights"])
    pre_cats["frozen_weights"] += more
    pre_work = max((work[sid, "forward"] for _, sid in layout.precompute), default=0)
    pre_cats["activations"] += pre_work
    pre_total = pre.blocks_peak + more + pre_work
    # encoder stage: the torch trace's, or the encoder programs' (``exact`` pte): the largest program's arena
    # and XNNPACK workspace beside its float32 weights and the photos (SANA-1.6B's DC-AE untiled at
    # 1024 px: 2564 + 1536 MiB; the torch trace said 1.5 GiB less than the native runner measured)
    enc_cats = {c: int(pre.encoder_by_cat.get(c, 0)) for c in CATEGORIES}
    if fmt == "pte" and exact:
        enc_cats = encoder_stage(spec, plan, num_images, delegate, peaks, rt)
    if sum(enc_cats.values()) > pre_total:
        pre_cats, pre_total = enc_cats, sum(enc_cats.values())
    reports.append(
        _report_from(
            "precompute",
            pre_total,
            pre_cats,
            profile,
            {
                "chunk": plan.precompute_chunk or plan.num_samples,
                "cache_entry_bytes": entry_bytes,
                "cache_storage_bytes": entry_bytes * plan.num_samples,
            },
        )
    )
    total = sum(cats.values())
    reports.append(
        _report_from(
            "train",
            total,
            cats,
            profile,
            {
                "span": "streamed",
                "format": fmt,
                "storage": storage,
                "trained_blocks": len(trained),
                "programs": {f"{sid}.{role}": v for (sid, role), v in sorted(prog.items())},
                "program_peak_kind": how,
                "workspaces": {f"{sid}.{role}": v for (sid, role), v in sorted(work.items()) if v},
                "weights_bytes": weights,
                "head_weights_bytes": head_w,
                "stash_bytes": stash,
                "state_bytes": state_bytes,
                "lora_bytes": lora_bytes,
            },
        )
    )
    # saving: the checkpoint's copies (LoRA, AdamW moments) and the LoRA file, no program running
    save = {**cats, "activations": 0, "lora": 2 * lora_bytes, "optimizer": 4 * lora_bytes}
    reports.append(_report_from("save", sum(save.values()), save, profile))
    # time: precompute as the torch trace computes it (the same blocks, embed and encoder); a step runs
    # each trained block's forward program, the head, each VJP program (recomputing the forward), and
    # reads each trained block's weights in each sweep (streamed weights), its cache entry, and the stash
    # when it spills to disk
    from blockskip.export.memory.cost import combine
    from blockskip.export.memory.dryrun import precompute_cost, timing

    reports[0].cost = precompute_cost(spec, plan, trained, pre, num_images, entry_bytes, storage)
    step = combine(
        Counter(),
        [(peaks.cost(traced_of[sid, role]), 1) for _, sid in layout.train for role in ("forward", "vjp")]
        + [(peaks.cost(head), 1)],
    )
    weights = 2 * sum(train_w) if plan.weights != "resident" else 0
    ahead = entry32 * plan.grad_accum + (weights if plan.prefetch else 0)  # read on a second thread
    read = (0 if plan.prefetch else weights) + (2 * state_bytes * len(trained) if plan.stash == "disk" else 0)
    reports[1].cost = {"step": (step, read, ahead)}
    reports[2].cost = {"checkpoint": (Counter(), 4 * lora_bytes, 0)}
    for r in reports:
        r.extra["seconds"] = {k: round(v, 4) for k, v in timing([r], profile, fmt).items()}
    return reports


def encoder_stage(
    spec: ModelSpec, plan: Plan, num_images: int, delegate: str, peaks: ProgramPeaks, round_to: int = 1
) -> dict[str, int]:
    """Bytes per category while the pte backends encode the photos: the photos (float32), the encoder's
    float32 weights once (the program's constants, which XNNPACK packs), the latents, and the largest
    encoder program's arena and workspace (a fresh process running SANA-1.6B's DC-AE program at 1024 px
    grew by 4697 MiB: 2564 arena + 1536 workspace + 552 weights + 45)."""
    from blockskip.export.graphs import encoder_program_inputs
    from blockskip.export.memory.export_phase import _encoder_bytes

    runs = [
        sum(peaks.encoder(spec.encoder_spec, shape, delegate))
        for _, shape in encoder_program_inputs(spec.encoder_spec, spec.vae_factor, plan)
    ]
    side = plan.s_max // spec.vae_factor
    channels = int(spec.encoder_spec.get("config", {}).get("latent_channels", 0) or 0)
    cats = dict.fromkeys(CATEGORIES, 0)
    cats.update(
        frozen_weights=_encoder_bytes(spec.encoder_spec),
        cache=_nbytes(
            {
                "photos": ((num_images, 3, plan.s_max, plan.s_max), torch.float32),
                "latents": ((num_images, channels, side, side), torch.float32),
            },
            round_to,
        ),
        activations=max(runs),
    )
    return cats


def bundle_bytes(spec: ModelSpec, plan: Plan, skeleton=None) -> int:
    """Bytes of the block and head weights the bundle stores (what a phone downloads and keeps; the
    programs, encoder and prompt are small next to them): the blocks precompute runs and the trained ones."""
    fam = spec.family
    skeleton = skeleton if skeleton is not None else fam.skeleton()
    storage = plan.storage_dtype
    trained = plan.trained_indices(fam.num_blocks)
    needed = set(range(blocks_to_run(trained, fam.num_blocks, plan.back_residual))) | set(trained)
    return sum(_nbytes(ts.block_specs(fam, skeleton, i, storage)) for i in sorted(needed)) + _nbytes(
        ts.head_specs(fam, skeleton, storage)
    )
