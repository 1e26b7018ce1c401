"""ExecuTorch artifacts for the ``executorch`` backend and the native runner.

* The trained span (LoRA blocks, the skipped spans' residual adds, head, flow-matching loss) becomes an
  ExecuTorch *training program*: ``torch.export`` -> ``_export_forward_backward`` (the joint graph)
  -> edge -> ExecuTorch, with the LoRA weights split into a ``.ptd`` beside the ``.pte``
  (``external_mutable_weights``), optionally delegated to XNNPACK.
* Every block precompute runs, and the photo encoder, become ``.pte`` inference programs, one per
  block, streamed one at a time on the device.

The training program's ``forward`` takes the cache entry's tensors in the manifest's order plus the
loss scale, and returns ``[loss, gradients..., parameters...]``; the metadata methods
``__et_training_gradients_index_forward``, ``__et_training_parameters_index_forward`` and
``__et_training_fqn_forward`` say where the gradients and parameters start and name them.

Graph fixes (measured with executorch 1.5.1 + torch 2.13.0), applied as passes on the joint graph:
export under the math SDPA kernel (the fused kernels' backward is not Core ATen); ``empty_permuted``
-> ``empty.memory_format``; a ``constant_pad_nd`` with negative pads (a pad's backward) ->
``slice_copy``; ``addmm`` -> ``mm`` + ``add`` (about 5x faster steps on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from blockskip.runtime.errors import PlanError

DELEGATES = ("none", "xnnpack")


@contextlib.contextmanager
def quiet():
    """executorch and torchao log loader warnings and deprecations on import and export."""
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


def _lower(ep, delegate: str, training: bool):
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower

    cfg = EdgeCompileConfig(_check_ir_validity=True)
    if delegate == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], compile_config=cfg)
    else:
        edge = to_edge(ep, compile_config=cfg)
    return edge.to_executorch(ExecutorchBackendConfig(external_mutable_weights=training))


def training_program(module: nn.Module, args: tuple, delegate: str = "none"):
    """The joint forward-backward program of ``module`` (output 0: the loss)."""
    from torch.export.experimental import _export_forward_backward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with quiet(), sdpa_kernel([SDPBackend.MATH]):
        ep = torch.export.export(module, args, strict=False)
        ep = _export_forward_backward(ep)
        _fix_graph(ep.graph_module)
        return _lower(ep, delegate, training=True)


def inference_program(module: nn.Module, args: tuple, delegate: str = "none"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with quiet(), sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
        _fix_graph(ep.graph_module)
        return _lower(ep, delegate, training=False)


def planned_arena_bytes(et_program) -> int:
    """The memory-planned arena of the program's ``forward`` (activations, saved tensors, gradients)."""
    for plan in et_program.executorch_program.execution_plan:
        if plan.name == "forward":
            return int(sum(plan.non_const_buffer_sizes))
    raise RuntimeError("the program has no forward method")


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
        raise PlanError(f"--format pte trains in float32; got --dtype {plan.dtype}")
    if plan.base_quant != "none":
        raise PlanError("--format pte does not support --base-quant yet; use the torch format for int8/4-bit bases")
    if plan.optimizer != "adamw":
        raise PlanError(f"--format pte trains with AdamW; --optimizer {plan.optimizer} is torch-only")
    if plan.vae_tiling:
        raise PlanError("--format pte exports the photo encoder untiled; leave out --vae-tiling")
