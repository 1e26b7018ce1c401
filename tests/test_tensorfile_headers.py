"""The Python safetensors reader refuses the malformed headers the native reader refuses (its C++ unit
tests hold the same cases): sizes that wrap around and tensors that share bytes."""

import json
import struct

import pytest

from blockskip.runtime.errors import BundleError
from blockskip.runtime.tensorfile import TensorFile, read_header


def _file(tmp_path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


@pytest.mark.parametrize(
    "header, words",
    [
        # 2^33 x 2^31 float32: 2^64 elements, whose byte count wraps to 0 in 64-bit arithmetic
        ({"a": {"dtype": "F32", "shape": [2**33, 2**31], "data_offsets": [0, 0]}}, "wrong size"),
        # 4096 x (2^52 + 1) int8 wraps to 4096 bytes in 64-bit arithmetic
        ({"a": {"dtype": "I8", "shape": [4096, 2**52 + 1], "data_offsets": [0, 4096]}}, "wrong size"),
        ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, "wrong size"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            "overlap",
        ),
    ],
)
def test_malformed_headers_are_refused(tmp_path, header, words):
    p = _file(tmp_path, header, bytes(4096))
    for read in (TensorFile, read_header):
        with pytest.raises(BundleError, match=words):
            read(p)


def test_adjacent_and_empty_tensors_are_read(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
        "b": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]},
    }
    f = TensorFile(_file(tmp_path, header, bytes(range(12))))
    assert (
        f.arrays["a"].shape == (2,)
        and f.arrays["e"].shape == (0, 3)
        and list(f.arrays["b"]) == [8, 9, 10, 11]
    )
    assert set(read_header(f.path)[0]) == {"a", "e", "b"}
