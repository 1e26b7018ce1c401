"""safetensors files with numpy only: the lean runtime's reader and writer.

numpy has no bfloat16, so a BF16 tensor is returned as its raw ``uint16`` bits; ``dtype_of`` names the
stored dtype, and the backends reinterpret the bits (ExecuTorch and ONNX Runtime take bfloat16 inputs).
A file is read with one ``readinto`` into one buffer, so holding a block's weights costs the file's
size and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from blockskip.runtime.errors import BundleError

# safetensors dtype -> (numpy dtype, our dtype name)
DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "I8": (np.int8, "int8"),
    "U8": (np.uint8, "uint8"),
    "I32": (np.int32, "int32"),
    "I64": (np.int64, "int64"),
    "F64": (np.float64, "float64"),
}
NAMES = {v[1]: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20


class TensorFile:
    """All tensors of one safetensors file, read into memory (``arrays``: name -> numpy view)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                # not zero-filled (bytearray would write every page while holding the GIL): the pages
                # are first touched by readinto, which releases it, so a prefetching thread does not
                # stall the step running beside it
                buf = np.empty(size, dtype=np.uint8)
                view = buf.data  # a memoryview of its bytes
                got = 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise BundleError(f"cannot read {self.path}: {e.strerror}") from e
        if got != size or size < 8:
            raise BundleError(f"{self.path} is truncated")
        (hlen,) = struct.unpack("<Q", bytes(buf[:8]))
        if hlen > min(MAX_HEADER, size - 8):
            raise BundleError(f"{self.path} is not a safetensors file (header length {hlen})")
        try:
            header = json.loads(bytes(buf[8 : 8 + hlen]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{self.path} has a malformed safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise BundleError(f"{self.path} has a malformed safetensors header")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.header: dict[str, dict[str, Any]] = header  # name -> dtype, shape, data_offsets
        self.data_start = 8 + hlen
        self.buffer = buf
        data = view[8 + hlen :]
        self.arrays: dict[str, npt.NDArray[Any]] = {}
        self.dtypes: dict[str, str] = {}
        for name, rec in header.items():
            try:
                np_dtype, dname = DTYPES[rec["dtype"]]
                shape = [int(d) for d in rec["shape"]]
                a, b = (int(x) for x in rec["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise BundleError(f"{self.path}: tensor {name!r} has a malformed header entry ({e})") from e
            count = math.prod(shape)  # Python integers: a huge shape cannot wrap to a small size
            if (
                min(shape, default=0) < 0
                or not 0 <= a <= b <= len(data)
                or b - a != count * np.dtype(np_dtype).itemsize
            ):
                raise BundleError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size")
            self.arrays[name] = np.frombuffer(data[a:b], dtype=np_dtype).reshape(shape)
            self.dtypes[name] = dname
        _refuse_overlaps(self.path, header)

    @property
    def nbytes(self) -> int:
        return len(self.buffer)

    def float32(self, name: str) -> npt.NDArray[np.float32]:
        """One floating tensor as float32 (bfloat16 bits widened exactly)."""
        a = self.arrays[name]
        if self.dtypes[name] == "bfloat16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(a, dtype=np.float32)


def read_header(
    path: str | os.PathLike[str], metadata: bool = False
) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets) and the file offset their
    data starts at, read without the data (a multi-GB model shard, read tensor by tensor). With
    ``metadata`` the header keeps its ``__metadata__`` (when the file has one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise BundleError(f"{path} is truncated")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(MAX_HEADER, size - 8):
                raise BundleError(f"{path} is not a safetensors file (header length {hlen})")
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from e
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{path} has a malformed safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise BundleError(f"{path} has a malformed safetensors header")
    meta = header.pop("__metadata__", None)
    for name, rec in header.items():
        try:
            a, b = (int(x) for x in rec["data_offsets"])
            ok = (
                rec["dtype"] in DTYPES
                and 0 <= a <= b <= size - 8 - hlen
                and all(int(d) >= 0 for d in rec["shape"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        count = math.prod(int(d) for d in rec["shape"])  # Python integers: no wrap-around
        if not ok or b - a != count * np.dtype(DTYPES[rec["dtype"]][0]).itemsize:
            raise BundleError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
    _refuse_overlaps(path, header)
    if metadata and meta is not None:
        header["__metadata__"] = meta
    return header, 8 + hlen


# floating dtype -> (the unsigned integer of its width, the exponent bits: all set means Inf or NaN)
_EXPONENT = {
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F64": (np.uint64, 0x7FF0000000000000),
}


def first_nonfinite(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str | None:
    """The first floating tensor (in name order) holding a NaN or an Inf, or None. Reads each tensor in
    ``chunk``-byte pieces (a prefetching thread does not hold another copy of the file)."""
    header, start = read_header(path)
    with open(path, "rb") as f:
        for name in sorted(header):
            rec = header[name]
            if rec["dtype"] not in _EXPONENT:
                continue
            uint, bits = _EXPONENT[rec["dtype"]]
            item = np.dtype(uint).itemsize
            a, b = rec["data_offsets"]
            f.seek(start + a)
            left, step = b - a, max(item, chunk // item * item)
            while left > 0:
                piece = f.read(min(step, left))
                left -= len(piece)
                if not piece or len(piece) % item:
                    raise BundleError(f"{path} is truncated")
                if np.any(
                    np.frombuffer(piece, dtype=np.dtype(uint).newbyteorder("<")) & uint(bits) == uint(bits)
                ):
                    return name
    return None


def read_tensors(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    return TensorFile(path).arrays


# numpy dtype -> safetensors dtype, for writing (a BF16 tensor is written from a torch tensor)
_CODES = {
    np.dtype(t): code
    for t, code in (
        (np.float64, "F64"),
        (np.float32, "F32"),
        (np.float16, "F16"),
        (np.int64, "I64"),
        (np.int32, "I32"),
        (np.int16, "I16"),
        (np.int8, "I8"),
        (np.uint64, "U64"),
        (np.uint32, "U32"),
        (np.uint16, "U16"),
        (np.uint8, "U8"),
        (np.bool_, "BOOL"),
    )
}


def _as_array(name: str, t: object) -> tuple[str, npt.NDArray[Any]]:
    """(safetensors dtype, C-contiguous little-endian array holding the bytes) of a numpy array or a
    torch tensor (bfloat16: its bits, as uint16)."""
    if hasattr(t, "detach"):  # torch, without importing it here
        tensor: Any = t.detach().cpu().contiguous()  # a torch.Tensor
        if str(tensor.dtype) == "torch.bfloat16":
            import torch

            return "BF16", tensor.view(torch.int16).numpy()
        t = tensor.numpy()
    a = np.asarray(t)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # (ascontiguousarray would make a scalar 1-d)
    code = _CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no safetensors dtype")
    return code, a.astype(a.dtype.newbyteorder("<"), copy=False)


def canonical_header(entries: Mapping[str, object], metadata: dict[str, str] | None) -> bytes:
    """The header of a canonical file (``runtime.formats``, "canonical safetensors files"): JSON with
    every object's keys sorted, no spaces, ASCII (other characters escaped), padded with spaces to a
    multiple of 8 bytes; ``__metadata__`` only when there is metadata."""
    header: dict[str, object] = dict(entries)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return text + b" " * (-len(text) % 8)


def _canonical(
    tensors: Mapping[str, object], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[str, npt.NDArray[Any]]]]:
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    if "__metadata__" in tensors:
        raise ValueError("a tensor cannot be named __metadata__")
    arrays = {name: _as_array(name, tensors[name]) for name in sorted(tensors)}
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, (code, a) in arrays.items():
        entries[name] = {
            "dtype": code,
            "shape": [int(d) for d in a.shape],
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    return canonical_header(entries, metadata), arrays


def canonical_digest(tensors: Mapping[str, object], metadata: dict[str, str] | None = None) -> str:
    """sha256 of the file ``write_tensors(path, tensors, metadata)`` writes, without writing it."""
    header, arrays = _canonical(tensors, metadata)
    h = hashlib.sha256(struct.pack("<Q", len(header)) + header)
    for _, a in arrays.values():
        if a.nbytes:
            h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def write_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, object], metadata: dict[str, str] | None = None
) -> None:
    """Write numpy arrays or torch tensors (any dtype safetensors has; bfloat16 from torch) with string
    metadata as a canonical safetensors file: the same tensors and metadata give the same bytes in every
    process (the safetensors package writes its metadata in a per-process hash order). The data follows
    in name order; each tensor's bytes are written from the array, without a copy of the whole file."""
    header, arrays = _canonical(tensors, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for _, a in arrays.values():
            if a.nbytes:
                f.write(a.reshape(-1).view(np.uint8).data)


def _refuse_overlaps(path: object, header: dict[str, dict[str, Any]]) -> None:
    """Safetensors tensors own disjoint byte ranges (empty ones aside): refuse a header where two share
    bytes, as the native reader does."""
    ranges = sorted(
        (int(r["data_offsets"][0]), int(r["data_offsets"][1]), n)
        for n, r in header.items()
        if n != "__metadata__" and int(r["data_offsets"][1]) > int(r["data_offsets"][0])
    )
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise BundleError(f"{path}: tensors {first!r} and {second!r} overlap in the data")
