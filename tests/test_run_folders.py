"""Byte-reproducible outputs and one run per folder, in the Python runtime (the native runner's side is
in tests/test_native_stream.py).

* Every safetensors file the runtime writes (LoRA, checkpoint, cache shards) has the canonical header
  (``runtime.formats``): two identical training runs in separate processes write the same bytes.
* A run holds its output and cache folders' locks (``runtime.files.folder_lock``); a second run on
  either is refused with the holder's pid, and taking the lock removes a killed run's temporaries.
"""

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_and_precompute
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file as load_pt

from blockskip.device_train import cli as device_cli
from blockskip.device_train.app import run_precompute, run_train
from blockskip.runtime import formats
from blockskip.runtime.errors import FolderInUseError
from blockskip.runtime.files import TEMP_NAME, atomic_write, output_lock
from blockskip.runtime.plan import Plan
from blockskip.runtime.tensorfile import TensorFile, write_tensors

PLAN = dict(
    front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=3, steps=2, checkpoint_every=1, lora_rank=4
)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def header_bytes(p: Path) -> bytes:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n]


def assert_canonical(p: Path) -> None:
    """The header is the canonical dump of itself, padded with spaces to 8 bytes; data in name order."""
    head = header_bytes(p)
    text = head.rstrip(b" ")
    assert len(head) % 8 == 0 and len(head) - len(text) < 8, p
    parsed = json.loads(text)
    assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode("ascii"), p
    parsed.pop("__metadata__", None)
    offsets = [parsed[k]["data_offsets"] for k in sorted(parsed)]
    assert offsets == sorted(offsets) and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:])), p


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockskip.device_train.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, photos) -> Path:
    """A tiny torch bundle and its cache (root/bundle, root/cache)."""
    return export_and_precompute(tmp_path_factory.mktemp("run-folders"), Plan(**PLAN), photos)


# --- the canonical writer ---------------------------------------------------------------------------


def test_write_tensors_is_canonical_and_loads_everywhere(tmp_path):
    arrays = {
        "b.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a": np.float32(2.5).reshape(()),
        "opt.step.x": np.array([3], np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(10, dtype=np.float32)[::2],
    }
    meta = {"step": "4", "log": json.dumps({"é": 1, "a": [1.5]}), "format": "pt"}
    write_tensors(tmp_path / "a.safetensors", arrays, meta)
    write_tensors(tmp_path / "b.safetensors", dict(reversed(arrays.items())), dict(reversed(meta.items())))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert a.read_bytes() == b.read_bytes()  # the order given does not matter
    assert_canonical(a)
    assert header_bytes(a).isascii()
    loaded = load_np(a)
    assert loaded.keys() == arrays.keys()
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        np.testing.assert_array_equal(loaded[k], v)
    with safe_open(a, "np") as f:
        assert f.metadata() == meta
    assert TensorFile(a).metadata == meta
    # no metadata: no __metadata__ key (as safetensors writes it)
    write_tensors(tmp_path / "c.safetensors", {"x": np.ones(3, np.float32)})
    assert b"__metadata__" not in header_bytes(tmp_path / "c.safetensors")


def test_torch_tensors_keep_their_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "f32": torch.randn(2, 2, generator=g).t(),
        "grad": torch.randn(4, generator=g, requires_grad=True),
        "step": torch.tensor(3.0).reshape(-1),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
    }
    p = tmp_path / "t.safetensors"
    write_tensors(p, tensors)
    assert_canonical(p)
    back = load_pt(p)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v.detach()), k
    f = TensorFile(p)
    assert f.dtypes["bf16"] == "bfloat16"
    np.testing.assert_array_equal(f.float32("bf16"), tensors["bf16"].float().numpy())


# --- two identical runs, the same bytes ---------------------------------------------------------------


def test_two_identical_torch_runs_write_the_same_bytes(tiny, photos, tmp_path):
    """Two `device-train` processes (torch backend) on one bundle: byte-identical LoRA and checkpoint;
    a precompute in another process writes the in-process precompute's shards, byte for byte."""
    root = tiny
    for out in ("a", "b"):
        r = cli(
            "train",
            str(root / "bundle"),
            "--cache",
            str(root / "cache"),
            "-o",
            str(tmp_path / out),
            "--quiet",
        )
        assert r.returncode == 0, r.stderr
    for rel in (formats.LORA_FILE, f"{formats.CHECKPOINT_DIR}/{formats.CHECKPOINT}"):
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        assert sha256(a) == sha256(b), rel
        assert_canonical(a)
    with safe_open(tmp_path / "a" / formats.CHECKPOINT_DIR / formats.CHECKPOINT, "np") as f:
        log = json.loads(f.metadata()[formats.META_LOG])
    assert formats.LOG_STEP_SECONDS not in log and len(log[formats.LOG_LOSSES]) == PLAN["steps"]
    assert (
        len(json.loads((tmp_path / "a" / formats.TRAIN_LOG).read_text())[formats.LOG_STEP_SECONDS])
        == PLAN["steps"]
    )
    # the LoRA still loads into diffusers
    from blockskip.export.families import load_model

    full = load_model("tiny-random").transformer
    full.load_lora_adapter(
        str(tmp_path / "a" / formats.LORA_FILE), adapter_name="subject", prefix="transformer"
    )
    assert any(".lora_A.subject." in n for n, _ in full.named_parameters())
    # the cache
    r = cli(
        "precompute",
        str(root / "bundle"),
        "--images",
        str(photos),
        "--cache",
        str(tmp_path / "cache"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    index = json.loads((root / "cache" / formats.CACHE_INDEX).read_text())
    for k in range(PLAN["num_samples"]):
        name = formats.shard_name(k)
        assert (
            sha256(tmp_path / "cache" / name)
            == sha256(root / "cache" / name)
            == index["entries"][str(k)]["sha256"]
        )
        assert_canonical(root / "cache" / name)


# --- one run per folder --------------------------------------------------------------------------------


def wait_for_locks(proc: subprocess.Popen, *folders: Path, timeout: float = 300) -> None:
    """Until ``proc`` holds the locks of ``folders`` (its pid written in each)."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        try:
            if all((f / formats.LOCK_FILE).read_text().strip() == str(proc.pid) for f in folders):
                return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"the run never took the locks of {folders} (exit {proc.poll()})")


def test_a_second_run_on_the_folder_is_refused_with_the_pid(tiny, photos, tmp_path, capsys):
    """A training run holds OUT and its cache; another `device-train` on either is refused with one line
    naming the holder's pid; the lock dies with the process. (The native runner against a Python run and
    the other way round: tests/test_native_stream.py.)"""
    root = tiny
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blockskip.device_train.cli",
            "train",
            str(root / "bundle"),
            "--cache",
            str(root / "cache"),
            "-o",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_locks(proc, out, root / "cache")
        proc.send_signal(signal.SIGSTOP)  # holds the locks for as long as the test needs
        assert proc.poll() is None, "the run ended before it could be stopped"
        # the same output folder
        code = device_cli.main(
            ["train", str(root / "bundle"), "--cache", str(root / "cache"), "-o", str(out), "--quiet"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == FolderInUseError.exit_code == 2 and len(err) == 1, err
        assert err[0] == (
            f"device-train: error: output folder {str(out)!r} is in use by another run (pid {proc.pid}); "
            "wait for it to end, or choose another output folder with -o"
        )
        # another output folder on the same cache
        code = device_cli.main(
            [
                "train",
                str(root / "bundle"),
                "--cache",
                str(root / "cache"),
                "-o",
                str(tmp_path / "other"),
                "--quiet",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert (
            code == 2
            and f"cache folder {str(root / 'cache')!r} is in use by another run (pid {proc.pid})" in err
        )
        # a precompute into that cache
        with pytest.raises(
            FolderInUseError, match=f"cache folder .* in use by another run \\(pid {proc.pid}\\)"
        ):
            run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    finally:
        proc.kill()
        proc.wait()
    with output_lock(out):  # released with the process
        assert (out / formats.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_taking_the_lock_removes_a_killed_runs_temporaries(tiny, tmp_path):
    root = tiny
    out = tmp_path / "out"
    run_train(root / "bundle", root / "cache", out, quiet=True)
    # what atomic writes killed mid-way leave: Python's names (mkstemp) and the native runner's (mkstemps)
    temps = []
    for folder, name in (
        (out, formats.LORA_FILE),
        (out / formats.CHECKPOINT_DIR, formats.CHECKPOINT),
        (root / "cache", formats.shard_name(1)),
    ):
        fd, tmp = tempfile.mkstemp(
            prefix=f"{formats.TEMP_PREFIX}{name}.", suffix=formats.TEMP_SUFFIX, dir=folder
        )
        os.write(fd, b"torn")
        os.close(fd)
        temps += [Path(tmp), folder / f".{name}.aB3xY9.tmp"]
        temps[-1].write_bytes(b"torn")
    kept = [out / "notes.tmp", out / ".hidden.tmp", out / "checkpoint" / ".x.12345.tmp", out / "keep.txt"]
    for p in kept:
        p.write_text("mine")
    assert all(TEMP_NAME.match(p.name) for p in temps) and not any(TEMP_NAME.match(p.name) for p in kept)
    before = sha256(out / formats.LORA_FILE)
    run_train(root / "bundle", root / "cache", out, quiet=True)  # resumes at the end: rewrites the LoRA
    assert not [p for p in temps if p.exists()]
    assert all(p.read_text() == "mine" for p in kept)
    assert sha256(out / formats.LORA_FILE) == before


def test_atomic_write_names_its_temporary_as_the_lock_expects(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.json", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_text("{}")))
    assert TEMP_NAME.match(seen[0]) and seen[0].startswith(".x.json.")
