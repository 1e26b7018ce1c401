"""A diffusers model folder's transformer weights, read tensor by tensor (streaming export).

The export of a folder never loads the whole transformer: ``FolderWeights`` maps each tensor name to the
safetensors shard that holds it (``diffusion_pytorch_model.safetensors.index.json``'s weight map, or the
shards' own headers when there is no index) and reads only the tensors asked for, and ``FolderStore`` is
the device's ``BlockStore`` interface over it: ``load_block(i)`` fills block i of a meta skeleton,
``free`` drops it again. So the export holds one block of the full model at a time, like precompute on
the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from blockskip.export.memory.fake_store import PartsStore
from blockskip.runtime.backends.torch_families.base import TorchFamily, tensor_names
from blockskip.runtime.errors import ModelError
from blockskip.runtime.memory import return_freed_memory

INDEX = "diffusion_pytorch_model.safetensors.index.json"


class FolderWeights:
    """Tensor name -> shard of a diffusers ``transformer/`` folder; reads named tensors only."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._headers: dict[Path, tuple[dict, int]] = {}
        index = self.folder / INDEX
        self.where: dict[str, Path] = {}
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                if not isinstance(wmap, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"cannot read {index}: {e}; the model folder is damaged") from e
            for name, shard in wmap.items():
                path = self.folder / str(shard)
                if path.parent != self.folder or not path.is_file():
                    raise ModelError(
                        f"{index} names shard {shard!r} for {name}, which is not a file in "
                        f"{self.folder}; the model folder is incomplete"
                    )
                self.where[name] = path
            return
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise ModelError(
                f"no weights (*.safetensors) in {self.folder}; save the model with save_pretrained "
                "(safe_serialization) first"
            )
        for path in shards:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if name in self.where:
                            raise ModelError(
                                f"{name} is in both {self.where[name].name} and {path.name}; "
                                f"keep one set of weights in {self.folder}"
                            )
                        self.where[name] = path
            except (
                OSError,
                ValueError,
            ) as e:  # safetensors raises SafetensorError (a ValueError) on a bad header
                raise ModelError(f"cannot read {path}: {e}; the model folder is damaged") from e

    def stored_dtype(self) -> torch.dtype:
        """The floating-point dtype the shards hold (their first floating tensor's; float32 if none)."""
        from safetensors import safe_open

        floats = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
        for path in dict.fromkeys(self.where.values()):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    dt = floats.get(f.get_slice(name).get_dtype())
                    if dt is not None:
                        return dt
        return torch.float32

    def read(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The named tensors, floating ones in ``dtype`` (None: as stored). Each is read into its own
        memory with plain reads (a shard mapped instead would keep the pages it touched in the process
        until unmapped: a block more, at times several, as garbage collection has it)."""
        from blockskip.runtime.errors import BundleError
        from blockskip.runtime.tensorfile import read_header

        missing = [n for n in names if n not in self.where]
        if missing:
            raise ModelError(
                f"the weights in {self.folder} lack {len(missing)} tensor(s) the model config needs "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the folder is "
                "incomplete or from another model"
            )
        by_shard: dict[Path, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_shard.items():
            try:
                if path not in self._headers:
                    self._headers[path] = read_header(path)
                header, start = self._headers[path]
                with open(path, "rb") as f:
                    for n in group:
                        rec = header[n]
                        a, b = (int(x) for x in rec["data_offsets"])
                        raw = torch.empty(b - a, dtype=torch.uint8)
                        f.seek(start + a)
                        # (numpy declares ndarray's buffer protocol for Python 3.12+ only)
                        if f.readinto(memoryview(raw.numpy())) != b - a:  # type: ignore[arg-type]
                            raise BundleError(f"{path} is truncated")
                        t = raw.view(TORCH_DTYPES[rec["dtype"]]).reshape([int(d) for d in rec["shape"]])
                        out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            except (OSError, KeyError, BundleError) as e:
                raise ModelError(f"cannot read {path}: {e}; the model folder is damaged") from e
        return out


#: safetensors dtype codes -> torch dtypes
TORCH_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}


class FolderStore(PartsStore):
    """BlockStore over a model folder's weights: each load reads that part's tensors from the shards
    (floating ones in ``dtype``; None: as the shards hold them)."""

    def __init__(self, family: TorchFamily, weights: FolderWeights, dtype: torch.dtype | None):
        super().__init__(family)
        self.weights, self.dtype = weights, dtype
        self._shapes = {
            n: tuple(t.shape)
            for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
        }

    def free(self, names: list[str]) -> None:
        super().free(names)
        return_freed_memory()  # else glibc keeps each dropped block's pages: ~ one block more per block

    def _read(self, rel: str) -> dict[str, torch.Tensor]:
        tensors = self.weights.read(tensor_names(self.model, self._parts[rel]), self.dtype)
        for n, t in tensors.items():
            if tuple(t.shape) != self._shapes[n]:
                raise ModelError(
                    f"{n} in {self.weights.where[n]} has shape {list(t.shape)}, the model config gives "
                    f"{list(self._shapes[n])}; the weights are from another model"
                )
        return tensors
