"""The block-streamed span: which program each block runs, and the programs themselves as FX graphs.

Blocks of the same *shape* (family block kind + the LoRA targets inside it) share programs, so a
FLUX span needs one double-block and one single-block program set however many blocks it trains:

* ``forward``: (state, step constants, frozen weights, LoRA) -> next state. Precompute runs it with a
  zero LoRA (exactly the frozen block) or, for kinds that do not train, a ``frozen`` variant;
* ``vjp``: (state, constants, gradient at the outputs, frozen weights, LoRA) -> (gradient at the
  inputs, LoRA gradients); it recomputes the block's forward inside;
* ``head``: (hidden after the span, constants, target, loss scale, head weights) -> (scaled loss, its
  gradient at the hidden state).

Each graph is traced once with ``make_fx`` (core ATen decompositions, math attention) from the stream
modules of ``blockskip.runtime.backends.torch_stream``, on fake tensors when only shapes matter (the
dry run), and every format plug-in lowers the same graph.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from blockskip.runtime.backends import torch_stream as ts
from blockskip.runtime.backends.torch_families.base import TorchFamily
from blockskip.runtime.formats import (  # noqa: F401  (the programs' calling convention, declared once)
    CONST,
    EMBED,
    GRAD,
    GRAD_IN,
    LORA,
    LORA_GRAD,
    OUT,
    STATE,
    TEXT,
    WEIGHT,
)


@dataclass
class Shape:
    """Blocks that share programs: one family block kind with one set of LoRA targets."""

    id: str
    kind: str
    targets: list[str]  # relative module names with LoRA (empty: a frozen-only shape)
    example_block: int  # a block of this shape (its structure is the shape's)
    blocks: list[int] = field(default_factory=list)

    @property
    def roles(self) -> list[str]:
        return ["forward", "vjp"] if self.targets else ["forward"]


@dataclass
class StreamLayout:
    """Which shape each trained block and each precomputed block runs."""

    shapes: dict[str, Shape]
    train: list[tuple[int, str]]  # (block, shape id), in span order
    precompute: list[tuple[int, str]]  # (block, shape id) for blocks [0, stop)


def rel_targets(fam: TorchFamily, i: int, targets: list[str]) -> list[str]:
    path = fam.block_paths()[i]
    return sorted(t[len(path) + 1 :] for t in targets if t.startswith(path + "."))


def stream_layout(fam: TorchFamily, trained: list[int], targets: list[str], stop: int) -> StreamLayout:
    """``targets``: the bundle's full LoRA module names; ``stop``: precompute runs blocks [0, stop)."""
    shapes: dict[str, Shape] = {}

    def shape_for(i: int, tg: list[str]) -> str:
        kind = fam.block_kind(i)
        if not tg:
            sid = f"{kind}.frozen"
        else:
            digest = hashlib.sha256(",".join(tg).encode()).hexdigest()[:6]
            sid = f"{kind}.lora-{digest}"
        if sid not in shapes:
            shapes[sid] = Shape(sid, kind, tg, i)
        shapes[sid].blocks.append(i)
        return sid

    train = [(i, shape_for(i, rel_targets(fam, i, targets))) for i in trained]
    trained_kind = {shapes[s].kind: s for _, s in train}
    precompute = []
    for j in range(stop):
        kind = fam.block_kind(j)
        sid = trained_kind.get(kind) or shape_for(j, [])
        if j not in shapes[sid].blocks:
            shapes[sid].blocks.append(j)
        precompute.append((j, sid))
    return StreamLayout(shapes, train, precompute)


def shape_module(fam: TorchFamily, skeleton: nn.Module, shape: Shape, storage: str, lora: dict) -> nn.Module:
    return ts.shape_module(fam, skeleton, shape.example_block, shape.targets, storage, lora)


# --------------------------------------------------------------------------------------------
# tracing


@dataclass
class Traced:
    gm: torch.fx.GraphModule
    inputs: list[tuple[str, tuple, torch.dtype]]  # name, shape, dtype, in call order
    outputs: list[tuple[str, tuple, torch.dtype]]

    def io(self) -> dict:
        """The program's calling convention for the manifest."""

        def rows(xs):
            return [{"name": n, "shape": list(s), "dtype": str(d).removeprefix("torch.")} for n, s, d in xs]

        return {"inputs": rows(self.inputs), "outputs": rows(self.outputs)}

    def example_args(self, fake: bool = False) -> tuple:
        return tuple(_tensors({n: (s, d) for n, s, d in self.inputs}, fake).values())

    def weight_positions(self) -> tuple[int, ...]:
        """The positions of the frozen weights among the inputs."""
        return tuple(i for i, (n, _, _) in enumerate(self.inputs) if n.startswith(WEIGHT))


def _safe_softmax(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """Softmax with fully masked rows set to zero, as ATen's ``_safe_softmax``, whose decomposition
    selects from a ``zeros_like`` of the scores: exported, that is a constant of heads x queries x keys
    floats in every attention program (56 MiB for a FLUX block at 768 tokens). A scalar zero instead.
    A row is fully masked when its maximum is -inf (ATen's ``all(x == -inf)`` exports to ONNX as a cast
    of the whole score tensor to int64, 8 bytes a score, before its reduction)."""
    out = torch.softmax(x, dim=dim, dtype=dtype)
    masked_rows = torch.amax(x, dim=dim, keepdim=True).eq(float("-inf"))
    return torch.where(masked_rows, torch.zeros((), dtype=out.dtype), out)


def trace(fn, example: dict[str, torch.Tensor]) -> Traced:
    """``fn(dict of named tensors) -> dict of named tensors`` as an FX graph of core ATen ops with
    positional inputs; inputs the graph never reads are dropped from its signature."""
    from torch._decomp import core_aten_decompositions
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = list(example)
    out_names: list[str] = []

    def flat(*args):
        out = fn(dict(zip(names, args)))
        out_names[:] = list(out)
        return tuple(out.values())

    args = tuple(example.values())
    mode: Literal["real", "fake"] = "fake" if any(isinstance(a, FakeTensor) for a in args) else "real"
    table = core_aten_decompositions()
    table[torch.ops.aten._safe_softmax.default] = _safe_softmax
    with sdpa_kernel([SDPBackend.MATH]):
        # (torch's CustomDecompTable is keyed by OperatorBase, make_fx's table by OpOverload)
        gm = make_fx(flat, decomposition_table=table, tracing_mode=mode)(*args)  # type: ignore[arg-type]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept = []
    for name, node in zip(names, placeholders):
        if node.users:
            kept.append((name, tuple(example[name].shape), example[name].dtype))
        else:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    vals = [a.meta["val"] for a in out_node.args[0]]
    outputs = [(n, tuple(v.shape), v.dtype) for n, v in zip(out_names, vals)]
    return Traced(gm, kept, outputs)


def _split(d: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}


def forward_fn(fam: TorchFamily, module: nn.Module):
    def fn(x: dict) -> dict:
        out = ts.block_forward(
            fam, module, _split(x, STATE), _split(x, CONST), _split(x, WEIGHT), _split(x, LORA)
        )
        return {OUT + k: v for k, v in out.items()}

    return fn


def vjp_fn(fam: TorchFamily, module: nn.Module):
    def fn(x: dict) -> dict:
        g_in, g_lora = ts.block_vjp(
            fam,
            module,
            _split(x, STATE),
            _split(x, CONST),
            _split(x, GRAD),
            _split(x, WEIGHT),
            _split(x, LORA),
        )
        return {**{GRAD_IN + k: v for k, v in g_in.items()}, **{LORA_GRAD + k: v for k, v in g_lora.items()}}

    return fn


def head_fn(fam: TorchFamily, module: nn.Module):
    def fn(x: dict) -> dict:
        loss, g = ts.head_loss_grad(
            fam,
            module,
            x[STATE + "hidden"],
            _split(x, CONST),
            x["target"],
            x["loss_scale"],
            _split(x, WEIGHT),
        )
        return {"loss": loss, GRAD_IN + "hidden": g}

    return fn


def _empty(shape, dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


Shapes = dict[str, tuple]  # name -> (shape, dtype)


def _tensors(shapes: Shapes, fake: bool) -> dict[str, torch.Tensor]:
    """Zero example tensors, fake (no memory) when only the graph's shapes matter."""
    if not fake:
        return {k: _empty(*v) for k, v in shapes.items()}
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return {k: _empty(*v) for k, v in shapes.items()}


def trace_shape(
    fam: TorchFamily,
    skeleton: nn.Module,
    shape: Shape,
    storage: str,
    lora: dict,
    state: Shapes,
    consts: Shapes,
    fake: bool = False,
    vjp: bool = True,
) -> dict[str, Traced]:
    """The shape's programs (``forward`` and, with LoRA and ``vjp``, ``vjp``) for one entry's state/const
    shapes."""
    module = shape_module(fam, skeleton, shape, storage, lora)
    specs = ts.block_specs(fam, skeleton, shape.example_block, storage)
    bufs = dict(module.named_buffers())
    head = {STATE + k: v for k, v in state.items()}
    head.update({CONST + k: v for k, v in sorted(consts.items())})
    w = {WEIGHT + k: specs[k] for k in sorted(specs)}
    lo = {LORA + k: (tuple(bufs[k].shape), torch.float32) for k in ts.lora_names(module)}
    out = {"forward": trace(forward_fn(fam, module), _tensors({**head, **w, **lo}, fake))}
    if shape.targets and vjp:
        grads = {GRAD + n[len(OUT) :]: (s, d) for n, s, d in out["forward"].outputs}
        out["vjp"] = trace(vjp_fn(fam, module), _tensors({**head, **grads, **w, **lo}, fake))
    return out


def trace_head(
    fam: TorchFamily,
    skeleton: nn.Module,
    storage: str,
    hidden: tuple,
    consts: Shapes,
    target: tuple,
    fake: bool = False,
) -> Traced:
    module = ts.head_module(fam, skeleton, storage)
    specs = ts.head_specs(fam, skeleton, storage)
    shapes = {
        STATE + "hidden": hidden,
        **{CONST + k: v for k, v in sorted(consts.items())},
        "target": target,
        "loss_scale": ((1,), torch.float32),
    }
    shapes.update({WEIGHT + k: specs[k] for k in sorted(specs)})
    return trace(head_fn(fam, module), _tensors(shapes, fake))


def entry_io(entry_shapes: Shapes) -> tuple[Shapes, Shapes, tuple]:
    """(state, constants, target) shapes of a span's programs, from a cache entry's tensor shapes."""
    state = {k[3:]: v for k, v in entry_shapes.items() if k.startswith("in.")}
    consts = {k[2:]: v for k, v in entry_shapes.items() if k.startswith("c.")}
    return state, consts, entry_shapes["target"]


# --------------------------------------------------------------------------------------------
# the embed program: a schedule entry's clean crop, its noise and its geometry -> the state entering
# block 0, the step constants and the flow-matching target (what precompute feeds the blocks)


class _EmbedRunner(nn.Module):
    """``prepare_text`` + noising + ``fam.embed`` + the target as a module's forward over the family's
    model skeleton, so ``functional_call`` feeds the embed weights as inputs."""

    def __init__(
        self, fam: TorchFamily, model: nn.Module, full: int, low: int, positions: str, guidance: float
    ):
        super().__init__()
        self.fam, self.m = fam, model
        self.full, self.low, self.positions, self.guidance = full, low, positions, guidance

    def forward(self, x0, noise, sigma, geom, text):
        from blockskip.runtime.backends.torch_families.base import CropGeometry

        prepared = self.fam.prepare_text(self.m, text)
        x_t = (1 - sigma) * x0 + sigma * noise
        # the crop's place in latent pixels (float64, as the eager path computes its positions)
        g = CropGeometry(full=self.full, side=geom[2], top=geom[0], left=geom[1], low=self.low)
        state, consts = self.fam.embed(self.m, x_t, sigma, prepared, g, self.positions, self.guidance)
        out = {STATE + k: v for k, v in state.items() if v is not None}
        out.update({CONST + k: v for k, v in consts.items()})
        out["target"] = self.fam.to_tokens(noise - x0)
        return out


def embed_fn(fam: TorchFamily, skeleton: nn.Module, full: int, low: int, positions: str, guidance: float):
    runner = _EmbedRunner(fam, skeleton, full, low, positions, guidance)

    def fn(x: dict) -> dict:
        weights = {"m." + k: v for k, v in _split(x, WEIGHT).items()}
        return torch.func.functional_call(
            runner, weights, (x["x0"], x["noise"], x["sigma"], x["geom"], _split(x, TEXT))
        )

    return fn


def trace_embed(
    fam: TorchFamily,
    skeleton: nn.Module,
    weights: Shapes,
    text: Shapes,
    channels: int,
    plan,
    vae_factor: int,
    fake: bool = False,
    example: dict[str, torch.Tensor] | None = None,
) -> Traced:
    """The embed program: inputs ``x0`` and ``noise`` [1, C, low, low] (the crop resized to s_min and its
    noise), ``sigma`` [1], ``geom`` float64 [top, left, side] of the crop in latent pixels, ``text.<k>``
    (the prompt embeddings) and ``w.<name>`` (the embed weights, full model names); outputs ``state.<k>``,
    ``c.<k>`` and ``target``. ``example``: real tensors to trace on (else zeros / fake)."""
    low, full = plan.s_min // vae_factor, plan.s_max // vae_factor
    shapes: Shapes = {
        "x0": ((1, channels, low, low), torch.float32),
        "noise": ((1, channels, low, low), torch.float32),
        "sigma": ((1,), torch.float32),
        "geom": ((3,), torch.float64),
    }
    shapes.update({TEXT + k: (s, torch.float32) for k, (s, _) in sorted(text.items())})
    shapes.update({WEIGHT + k: (s, torch.float32) for k, (s, _) in sorted(weights.items())})
    example = example or {}
    made = _tensors({k: v for k, v in shapes.items() if k not in example}, fake)  # no zeros for what is given
    tensors = {k: example[k] if k in example else made[k] for k in shapes}
    return trace(embed_fn(fam, skeleton, full, low, plan.positions, plan.guidance), tensors)
