"""Blocks whose frozen weights and LoRA are inputs: what every block-streamed backend computes.

A *stream block* is a copy of one diffusers block (or of the head) in which every ``nn.Linear`` and
``nn.Conv2d`` is replaced by a stand-in that reads its frozen weight in the bundle's storage layout
(see ``store_tensors``) and, for LoRA targets, its LoRA A and B, all as buffers that
``torch.func.functional_call`` fills from the caller's tensors. The same module runs eagerly in the
torch backend and is traced (``make_fx``) into the forward / VJP / head programs that ExecuTorch, ONNX
Runtime and the native runner run, so every backend computes the same thing.

The frozen product runs in a custom autograd function that dequantises the weight piece by piece
(at most ``CHUNK`` values at a time) in the forward and again in the backward: no full-precision copy
of a weight lives from forward to backward, and the programs' memory planners see only one piece at
a time. Compute is float32 whatever the storage dtype.

Storage layout of one frozen tensor (name ``<module>.weight`` of a Linear or Conv2d; other tensors
are stored as floats):

====================  ===========================================================================
storage               tensors
====================  ===========================================================================
float32/16, bfloat16  ``<module>.weight`` in that dtype, the diffusers shape
int8                  ``<module>.weight_q8`` int8, the weight's shape; ``<module>.weight_scale``
                      float32 ``[out]``: w = q * scale[row] (symmetric, one scale per output row)
int4                  ``<module>.weight_q4`` uint8 ``[out, row/2]`` (two values a byte, the even
                      index in the low nibble, stored as value + 8); ``<module>.weight_scale`` float32
                      ``[out, row/G]``: w = (nibble - 8) * scale[row, group], groups of G consecutive
                      values of a row (G the largest of 64, 32, 16, 8 dividing the row; int8 if none)
====================  ===========================================================================

Biases, norms and every other tensor are stored as float32 (they are small, and diffusers' norms compute in
their weight's dtype).
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from blockskip.runtime.backends.torch_families.base import State, TorchFamily

# the layout of one stored tensor: (shape, dtype); ``layout`` maps relative names to these
Spec = tuple[tuple[int, ...], torch.dtype]
# a block's forward with autograd recording: (state leaves, LoRA leaves, outputs)
Graph = tuple[State, State, State]

STORAGE = ("float32", "float16", "bfloat16", "int8", "int4")
FLOAT_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT4_GROUPS = (64, 32, 16, 8)
CHUNK = 1 << 22  # float32 values of a weight dequantised (or transposed) at once: 16 MiB


# --------------------------------------------------------------------------------------------
# storage layout


def int4_group(row: int) -> int | None:
    """Group size for a row of ``row`` values, or None when int4 cannot store it (int8 instead)."""
    return next((g for g in INT4_GROUPS if row % g == 0), None)


def store_tensors(module: nn.Module, storage: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` (a block or the head parts) in the storage layout, by relative name.

    Works on meta tensors too (shapes and dtypes only)."""
    if storage not in STORAGE:
        raise ValueError(f"unknown storage {storage!r}; choose from {', '.join(STORAGE)}")
    out: dict[str, torch.Tensor] = {}
    weights: set[str] = set()
    for path, mod in module.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d):
            pre = f"{path}." if path else ""
            w = mod.weight.detach()
            if storage in FLOAT_STORAGE:
                out[pre + "weight"] = w.to(FLOAT_STORAGE[storage])
            else:
                out.update({pre + k: v for k, v in quantise(w, storage).items()})
            weights.add(pre + "weight")
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in weights:
            out[name] = t.detach().float() if t.is_floating_point() else t.detach()
    return out


def quantise(w: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """One Linear/Conv weight -> ``weight_q8``/``weight_q4`` + ``weight_scale`` (see the module doc).
    Rows are quantised independently, so it works a few MiB of rows at a time: a real-size weight (FLUX's
    3072x18432, 216 MiB in float32) needs no float32 copies of itself."""
    out_ch, row = w.shape[0], math.prod(w.shape[1:])
    flat = w.reshape(out_ch, row)
    g = int4_group(row) if storage == "int4" else None
    parts = [_quantise_rows(flat[r].float(), g) for r in _row_chunks(out_ch, row)]
    q, scale = (torch.cat([p[i] for p in parts]) for i in range(2))
    if g is None:
        return {"weight_q8": q.reshape(w.shape), "weight_scale": scale}
    return {"weight_q4": q, "weight_scale": scale}


def _quantise_rows(flat: torch.Tensor, g: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    out_ch, row = flat.shape
    if g is None:
        scale = flat.abs().amax(1).clamp_min(1e-30) / 127
        return torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
    scale = flat.reshape(out_ch, row // g, g).abs().amax(-1).clamp_min(1e-30) / 7
    q = torch.round(flat.reshape(out_ch, row // g, g) / scale[..., None]).clamp(-8, 7).to(torch.int32) + 8
    q = q.reshape(out_ch, row)
    return (q[:, 0::2] + q[:, 1::2] * 16).to(torch.uint8), scale


def dequantise(stored: tuple[torch.Tensor, ...], rows: slice | None = None) -> torch.Tensor:
    """Float32 rows of a stored weight (all rows if ``rows`` is None), flattened to [rows, row]."""
    q = stored[0]
    if rows is not None:
        stored = tuple(t[rows] for t in stored)
        q = stored[0]
    if len(stored) == 1:  # a float weight
        return q.reshape(q.shape[0], -1).float()
    scale = stored[1]
    if q.dtype == torch.int8:
        return q.reshape(q.shape[0], -1).float() * scale[:, None]
    v = q.to(torch.int32)
    hi = torch.div(v, 16, rounding_mode="floor")
    lo = v - hi * 16
    v = torch.stack([lo, hi], -1).reshape(q.shape[0], -1) - 8
    n_groups = scale.shape[1]
    return (v.float().reshape(q.shape[0], n_groups, -1) * scale[..., None]).reshape(q.shape[0], -1)


def _row_chunks(out_ch: int, row: int) -> list[slice]:
    step = max(1, CHUNK // max(1, row))
    return [slice(a, min(out_ch, a + step)) for a in range(0, out_ch, step)]


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a stored frozen W; no gradient for W or b; W re-dequantised in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, *stored: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*stored)
        parts = [x @ dequantise(stored, r).T for r in _row_chunks(stored[0].shape[0], x.shape[-1])]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return y if bias is None else y + bias.float()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        stored = ctx.saved_tensors
        gx: torch.Tensor | None = None
        for r in _row_chunks(stored[0].shape[0], _row_len(stored)):
            part = g[..., r] @ dequantise(stored, r)
            gx = part if gx is None else gx + part
        return (gx, None) + (None,) * len(stored)


def _apply(fn: type[torch.autograd.Function], *args: Any) -> torch.Tensor:
    """``fn.apply(*args)``: the output of one of the functions here (``Function.apply`` is untyped in torch)."""
    return cast(torch.Tensor, fn.apply(*args))  # type: ignore[no-untyped-call]


def _row_len(stored: tuple[torch.Tensor, ...]) -> int:
    q = stored[0]
    if q.dtype == torch.uint8:
        return q.shape[1] * 2
    return math.prod(q.shape[1:])


class _FrozenConv(torch.autograd.Function):
    """conv2d with a stored frozen weight; only the input gets a gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        padding: str | tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        *stored: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(*stored)
        ctx.conf = (tuple(x.shape), shape, stride, padding, dilation, groups)
        w = dequantise(stored).reshape(shape)
        return F.conv2d(x, w, None if bias is None else bias.float(), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_shape, shape, stride, padding, dilation, groups = ctx.conf
        w = dequantise(ctx.saved_tensors).reshape(shape)
        # the input gradient as a transposed convolution (ONNX has ConvTranspose, not convolution_backward)
        extra = tuple(
            x_shape[2 + d]
            - ((g.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (shape[2 + d] - 1) + 1)
            for d in range(2)
        )
        gx = F.conv_transpose2d(g, w, None, stride, padding, extra, groups, dilation)
        return (gx,) + (None,) * (6 + len(ctx.saved_tensors))


def _buffers(mod: nn.Module, specs: dict[str, Spec], prefix: str) -> None:
    for k, (shape, dtype) in specs.items():
        if k.startswith(prefix) and "." not in k[len(prefix) :]:
            mod.register_buffer(k[len(prefix) :], torch.empty(shape, dtype=dtype, device="meta"))


class StreamLinear(nn.Module):
    """A frozen Linear in storage layout, with LoRA (``lora_A`` [r, in], ``lora_B`` [out, r]) if a target."""

    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def __init__(
        self,
        specs: dict[str, Spec],
        prefix: str,
        rank: int = 0,
        scale: float = 1.0,
        shape: tuple[int, ...] = (0, 0),
    ) -> None:
        super().__init__()
        _buffers(self, specs, prefix)
        if "bias" not in self._buffers:
            self.bias = None
        self.rank, self.scale = rank, float(scale)
        if rank:
            out_f, in_f = shape
            self.register_buffer("lora_A", torch.empty(rank, in_f, device="meta"))
            self.register_buffer("lora_B", torch.empty(out_f, rank, device="meta"))

    def stored(self) -> tuple[torch.Tensor, ...]:
        # every buffer ``_buffers`` registers is a tensor (torch types module buffers as optional)
        b = cast(dict[str, torch.Tensor], self._buffers)
        return (
            (b["weight"],)
            if "weight" in b
            else (cast(torch.Tensor, b.get("weight_q8", b.get("weight_q4"))), b["weight_scale"])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _apply(_FrozenLinear, x, self.bias, *self.stored())
        if self.rank:  # peft's order: result + lora_B(lora_A(x)) * scaling
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y


class _FrozenDepthwise(torch.autograd.Function):
    """A depthwise conv2d (stride 1) with a stored frozen weight, as ``kh * kw`` shifted multiply-adds
    (``_depthwise``); the input gradient is the same with the kernel flipped."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        kernel: tuple[int, int],
        padding: tuple[int, int],
        *stored: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(*stored)
        ctx.conf = (kernel, padding)
        y = _depthwise(x, dequantise(stored), kernel, padding)
        return y if bias is None else y + bias.float()[None, :, None, None]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (kh, kw), (ph, pw) = ctx.conf
        gx = _depthwise(g, dequantise(ctx.saved_tensors).flip(-1), (kh, kw), (kh - 1 - ph, kw - 1 - pw))
        return (gx,) + (None,) * (3 + len(ctx.saved_tensors))


def _depthwise(
    x: torch.Tensor, w: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """Depthwise correlation of ``x`` [B,C,H,W] with ``w`` [C, kh*kw] (row-major taps), stride 1."""
    (kh, kw), (ph, pw) = kernel, padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    ho, wo = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    out: torch.Tensor | None = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, :, i : i + ho, j : j + wo] * w[:, i * kw + j].reshape(1, -1, 1, 1)
            out = term if out is None else out + term
    assert out is not None  # kh, kw >= 1
    return out


class StreamConv2d(StreamLinear):
    """A frozen Conv2d in storage layout. The convolutions of the families' blocks and embedders run
    without a convolution whose weight is an input (XNNPACK delegates none; the portable and optimized
    kernels run one on a single core, many minutes a step for SANA-1.6B's blocks):

    * kernel == stride, no padding, one group (a 1x1 conv; a patch embedding): patches x weight^T, the
      same chunked product as ``StreamLinear``;
    * depthwise, stride 1 (SANA's 3x3 in GLUMBConv): ``kh * kw`` shifted multiply-adds;
    * anything else: ``F.conv2d``, its input gradient by ``F.conv_transpose2d``."""

    def __init__(self, conv: nn.Conv2d, specs: dict[str, Spec], prefix: str) -> None:
        super().__init__(specs, prefix)
        self.conf = (tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (o, c, kh, kw), stride, padding, dilation, groups = self.conf
        b, _, h, w = x.shape
        if isinstance(padding, str) or tuple(dilation) != (1, 1):
            return _apply(_FrozenConv, x, self.bias, *self.conf, *self.stored())
        if (
            groups == 1
            and tuple(padding) == (0, 0)
            and tuple(stride) == (kh, kw)
            and h % kh == 0
            and w % kw == 0
        ):
            p = (
                x.reshape(b, c, h // kh, kh, w // kw, kw)
                .permute(0, 2, 4, 1, 3, 5)
                .reshape(b, h // kh, w // kw, -1)
            )
            return _apply(_FrozenLinear, p, self.bias, *self.stored()).permute(0, 3, 1, 2)
        if (
            groups == o == x.shape[1]
            and c == 1
            and tuple(stride) == (1, 1)
            and padding[0] < kh
            and padding[1] < kw
        ):
            return _apply(_FrozenDepthwise, x, self.bias, (kh, kw), tuple(padding), *self.stored())
        return _apply(_FrozenConv, x, self.bias, *self.conf, *self.stored())


def stream_module(
    module: nn.Module, specs: dict[str, Spec], targets: list[str], rank: int, scale: float
) -> nn.Module:
    """A meta copy of ``module`` (a block, or the head parts) with Linear/Conv2d replaced by stand-ins.

    ``specs``: relative stored-tensor name -> (shape, dtype), i.e. ``store_tensors``' layout;
    ``targets``: relative module names that carry LoRA."""
    m = copy.deepcopy(module).to("meta")
    for path, mod in list(m.named_modules()):
        if not isinstance(mod, nn.Linear | nn.Conv2d):
            continue
        pre = f"{path}." if path else ""
        if isinstance(mod, nn.Conv2d):
            new: StreamLinear = StreamConv2d(mod, specs, pre)
        else:
            r = rank if path in targets else 0
            new = StreamLinear(specs, pre, r, scale, tuple(mod.weight.shape))
        parent, _, leaf = path.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, new)
    missing = sorted(
        set(targets) - {p for p, x in m.named_modules() if isinstance(x, StreamLinear) and x.rank}
    )
    if missing:
        raise ValueError(f"LoRA targets {missing} are not Linear modules of this block")
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def lora_names(module: nn.Module) -> list[str]:
    """Relative names of the LoRA tensors of a stream module, sorted (``attn.to_q.lora_A``, ...)."""
    return sorted(n for n, _ in module.named_buffers() if n.endswith((".lora_A", ".lora_B")))


def frozen_names(module: nn.Module) -> list[str]:
    names = [n for n, _ in list(module.named_parameters()) + list(module.named_buffers())]
    return sorted(n for n in names if not n.endswith((".lora_A", ".lora_B")))


def peft_lora_name(block_path: str, rel: str) -> str:
    """``attn.to_q.lora_A`` of block ``transformer_blocks.3`` -> peft's full parameter name."""
    module, _, ab = rel.rpartition(".")
    return f"{block_path}.{module}.{ab}.default.weight"


# --------------------------------------------------------------------------------------------
# the three computations


class _Runner(nn.Module):
    """``fam.call_block`` (or ``fam.head``) as a module's forward, so ``functional_call`` can feed it."""

    def __init__(self, fam: TorchFamily, module: nn.Module, head: bool = False):
        super().__init__()
        self.fam, self.m, self.is_head = fam, module, head

    def forward(self, state: State, consts: State) -> State | torch.Tensor:
        if self.is_head:
            return self.fam.head(self.m, state, consts)
        return self.fam.call_block(self.m, state, consts)


def _functional(
    fam: TorchFamily, module: nn.Module, tensors: State, state: State, consts: State, head: bool = False
) -> Any:
    """The runner's output on ``tensors``: the next state, or the head's prediction if ``head``
    (``torch.func.functional_call`` returns Any)."""
    runner = _Runner(fam, module, head)
    return torch.func.functional_call(runner, {f"m.{k}": v for k, v in tensors.items()}, (state, consts))


def block_forward(
    fam: TorchFamily, module: nn.Module, state: State, consts: State, weights: State, lora: State
) -> State:
    """The next state (outputs that are None are dropped)."""
    out: State = _functional(fam, module, {**weights, **lora}, state, consts)
    return {k: v for k, v in out.items() if v is not None}


def block_graph(
    fam: TorchFamily, module: nn.Module, state: State, consts: State, weights: State, lora: State
) -> Graph:
    """The block's forward with autograd recording: (state leaves, LoRA leaves, outputs)."""
    with torch.enable_grad():
        xs = {k: v.detach().requires_grad_() for k, v in state.items()}
        ls = {k: v.detach().requires_grad_() for k, v in lora.items()}
        return xs, ls, block_forward(fam, module, xs, consts, weights, ls)


def graph_vjp(graph: Graph, grads: State) -> tuple[State, State]:
    """(gradient at each state input, gradient of each LoRA tensor) of a ``block_graph`` for output
    gradients ``grads``; frees the graph."""
    xs, ls, out = graph
    keys = [k for k in out if k in grads]
    wrt = list(xs.values()) + list(ls.values())
    # None for an input the outputs do not use (allow_unused)
    used: tuple[torch.Tensor | None, ...] = torch.autograd.grad(
        [out[k] for k in keys], wrt, [grads[k] for k in keys], allow_unused=True
    )
    g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(used, wrt)]
    return dict(zip(xs, g[: len(xs)])), dict(zip(ls, g[len(xs) :]))


def block_vjp(
    fam: TorchFamily,
    module: nn.Module,
    state: State,
    consts: State,
    grads: State,
    weights: State,
    lora: State,
) -> tuple[State, State]:
    """(gradient at each state input, gradient of each LoRA tensor) for output gradients ``grads``.

    The block's forward is recomputed here (activation checkpointing at block granularity)."""
    return graph_vjp(block_graph(fam, module, state, consts, weights, lora), grads)


def head_loss_grad(
    fam: TorchFamily,
    module: nn.Module,
    hidden: torch.Tensor,
    consts: State,
    target: torch.Tensor,
    scale: torch.Tensor,
    weights: State,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss * scale, its gradient at the head's input) for the flow-matching MSE."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        pred: torch.Tensor = _functional(fam, module, weights, {"hidden": h}, consts, head=True)
        loss = F.mse_loss(pred.float(), target.float()) * scale.reshape(())
        (g,) = torch.autograd.grad(loss, [h])
    return loss.detach().reshape(1), g


def head_parts(fam: TorchFamily, model: nn.Module) -> nn.Module:
    """A module holding the head's submodules/parameters under their model names (meta copies)."""
    m = nn.Module()
    for path in fam.head_prefixes:
        obj = (
            model.get_submodule(path)
            if isinstance(getattr(model, path, None), nn.Module)
            else getattr(model, path)
        )
        if isinstance(obj, nn.Module):
            m.add_module(path, copy.deepcopy(obj).to("meta"))
        else:
            m.register_parameter(
                path, nn.Parameter(torch.empty_like(obj, device="meta"), requires_grad=False)
            )
    return m


def weight_layout(shape: tuple[int, ...], storage: str) -> dict[str, Spec]:
    """What ``quantise`` (or the float cast) stores for a Linear/Conv weight of ``shape``: suffix
    (``weight``, ``weight_q8``, ...) -> (shape, dtype), computed from the shape alone."""
    shape = tuple(int(d) for d in shape)
    if storage in FLOAT_STORAGE:
        return {"weight": (shape, FLOAT_STORAGE[storage])}
    out_ch, row = shape[0], math.prod(shape[1:])
    g = int4_group(row) if storage == "int4" else None
    if g is None:
        return {"weight_q8": (shape, torch.int8), "weight_scale": ((out_ch,), torch.float32)}
    return {
        "weight_q4": ((out_ch, row // 2), torch.uint8),
        "weight_scale": ((out_ch, row // g), torch.float32),
    }


def layout(module: nn.Module, storage: str) -> dict[str, Spec]:
    """``store_tensors``' layout of ``module`` (relative name -> (shape, dtype)), in its order, from the
    module's shapes alone: no tensor is made, so a 57-block skeleton takes milliseconds, not seconds."""
    if storage not in STORAGE:
        raise ValueError(f"unknown storage {storage!r}; choose from {', '.join(STORAGE)}")
    out: dict[str, Spec] = {}
    weights: set[str] = set()
    for path, mod in module.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d):
            pre = f"{path}." if path else ""
            out.update({pre + k: v for k, v in weight_layout(mod.weight.shape, storage).items()})
            weights.add(pre + "weight")
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in weights:
            out[name] = (tuple(t.shape), torch.float32 if t.is_floating_point() else t.dtype)
    return out


def block_specs(fam: TorchFamily, skeleton: nn.Module, i: int, storage: str) -> dict[str, Spec]:
    """Stored-tensor layout (relative name -> (shape, dtype)) of block i."""
    return layout(skeleton.get_submodule(fam.block_paths()[i]), storage)


def head_specs(fam: TorchFamily, skeleton: nn.Module, storage: str) -> dict[str, Spec]:
    return layout(head_parts(fam, skeleton), storage)


def shape_module(
    fam: TorchFamily, skeleton: nn.Module, block: int, targets: list[str], storage: str, lora: dict[str, Any]
) -> nn.Module:
    """The stream module of a block shape: block ``block``'s structure, LoRA on ``targets``."""
    specs = block_specs(fam, skeleton, block, storage)
    module = skeleton.get_submodule(fam.block_paths()[block])
    return stream_module(module, specs, targets, lora["rank"], lora["alpha"] / lora["rank"])


def head_module(fam: TorchFamily, skeleton: nn.Module, storage: str) -> nn.Module:
    return stream_module(head_parts(fam, skeleton), head_specs(fam, skeleton, storage), [], 0, 1.0)


def from_storage(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stored tensors (full names) -> model parameters in ``dtype``: quantised weights dequantised (as
    [out, row]: the caller reshapes to the parameter's shape), floats cast."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(("weight_q8", "weight_q4")):
            base = name[: -len("_q8")]
            out[base] = dequantise((t, tensors[base + "_scale"])).to(dtype)
        elif name.endswith("weight_scale"):
            continue
        else:
            out[name] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    return out
