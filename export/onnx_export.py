"""ONNX artifacts for the ``ort`` backend.

* The trained span (LoRA blocks, skipped spans' residual adds, head, flow-matching loss) becomes ONNX
  Runtime training artifacts (training / eval / optimizer models and a checkpoint): LoRA parameters
  trainable, base weights frozen, AdamW in PyTorch's formulation.
* Every block the device runs while precomputing, and the photo encoder, become ONNX inference models,
  one per block, so precompute streams them one at a time.

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

from blockskip.export.memory.fake_store import PartsStore
from blockskip.runtime.backends.torch import gaps, span_forward, span_loss
from blockskip.runtime.backends.torch_families.base import TorchFamily, tensor_names
from blockskip.runtime.errors import PlanError

OPSET = 18
IR_VERSION = 10
LOSS_SCALE = "loss_scale"  # graph input: the loss is multiplied by it (1 / grad_accum)


# --------------------------------------------------------------------------------------------
# an in-memory BlockStore, so export reuses the device's own span and precompute code


class ModelStore(PartsStore):
    """BlockStore over an in-memory model: loads share the model's tensors (no copies)."""

    def __init__(self, family: TorchFamily, model: nn.Module):
        super().__init__(family)
        self._state = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())}

    def _read(self, rel: str) -> dict[str, torch.Tensor]:
        return {n: self._state[n] for n in tensor_names(self.model, self._parts[rel])}


def graft(root: nn.Module, source: nn.Module, path: str) -> None:
    """Make ``source.<path>`` (a module, parameter or buffer) reachable as ``root.<path>``."""
    *parents, leaf = path.split(".")
    node, src = root, source
    for k in parents:
        src = getattr(src, k)
        if k not in node._modules:
            node.add_module(k, nn.Module())
        node = node._modules[k]
    obj = getattr(src, leaf)
    if isinstance(obj, nn.Module):
        node.add_module(leaf, obj)
    elif isinstance(obj, nn.Parameter):
        node.register_parameter(leaf, obj)
    else:
        node.register_buffer(leaf, obj)


class SpanLossGraph(nn.Module):
    """The trained span as one graph: cache-entry tensors (and the loss scale) in, the scaled loss out.

    Parameter names equal the full model's (``transformer_blocks.3.attn.to_q.lora_A.default.weight``).
    """

    def __init__(self, family: TorchFamily, model: nn.Module, trained: list[int], input_names: list[str]):
        super().__init__()
        for path in [family.block_paths()[i] for i in trained] + list(family.head_prefixes):
            graft(self, model, path)
        self.family, self.trained, self.input_names = family, list(trained), list(input_names)
        self.gaps = gaps(self.trained, family.num_blocks)

    def forward(self, *inputs):
        *tensors, scale = inputs
        entry = dict(zip(self.input_names, tensors))
        return span_loss(span_forward(self.family, self, self.trained, self.gaps, entry), entry) * scale


class BlockGraph(nn.Module):
    """One frozen block for streamed precompute: state + constants in, the next state out."""

    def __init__(self, family: TorchFamily, model: nn.Module, i: int, state_names: list[str], const_names: list[str]):
        super().__init__()
        graft(self, model, family.block_paths()[i])
        self.family, self.i, self.state_names, self.const_names = family, i, list(state_names), list(const_names)

    def forward(self, *inputs):
        state = dict(zip(self.state_names, inputs[: len(self.state_names)]))
        consts = dict(zip(self.const_names, inputs[len(self.state_names):]))
        out = self.family.run_block(self, self.i, state, consts)
        return tuple(out[n] for n in self.state_names if out.get(n) is not None)


# --------------------------------------------------------------------------------------------
# torch -> onnx with the fixes ORT training needs


def to_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str]):
    """Export with dynamo (opset 18, unoptimised), fold constants that read no parameter, fix
    LayerNormalization, stamp IR 10. Returns an ``onnx.ModelProto`` with initializers named like the
    module's parameters."""
    import onnx_ir as ir

    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, optimize=False,
                                 input_names=input_names, output_names=output_names, verbose=False,
                                 report=False)
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
    proto.ir_version = IR_VERSION
    return proto


def _optimize(model, should_fold) -> None:
    """onnxscript's default optimisation (constant folding, rewrites, dead-node removal) without
    deduplicating initializers: identical weights (every zero-initialised LoRA B) must stay distinct
    parameters."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    loop = ir.passes.PassManager(
        [_constant_folding.FoldConstantsPass(shape_inference=True, should_fold=should_fold,
                                             input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                             output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
         rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
         common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
        steps=2, early_stop=True)
    ir.passes.Sequential(
        common.InlinePass(), loop, common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.OutputFixPass(), common.NameFixPass(),
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
# the bundle part


def example_entry(lm, plan, trained: list[int], prompt: dict) -> dict[str, torch.Tensor]:
    """One cache entry of the right names and shapes (what training is fed), made by the device's own
    precompute code on the in-memory model."""
    from blockskip.runtime.backends.torch import compute_entries
    from blockskip.runtime.schedule import ScheduleEntry

    fam = lm.family
    store = ModelStore(fam, lm.transformer)
    names = store.load_part("embed")
    with torch.no_grad():
        text = fam.prepare_text(store.model, prompt)
    store.free(names)
    f = lm.vae_factor
    c = lm.latent_channels
    latents = torch.zeros(1, c, plan.s_max // f, plan.s_max // f, dtype=DTYPES[plan.dtype])
    e = ScheduleEntry(index=0, image=0, t=500, sigma=0.5, side=plan.s_min, top=0, left=0, noise_seed=0)
    return compute_entries(store, latents, text, [e], plan, f, trained)[0]


def check_plan(plan) -> None:
    if plan.dtype != "float32":
        raise PlanError(f"--format onnx trains in float32 (ONNX Runtime training on CPU); got --dtype {plan.dtype}")
    if plan.base_quant != "none":
        raise PlanError("--format onnx does not support --base-quant yet; use the torch format for int8/4-bit bases")
    if plan.optimizer != "adamw":
        raise PlanError(f"--format onnx trains with AdamW; --optimizer {plan.optimizer} is torch-only")
    if plan.vae_tiling:
        raise PlanError("--format onnx exports the photo encoder untiled; leave out --vae-tiling")


def write_onnx(root: Path, lm, plan, trained: list[int], lora: dict, prompt: dict, files: list[str],
               log=print) -> dict:
    """Write ``onnx/`` into the bundle folder ``root``; return the manifest's ``onnx`` section."""
    from blockskip.runtime.backends.torch import TrainedSpan, blocks_to_run

    check_plan(plan)
    fam = lm.family
    entry = example_entry(lm, plan, trained, prompt)
    names = sorted(entry)
    section: dict = {"opset": OPSET, "ir_version": IR_VERSION}

    # the trained span -> training artifacts
    log("onnx: exporting the trained span with its loss")
    store = ModelStore(fam, lm.transformer)
    span = TrainedSpan(store, trained, lora, plan.seed, base_quant="none", checkpointing=False)
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
    section["train"] = generate_training_artifacts(proto, trainable, frozen, train_dir, plan)
    for rel in section["train"]["files"].values():
        files.append(str(Path("onnx/train") / rel))
    section["train"]["files"] = {k: str(Path("onnx/train") / v) for k, v in section["train"]["files"].items()}
    section["train"]["inputs"] = names + [LOSS_SCALE]
    section["train"]["shapes"] = {n: list(entry[n].shape) for n in names}
    section["train"]["lora"] = trainable
    del span, graph, proto

    # the blocks precompute runs -> one inference model each
    state_names = [k for k in fam.state_keys]
    const_names = sorted(n[2:] for n in names if n.startswith("c."))
    stop = blocks_to_run(trained, fam.num_blocks, plan.back_residual)
    section["blocks"] = []
    shapes = block_io_examples(lm, plan, prompt, stop)
    for i in range(stop):
        log(f"onnx: block {i + 1}/{stop} for precompute")
        st_in, consts = shapes[i]
        st_names = [n for n in state_names if n in st_in]
        g = BlockGraph(fam, lm.transformer, i, st_names, const_names)
        with torch.no_grad():
            out = fam.run_block(g, i, dict(st_in), dict(consts))
        out_names = [n for n in st_names if out.get(n) is not None]
        proto = to_onnx(g, tuple(st_in[n] for n in st_names) + tuple(consts[n] for n in const_names),
                        [f"state.{n}" for n in st_names] + [f"c.{n}" for n in const_names],
                        [f"out.{n}" for n in out_names])
        rel = f"onnx/blocks/block_{i:03d}.onnx"
        _save_proto(root / rel, proto)
        files.append(rel)
        section["blocks"].append({"file": rel, "state": st_names, "consts": const_names, "outputs": out_names})

    # the photo encoder
    log("onnx: photo encoder")
    section["encoder"] = write_encoder(root, lm, plan, files)
    return section


def block_io_examples(lm, plan, prompt, stop):
    """Example (state, consts) entering each block [0, stop), from one embedded sample."""
    from blockskip.runtime.backends.torch_families.base import CropGeometry

    fam = lm.family
    store = ModelStore(fam, lm.transformer)
    names = store.load_part("embed")
    f = lm.vae_factor
    c = lm.latent_channels
    low = plan.s_min // f
    x = torch.zeros(1, c, low, low, dtype=DTYPES[plan.dtype])
    geom = CropGeometry(full=plan.s_max // f, side=low, top=0, left=0, low=low)
    with torch.no_grad():
        text = fam.prepare_text(store.model, prompt)
        state, consts = fam.embed(store.model, x, torch.tensor([0.5]), text, geom, plan.positions, plan.guidance)
        out = []
        for i in range(stop):
            st = {n: v for n, v in state.items() if v is not None}
            out.append((st, consts))
            names_i = store.load_block(i)
            state = store.run_block(i, st, consts)
            store.free(names_i)
    store.free(names)
    return out


class EncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module, spec: dict):
        super().__init__()
        self.encoder, self.spec = encoder, spec

    def forward(self, images):
        from blockskip.runtime.backends.torch_families.latent import encode_images

        return encode_images(self.encoder, self.spec, images)


def write_encoder(root: Path, lm, plan, files: list[str]) -> dict:
    g = EncoderGraph(lm.encoder.float(), lm.encoder_spec)
    x = torch.zeros(1, 3, plan.s_max, plan.s_max)
    proto = to_onnx(g, (x,), ["images"], ["latents"])
    rel = "onnx/encoder.onnx"
    _save_proto(root / rel, proto)
    files.append(rel)
    return {"file": rel, "input": [1, 3, plan.s_max, plan.s_max]}


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
        artifacts.generate_artifacts(proto, requires_grad=trainable, frozen_params=frozen, loss=None,
                                     optimizer=opt, artifact_directory=out)
    names = {"training": "training_model.onnx", "eval": "eval_model.onnx", "optimizer": "optimizer_model.onnx",
             "checkpoint": "checkpoint"}
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
    return {"files": names, "optimizer": {"type": "adamw", "adam_mode": 0, "betas": list(ADAM_BETAS),
                                          "eps": ADAM_EPS, "weight_decay": plan.weight_decay}}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
