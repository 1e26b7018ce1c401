"""The graphs every format plug-in lowers, built from the device's own torch code.

* ``SpanLossGraph``: the resident trained span (LoRA blocks, residual adds, head, loss) as one module;
* ``EncoderGraph``: the photo encoder;
* ``example_entry``: one cache entry of the right names and shapes, made by the device's precompute code
  on the in-memory model (``ModelStore``: a BlockStore that shares the model's tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from blockskip.export.memory.fake_store import PartsStore
from blockskip.runtime.backends.torch import span_forward, span_loss
from blockskip.runtime.backends.torch_families.base import TorchFamily, tensor_names
from blockskip.runtime.precompute import gaps

LOSS_SCALE = "loss_scale"  # graph input: the loss is multiplied by it (1 / grad_accum)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        child = node._modules[k]
        assert child is not None  # added above if missing
        node = child
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


def encoder_inputs(lm, plan) -> list[tuple[str, tuple[int, ...]]]:
    """(file stem, input shape) of the photo encoder programs: one at s_max, or with ``vae_tiling`` one per
    tile shape (``runtime.tiles``: DC-AE and KL encoders)."""
    return encoder_program_inputs(lm.encoder_spec, lm.vae_factor, plan)


def encoder_program_inputs(encoder_spec: dict, vae_factor: int, plan) -> list[tuple[str, tuple[int, ...]]]:
    """``encoder_inputs`` from the encoder's spec (what the dry run has)."""
    from blockskip.runtime.backends.torch_families.latent import FIXED_ENCODERS
    from blockskip.runtime.errors import PlanError
    from blockskip.runtime.tiles import STRIDES, tile_shapes

    cls = encoder_spec["class"]
    if not plan.vae_tiling or cls in FIXED_ENCODERS:
        return [("encoder", (1, 3, plan.s_max, plan.s_max))]
    if cls not in STRIDES:
        raise PlanError(
            f"--vae-tiling with a program format (pte, onnx) encodes {' and '.join(STRIDES)} photos; this "
            f"model's {cls} encodes untiled there (leave out --vae-tiling, or use --format torch)"
        )
    return [(f"encoder_{h}x{w}", (1, 3, h, w)) for h, w in tile_shapes(plan.s_max, vae_factor, STRIDES[cls])]


def encoder_section(lm, plan, programs: dict) -> dict:
    """The manifest's encoder record of a format: its programs by input shape, and the tiling."""
    rec = {"input": [1, 3, plan.s_max, plan.s_max], "programs": programs}
    if len(programs) > 1 or next(iter(programs)) != f"{plan.s_max}x{plan.s_max}":
        from blockskip.runtime.tiles import TILE, stride_for

        rec["tiles"] = {"tile": TILE, "stride": stride_for(lm.encoder_spec["class"]), "ratio": lm.vae_factor}
    return rec


class EncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module, spec: dict):
        super().__init__()
        self.encoder, self.spec = encoder, spec

    def forward(self, images):
        from blockskip.runtime.backends.torch_families.latent import encode_images

        return encode_images(self.encoder, self.spec, images)


def example_entry(lm, plan, trained: list[int], prompt: dict, fake: bool = False) -> dict[str, torch.Tensor]:
    """One cache entry of the right names and shapes (what training is fed), made by the device's own
    precompute code on the in-memory model. ``fake``: shapes only, computed on fake tensors (no block is
    read or run: what a block-streamed bundle needs)."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    from blockskip.export.memory.fake_store import FakeStore
    from blockskip.runtime.backends.torch import compute_entries
    from blockskip.runtime.schedule import ScheduleEntry

    fam = lm.family
    dtype = DTYPES[plan.dtype]
    f = lm.vae_factor
    e = ScheduleEntry(index=0, image=0, t=500, sigma=0.5, side=plan.s_min, top=0, left=0, noise_seed=0)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        store = FakeStore(fam, lm.encoder_spec, {}, dtype) if fake else lm.store()
        names = store.load_part("embed")
        with torch.no_grad():
            text = fam.prepare_text(store.model, prompt)
        store.free(names)
        latents = torch.zeros(1, lm.latent_channels, plan.s_max // f, plan.s_max // f, dtype=dtype)
        return compute_entries(store, latents, text, [e], plan, f, trained)[0]


def initial_lora(lm, trained: list[int], lora: dict, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA every run starts from (peft's init under the plan seed), by peft name. peft's init reads
    only the layers' shapes, so the trained blocks are left unfilled (``FakeStore``: ``torch.empty``, pages
    never touched): the base weights of the trained span are not read for it."""
    from blockskip.export.memory.fake_store import FakeStore
    from blockskip.runtime.backends.torch import TrainedSpan

    span = TrainedSpan(
        FakeStore(lm.family, lm.encoder_spec, {}, lm.param_dtype),
        trained,
        lora,
        seed,
        base_quant="none",
        checkpointing=False,
    )
    return {
        n: p.detach().float().contiguous().clone() for n, p in span.model.named_parameters() if ".lora_" in n
    }
