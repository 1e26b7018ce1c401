"""``blockskip-train-native run``: the whole device path in C++ with no Python. The runner reads the
photos, encodes them, realises the schedule, builds each sample with the bundle's embed program, runs
the frozen blocks and writes the cache, then trains. Held against ``device-train run --backend
executorch`` on the same bundle and photos: the same schedule, the same cache within 1e-5 per tensor,
the same LoRA within 1e-5; and a run killed anywhere (precompute or training) resumes to the same
bytes."""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_photos
from safetensors.numpy import load_file as load_np

pytest.importorskip(
    "executorch.extension.pybindings.portable_lib", reason="the reference run needs executorch"
)

from blockskip.device_train import cli as device_cli  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

# a resident span (the joint training program) and a block-streamed one (int8 storage); a front span,
# a trained middle and a back span replaced by its residual; 3 photos, 6 entries, 4 steps
BASE = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=4,
    grad_accum=1,
    lr=3e-3,
    weight_decay=0.05,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=2,
    precompute_chunk=4,
)
PLANS = {"resident": BASE, "streamed": {**BASE, "span": "streamed", "storage": "int8"}}


@pytest.fixture(scope="module")
def runs(runner, tmp_path_factory, photos):
    """span -> root with the bundle, a native run (``native``) and the Python executorch run (``python``)."""
    made = {}

    def get(span: str) -> Path:
        if span not in made:
            root = tmp_path_factory.mktemp(f"native-run-{span}")
            export_bundle(
                load_model("tiny-random"),
                Plan(**PLANS[span]),
                load_profile("desktop-cpu"),
                "a photo of sks cat",
                root / "bundle",
                formats=["pte"],
            )
            r = native(runner, "run", root / "bundle", "--images", photos, "-o", root / "native")
            assert "precompute:" in r.stdout and "step 4/4" in r.stdout, r.stdout
            assert (
                device_cli.main(
                    [
                        "run",
                        str(root / "bundle"),
                        "--images",
                        str(photos),
                        "-o",
                        str(root / "python"),
                        "--backend",
                        "executorch",
                        "--quiet",
                    ]
                )
                == 0
            )
            made[span] = root
        return made[span]

    return get


def native(runner: Path, *args, check: bool = True, env: dict | None = None, timeout: int = 600):
    r = subprocess.run(
        [str(runner), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check:
        assert r.returncode == 0, f"runner failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _tensors(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    index = json.loads((cache / "index.json").read_text())
    return {k: load_np(cache / rec["file"]) for k, rec in index["entries"].items()}


@pytest.mark.parametrize("span", list(PLANS))
def test_the_native_cache_is_the_python_cache(span, runs):
    root = runs(span)
    a = json.loads((root / "native" / "cache" / "index.json").read_text())
    b = json.loads((root / "python" / "cache" / "index.json").read_text())
    # the same photos and bundle, the same identity, the same schedule and crop boxes, exactly
    assert a["source"] == b["source"] and a["source_sha256"] == b["source_sha256"]
    assert a["schedule"] == b["schedule"]
    assert len({(e["side"], e["top"], e["left"]) for e in a["schedule"]["entries"]}) > 2
    ta, tb = _tensors(root / "native" / "cache"), _tensors(root / "python" / "cache")
    assert ta.keys() == tb.keys() == {str(k) for k in range(BASE["num_samples"])}
    names = set()
    for k in ta:
        assert ta[k].keys() == tb[k].keys()
        names |= set(ta[k])
        for n in ta[k]:
            assert ta[k][n].dtype == np.float32
            np.testing.assert_allclose(ta[k][n], tb[k][n], rtol=0, atol=1e-5, err_msg=f"entry {k} {n}")
    assert {"in.hidden", "in.encoder", "target", "c.temb"} <= names
    assert any(n.startswith("delta.") for n in names)  # the back span's residual
    assert a["max_resident_blocks"] == 1 and a["peak_rss_mib"] > 0


@pytest.mark.parametrize("span", list(PLANS))
def test_the_native_lora_is_the_python_lora(span, runs):
    root = runs(span)
    ln = json.loads((root / "native" / "train_log.json").read_text())
    lp = json.loads((root / "python" / "train_log.json").read_text())
    assert ln["cache_source"] == lp["cache_source"]
    np.testing.assert_allclose(ln["losses"], lp["losses"], rtol=1e-5)
    a, b = load_np(root / "native" / "lora.safetensors"), load_np(root / "python" / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)
    assert max(float(np.abs(v).max()) for k, v in a.items() if ".lora_B." in k) > 1e-4  # it trained


def test_no_python_is_involved(runner, runs, tmp_path, photos):
    """The run works with an empty environment (no PATH, no PYTHONHOME): nothing it starts is Python, and
    no Python library is mapped into it."""
    root = runs("streamed")
    shutil.copytree(root / "native" / "cache", tmp_path / "out" / "cache")  # precompute is covered above
    proc = subprocess.Popen(
        [str(runner), "run", str(root / "bundle"), "--images", str(photos), "-o", str(tmp_path / "out")],
        env={},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_maps, children = "", set()
    while proc.poll() is None:
        try:
            seen_maps += Path(f"/proc/{proc.pid}/maps").read_text()
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                children |= set((task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "libpython" not in seen_maps and seen_maps  # it was observed, and no interpreter was loaded
    assert not children
    a, b = load_np(tmp_path / "out" / "lora.safetensors"), load_np(root / "native" / "lora.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_kill_9_anywhere_then_run_again_is_bitwise_equal(runner, runs, tmp_path, photos):
    """SIGKILL at random moments of precompute and training; each rerun resumes (kept cache entries, the
    last checkpoint), and the finished run's cache and LoRA are byte for byte the uninterrupted run's."""
    root = runs("streamed")
    t0 = time.monotonic()
    native(runner, "run", root / "bundle", "--images", photos, "-o", tmp_path / "timed", "--quiet")
    whole = time.monotonic() - t0
    out = tmp_path / "out"
    rng = random.Random(0)
    kills = 0
    for _ in range(40):
        proc = subprocess.Popen(
            [str(runner), "run", str(root / "bundle"), "--images", str(photos), "-o", str(out), "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(rng.uniform(0.02, 0.45) * whole)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err
        if (out / "lora.safetensors").is_file():
            break
    assert kills >= 2
    native(runner, "run", root / "bundle", "--images", photos, "-o", out, "--quiet")
    ref = root / "native"
    assert (out / "lora.safetensors").read_bytes() == (ref / "lora.safetensors").read_bytes()
    ia = json.loads((out / "cache" / "index.json").read_text())
    ib = json.loads((ref / "cache" / "index.json").read_text())
    assert {k: v["sha256"] for k, v in ia["entries"].items()} == {
        k: v["sha256"] for k, v in ib["entries"].items()
    }


def test_bad_photos_are_refused_like_the_python_cli(runner, runs, tmp_path, capsys):
    """Refused with the Python CLI's message and a non-zero exit, and nothing of a good run in OUT is
    touched."""
    from PIL import Image

    root = runs("streamed")
    out = tmp_path / "out"
    shutil.copytree(root / "native", out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cases = {}
    cases["empty"] = tmp_path / "empty"
    cases["empty"].mkdir()
    d = write_photos(tmp_path / "not-images", n=1)
    (d / "photo_0.png").write_text("this is not a picture")
    cases["not-images"] = d
    d = write_photos(tmp_path / "zero", n=2)
    (d / "photo_1.png").write_bytes(b"")
    cases["zero-byte"] = d
    d = write_photos(tmp_path / "truncated", n=2)
    (d / "photo_1.png").write_bytes((d / "photo_1.png").read_bytes()[:300])
    cases["truncated"] = d
    d = write_photos(tmp_path / "tiny", n=1)
    Image.new("RGB", (1, 1)).save(d / "photo_1.png")
    cases["1x1"] = d
    d = write_photos(tmp_path / "deep", n=1)
    Image.fromarray(np.full((80, 80), 40000, np.uint16)).save(d / "photo_1.png")
    cases["16-bit"] = d
    d = write_photos(tmp_path / "cmyk", n=1)
    Image.new("CMYK", (80, 80), (10, 20, 30, 40)).save(d / "photo_1.jpg")
    cases["cmyk"] = d
    d = write_photos(tmp_path / "link", n=1)
    outside = write_photos(tmp_path / "elsewhere", n=1) / "photo_0.png"
    (d / "photo_1.png").symlink_to(outside)
    cases["symlink"] = d
    for name, folder in cases.items():
        r = native(runner, "run", root / "bundle", "--images", folder, "-o", out, check=False)
        assert r.returncode == 1, (name, r.stderr)
        got = r.stderr.strip().removeprefix("blockskip-train-native: error: ")
        assert (
            device_cli.main(
                [
                    "run",
                    str(root / "bundle"),
                    "--images",
                    str(folder),
                    "-o",
                    str(out),
                    "--backend",
                    "executorch",
                    "--quiet",
                ]
            )
            != 0
        )
        want = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("device-train: error: ")
        assert got.split(": ")[0] == want.split(": ")[0] and got.endswith(want.split("; ")[-1]), (
            name,
            got,
            want,
        )
        if "cannot read image" not in want:
            assert got == want, name
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow  # a DC-AE model at 512 px: about a minute
@pytest.mark.parametrize("family,kind", [("sana", "AutoencoderDC"), ("flux", "AutoencoderKL")])
def test_tiled_encoder_cache_is_the_python_cache(runner, tmp_path, family, kind):
    """A bundle that encodes photos in tiles (DC-AE every 224 px, KL every 192 px, --vae-tiling): four tile
    programs, each over every photo, blended as runtime/tiles.py blends them; the shards are the Python
    precompute's."""
    import dataclasses

    from test_tiles import KINDS, _vae
    from tiny_models import build

    from blockskip.device_train.app import run_precompute
    from blockskip.export.families import wrap_model

    vae, spec = _vae(kind)
    lm = dataclasses.replace(
        wrap_model(build(family), family), encoder=vae, encoder_spec=spec, vae_factor=KINDS[kind]
    )
    plan = Plan(
        front_skip=1, back_skip=1, s_min=256, s_max=512, num_samples=3, steps=2, vae_tiling=True, lora_rank=4
    )
    export_bundle(
        lm, plan, load_profile("desktop-cpu"), "a photo of sks cat", tmp_path / "bundle", formats=["pte"]
    )
    assert (
        len(json.loads((tmp_path / "bundle" / "manifest.json").read_text())["pte"]["encoder"]["programs"])
        == 4
    )
    photos = write_photos(tmp_path / "photos", n=2, size=(520, 600))
    run_precompute(tmp_path / "bundle", photos, tmp_path / "py", backend="executorch", quiet=True)
    native(
        runner, "precompute", tmp_path / "bundle", "--images", photos, "--cache", tmp_path / "nat", "--quiet"
    )
    a = json.loads((tmp_path / "nat" / "index.json").read_text())
    b = json.loads((tmp_path / "py" / "index.json").read_text())
    assert a["schedule"] == b["schedule"]
    ta, tb = _tensors(tmp_path / "nat"), _tensors(tmp_path / "py")
    for k in tb:
        for n in tb[k]:
            np.testing.assert_allclose(ta[k][n], tb[k][n], rtol=0, atol=1e-5, err_msg=f"entry {k} {n}")
