"""A BlockStore whose tensors are fake: the same load/free calls as on the device, no memory."""

from __future__ import annotations

import torch

from blockskip.runtime.backends.torch_families.base import TorchFamily, materialize, tensor_names
from blockskip.runtime.backends.torch_families.latent import ENCODER_PREFIXES, build_encoder_skeleton
from blockskip.runtime.backends.torch_io import BlockStore


class PartsStore(BlockStore):
    """A BlockStore over a family instead of a bundle: the same part names, tensors from elsewhere
    (subclasses define ``_read``)."""

    def __init__(self, family: TorchFamily):
        self.bundle = None  # type: ignore[assignment]  # (no bundle: BlockStore's reads check for None)
        self.family = family
        self.model = family.skeleton()
        self.loaded, self._alive, self.max_resident = [], {}, 0
        self._parts = {self.block_file(i): [p] for i, p in enumerate(family.block_paths())}
        self._parts["model/embed.safetensors"] = family.embed_prefixes
        self._parts["model/head.safetensors"] = family.head_prefixes

    def block_file(self, i: int) -> str:
        return f"model/blocks/block_{i:03d}.safetensors"

    def load_part(self, part: str) -> list[str]:
        return self._load(f"model/{part}.safetensors")


class FakeStore(PartsStore):
    """Mirrors BlockStore over a family and an encoder spec instead of a bundle.

    Each load creates fresh (fake, when run under FakeTensorMode) tensors of the stored shapes in the
    bundle dtype, under the tracer category ``frozen_weights`` unless the caller says otherwise.
    """

    def __init__(self, family: TorchFamily, encoder_spec: dict, prompt_shapes: dict, dtype, tracer=None):
        super().__init__(family)
        self.encoder_spec, self.prompt_shapes, self.dtype, self.tracer = (
            encoder_spec,
            prompt_shapes,
            dtype,
            tracer,
        )
        self.category = "frozen_weights"
        self._shapes = {
            n: (t.shape, t.dtype)
            for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
        }

    def _empty(self, shape, dtype):
        dt = self.dtype if dtype.is_floating_point else dtype
        t = torch.empty(shape, dtype=dt, device="cpu")
        if self.tracer is not None:
            self.tracer.retag(t, self.category)
        return t

    def _read(self, rel: str) -> dict[str, torch.Tensor]:
        names = tensor_names(self.model, self._parts[rel])
        return {n: self._empty(*self._shapes[n]) for n in names}

    def load_encoder(self):
        enc = build_encoder_skeleton(self.encoder_spec)
        names = tensor_names(enc, ENCODER_PREFIXES[self.encoder_spec["class"]])
        shapes = dict(list(enc.named_parameters()) + list(enc.named_buffers()))
        old, self.dtype = self.dtype, torch.float32
        tensors = {n: self._empty(shapes[n].shape, shapes[n].dtype) for n in names}
        self.dtype = old
        materialize(enc, tensors)
        if (
            self.tracer is not None
        ):  # the torch backend maps the encoder file: a weight is resident from its use
            for t in list(enc.parameters()) + list(enc.buffers()):
                self.tracer.defer(t, self.category)
        return enc.eval(), self.encoder_spec

    def load_prompt(self, dtype) -> dict:
        return {k: self._empty(s, dtype) for k, s in self.prompt_shapes.items()}
