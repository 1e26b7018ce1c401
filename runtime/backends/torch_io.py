"""Loading bundle parts for the torch backend: skeletons, tensors by name, encoder, prompt."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from safetensors.torch import load_file

from blockskip.runtime.backends.torch_families import get_family
from blockskip.runtime.backends.torch_families.base import State, TorchFamily, materialize, release
from blockskip.runtime.backends.torch_families.latent import build_encoder_skeleton
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.errors import BundleError

if TYPE_CHECKING:
    from blockskip.runtime.contract import Arrays, BlockBackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tensor_at(root: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer of ``root`` with this full name."""
    mod_path, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    # a bundle's names are never a slot set to None (the skeleton holds a tensor, meta or real, at each)
    return cast(torch.Tensor, mod._parameters[leaf] if leaf in mod._parameters else mod._buffers[leaf])


class BlockStore:
    """Loads block / embed / head tensors from a bundle into a meta skeleton and frees them again.

    It keeps weak references to what it loaded, so tests (and the progress line) can see how many
    blocks are really resident: ``max_resident`` is the most blocks alive at any load.
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        model = bundle.manifest["model"]
        self.family: TorchFamily = get_family(bundle.family, model["config"])
        self.model = self.family.skeleton()
        self.store_dtype = DTYPES[bundle.plan.dtype]  # what the stored layout becomes in the model
        self.loaded: list[str] = []  # artifact names in load order
        self._alive: dict[str, list[weakref.ref[torch.Tensor]]] = {}
        self.max_resident = 0

    def _read(self, rel: str) -> dict[str, torch.Tensor]:
        return load_file(self.bundle.path(rel))

    def _load(self, rel: str) -> list[str]:
        tensors = self._read(rel)
        if self.bundle is not None:  # the bundle's storage layout -> the model's parameters in the plan dtype
            from blockskip.runtime.backends.torch_stream import from_storage

            tensors = from_storage(tensors, self.store_dtype)
            tensors = {n: t.reshape(tensor_at(self.model, n).shape) for n, t in tensors.items()}
        materialize(self.model, tensors)
        self.loaded.append(rel)
        names = list(tensors)
        del tensors
        # watch the tensors the model now holds: they die only when nothing references them any more
        self._alive[rel] = [weakref.ref(tensor_at(self.model, n)) for n in names]
        return names

    def resident_blocks(self) -> int:
        return sum(
            1
            for rel, refs in self._alive.items()
            if rel.startswith("model/blocks/") and any(r() is not None for r in refs)
        )

    def block_file(self, i: int) -> str:
        rel: str = self.bundle.manifest["model"]["blocks"][i]
        return rel

    def load_block(self, i: int) -> list[str]:
        names = self._load(self.block_file(i))
        self.max_resident = max(self.max_resident, self.resident_blocks())
        return names

    def load_part(self, part: str) -> list[str]:
        return self._load(self.bundle.manifest["model"][part])

    def free(self, names: list[str]) -> None:
        release(self.model, names)

    def run_block(self, i: int, state: State, consts: State) -> State:
        """Run block i (loaded with :meth:`load_block`) on one sample's state."""
        return self.family.run_block(self.model, i, state, consts)

    def load_encoder(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The photo encoder, materialised (caller drops it when done)."""
        spec: dict[str, Any] = self.bundle.manifest["encoder"]
        enc = build_encoder_skeleton(spec)
        materialize(enc, self._read(spec["file"]))
        return enc.eval(), spec

    def load_prompt(self, dtype: torch.dtype) -> State:
        return {k: v.to(dtype) for k, v in self._read(self.bundle.manifest["prompt"]).items()}


def load_encoder(bundle: Bundle) -> tuple[torch.nn.Module, dict[str, Any]]:
    return BlockStore(bundle).load_encoder()


def load_prompt(bundle: Bundle, dtype: torch.dtype) -> State:
    return BlockStore(bundle).load_prompt(dtype)


class StreamBlockStore(BlockStore):
    """Precompute's blocks through a block backend (ONNX Runtime, ExecuTorch): each block's stored weights
    (the next block's read ahead) fed to its shape's forward program with a zero LoRA."""

    def __init__(self, bundle: Bundle, backend: BlockBackend):
        from blockskip.runtime.stream import StreamSpec, WeightSource

        super().__init__(bundle)
        self.backend = backend
        self.spec = StreamSpec(bundle)
        self.shape_of = dict(self.spec.precompute)
        self.weights = WeightSource(self.spec, resident=False, prefetch=bundle.plan.prefetch)
        self.weights.plan([i for i, _ in self.spec.precompute])
        self.current: Arrays | None = None

    def load_block(self, i: int) -> list[str]:
        if i not in self.shape_of:
            raise BundleError(f"the bundle has no precompute program for block {i}; export it again")
        self.current = self.weights.get(i)
        self.loaded.append(self.spec.block_file(i))
        self.max_resident = max(self.max_resident, 1)
        return [f"__stream_block__.{i}"]

    def free(self, names: list[str]) -> None:
        rest = [n for n in names if not n.startswith("__stream_block__.")]
        if len(rest) < len(names):
            self.current = None
        if rest:
            super().free(rest)

    def run_block(self, i: int, state: State, consts: State) -> State:
        st = {n: v.detach().float().numpy() for n, v in state.items() if v is not None}
        cs = {n: v.detach().float().numpy() for n, v in consts.items()}
        assert self.current is not None, "run_block before load_block"
        out = self.backend.precompute_block(self.shape_of[i], st, cs, self.current)
        new: dict[str, torch.Tensor | None] = {n: None for n in state}
        new.update({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in out.items()})
        # an output the block does not have (SD3's last text state) is None, as the torch families return it
        return cast(State, new)

    def close(self) -> None:
        self.weights.close()
        self.backend.release()
