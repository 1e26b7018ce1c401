"""Time prediction: per-op FLOPs and bytes, the roofline on a profile, the profile's time figures, and
what blockskip-plan reports."""

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from blockskip.export.memory.cost import CostCounter, op_cost, seconds
from blockskip.runtime.errors import ProfileError
from blockskip.runtime.profiles import load_profile, parse_profile


def _costs(fn, *args):
    c = CostCounter()
    with c:
        fn(*args)
    return c.cost


def test_matmul_and_attention_flops_and_bytes():
    """A matmul counts 2*m*n*k FLOPs and its operands' and result's bytes; CPU flash attention counts
    its two products (QK^T, PV); a view moves nothing."""
    a, b = torch.randn(32, 64), torch.randn(64, 16)
    (((dtype, flops, nbytes), n),) = _costs(torch.mm, a, b).items()
    assert (dtype, flops, nbytes, n) == ("float32", 2 * 32 * 64 * 16, 4 * (32 * 64 + 64 * 16 + 32 * 16), 1)
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    cost = _costs(torch.nn.functional.scaled_dot_product_attention, q, k, v)  # the CPU flash kernel
    assert max(f for _, f, _ in cost) == 2 * 1 * 2 * 10 * 12 * (8 + 8)
    # the math path (value width unlike the query's) decomposes into two bmm: the same products
    cost = _costs(torch.nn.functional.scaled_dot_product_attention, q, k, v[..., :4])
    assert sum(sorted(f for _, f, _ in cost)[-2:]) == 2 * 1 * 2 * 10 * 12 * (8 + 4)
    assert op_cost(torch.ops.aten.view.default, (a, [64, 32]), {}, a.view(64, 32))[1:] == (0, 0)


def test_roofline_takes_the_slower_of_compute_and_memory():
    prof = load_profile("desktop-cpu")
    import dataclasses

    prof = dataclasses.replace(
        prof, bandwidth_gbs=10.0, throughput={"cpu": {"float32": 100.0}}, op_overhead_us={"torch": 5.0}
    )
    compute_bound = Counter({("float32", 10**9, 10**6): 1})  # 10 ms of FLOPs, 0.1 ms of bytes
    memory_bound = Counter({("float32", 10**6, 10**9): 2})  # 0.01 ms of FLOPs, 100 ms of bytes each
    assert math.isclose(seconds(compute_bound, prof, "cpu", "torch"), 0.01 + 5e-6)
    assert math.isclose(seconds(memory_bound, prof, "cpu", "torch"), 2 * (0.1 + 5e-6))
    assert math.isclose(seconds(memory_bound, prof, "cpu", "program"), 0.2)  # no overhead listed


def _profile(extra: str) -> str:
    return (
        "name = 'p'\ndescription = 'x'\n[memory]\nram_gib = 8.0\nbudget_gib = 4.0\nruntime_overhead_mib = 0.0\n"
        "cuda_context_mib = 0.0\nallocator_slack = 0.0\nsafety_margin_mib = 0.0\nalloc_round_bytes = 64\n"
        "bandwidth_gbs = 50.0\n[storage]\ncache_budget_gib = 1.0\nread_mbs = 100.0\n[compute]\n"
        f"default_dtype = 'float32'\n{extra}[compute.dtypes]\ncpu = ['float32']\n"
        "[backends]\navailable = ['torch-cpu']\n"
    )


def test_profiles_carry_time_figures_and_refuse_bad_ones():
    for name in (
        "snapdragon8",
        "snapdragon8-gen2",
        "desktop-cpu",
        "jetson-orin-nano-8gb",
        "jetson-orin-nx-16gb",
        "jetson-agx-orin-64gb",
    ):
        p = load_profile(name)
        assert p.throughput and all(v > 0 for e in p.throughput.values() for v in e.values()), name
    ok = parse_profile(
        _profile("[compute.throughput]\ncpu = { float32 = 50.0 }\n[compute.op_overhead_us]\ntorch = 10\n"),
        "p.toml",
    )
    assert ok.throughput == {"cpu": {"float32": 50.0}} and ok.op_overhead_us == {"torch": 10.0}
    assert parse_profile(_profile(""), "p.toml").throughput == {}  # optional
    for bad, words in [
        ("[compute.throughput]\ntpu = { float32 = 1.0 }\n", "unknown engine"),
        ("[compute.throughput]\ncpu = { float32 = -1.0 }\n", "positive number"),
        ("[compute.throughput]\ncpu = { fp8 = 1.0 }\n", "unknown dtype"),
        ("[compute.op_overhead_us]\njit = 1.0\n", "unknown runtime"),
    ]:
        with pytest.raises(ProfileError, match=words):
            parse_profile(_profile(bad), "p.toml")


def test_plan_reports_time_per_phase_and_the_run(tmp_path):
    """blockskip-plan's JSON carries seconds per photo, sample, step and checkpoint, and the run's total
    is photos x per photo + K x per sample + steps x per step + checkpoints x per checkpoint."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockskip.export.plan_cli",
            "--model",
            "tiny-random",
            "--profile",
            "desktop-cpu",
            "--json",
            "-n",
            "1",
            "-m",
            "1",
            "--rank",
            "4",
            "--span",
            "resident",
            "--s-min",
            "64",
            "--s-max",
            "128",
            "--samples",
            "8",
            "--steps",
            "30",
            "--photos",
            "3",
            "--checkpoint-every",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["predicted_seconds"]
    for k in ("precompute_per_photo", "precompute_per_sample", "train_per_step", "save_per_checkpoint"):
        assert t[k] > 0, k
    want = (
        3 * t["precompute_per_photo"]
        + 8 * t["precompute_per_sample"]
        + 30 * t["train_per_step"]
        + 4 * t["save_per_checkpoint"]
    )
    assert math.isclose(t["total"], want, rel_tol=1e-9)
    # without per-op overhead (the tiny model's time is mostly that), a step at twice the side (4x the
    # tokens) takes more than twice as long
    from importlib import resources

    text = (resources.files("blockskip.profiles") / "desktop-cpu.toml").read_text()
    assert "\ntorch = 20.0" in text
    (tmp_path / "roof.toml").write_text(text.replace("\ntorch = 20.0", "\ntorch = 0.0"))
    steps = []
    for side in (64, 128):
        r2 = subprocess.run(
            [
                sys.executable,
                "-m",
                "blockskip.export.plan_cli",
                "--model",
                "tiny-random",
                "--profile",
                str(tmp_path / "roof.toml"),
                "--json",
                "-n",
                "1",
                "-m",
                "1",
                "--rank",
                "4",
                "--span",
                "resident",
                "--s-min",
                str(side),
                "--s-max",
                "128",
                "--samples",
                "8",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r2.returncode == 0, r2.stderr
        steps.append(json.loads(r2.stdout)["predicted_seconds"]["train_per_step"])
    assert steps[1] > 2 * steps[0] and steps[0] < t["train_per_step"]


def test_calibrate_writes_a_profile_that_loads(tmp_path):
    out = tmp_path / "mine.toml"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockskip.export.plan_cli",
            "--profile",
            "desktop-cpu",
            "--calibrate",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    p = load_profile(out)
    assert p.name == "desktop-cpu-calibrated" and p.throughput["cpu"]["float32"] > 0.5
    assert p.op_overhead_us["torch"] > 0 and p.bandwidth_gbs > 0.1


def _plan(*args):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockskip.export.plan_cli",
            "--model",
            "tiny-random",
            "--profile",
            "desktop-cpu",
            "--s-max",
            "128",
            "--samples",
            "8",
            "--steps",
            "200",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r


def test_a_time_budget_moves_the_search_to_a_faster_plan():
    """--max-minutes: the plan the search picks without it is too slow for a budget just under its own
    predicted run; with it the search skips more blocks or trains smaller crops, and the plan it picks is
    predicted within the budget. An impossible budget is refused with the fastest plan's time."""
    free = _plan("--json")
    assert free.returncode == 0, free.stderr
    out = json.loads(free.stdout)
    total = out["predicted_seconds"]["total"]
    budget = 0.9 * total
    r = _plan("--json", "--max-minutes", str(budget / 60))
    assert r.returncode == 0, r.stderr
    fast = json.loads(r.stdout)
    assert fast["predicted_seconds"]["total"] <= budget
    p, q = out["plan"], fast["plan"]
    assert (q["front_skip"] + q["back_skip"], -q["s_min"]) > (p["front_skip"] + p["back_skip"], -p["s_min"])
    r = _plan("--max-minutes", "0.00001")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no plan fits" in r.stderr and "minutes" in r.stderr


def test_the_device_compares_its_step_time_with_the_prediction(tmp_path, photos):
    """The export writes its predicted seconds into the manifest; device-train prints the prediction
    before training and keeps it next to the measured step times in its log."""
    from blockskip.runtime.bundle import Bundle

    def run(*argv):
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    run(
        "-m",
        "blockskip.export.cli",
        "--model",
        "tiny-random",
        "--profile",
        "desktop-cpu",
        "--prompt",
        "a photo",
        "-n",
        "1",
        "-m",
        "1",
        "--s-min",
        "64",
        "--s-max",
        "128",
        "--samples",
        "2",
        "--steps",
        "3",
        "-o",
        str(tmp_path / "b"),
    )
    sec = Bundle(tmp_path / "b").manifest["memory"]["seconds"]
    assert sec["train_per_step"] > 0 and sec["precompute_per_sample"] > 0
    run(
        "-m",
        "blockskip.device_train.cli",
        "precompute",
        str(tmp_path / "b"),
        "--images",
        str(photos),
        "--cache",
        str(tmp_path / "c"),
    )
    r = run(
        "-m",
        "blockskip.device_train.cli",
        "train",
        str(tmp_path / "b"),
        "--cache",
        str(tmp_path / "c"),
        "-o",
        str(tmp_path / "o"),
    )
    assert f"{sec['train_per_step']:.3g} s a step" in r.stderr and "step time: measured" in r.stderr
    log = json.loads((tmp_path / "o" / "train_log.json").read_text())
    assert log["predicted_step_seconds"] == sec["train_per_step"] and len(log["step_seconds"]) == 3
