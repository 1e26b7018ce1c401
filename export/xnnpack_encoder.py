"""The photo encoder as an XNNPACK program: ops XNNPACK delegates, and what XNNPACK holds while it runs.

XNNPACK delegates neither ``native_group_norm`` nor the ``_safe_softmax`` that the math SDPA kernel
decomposes to, so a KL encoder (AutoencoderKL: SD3/3.5, FLUX) lowered as diffusers writes it was cut into a
delegate call between every two GroupNorms (a 4-level, 128-channel encoder: 18 calls at 512 px). Every
call boundary costs memory: the GroupNorm's output is a full tensor of the planned arena, XNNPACK copies
each call's NCHW input to NHWC and its output back inside the call, and the shared workspace grows call by
call, the old and the new buffer held together at each grow. The encoder program computes them with ops
XNNPACK delegates instead (``delegable_ops``; the torch backend runs diffusers' own modules):

* GroupNorm: per-channel means over H, W (XNNPACK's global average pooling), averaged over each group's
  channels on the (N, C, 1, 1) means, then the same for the squared deviations (two passes, as ATen's
  kernel: no E[x^2] - E[x]^2 cancellation); a ``(N, C, L)`` input (the attention's GroupNorm) as
  ``(N, C, L, 1)``;
* unmasked scaled-dot-product attention: ``softmax((q s)(k s)^T) v`` with ``s = scale ** 0.5`` (the math
  kernel's scaling), in 3-D ``bmm`` (a 4-D matmul exports with ``expand_copy`` ops XNNPACK leaves out).

The KL encoder then lowers to two calls (the last one after the latent's ``chunk``), its latents within
about 1e-5 of the eager encoder's (``tests/test_dryrun_streamed.py``).

``workspace_bytes`` and ``indirection_bytes`` are what the program's XNNPACK calls hold beside the planned
arena: the shared workspace as XNNPACK's memory planner lays it out, and the convolutions' indirection
buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` in ops XNNPACK delegates (4-D means over H, W; elementwise ops; small reshapes)."""
    if x.dim() != 4:
        shape = x.shape
        return group_norm(x.reshape(shape[0], shape[1], -1, 1), num_groups, weight, bias, eps).reshape(shape)
    n, c = x.shape[:2]
    k = c // num_groups

    def group_mean(v):  # (N, C, H, W) -> (N, C, 1, 1): the mean over each channel's group
        m = v.mean((2, 3), keepdim=True).reshape(n, num_groups, k, 1)
        g = m.mean((2, 3), keepdim=True)
        return (m - m + g).reshape(
            n, c, 1, 1
        )  # broadcast back to the group's channels (expand is not delegated)

    d = x - group_mean(x)
    scale = torch.rsqrt(group_mean(d * d) + eps)
    if weight is not None:
        scale = scale * weight.reshape(1, c, 1, 1)
    y = d * scale
    return y + bias.reshape(1, c, 1, 1) if bias is not None else y


def attention(q, k, v, scale=None) -> torch.Tensor:
    """Unmasked ``F.scaled_dot_product_attention`` as the math kernel computes it, in 3-D ``bmm``."""
    s = math.sqrt(scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    shape = q.shape
    q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
    w = torch.softmax(torch.bmm(q * s, (k * s).transpose(1, 2)), dim=-1)
    return torch.bmm(w, v).reshape(*shape[:-1], v.shape[-1])


class delegable_ops(TorchFunctionMode):
    """Within it, ``F.group_norm`` and unmasked ``F.scaled_dot_product_attention`` compute as above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm:
            return group_norm(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            kw = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), rest), **kwargs)
            if (
                kw.get("attn_mask") is None
                and not kw.get("dropout_p")
                and not kw.get("is_causal")
                and not kw.get("enable_gqa")
                and q.shape[-3] == k.shape[-3]
            ):
                return attention(q, k, v, kw.get("scale"))
        return func(*args, **kwargs)


class DelegableEncoder(nn.Module):
    """The encoder graph (``graphs.EncoderGraph``) run under ``delegable_ops``: what the pte export lowers
    with the XNNPACK delegate. It shares the encoder's parameters."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.encoder_graph = graph

    def forward(self, images):
        with delegable_ops():
            return self.encoder_graph(images)


def encoder_program(encoder: nn.Module, spec: dict, shape: tuple, delegate: str, example=None):
    """The photo encoder's ExecuTorch program for inputs of ``shape`` (float32 encoder), as the export
    writes it and the dry run measures it."""
    from blockskip.export.graphs import EncoderGraph
    from blockskip.export.pte_export import inference_program

    graph: nn.Module = EncoderGraph(encoder, spec)
    if delegate == "xnnpack":
        graph = DelegableEncoder(graph)
    return inference_program(graph, (torch.zeros(*shape) if example is None else example,), delegate)


# --------------------------------------------------------------------------------------------
# what the XNNPACK calls hold

#: elementwise ops whose output XNNPACK's memory planner puts in the buffer of an input it is the only
#: reader of (``optimize_tensor_allocation_for_in_place_operations``, XNNPACK's runtime.c)
IN_PLACE = {
    "abs",
    "add",
    "clamp",
    "div",
    "elu",
    "floor",
    "hardswish",
    "leaky_relu",
    "maximum",
    "minimum",
    "mul",
    "neg",
    "sigmoid",
    "_softmax",
    "sqrt",
    "rsqrt",
    "sub",
    "view_copy",
    "_clone_dim_order",
    "clone",
    "hardtanh",
    "relu",
    "tanh",
    "exp",
    "ceil",
}


def _op(node) -> str:
    name = str(getattr(node.target, "__name__", node.target))  # "aten.convolution.default"
    return name.split(".")[-2] if name.count(".") >= 2 else name


def _nbytes(v) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def call_workspace(mod, reverse_ties: bool = False) -> int:
    """The workspace one delegate call needs: its values (neither its inputs nor its outputs) laid out by
    XNNPACK's memory planner (``xnn_plan_value_allocation_tracker``): an elementwise op's output shares the
    buffer of an input of equal size that only it reads (when only one op reads the output); the rest,
    largest first, each at the smallest gap among the live values' buffers it fits in, else above them.
    Values of equal size are placed in the value order (``reverse_ties``: the reverse), which XNNPACK's
    ``qsort`` leaves to the C library."""
    nodes = list(mod.original_module.graph_module.graph.nodes)
    outputs = set(nodes[-1].all_input_nodes) if nodes and nodes[-1].op == "output" else set()
    at = {n: i for i, n in enumerate(nodes)}
    vals = [n for n in nodes if n.op == "call_function" and n not in outputs and _nbytes(n.meta.get("val"))]
    size = {n: _nbytes(n.meta["val"]) for n in vals}
    first = {n: at[n] for n in vals}
    last = {n: max([at[u] for u in n.users], default=at[n]) for n in vals}
    shares: dict = {}
    for n in vals:
        if _op(n) not in IN_PLACE or len(n.users) != 1:
            continue
        for a in n.all_input_nodes:
            if a in size and len(a.users) == 1 and size[a] == size[n]:
                root = a
                while root in shares:
                    root = shares[root]
                shares[n] = root
                last[root] = max(last[root], last[n])
                break
    placed = [n for n in vals if n not in shares]
    placed.sort(key=lambda n: (-size[n], -at[n] if reverse_ties else at[n]))
    offset: dict = {}
    arena = 0
    for i, cur in enumerate(placed):
        live = sorted(
            (offset[a], offset[a] + size[a])
            for a in placed[:i]
            if last[a] >= first[cur] and last[cur] >= first[a]
        )
        merged: list[list[int]] = []
        for lo, hi in live:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        at_offset, best = (merged[-1][1] if merged else 0), None
        gaps = ([(0, merged[0][0])] if merged else []) + [
            (merged[j][1], merged[j + 1][0] - merged[j][1]) for j in range(len(merged) - 1)
        ]
        for lo, gap in gaps:
            if gap >= size[cur] and (best is None or gap < best):
                at_offset, best = lo, gap
        offset[cur] = at_offset
        arena = max(arena, at_offset + size[cur])
    return arena


def workspace_bytes(et_program) -> int:
    """The most XNNPACK's shared workspace holds while the program runs once: each call's need
    (``call_workspace``, the worse of the two tie orders), and where a call needs more than the workspace
    has, the old and the grown buffer together (XNNPACK frees the old one after allocating the new)."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    gm = et_program.exported_program().graph_module
    cur = held = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and "call_delegate" in str(node.target):
            mod = getattr(gm, node.args[0].target)
            if not isinstance(mod, LoweredBackendModule):
                continue
            need = max(call_workspace(mod), call_workspace(mod, reverse_ties=True))
            if need > cur:
                held = max(held, cur + need)
                cur = need
    return held


#: bytes of a pointer on the devices (64-bit)
POINTER_BYTES = 8


def indirection_bytes(et_program) -> int:
    """XNNPACK's indirection buffers of the program's delegated convolutions, held while it is loaded: a
    pointer per output pixel and kernel tap of every convolution that is not a plain 1x1 matmul (a
    128-channel 3x3 convolution at 512 x 512: 18 MiB, measured)."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    total = 0
    for mod in et_program.exported_program().graph_module.children():
        if not isinstance(mod, LoweredBackendModule):
            continue
        for n in mod.original_module.graph_module.graph.nodes:
            if n.op != "call_function" or _op(n) != "convolution":
                continue
            w, out = n.args[1].meta["val"], n.meta["val"]
            stride, padding = list(n.args[3]), list(n.args[4])
            taps = math.prod(w.shape[2:])
            if taps == 1 and all(s == 1 for s in stride) and not any(padding):
                continue
            total += POINTER_BYTES * taps * math.prod(out.shape[2:]) * out.shape[0]
    return total
