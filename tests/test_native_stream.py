"""The native runner's block-streamed mode (``plan.span == "streamed"``): per-block-shape forward / VJP /
head programs with the frozen weights streamed from the block files, against the Python ExecuTorch
streamed span (``runtime.stream.StreamedSpan`` over the same programs, numpy AdamW), which it follows
bit for bit; resume and kill -9; the driver's refusals.

Two tiny bundles: the built-in FLUX-like model with int8 storage, weights streamed with prefetch and the
stash in memory; a SANA model with int4 storage, weights resident, no prefetch, the stash on disk and
two micro-steps a step.
"""

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
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file

pytest.importorskip("executorch.extension.pybindings.portable_lib", reason="the reference needs executorch")

from blockskip.device_train.app import run_precompute, run_train  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model, wrap_model  # noqa: E402
from blockskip.runtime.bundle import write_manifest
from blockskip.runtime.cache import source_digest  # noqa: E402
from blockskip.runtime.files import sha256_file  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

COMMON = dict(s_min=32, s_max=64, lora_rank=4, lr=3e-3, weight_decay=0.05, span="streamed")
FLUX_PLAN = dict(
    front_skip=1,
    back_skip=2,
    num_samples=4,
    steps=6,
    checkpoint_every=2,
    lora_alpha=8.0,
    storage="int8",
    **COMMON,
)
SANA_PLAN = dict(
    front_skip=1,
    back_skip=1,
    num_samples=3,
    steps=4,
    grad_accum=2,
    checkpoint_every=2,
    storage="int4",
    weights="resident",
    stash="disk",
    prefetch=False,
    **COMMON,
)


def command(runner, bundle, cache, out, *extra) -> list[str]:
    return [str(runner), str(bundle), "--cache", str(cache), "-o", str(out), *map(str, extra)]


def run_native(runner, bundle, cache, out, *extra, check=True, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        command(runner, bundle, cache, out, *extra), capture_output=True, text=True, timeout=300, env=env
    )
    if check:
        assert r.returncode == 0, f"runner failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def _log(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


def _same_lora(a: Path, b: Path) -> None:
    x, y = load_np(a / "lora.safetensors"), load_np(b / "lora.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _setup(root: Path, model, plan: dict, photos: Path, runner) -> Path:
    """Export, precompute, the Python ExecuTorch streamed run (root/py) and a native run (root/full)."""
    export_bundle(
        model,
        Plan(**plan),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=["torch", "pte"],
    )
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    run_train(root / "bundle", root / "cache", root / "py", backend="executorch", quiet=True)
    run_native(runner, root / "bundle", root / "cache", root / "full")
    return root


@pytest.fixture(scope="module")
def flux(runner, tmp_path_factory, photos) -> Path:
    return _setup(
        tmp_path_factory.mktemp("stream-flux"), load_model("tiny-random"), FLUX_PLAN, photos, runner
    )


@pytest.fixture(scope="module")
def sana(runner, tmp_path_factory, photos) -> Path:
    from tiny_models import build

    return _setup(
        tmp_path_factory.mktemp("stream-sana"), wrap_model(build("sana"), "sana"), SANA_PLAN, photos, runner
    )


def _edited_copy(
    root: Path, dest: Path, plan: dict | None = None, memory: dict | None = None
) -> tuple[Path, Path]:
    """A copy of the bundle with its manifest edited and the cache re-labelled for it (same tensors)."""
    shutil.copytree(root / "bundle", dest / "bundle")
    m = json.loads((dest / "bundle" / "manifest.json").read_text())
    m["plan"].update(plan or {})
    if memory is not None:
        m["memory"] = memory
    write_manifest(dest / "bundle" / "manifest.json", m)
    shutil.copytree(root / "cache", dest / "cache")
    idx = json.loads((dest / "cache" / "index.json").read_text())
    idx["source"]["bundle"] = sha256_file(dest / "bundle" / "manifest.json")
    idx["source_sha256"] = source_digest(idx["source"])  # the identity of what it now claims
    (dest / "cache" / "index.json").write_text(json.dumps(idx))
    return dest / "bundle", dest / "cache"


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["flux", "sana"])
def test_matches_the_python_streamed_span(case, request):
    root = request.getfixturevalue(case)
    plan = FLUX_PLAN if case == "flux" else SANA_PLAN
    native, py = _log(root / "full"), _log(root / "py")
    assert native["backend"] == "native" and native["span"] == "streamed" and native["resumed_from"] == 0
    assert native["storage"] == plan["storage"]
    assert len(native["losses"]) == plan["steps"] == len(native["step_seconds"])
    a, b = np.array(native["losses"]), np.array(py["losses"])
    assert np.max(np.abs(a - b) / np.abs(b)) <= 1e-5, (a, b)
    assert native["weight_file_reads"] == py["weight_file_reads"]
    if plan.get("weights") == "resident":  # each trained block read once
        trained = json.loads((root / "bundle" / "manifest.json").read_text())["stream"]["train"]
        assert native["weight_file_reads"] == len(trained)
    _same_lora(root / "full", root / "py")  # the numpy AdamW follows the C++ one bit for bit
    ck_a = load_np(root / "full" / "checkpoint" / "checkpoint.safetensors")
    ck_b = load_np(root / "py" / "checkpoint" / "checkpoint.safetensors")
    assert ck_a.keys() == ck_b.keys()
    for k in ck_a:
        np.testing.assert_array_equal(ck_a[k], ck_b[k], err_msg=k)
    if plan.get("stash") == "disk":  # spilled and cleaned up
        assert (root / "full" / "stash").is_dir() and not any((root / "full" / "stash").iterdir())


def test_lora_loads_into_diffusers(flux):
    path = flux / "full" / "lora.safetensors"
    sd = load_np(path)
    manifest = json.loads((flux / "bundle" / "manifest.json").read_text())
    with safe_open(path, "np") as f:
        assert f.metadata() == manifest["lora"]["metadata"]
    init = load_np(flux / "bundle" / manifest["stream"]["lora_init"])
    assert set(sd) == {"transformer." + n.replace(".default.", ".") for n in init}
    full = load_model("tiny-random").transformer
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}
    params = dict(full.named_parameters())
    for k, v in sd.items():
        name = (
            k.removeprefix("transformer.")
            .replace(".lora_A.", ".lora_A.subject.")
            .replace(".lora_B.", ".lora_B.subject.")
        )
        np.testing.assert_array_equal(params[name].detach().numpy(), v)
    assert any(np.abs(v).max() > 0 for k, v in sd.items() if ".lora_B." in k)


@pytest.mark.parametrize("case", ["flux", "sana"])
def test_resume_equals_uninterrupted(case, request, runner, tmp_path):
    root = request.getfixturevalue(case)
    out = tmp_path / "o"
    r = run_native(runner, root / "bundle", root / "cache", out, "--stop-after", 3)
    assert "step 3/" in r.stdout and "step 4/" not in r.stdout and not (out / "lora.safetensors").exists()
    r = run_native(runner, root / "bundle", root / "cache", out)
    assert "resuming from step 2" in r.stdout
    log = _log(out)
    assert log["resumed_from"] == 2 and log["losses"] == _log(root / "full")["losses"]
    _same_lora(out, root / "full")


def test_kill_9_anywhere_then_resume_is_bitwise_equal(flux, runner, tmp_path):
    # a long run (about 10 ms a step here), so the kill lands inside it
    bundle, cache = _edited_copy(flux, tmp_path, plan=dict(steps=300, checkpoint_every=2))
    run_native(runner, bundle, cache, tmp_path / "a", "--quiet")
    ckpt = tmp_path / "b" / "checkpoint" / "checkpoint.safetensors"
    proc = subprocess.Popen(
        command(runner, bundle, cache, tmp_path / "b", "--quiet"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.002)
    time.sleep(random.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "lora.safetensors").exists(), "the run ended before the kill; make it longer"
    run_native(runner, bundle, cache, tmp_path / "b", "--quiet")
    assert _log(tmp_path / "b")["resumed_from"] > 0
    _same_lora(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("case", ["flux", "sana"])
def test_the_export_dry_run_counts_the_stream_programs_it_lowers(case, request):
    """The export's encoder stage sits on what every earlier program lowering left behind: the dry run
    counts the programs the export lowers (``export_phase.stream_program_count``)."""
    from tiny_models import build

    from blockskip.export.families import lora_target_names
    from blockskip.export.memory.export_phase import stream_program_count
    from blockskip.runtime.backends.torch import blocks_to_run

    root = request.getfixturevalue(case)
    plan = Plan(**(FLUX_PLAN if case == "flux" else SANA_PLAN))
    fam = (load_model("tiny-random") if case == "flux" else wrap_model(build("sana"), "sana")).family
    trained = plan.trained_indices(fam.num_blocks)
    count = stream_program_count(
        fam,
        trained,
        lora_target_names(fam, trained, plan.lora_targets),
        blocks_to_run(trained, fam.num_blocks, plan.back_residual),
        plan,
    )
    assert count == len(list((root / "bundle" / "stream").glob("*.pte")))


@pytest.mark.parametrize("who", ["native", "python"])
def test_sigterm_ends_a_run_like_ctrl_c_and_it_resumes(who, flux, runner, tmp_path):
    """SIGTERM (how Android and service managers stop a process) ends a run with one line and exit code
    143, the last checkpoint whole; the same command resumes it to the LoRA of an uninterrupted run."""
    import sys

    bundle, cache = _edited_copy(flux, tmp_path, plan=dict(steps=300, checkpoint_every=2))

    def cmd(out):
        if who == "native":
            return command(runner, bundle, cache, out, "--quiet")
        return [
            sys.executable,
            "-m",
            "blockskip.device_train.cli",
            "train",
            str(bundle),
            "--cache",
            str(cache),
            "-o",
            str(out),
            "--backend",
            "executorch",
            "--quiet",
        ]

    assert subprocess.run(cmd(tmp_path / "a"), capture_output=True, timeout=600).returncode == 0
    ckpt = tmp_path / "b" / "checkpoint" / "checkpoint.safetensors"
    proc = subprocess.Popen(cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.002)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert not (tmp_path / "b" / "lora.safetensors").exists(), (
        "the run ended before the signal; make it longer"
    )
    assert proc.returncode == 143, (proc.returncode, err)
    prog = "blockskip-train-native" if who == "native" else "device-train"
    assert err.strip().splitlines()[-1].startswith(f"{prog}: terminated; completed work is kept"), err
    r = subprocess.run(cmd(tmp_path / "b"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _log(tmp_path / "b")["resumed_from"] > 0
    _same_lora(tmp_path / "a", tmp_path / "b")


def _fails(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 1 and needle in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockskip-train-native: error: "), r.stderr


def test_refusals(flux, runner, tmp_path):
    bundle, cache = flux / "bundle", flux / "cache"
    # a checkpoint of the ORT backend
    (tmp_path / "o1" / "checkpoint").mkdir(parents=True)
    (tmp_path / "o1" / "checkpoint" / "ort_checkpoint").write_bytes(b"x")
    _fails(run_native(runner, bundle, cache, tmp_path / "o1", check=False), "--backend ort")
    # a checkpoint of a run on other photos
    other = tmp_path / "other_cache"
    shutil.copytree(cache, other)
    idx = json.loads((other / "index.json").read_text())
    idx["source"]["images"] = {"other.png": "1" * 64}
    idx["source_sha256"] = source_digest(idx["source"])  # the identity of what it now claims
    (other / "index.json").write_text(json.dumps(idx))
    shutil.copytree(flux / "full" / "checkpoint", tmp_path / "o2" / "checkpoint")
    _fails(run_native(runner, bundle, other, tmp_path / "o2", check=False), "other photos")
    # values in an entry whose square overflows float32 (a NaN itself is refused when the shard is read):
    # a non-finite loss, nothing written
    nan_cache = tmp_path / "nan_cache"
    shutil.copytree(cache, nan_cache)
    shard = nan_cache / "entry_00000.safetensors"
    t = load_np(shard)
    t["target"][...] = 3e38
    save_file(t, str(shard))
    idx = json.loads((nan_cache / "index.json").read_text())
    idx["entries"]["0"]["sha256"] = sha256_file(shard)
    (nan_cache / "index.json").write_text(json.dumps(idx))
    _fails(run_native(runner, bundle, nan_cache, tmp_path / "o3", check=False), "non-finite loss")
    assert (
        not (tmp_path / "o3" / "checkpoint").exists() and not (tmp_path / "o3" / "lora.safetensors").exists()
    )


def test_zero_learning_rate_is_refused(flux, runner, tmp_path):
    """A learning rate of 0 would train nothing: the manifest's declared format refuses it (exit 2)."""
    bundle, cache = _edited_copy(flux, tmp_path, plan=dict(lr=0.0))
    r = run_native(runner, bundle, cache, tmp_path / "o", check=False)
    assert r.returncode == 2 and "plan.lr must be a number > 0" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "checkpoint").exists()


def test_memory_check(flux, runner, tmp_path):
    gib = 1 << 30
    memory = {
        "profile_budget_bytes": 5 * gib,
        "phases": {"train": 1 << 50},
        "alternatives": [
            {"option": "--huge", "phases": {"train": 1 << 49}},
            {"option": "--weights streamed", "phases": {"train": gib}},
        ],
    }
    bundle, cache = _edited_copy(flux, tmp_path, memory=memory)
    r = run_native(runner, bundle, cache, tmp_path / "o", check=False)
    _fails(r, "not enough memory for train")
    assert "re-export with --weights streamed (predicted 1024 MiB)" in r.stderr
    assert "BLOCKSKIP_IGNORE_MEMORY_CHECK" in r.stderr
    env = {**os.environ, "BLOCKSKIP_IGNORE_MEMORY_CHECK": "1"}
    run_native(runner, bundle, cache, tmp_path / "o", "--stop-after", 0, env=env)


# --------------------------------------------------------------------------------------------
# byte-reproducible outputs, one run per folder (tests/test_run_folders.py: the Python side)


def test_two_native_runs_write_the_same_bytes(flux, runner, tmp_path):
    """A second native run (another process) writes the first's LoRA and checkpoint byte for byte, in the
    canonical form; the LoRA is also the Python streamed span's, byte for byte (one header form)."""
    from test_run_folders import assert_canonical, sha256

    run_native(runner, flux / "bundle", flux / "cache", tmp_path / "o", "--quiet")
    for rel in ("lora.safetensors", "checkpoint/checkpoint.safetensors"):
        assert sha256(tmp_path / "o" / rel) == sha256(flux / "full" / rel), rel
        assert_canonical(tmp_path / "o" / rel)
    assert sha256(tmp_path / "o" / "lora.safetensors") == sha256(flux / "py" / "lora.safetensors")
    with safe_open(tmp_path / "o" / "checkpoint" / "checkpoint.safetensors", "np") as f:
        text = f.metadata()["log"]
    log = json.loads(text)
    assert "step_seconds" not in log and len(log["losses"]) == FLUX_PLAN["steps"]
    assert text == json.dumps(log, sort_keys=True)  # as Python writes it


def test_one_run_per_folder(flux, runner, tmp_path, capsys):
    """A native run holds OUT and its cache: a second native run, or `device-train`, on either is refused
    with one line naming its pid; the lock dies with the process."""
    from test_run_folders import wait_for_locks

    from blockskip.device_train import cli as device_cli

    bundle, cache = _edited_copy(flux, tmp_path, plan=dict(steps=300, checkpoint_every=2))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        command(runner, bundle, cache, out, "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_locks(proc, out, cache)
        proc.send_signal(signal.SIGSTOP)  # holds the locks for as long as the test needs
        assert proc.poll() is None
        r = run_native(runner, bundle, cache, out, check=False)
        _fails(
            r,
            f"output folder '{out}' is in use by another run (pid {proc.pid}); wait for it to end, or "
            "choose another output folder with -o",
        )
        r = run_native(runner, bundle, cache, tmp_path / "other", check=False)
        _fails(
            r,
            f"cache folder '{cache}' is in use by another run (pid {proc.pid}); wait for it to end, or use "
            "another --cache folder",
        )
        assert (
            device_cli.main(
                [
                    "train",
                    str(bundle),
                    "--cache",
                    str(cache),
                    "-o",
                    str(out),
                    "--backend",
                    "executorch",
                    "--quiet",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"device-train: error: output folder '{out}' is in use by another run (pid {proc.pid}); "
            "wait for it to end, or choose another output folder with -o"
        ], err
    finally:
        proc.kill()
        proc.wait()
    run_native(runner, bundle, cache, out, "--stop-after", 0, "--quiet")  # released with the process
    assert (out / ".blockskip.lock").read_text().strip() != str(proc.pid)


def test_a_killed_runs_temporaries_are_removed(flux, runner, tmp_path):
    """Taking the locks removes what atomic writes killed mid-way left (the runner's .NAME.XXXXXX.tmp and
    Python's .NAME.xxxxxxxx.tmp) in OUT, OUT/checkpoint and the cache; nothing else."""
    bundle, cache = _edited_copy(flux, tmp_path)
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    temps = [
        out / ".lora.safetensors.Qx7Rt2.tmp",
        out / ".train_log.json.k2j4_9ab.tmp",
        out / "checkpoint" / ".checkpoint.safetensors.aB3xY9.tmp",
        cache / ".entry_00001.safetensors.ZZ09ab.tmp",
        cache / ".index.json.p0o9i8u7.tmp",
    ]
    kept = [out / "notes.tmp", out / ".hidden.tmp", out / "checkpoint" / ".x.12345.tmp", cache / "readme.txt"]
    for p in temps + kept:
        p.write_bytes(b"torn")
    run_native(runner, bundle, cache, out, "--stop-after", 0, "--quiet")
    assert [p for p in temps if p.exists()] == []
    assert all(p.read_bytes() == b"torn" for p in kept)
