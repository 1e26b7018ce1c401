"""The native runner cross-built for Linux aarch64 (``make native-aarch64``) and run under qemu-aarch64:
the device path on the CPU architecture of a phone or Jetson. ``run`` precomputes the tiny block-streamed
bundle's cache (int8 storage) from the photos and trains it, as the x86 build does: the same cache within
1e-5 and the same LoRA, 99.9% of its values within 1e-5 (the kernels' vector arithmetic differs between the two CPUs: losses agree to about 1e-7 relative,
not bit for bit, and AdamW can turn that into up to a fraction of lr where a gradient is nearly zero).

Emulation is about 60x slower than native, so the run is a few steps. Skips, saying why, where the
aarch64 build or qemu is absent (``.ci/run`` installs both)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as load_np

pytest.importorskip("executorch.extension.pybindings.portable_lib", reason="the export needs executorch")

from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
X86 = ROOT / "build" / "native" / "device_train" / "native" / "blockskip-train-native"
ARM = ROOT / "build" / "native-aarch64" / "device_train" / "native" / "blockskip-train-native"
SYSROOT = Path("/usr/aarch64-linux-gnu")
PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=2,
    steps=3,
    checkpoint_every=3,
    lora_rank=4,
    lora_alpha=8.0,
    lr=3e-3,
    weight_decay=0.05,
    span="streamed",
    storage="int8",
)


def _is_aarch64(path: Path) -> bool:
    head = path.read_bytes()[:20]
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # e_machine EM_AARCH64


@pytest.fixture(scope="module")
def qemu() -> str:
    q = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if q is None or not SYSROOT.is_dir():
        pytest.skip(
            "needs qemu-aarch64 and the aarch64 C++ runtime (apt-get install qemu-user g++-aarch64-linux-gnu)"
        )
    if not ARM.is_file():
        pytest.skip("the aarch64 runner is not built: make native-aarch64")
    if not X86.is_file():
        pytest.skip("the x86 runner is not built: make native")
    assert _is_aarch64(ARM), f"{ARM} is not an aarch64 executable"
    return q


def test_aarch64_run_gives_the_x86_cache_and_lora(qemu, tmp_path, photos):
    """``run`` from the photos on both CPUs: the photos read, encoded, embedded and run through the
    frozen blocks into the cache, then the span trained, all in the runner."""
    export_bundle(
        load_model("tiny-random"),
        Plan(**PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "b",
        formats=["pte"],
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    outs = {}
    for arch, cmd in (("x86", [str(X86)]), ("aarch64", [qemu, "-L", str(SYSROOT), str(ARM)])):
        out = tmp_path / f"out-{arch}"
        r = subprocess.run(
            cmd + ["run", str(tmp_path / "b"), "--images", str(photos), "-o", str(out), "--quiet"],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert r.returncode == 0, f"{arch} runner failed:\n{r.stderr[-3000:]}"
        outs[arch] = (
            json.loads((out / "train_log.json").read_text()),
            load_np(out / "lora.safetensors"),
            json.loads((out / "cache" / "index.json").read_text()),
            out / "cache",
        )
    (log_x, lora_x, idx_x, cache_x), (log_a, lora_a, idx_a, cache_a) = outs["x86"], outs["aarch64"]
    # the same cache: schedule exactly, tensors within 1e-5
    assert idx_a["schedule"] == idx_x["schedule"] and idx_a["source_sha256"] == idx_x["source_sha256"]
    for k, rec in idx_x["entries"].items():
        a, x = load_np(cache_a / idx_a["entries"][k]["file"]), load_np(cache_x / rec["file"])
        assert a.keys() == x.keys()
        for n in x:
            np.testing.assert_allclose(a[n], x[n], rtol=0, atol=1e-5, err_msg=f"entry {k} {n}")
    assert len(log_a["losses"]) == PLAN["steps"]
    np.testing.assert_allclose(log_a["losses"], log_x["losses"], rtol=1e-5)
    assert lora_a.keys() == lora_x.keys()
    # AdamW divides each gradient by its running magnitude, so where a gradient is nearly zero the CPUs'
    # 1e-7 relative difference can move a LoRA value by a visible fraction of lr: all but 0.1% of the
    # values agree within 1e-5, none by more than lr / 30
    moved, off, total = 0.0, 0, 0
    for k in lora_x:
        d = np.abs(lora_a[k] - lora_x[k])
        off += int((d > 1e-5).sum())
        total += d.size
        assert float(d.max()) < PLAN["lr"] / 30, (k, float(d.max()))
        moved = max(moved, float(np.abs(lora_x[k]).max()))
    assert off <= total // 1000, f"{off} of {total} LoRA values differ by more than 1e-5"
    assert moved > 1e-4  # the LoRA was trained (lora_B starts at zero)


def test_aarch64_runner_draws_the_python_schedule_and_noise(qemu, tmp_path):
    """The shared generator on the other CPU: the same schedule, and noise within 1e-6 (libm's cos, sin
    and log may differ in the last bit of a float64 there)."""
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.rng import normals

    plan = Plan(**{**PLAN, "num_samples": 12, "seed": 5})
    export_bundle(
        load_model("tiny-random"),
        plan,
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "b",
        formats=["torch"],
    )
    r = subprocess.run(
        [
            qemu,
            "-L",
            str(SYSROOT),
            str(ARM),
            "schedule",
            str(tmp_path / "b"),
            "--images",
            "3",
            "--noise-values",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["entries"] == Bundle(tmp_path / "b").schedule(3).to_json()["entries"]
    for values, e in zip(got["noise_values"], got["entries"]):
        np.testing.assert_allclose(
            np.array(values, dtype=np.float32), normals(e["noise_seed"], 64), rtol=0, atol=1e-6
        )
