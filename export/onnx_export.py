"""The ``onnx`` format plug-in: ONNX models for the ``ort`` backend.

* block-streamed programs (forward / VJP / head per block shape, ``stream_export``) and the photo encoder
  become ordinary ONNX inference models that ``onnxruntime.InferenceSession`` runs;
* a resident trained span (LoRA blocks, skipped spans' residual adds, head, flow-matching loss) becomes
  ONNX Runtime training artifacts (training / eval / optimizer models and a checkpoint): LoRA
  parameters trainable, base weights frozen, AdamW in PyTorch's formulation.

ONNX Runtime training is frozen at 1.19.2 (the last release); these rules keep its graphs correct:
opset 18 (newer opsets get the tanh-GELU gradient wrong, 23 does not load), IR version 10, the dynamo
exporter without its optimizer (which renames the weights it folds transposes into) followed by
onnxscript's constant folding restricted to nodes that read no parameter, and LayerNormalization always
with a scale and a bias (the gradient builder needs them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blockskip.export.graphs import LOSS_SCALE, EncoderGraph, SpanLossGraph
from blockskip.runtime.errors import PlanError
from blockskip.runtime.stream import WEIGHT

OPSET = 18
IR_VERSION = 10


# --------------------------------------------------------------------------------------------
# torch -> onnx with the fixes ORT training needs


def to_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str]):
    """Export with dynamo (opset 18, unoptimised), fold constants that read no parameter, fix
    LayerNormalization, stamp IR 10. Returns an ``onnx.ModelProto`` with initializers named like the
    module's parameters."""
    import onnx_ir as ir

    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            optimize=False,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
            report=False,
        )
    assert prog is not None  # the dynamo export returns its program (torch types it Optional)
    model = prog.model
    params = set(model.graph.initializers)

    def should_fold(node):
        if any(v is not None and v.name in params for v in node.inputs):
            return False  # keep weights (and their transposes) visible under their own names
        return None

    with _quiet():
        _optimize(model, should_fold)
    proto = ir.serde.serialize_model(model)
    _fix_layer_norm(proto)
    _float_trig(proto)
    proto.ir_version = IR_VERSION
    return proto


def _float_trig(proto) -> None:
    """ONNX Runtime's CPU Cos and Sin take float32 only: a float64 one (the embed program's positions,
    computed in float64 as the eager model does) runs in float32 between two Casts."""
    import onnx
    from onnx import TensorProto, helper

    trig = [n for n in proto.graph.node if n.op_type in ("Cos", "Sin")]
    if not trig:
        return
    g = onnx.shape_inference.infer_shapes(proto).graph
    types = {
        v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)
    }
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    nodes = []
    for k, node in enumerate(proto.graph.node):
        if node.op_type in ("Cos", "Sin") and types.get(node.input[0]) == TensorProto.DOUBLE:
            x, y = f"{node.input[0]}_as_f32_{k}", f"{node.output[0]}_f32_{k}"
            nodes += [
                helper.make_node("Cast", [node.input[0]], [x], to=TensorProto.FLOAT),
                helper.make_node(node.op_type, [x], [y]),
                helper.make_node("Cast", [y], [node.output[0]], to=TensorProto.DOUBLE),
            ]
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _rewrite_rules() -> list:
    """onnxscript's default rewrite rules without its no-op rules (x+0, x-0, x*1, x/1): they match a
    constant within an absolute 1e-8, so they drop a 1e-15 epsilon (DC-AE's linear attention divides by
    ``sum + 1e-15``; without it an all-zero row is 0/0 = NaN once ONNX Runtime optimises the graph)."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _no_op

    drop = {id(r) for r in _no_op.rules.rules}
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if id(r) not in drop]


def _optimize(model, should_fold) -> None:
    """onnxscript's default optimisation (constant folding, rewrites, dead-node removal) without
    deduplicating initializers: identical weights (every zero-initialised LoRA B) must stay distinct
    parameters."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    loop = ir.passes.PassManager(
        [
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                should_fold=should_fold,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
            rewriter.RewritePass(_rewrite_rules()),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    ir.passes.Sequential(
        common.InlinePass(),
        loop,
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _fix_layer_norm(proto) -> None:
    """Give every LayerNormalization its own scale and a bias, and the Mean/InvStdDev outputs: ORT's
    gradient builder needs all three inputs and outputs, and distinct initializer names."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    for k, node in enumerate(g.node):
        if node.op_type != "LayerNormalization":
            continue
        inputs = list(node.input)
        scale = inputs[1] if len(inputs) > 1 else ""
        ref = inits.get(scale)
        if ref is None:
            continue  # a computed scale: not what the exporter writes for a plain LayerNorm
        if not _is_param(scale):
            arr = numpy_helper.to_array(inits[scale])
            name = f"{node.name or 'layernorm'}_{k}.scale"
            g.initializer.append(numpy_helper.from_array(arr.copy(), name))
            inputs[1] = name
        if len(inputs) < 3 or not inputs[2]:
            dim = ref.dims[-1]
            name = f"{node.name or 'layernorm'}_{k}.bias"
            g.initializer.append(numpy_helper.from_array(np.zeros(dim, np.float32), name))
            inputs = inputs[:2] + [name]
        del node.input[:]
        node.input.extend(inputs)
        outs = list(node.output)
        while len(outs) < 3:
            outs.append(f"{node.output[0]}_ln_aux{len(outs)}")
        del node.output[:]
        node.output.extend(outs)


def _is_param(name: str) -> bool:
    return "." in name and not name.startswith("val_")


def native_stderr_captured():
    """ORT's gradient-graph builder logs every graph transformer at info level straight to fd 2 whatever
    the Python-side severity; keep that out of the output (shown again if the block fails)."""
    from blockskip.runtime.native_log import fd2_filtered

    return fd2_filtered(lambda line, failed: failed)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings on every call; keep them out of the CLI's output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# --------------------------------------------------------------------------------------------
# the plug-in


def check_plan(plan) -> None:
    if plan.dtype != "float32":
        raise PlanError(
            f"--format onnx computes in float32; got --dtype {plan.dtype} (use --storage for smaller "
            "frozen weights)"
        )
    if plan.base_quant != "none":
        raise PlanError(
            "--format onnx has no --base-quant; store the frozen weights in fewer bits with "
            "--span streamed --storage int8 (or int4)"
        )
    if plan.optimizer != "adamw":
        raise PlanError(f"--format onnx trains with AdamW; --optimizer {plan.optimizer} is torch-only")
    if plan.span == "streamed" and plan.storage_dtype == "bfloat16":
        # onnxruntime 1.19's Python API builds no bfloat16 tensor from host memory (numpy has no bfloat16)
        raise PlanError(
            "--format onnx cannot feed bfloat16 weights to ONNX Runtime's Python API; use --storage "
            "float16 (the same size), int8 or int4"
        )


class OnnxFormat:
    name = "onnx"

    def check(self, plan, delegate: str = "none") -> None:
        check_plan(plan)

    def program(self, traced, root: Path, rel: str, files: list[str]) -> dict:
        """One stream program (an FX graph with its calling convention) as an ONNX inference model."""
        names = [n for n, _, _ in traced.inputs]
        proto = to_onnx(traced.gm, traced.example_args(), names, [n for n, _, _ in traced.outputs])
        defer_weights(proto, lambda n: n.startswith(WEIGHT))
        got = [i.name for i in proto.graph.input]
        if got != names:
            raise RuntimeError(
                f"the ONNX export renamed or dropped inputs of {rel} ({got[:3]}...); this is a bug"
            )
        _save_proto(root / f"{rel}.onnx", proto)
        files.append(f"{rel}.onnx")
        return {"file": f"{rel}.onnx"}

    def encoder(self, root: Path, lm, plan, files: list[str]) -> dict:
        from blockskip.export.graphs import encoder_inputs, encoder_section

        g = EncoderGraph(lm.encoder.float(), lm.encoder_spec)
        programs = {}
        for stem, shape in encoder_inputs(lm, plan):
            proto = to_onnx(g, (torch.zeros(*shape),), ["images"], ["latents"])
            rel = f"onnx/{stem}.onnx"
            _save_proto(root / rel, proto)
            files.append(rel)
            programs[f"{shape[2]}x{shape[3]}"] = {"file": rel}
        return encoder_section(lm, plan, programs)

    def resident_span(
        self, root: Path, lm, plan, trained: list[int], lora: dict, entry: dict, files: list[str], log
    ) -> dict:
        """ONNX Runtime training artifacts of the whole trained span (``onnx/train/``)."""
        from blockskip.runtime.backends.torch import TrainedSpan

        fam = lm.family
        names = sorted(entry)
        log("onnx: exporting the trained span with its loss")
        span = TrainedSpan(lm.store(), trained, lora, plan.seed, base_quant="none", checkpointing=False)
        graph = SpanLossGraph(fam, span.model, trained, names)
        args = tuple(entry[n] for n in names) + (torch.ones(1),)
        proto = to_onnx(graph, args, names + [LOSS_SCALE], ["loss"])
        trainable = [n for n, p in graph.named_parameters() if p.requires_grad]
        inits = {t.name for t in proto.graph.initializer}
        missing = [n for n in trainable if n not in inits]
        if missing:
            raise RuntimeError(f"the ONNX export lost LoRA parameters {missing[:3]}...; this is a bug")
        frozen = sorted(inits - set(trainable))
        train_dir = root / "onnx" / "train"
        train_dir.mkdir(parents=True, exist_ok=True)
        log(f"onnx: building the gradient graph ({len(trainable)} LoRA tensors, {len(frozen)} frozen)")
        sec = generate_training_artifacts(proto, trainable, frozen, train_dir, plan)
        for rel in sec["files"].values():
            files.append(str(Path("onnx/train") / rel))
        sec["files"] = {k: str(Path("onnx/train") / v) for k, v in sec["files"].items()}
        sec["inputs"] = names + [LOSS_SCALE]
        sec["shapes"] = {n: list(entry[n].shape) for n in names}
        sec["lora"] = trainable
        return {"train": sec}

    def section(self) -> dict:
        return {"opset": OPSET, "ir_version": IR_VERSION}


def defer_weights(proto, is_weight) -> int:
    """Make each computation on a frozen weight input wait for the activation it meets.

    ONNX Runtime orders a graph by its own depth-first walk, which runs every node that reads only graph
    inputs early: all of a block's weights were dequantised to float32 (and transposed) before its first
    matmul, the whole block in float32 at once (a FLUX-like double block at 1024 tokens: 142 instead of
    74 MiB). Here each node that reads a weight input and nothing computed from an activation (a
    ``Cast``, ``Slice`` or ``Transpose`` of the stored weight) reads it through
    ``Reshape(w, shape + zero(x))`` instead, ``x`` being the activation input of the first node the
    weight's values meet, and ``zero(x) = Cast(Equal(x[0], x[0])) * 0`` (0 whatever x holds, NaN
    included, and not foldable). ``Reshape`` aliases its input, so nothing is copied; the weight's
    float32 form now exists only from its matmul's input on, as in the graph's own order (the order the
    dry run traces). Returns the number of weight reads deferred."""
    import heapq
    from collections import defaultdict

    from onnx import TensorProto, helper

    g = proto.graph
    weights = {i.name: i for i in g.input if is_weight(i.name)}
    static = set(weights) | {t.name for t in g.initializer}
    nodes = list(g.node)
    consumers: dict[str, list[int]] = defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            if i:
                consumers[i].append(k)
    is_static = []
    for n in nodes:
        st = all(not i or i in static for i in n.input)
        is_static.append(st)
        if st:
            static.update(o for o in n.output if o)

    def activation_for(k: int) -> str | None:
        """The first activation that the values of static node k meet (in graph order)."""
        seen, frontier = {k}, [k]
        best: tuple[int, str] | None = None
        while frontier:
            j = frontier.pop()
            for o in nodes[j].output:
                for c in consumers.get(o, ()):
                    if c in seen:
                        continue
                    seen.add(c)
                    if is_static[c]:
                        frontier.append(c)
                    else:
                        x = next(i for i in nodes[c].input if i and i not in static)
                        if best is None or c < best[0]:
                            best = (c, x)
        return None if best is None else best[1]

    new: list[tuple[float, object]] = []  # (position, node) of the nodes added
    zeros: dict[str, str] = {}
    deferred: dict[tuple[str, str], str] = {}
    uid = iter(range(1 << 30))

    def const(vals: list[int]) -> str:
        name = f"defer_c{next(uid)}"
        new.append(
            (
                -1.0,
                helper.make_node(
                    "Constant",
                    [],
                    [name],
                    value=helper.make_tensor(name + "_v", TensorProto.INT64, [len(vals)], vals),
                ),
            )
        )
        return name

    count = 0
    for k, n in enumerate(nodes):
        if not is_static[k] or not any(i in weights for i in n.input):
            continue
        x = activation_for(k)
        if x is None:
            continue
        pos = k - 0.5
        if x not in zeros:
            t = f"defer_z{next(uid)}"
            flat, one, eq, ci = (f"{t}_flat", f"{t}_one", f"{t}_eq", f"{t}_int")
            new.extend(
                (pos, nd)
                for nd in (
                    helper.make_node("Reshape", [x, const([-1])], [flat]),
                    helper.make_node("Slice", [flat, const([0]), const([1])], [one]),
                    helper.make_node("Equal", [one, one], [eq]),
                    helper.make_node("Cast", [eq], [ci], to=TensorProto.INT64),
                    helper.make_node("Mul", [ci, const([0])], [t]),
                )
            )
            zeros[x] = t
        ins = list(n.input)
        for j, i in enumerate(ins):
            if i not in weights:
                continue
            key = (i, x)
            if key not in deferred:
                dims = [d.dim_value for d in weights[i].type.tensor_type.shape.dim]
                name = f"defer_w{next(uid)}"
                shp = name + "_shape"
                new.append((pos, helper.make_node("Add", [const(dims), zeros[x]], [shp])))
                new.append((pos, helper.make_node("Reshape", [i, shp], [name])))
                deferred[key] = name
                count += 1
            ins[j] = deferred[key]
        del n.input[:]
        n.input.extend(ins)
    if not count:
        return 0
    # a stable topological order: the original order, each added node just before the node it serves
    allnodes = [(float(k), n) for k, n in enumerate(nodes)] + new
    produced = {o: idx for idx, (_, nd) in enumerate(allnodes) for o in nd.output if o}
    deps = [{produced[i] for i in nd.input if i in produced} for _, nd in allnodes]
    users: dict[int, list[int]] = defaultdict(list)
    for idx, ds in enumerate(deps):
        for d in ds:
            users[d].append(idx)
    left = [len(ds) for ds in deps]
    ready = [(allnodes[idx][0], idx) for idx in range(len(allnodes)) if not left[idx]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, idx = heapq.heappop(ready)
        order.append(allnodes[idx][1])
        for u in users[idx]:
            left[u] -= 1
            if not left[u]:
                heapq.heappush(ready, (allnodes[u][0], u))
    if len(order) != len(allnodes):
        raise RuntimeError("deferring the weights made the ONNX graph cyclic; this is a bug")
    del g.node[:]
    g.node.extend(order)
    return count


def _save_proto(path: Path, proto) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if proto.ByteSize() > 1_800_000_000:  # protobuf's 2 GB limit: weights go to a side file
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default


def generate_training_artifacts(proto, trainable: list[str], frozen: list[str], out: Path, plan) -> dict:
    """ORT's training / eval / optimizer models and checkpoint for ``proto`` (whose output is the loss).

    The optimizer is ORT's AdamWOptimizer switched to PyTorch's formulation (``adam_mode=0``: decoupled
    weight decay before the update, bias correction on both moments, eps 1e-8), so the ``ort`` backend
    takes the same steps as the torch backend's ``torch.optim.AdamW``."""
    import onnx
    import onnxruntime
    from onnxruntime.training import artifacts, onnxblock

    onnxruntime.set_default_logger_severity(3)
    opt = onnxblock.optim.AdamW(betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=plan.weight_decay)
    with _quiet(), native_stderr_captured():
        artifacts.generate_artifacts(
            proto,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=None,
            optimizer=opt,
            artifact_directory=out,
        )
    names = {
        "training": "training_model.onnx",
        "eval": "eval_model.onnx",
        "optimizer": "optimizer_model.onnx",
        "checkpoint": "checkpoint",
    }
    for key in ("training", "eval", "optimizer"):
        p = out / names[key]
        m = onnx.load(str(p))
        m.ir_version = IR_VERSION
        if key == "optimizer":
            for node in m.graph.node:
                if node.op_type == "AdamWOptimizer":
                    for a in node.attribute:
                        if a.name == "adam_mode":
                            a.i = 0
        onnx.save(m, str(p))
    return {
        "files": names,
        "optimizer": {
            "type": "adamw",
            "adam_mode": 0,
            "betas": list(ADAM_BETAS),
            "eps": ADAM_EPS,
            "weight_decay": plan.weight_decay,
        },
    }
