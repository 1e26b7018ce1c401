"""The ``pte`` format plug-in: ExecuTorch programs for the ``executorch`` backend and the native runner.

* block-streamed programs (forward / VJP / head per block shape, ``stream_export``) and the photo encoder
  become ordinary inference programs. A stream program's inputs (state, weights, LoRA) are not
  memory-planned: the runtime hands its own buffers to the program, so the planned arena holds only
  what the program computes;
* a resident trained span (LoRA blocks, the skipped spans' residual adds, head, flow-matching loss)
  becomes an ExecuTorch *training program*: ``torch.export`` -> ``_export_forward_backward`` (the joint
  graph) -> edge -> ExecuTorch, with the LoRA weights split into a ``.ptd`` beside the ``.pte``
  (``external_mutable_weights``). Its ``forward`` takes the cache entry's tensors in the manifest's
  order plus the loss scale and returns ``[loss, gradients..., parameters...]``; the metadata methods
  ``__et_training_gradients_index_forward``, ``__et_training_parameters_index_forward`` and
  ``__et_training_fqn_forward`` say where the gradients and parameters start and name them.

All programs can be delegated to XNNPACK. Graph fixes (measured with executorch 1.5.1 + torch
2.13.0), applied as passes: export under the math SDPA kernel (the fused kernels' backward is not Core
ATen); ``empty_permuted`` -> ``empty.memory_format``; a ``constant_pad_nd`` with negative pads (a pad's
backward) -> ``slice_copy``; ``addmm`` -> ``mm`` + ``add`` (about 5x faster steps on CPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import torch
from torch import nn

from blockskip.runtime.backends.executorch import quiet
from blockskip.runtime.errors import PlanError

DELEGATES = ("none", "xnnpack")


# --------------------------------------------------------------------------------------------
# graph passes


def _fix_graph(gm: torch.fx.GraphModule) -> None:
    aten = torch.ops.aten
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.empty_permuted.default:
            size, _perm = node.args[0], node.args[1]
            with g.inserting_before(node):
                new = g.call_function(aten.empty.memory_format, (size,), dict(node.kwargs))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
        elif node.target == aten.constant_pad_nd.default:
            x, pad = node.args[0], list(node.args[1])
            if not any(p < 0 for p in pad) or any(p > 0 for p in pad):
                continue
            # pads come in (left, right) pairs from the last dim backwards; all <= 0 here: a slice
            shape = list(x.meta["val"].shape)
            cur = x
            with g.inserting_before(node):
                for k in range(len(pad) // 2):
                    dim = len(shape) - 1 - k
                    lo, hi = -pad[2 * k], -pad[2 * k + 1]
                    if lo == 0 and hi == 0:
                        continue
                    cur = g.call_function(aten.slice_copy.Tensor, (cur, dim, lo, shape[dim] - hi))
                    cur.meta = dict(node.meta)
            node.replace_all_uses_with(cur)
            g.erase_node(node)
        elif node.target == aten.addmm.default and not node.kwargs:
            bias, a, b = node.args[:3]
            with g.inserting_before(node):
                mm = g.call_function(aten.mm.default, (a, b))
                mm.meta = dict(node.meta)
                add = g.call_function(aten.add.Tensor, (mm, bias))
                add.meta = dict(node.meta)
            node.replace_all_uses_with(add)
            g.erase_node(node)
    g.lint()
    gm.recompile()


# --------------------------------------------------------------------------------------------
# programs


def _xnnpack_partitioner(weights: frozenset = frozenset()):
    """XNNPACK's partitioner, keeping the tanh-approximated GELU out of the delegate, and what is computed
    from the ``weights`` inputs alone (a streamed weight's dequantisation: the delegate would take every
    such op of a block into one call at the top of the program, all the block's weights in float32 at once).

    XNNPACK has one GELU, the exact (erf) one, and its GELU config ignores ``approximate``: a
    ``gelu(x, approximate="tanh")`` (the FLUX and SD3 feed-forwards) would run as the exact GELU in the
    forward while the backward still differentiates the tanh form, which moved FLUX's LoRA gradients by
    about 1.6e-4 (relative). Left to the portable kernel it computes the tanh form, as torch does."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import GeluConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class ExactGeluConfig(GeluConfig):
        def check_constraints(self, node, ep) -> bool:
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return approximate == "none" and super().check_constraints(node, ep)

    memo: dict = {}  # one graph is partitioned per partitioner

    def not_on_weights(config):
        class Config(config):  # type: ignore[valid-type,misc]  # (a dynamic base: each partitioner config)
            def check_constraints(self, node, ep) -> bool:
                return not _from_weights(node, weights, memo) and super().check_constraints(node, ep)

        Config.__name__ = config.__name__
        return Config

    configs = [ExactGeluConfig if c is GeluConfig else c for c in ALL_PARTITIONER_CONFIGS]
    if not weights:
        return XnnpackPartitioner(configs=configs)
    # a stream program's matmuls read weights that are inputs: XNNPACK takes them only when told to (else
    # they run on the optimized kernels' single-threaded gemm: a FLUX.1-dev photo took many minutes)
    return XnnpackPartitioner(
        configs=[not_on_weights(c) for c in configs], force_non_static_weights_for_f32_linear=True
    )


def _from_weights(node, weights: frozenset, memo: dict) -> bool:
    """Whether ``node`` is computed from the placeholders named in ``weights`` alone."""
    if node not in memo:
        if node.op == "placeholder":
            memo[node] = node.name in weights
        elif node.op == "call_function" and node.all_input_nodes and "call_delegate" not in str(node.target):
            memo[node] = all(_from_weights(a, weights, memo) for a in node.all_input_nodes)
        else:
            memo[node] = False
    return memo[node]


def _sink_weight_computations(gm, weights: frozenset) -> None:
    """Move what is computed from the weight inputs alone (dequantisation, views) to just before its first
    use: partitioning sorts it all to the top of the graph, so every dequantised weight of a block was
    planned alive at once (a FLUX.1-dev double block's forward: 1764 MiB of arena); sunk, each lives from
    its dequantisation to the call that reads it."""
    g = gm.graph
    memo: dict = {}
    order = {n: i for i, n in enumerate(g.nodes)}
    moved = False
    for n in reversed(list(g.nodes)):
        if n.op != "call_function" or not n.users or not _from_weights(n, weights, memo):
            continue
        first = min(n.users, key=lambda u: order[u])
        if order[first] > order[n] + 1:
            first.prepend(n)
            moved = True
            order = {m: i for i, m in enumerate(g.nodes)}
    if moved:
        g.lint()
        gm.recompile()


def _lower(ep, delegate: str, training: bool, plan_inputs: bool = True, weights: tuple[int, ...] = ()):
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes import MemoryPlanningPass

    cfg = EdgeCompileConfig(_check_ir_validity=True)
    if delegate == "xnnpack":
        names = frozenset(ep.graph_signature.user_inputs[i] for i in weights)
        edge = to_edge_transform_and_lower(ep, partitioner=[_xnnpack_partitioner(names)], compile_config=cfg)
        if names:
            _sink_weight_computations(edge.exported_program().graph_module, names)
    else:
        edge = to_edge(ep, compile_config=cfg)
    return edge.to_executorch(
        ExecutorchBackendConfig(
            external_mutable_weights=training,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=plan_inputs),
        )
    )


def training_program(module: nn.Module, args: tuple, delegate: str = "none"):
    """The joint forward-backward program of ``module`` (output 0: the loss)."""
    from torch.export.experimental import _export_forward_backward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with quiet(), sdpa_kernel([SDPBackend.MATH]):
        ep = torch.export.export(module, args, strict=False)
        ep = _export_forward_backward(ep)
        _fix_graph(ep.graph_module)
        return _lower(ep, delegate, training=True)


def inference_program(
    module: nn.Module,
    args: tuple,
    delegate: str = "none",
    plan_inputs: bool = True,
    weights: tuple[int, ...] = (),
):
    """An inference program; ``plan_inputs=False`` leaves the inputs out of the memory plan (the caller's
    buffers are used as they are). ``args`` may be fake tensors: the program's arena is then known
    without any weights (the dry run), though it cannot be serialised with constants. ``weights``: the
    positions of the args that are weights (a stream program's streamed frozen weights)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with quiet(), sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
        _fix_graph(ep.graph_module)
        return _lower(ep, delegate, training=False, plan_inputs=plan_inputs, weights=weights)


def planned_arena_bytes(et_program) -> int:
    """The memory-planned arena of the program's ``forward`` (activations, saved tensors, gradients)."""
    for plan in et_program.executorch_program.execution_plan:
        if plan.name == "forward":
            return int(sum(plan.non_const_buffer_sizes))
    raise RuntimeError("the program has no forward method")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _call_workspace(mod) -> int:
    """XNNPACK's workspace for one delegate call: the live bytes of the values computed inside it (neither
    its inputs nor its outputs) at their most, in its node order, each freed after its last use."""
    nodes = list(mod.original_module.graph_module.graph.nodes)
    outputs = set(nodes[-1].all_input_nodes) if nodes and nodes[-1].op == "output" else set()
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    alive: dict = {}
    live = largest = 0
    for i, n in enumerate(nodes):
        if n.op == "call_function" and n not in outputs:
            alive[n] = _nbytes(n.meta.get("val"))
            live += alive[n]
            largest = max(largest, live)
        for a in n.all_input_nodes:
            if last[a] == i and a in alive:
                live -= alive.pop(a)
    return largest


def delegate_workspace_bytes(et_program) -> int:
    """XNNPACK's workspace for the program: the values computed inside a delegate call (neither its inputs
    nor its outputs), which XNNPACK allocates itself, outside the program's memory plan. The backend's
    default sharing (executorch 1.5.1's wheel: "Global") gives every delegate call of every loaded program
    one workspace, grown to the largest call's need and kept while any is loaded: this is the largest
    call's, by the live bytes of its values in its node order, each freed after its last use (a FLUX.1-dev
    single block's VJP at 768 tokens: 586 MiB, the attention backward). 0 without delegate calls."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    return max(
        (
            _call_workspace(mod)
            for mod in et_program.exported_program().graph_module.children()
            if isinstance(mod, LoweredBackendModule)
        ),
        default=0,
    )


def workspace_grow_points(et_program, align: int = 64) -> list[tuple[int, list[tuple[int, int]]]]:
    """The delegate calls of the program's ``forward`` that need more workspace than every earlier one (the
    only calls that can grow XNNPACK's shared workspace), in execution order: each call's need
    (``_call_workspace``) and the arena it finds touched, as merged byte ranges [lo, hi) of the values
    computed before it (their memory-planned ``mem_id``/``mem_offset``/``allocated_memory``, with the
    planned buffers laid end to end, each rounded up to ``align``, as the native runner lays them in its
    one arena). The call's own outputs are written after it grows the workspace: not counted."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    sizes = next(
        list(p.non_const_buffer_sizes)
        for p in et_program.executorch_program.execution_plan
        if p.name == "forward"
    )
    base = [0]
    for n in sizes[:-1]:
        base.append(base[-1] + (int(n) + align - 1) // align * align)
    gm = et_program.exported_program().graph_module
    ranges: list[tuple[int, int]] = []
    points: list[tuple[int, list[tuple[int, int]]]] = []
    best = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.args and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr":
            # a get_attr node's target is the attribute's name (torch types it as a name or a callable)
            mod = getattr(gm, cast(str, node.args[0].target), None)
            if isinstance(mod, LoweredBackendModule):
                need = _call_workspace(mod)
                if need > best:
                    best = need
                    points.append((need, merged_ranges(ranges)))
        specs = node.meta.get("spec")
        for spec in specs if isinstance(specs, list | tuple) else [specs]:
            mem_id, off = getattr(spec, "mem_id", None), getattr(spec, "mem_offset", None)
            if mem_id is None or off is None or getattr(spec, "const", False) or mem_id >= len(base):
                continue
            lo = base[mem_id] + int(off)
            ranges.append((lo, lo + int(spec.allocated_memory)))
        ranges = merged_ranges(ranges)
    return points


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi), sorted and merged where they overlap or touch; empty ones dropped."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def write_program(et_program, root: Path, rel: str, files: list[str]) -> dict:
    """Write ``rel`` (.pte) and, for a training program, its ``.ptd`` of trainable weights."""
    import tempfile

    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(et_program.buffer)
    files.append(rel)
    out = {"file": rel, "arena_bytes": planned_arena_bytes(et_program)}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        et_program.write_tensor_data_to_file(tmp)
        data = sorted(Path(tmp).glob("*.ptd"))
        if len(data) > 1:
            raise RuntimeError(f"expected at most one .ptd, got {[p.name for p in data]}")
        if data:
            drel = str(Path(rel).with_suffix(".ptd"))
            os.replace(data[0], root / drel)
            files.append(drel)
            out["data"] = drel
    return out


def check_plan(plan, delegate: str = "none") -> None:
    if delegate not in DELEGATES:
        raise PlanError(f"unknown --delegate {delegate!r}; choose from {', '.join(DELEGATES)}")
    if plan.dtype != "float32":
        raise PlanError(
            f"--format pte computes in float32; got --dtype {plan.dtype} (use --storage for smaller "
            "frozen weights)"
        )
    if plan.base_quant != "none":
        raise PlanError(
            "--format pte has no --base-quant; store the frozen weights in fewer bits with "
            "--span streamed --storage int8 (or int4)"
        )
    if plan.optimizer != "adamw":
        raise PlanError(f"--format pte trains with AdamW; --optimizer {plan.optimizer} is torch-only")


class PteFormat:
    name = "pte"

    def __init__(self, delegate: str = "none"):
        self.delegate = delegate

    def check(self, plan, delegate: str | None = None) -> None:
        check_plan(plan, self.delegate if delegate is None else delegate)

    def program(self, traced, root: Path, rel: str, files: list[str]) -> dict:
        """One stream program (an FX graph with its calling convention) as an ExecuTorch program, lowered
        on fake inputs (its weights are inputs: real zeros would be a block's weights, GBs for SD3's embed)."""
        et = inference_program(
            traced.gm,
            traced.example_args(fake=True),
            self.delegate,
            plan_inputs=False,
            weights=traced.weight_positions(),
        )
        return write_program(et, root, f"{rel}.pte", files)

    def encoder(self, root: Path, lm, plan, files: list[str]) -> dict:
        from blockskip.export.graphs import encoder_inputs, encoder_section
        from blockskip.export.xnnpack_encoder import encoder_program

        programs = {}
        for stem, shape in encoder_inputs(lm, plan):
            et = encoder_program(lm.encoder.float(), lm.encoder_spec, shape, self.delegate)
            programs[f"{shape[2]}x{shape[3]}"] = write_program(et, root, f"pte/{stem}.pte", files)
        return encoder_section(lm, plan, programs)

    def resident_span(
        self, root: Path, lm, plan, trained: list[int], lora: dict, entry: dict, files: list[str], log
    ) -> dict:
        """The ExecuTorch training program of the whole trained span (``pte/train/span.pte`` + ``.ptd``)."""
        from blockskip.export.graphs import LOSS_SCALE, SpanLossGraph
        from blockskip.runtime.backends.torch import TrainedSpan

        fam = lm.family
        names = sorted(entry)
        log(f"pte: exporting the trained span's training program (delegate {self.delegate})")
        span = TrainedSpan(lm.store(), trained, lora, plan.seed, base_quant="none", checkpointing=False)
        graph = SpanLossGraph(fam, span.model, trained, names)
        args = tuple(entry[n] for n in names) + (torch.ones(1),)
        trainable = [n for n, p in graph.named_parameters() if p.requires_grad]
        et = training_program(graph, args, self.delegate)
        train = write_program(et, root, "pte/train/span.pte", files)
        if "data" not in train:
            raise RuntimeError("the training program has no .ptd of LoRA weights; this is a bug")
        train.update(
            inputs=names + [LOSS_SCALE],
            shapes={n: list(entry[n].shape) for n in names},
            lora=trainable,
            optimizer={
                "type": "adamw",
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": plan.weight_decay,
            },
        )
        return {"train": train}

    def section(self) -> dict:
        return {"delegate": self.delegate}
