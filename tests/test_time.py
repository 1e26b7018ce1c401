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


def test_calibration_fit_recovers_the_figures_that_made_the_step_times():
    """``fit_step_times`` solves for the per-op overhead and the matmul efficiency from an overhead-bound
    and a compute-bound step: given step times made with known figures it returns those figures."""
    import dataclasses

    from blockskip.export.memory.cost import fit_step_times

    peak = {"float32": 200.0, "bfloat16": 400.0}
    prof = dataclasses.replace(
        load_profile("desktop-cpu"),
        bandwidth_gbs=30.0,
        throughput={"cpu": {k: v * 0.6 for k, v in peak.items()}},
        op_overhead_us={"torch": 7.0},
    )
    small = Counter({("float32", 10**5, 10**5): 900, ("float32", 0, 0): 400, ("float32", 3000, 24000): 700})
    large = Counter(
        {("float32", 4 * 10**8, 6 * 10**6): 80, ("bfloat16", 10**8, 10**6): 20, ("float32", 0, 0): 300}
    )
    times = [(c, seconds(c, prof, "cpu", "torch")) for c in (small, large)]
    overhead, eff = fit_step_times(times, peak, 30.0)
    assert math.isclose(overhead, 7e-6, rel_tol=1e-3) and math.isclose(eff, 0.6, rel_tol=1e-3)
    # a slower large step means a lower efficiency, not a higher overhead
    slower = [times[0], (large, times[1][1] * 1.5)]
    overhead2, eff2 = fit_step_times(slower, peak, 30.0)
    assert eff2 < 0.45 and math.isclose(overhead2, 7e-6, rel_tol=0.05)


def test_reads_on_a_second_thread_cost_only_what_outlasts_the_ops():
    """A streamed span reads the next block's weights while one runs (``prefetch``): the step's time is
    the slower of its ops and those reads; without prefetching it is their sum."""
    import dataclasses

    from blockskip.export.families import load_model
    from blockskip.export.memory.dryrun import timing
    from blockskip.export.memory.search import evaluate
    from blockskip.runtime.plan import Plan

    spec = load_model("tiny-random").model_spec()
    plan = Plan(
        front_skip=1, back_skip=1, s_min=64, s_max=128, lora_rank=4, span="streamed", storage="float32"
    )
    prof = load_profile("desktop-cpu")
    ahead = evaluate(spec, plan, prof, exact=False)
    serial = evaluate(spec, dataclasses.replace(plan, prefetch=False), prof, exact=False)
    (step_a, read_a, pre_a) = ahead.reports[1].cost["step"]
    (step_s, read_s, pre_s) = serial.reports[1].cost["step"]
    assert step_a == step_s and read_a + pre_a == read_s + pre_s and pre_a > read_a == 0
    ops = seconds(step_a, prof, "cpu", "torch")
    reads = (read_s + pre_s) / (prof.storage_read_mbs * 1e6)
    entry = pre_s / (prof.storage_read_mbs * 1e6)  # the cache entry is read ahead either way
    assert math.isclose(
        timing(serial.reports, prof, "torch")["train_per_step"], max(ops, entry) + reads - entry
    )
    assert math.isclose(timing(ahead.reports, prof, "torch")["train_per_step"], max(ops, reads))
    slow = dataclasses.replace(prof, storage_read_mbs=1.0)  # storage so slow the reads outlast the ops
    assert math.isclose(
        timing(ahead.reports, slow, "torch")["train_per_step"], (read_a + pre_a) / 1e6, rel_tol=1e-9
    )


def test_the_trace_counts_the_ops_a_real_step_runs(tmp_path, photos):
    """The dry run's training step has as many ops as the torch backend's real step (fake tensors'
    ``prim`` queries, thousands a step, are not ops): per-op overhead is most of a small model's time."""
    from safetensors.torch import load_file

    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.export.memory.search import evaluate
    from blockskip.runtime.backends.torch import TrainedSpan, make_optimizer
    from blockskip.runtime.backends.torch_io import BlockStore
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.cache import ResidualCache
    from blockskip.runtime.plan import Plan

    lm = load_model("tiny-random")
    plan = Plan(front_skip=1, back_skip=1, s_min=64, s_max=128, num_samples=2, lora_rank=4, steps=2)
    prof = load_profile("desktop-cpu")
    export_bundle(lm, plan, prof, "a photo of sks cat", tmp_path / "b")
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    bundle, cache = Bundle(tmp_path / "b"), ResidualCache(tmp_path / "c")
    span = TrainedSpan(BlockStore(bundle), bundle.trained, bundle.manifest["lora"], plan.seed)
    opt = make_optimizer(span.params, bundle.plan)
    entry = load_file(cache.path(0))

    def step():
        span.loss(entry).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from the second step on, as in the trace
    real = _costs(step)
    traced = evaluate(lm.model_spec(), bundle.plan, prof, exact=False).reports[1].cost["step"][0]
    n_real, n_traced = sum(real.values()), sum(traced.values())
    assert abs(n_traced - n_real) <= 0.02 * n_real, (n_traced, n_real)
    flops = lambda c: sum(f * n for (_, f, _), n in c.items())  # noqa: E731
    assert math.isclose(flops(traced), flops(real), rel_tol=0.02)


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
    import re
    from importlib import resources

    text = (resources.files("blockskip.profiles") / "desktop-cpu.toml").read_text()
    text, n = re.subn(r"(?m)^torch = [0-9.]+$", "torch = 0.0", text)
    assert n == 1
    (tmp_path / "roof.toml").write_text(text)
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
