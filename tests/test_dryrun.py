"""Memory dry run: prediction vs the real CPU allocator, phases, budget, plan search, CLI."""

import json
import subprocess
import sys

import pytest

from blockskip.device_train.app import run_precompute
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model
from blockskip.export.memory.dryrun import dry_run
from blockskip.export.memory.measure import measure_train_step
from blockskip.export.memory.search import evaluate, require_fit, search, split_for
from blockskip.export.memory.specs import load_spec
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.errors import PlanError
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile, parse_profile


@pytest.mark.parametrize(
    "kw",
    [
        dict(front_skip=1, back_skip=2, s_min=64),
        dict(s_min=128, patch_sampling=False),
        dict(front_skip=1, back_skip=1, s_min=64, checkpointing=True),
    ],
)
def test_prediction_matches_the_cpu_allocator(kw, photos, tmp_path):
    plan = Plan(s_max=128, num_samples=2, **kw)
    export_bundle(load_model("tiny-random"), plan, load_profile("desktop-cpu"), "a photo", tmp_path / "b")
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    spec, _ = load_spec("tiny-random")
    pred = dry_run(spec, plan, Bundle(tmp_path / "b").manifest["lora"])[1].tensor_peak
    m = measure_train_step(tmp_path / "b", tmp_path / "c")
    measured = m["live0"] + m["alloc_delta"]
    assert m["alloc_delta"] > 0
    assert abs(pred / measured - 1) < 0.02, (pred, measured)


def _lora(spec, plan):
    from blockskip.export.families import lora_target_names

    trained = plan.trained_indices(spec.family.num_blocks)
    return {"rank": plan.lora_rank, "alpha": plan.alpha, "targets": lora_target_names(spec.family, trained)}


def test_phases_and_categories_make_sense():
    spec, _ = load_spec("tiny-random")
    full = Plan(s_min=128, s_max=128, patch_sampling=False, num_samples=2)
    skip = Plan(front_skip=2, back_skip=2, s_min=64, s_max=128, num_samples=2)
    pf, tf, sf = dry_run(spec, full, _lora(spec, full))
    ps, ts, ss = dry_run(spec, skip, _lora(spec, skip))
    assert [p.phase for p in (pf, tf, sf)] == ["precompute", "train", "save"]
    # fewer trained blocks: less span base and LoRA; lower resolution: fewer activations
    assert ts.tensors["trained_base"] < tf.tensors["trained_base"]
    assert ts.tensors["lora"] < tf.tensors["lora"]
    assert ts.tensors["activations"] < tf.tensors["activations"]
    # step 2 holds AdamW state: two moments per LoRA parameter
    assert tf.tensors["optimizer"] == pytest.approx(2 * tf.tensors["lora"], rel=0.05)
    # precompute streams one block: its frozen weights are at most the largest block plus the embedders
    assert 0 < pf.tensors["frozen_weights"] < tf.tensors["trained_base"]
    assert pf.extra["cache_entry_bytes"] > 0 and ps.extra["cache_entry_bytes"] < pf.extra["cache_entry_bytes"]


def test_profile_overheads_and_budget_are_applied():
    spec, _ = load_spec("tiny-random")
    prof = load_profile("snapdragon8")
    plan = Plan(front_skip=1, back_skip=1, s_min=64, s_max=128, num_samples=2)
    bare = dry_run(spec, plan, _lora(spec, plan))[1]
    dev = dry_run(spec, plan, _lora(spec, plan), prof)[1]
    assert dev.budget == prof.budget_bytes
    assert dev.overhead == pytest.approx(
        prof.fixed_overhead_bytes + prof.allocator_slack * dev.tensor_peak, abs=1
    )
    assert dev.peak == dev.tensor_peak + dev.overhead and dev.fits
    # the safety margin is inside the overhead, reported apart from the process's own peak
    assert dev.margin == int(prof.safety_margin_mib * 2**20) > 0
    assert dev.process_peak == dev.peak - dev.margin
    assert dev.to_dict()["process_peak"] == dev.process_peak
    from blockskip.export.memory.report import table

    head, _, row = table([dev]).splitlines()
    cols = {  # fixed-width columns of 10 after the phase's 15
        head[i : i + 10].strip(): float(row[i : i + 10]) for i in range(15, len(head), 10)
    }
    assert cols["margin"] == pytest.approx(prof.safety_margin_mib, abs=0.01)
    assert cols["peak"] == pytest.approx(dev.process_peak / 2**20, abs=0.01)
    assert cols["budget"] - cols["peak"] - cols["margin"] == pytest.approx(cols["headroom"], abs=0.03)
    assert dev.tensor_peak >= bare.tensor_peak  # 64-byte rounding only adds


def _profile(budget_mib: float):
    return parse_profile(_profile_text(budget_mib / 1024), "tight.toml")


def test_search_picks_the_most_capable_fitting_plan_and_explains_the_next():
    spec, _ = load_spec("tiny-random")
    base = Plan(s_min=64, s_max=128, num_samples=2)
    roomy = search(spec, base, _profile(1000), ratios=(0.0, 0.5), quants=("none",), checkpointing=(False,))
    assert roomy.best is not None and roomy.best.plan.front_skip == 0 and roomy.best.plan.back_skip == 0
    full = roomy.best.peak
    # a budget just below the no-skip plan forces skipping; the no-skip plan is reported as the next bigger
    tight = search(
        spec,
        base,
        _profile((full - 1) / 2**20),
        ratios=(0.0, 0.5),
        ranks=(16,),
        quants=("none",),
        checkpointing=(False,),
    )
    assert tight.best is not None and tight.best.plan.front_skip + tight.best.plan.back_skip > 0
    assert tight.best.fits and tight.next_bigger is not None and not tight.next_bigger.fits
    assert tight.best.peak < full <= tight.next_bigger.peak


def test_budget_below_the_minimum_says_what_the_minimum_is():
    spec, _ = load_spec("tiny-random")
    prof = _profile(0.5)
    res = search(
        spec,
        Plan(s_min=64, s_max=128, num_samples=2),
        prof,
        ratios=(0.5,),
        ranks=(4,),
        quants=("none",),
        checkpointing=(True,),
    )
    assert res.best is None
    with pytest.raises(PlanError, match=r"smallest traced plan .* needs \d+\.\d+ GiB"):
        require_fit(res, prof)


def test_split_for_uses_the_paper_splits_for_flux():
    assert [split_for(57, r) for r in (0.3, 0.4, 0.5)] == [(7, 10), (13, 10), (19, 10)]
    n, m = split_for(24, 0.5)
    assert n + m == 12 and 0 < m < n


def test_known_full_size_specs_build_without_weights():
    for name, blocks in [("flux-dev", 57), ("sd3-medium", 24), ("sd35-medium", 24), ("sana-1.6b", 20)]:
        spec, d = load_spec(name)
        assert spec.family.num_blocks == blocks and d["s_max"] >= 512


def test_plan_cli_json_and_plot(tmp_path):
    png = tmp_path / "chart.png"
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
            "--plot",
            str(png),
            "--s-min",
            "64",
            "--s-max",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and [p["phase"] for p in out["phases"]] == ["precompute", "train", "save"]
    assert out["plan"]["front_skip"] == 0 and out["plan"]["back_skip"] == 0  # 16 GiB: nothing to skip
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_cli_refuses_an_impossible_budget(tmp_path):
    prof = tmp_path / "tiny-budget.toml"
    prof.write_text(_profile_text(0.001))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockskip.export.plan_cli",
            "--model",
            "tiny-random",
            "--profile",
            str(prof),
            "--s-min",
            "64",
            "--s-max",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no plan fits" in r.stderr and "smallest traced plan" in r.stderr


def _profile_text(budget_gib: float, backends=("torch-cpu",)) -> str:
    return (
        f"name = 'tight'\ndescription = 'x'\n[memory]\nram_gib = 24.0\nbudget_gib = {budget_gib!r}\n"
        "runtime_overhead_mib = 0.0\ncuda_context_mib = 0.0\nallocator_slack = 0.0\nsafety_margin_mib = 0.0\n"
        "alloc_round_bytes = 64\nbandwidth_gbs = 50.0\n[storage]\ncache_budget_gib = 1.0\nread_mbs = 100.0\n"
        "[compute]\ndefault_dtype = 'float32'\n[compute.dtypes]\ncpu = ['float32']\n"
        f"[backends]\navailable = {list(backends)!r}\n"
    )


def test_evaluate_flags_over_budget_phases():
    spec, _ = load_spec("tiny-random")
    c = evaluate(spec, Plan(s_min=64, s_max=128, num_samples=2), _profile(1))
    assert not c.fits and c.worst().phase in ("train", "precompute")


def test_the_torch_encoder_stage_counts_each_weight_from_its_first_use(tmp_path):
    """The torch backend reads the encoder with safetensors' ``load_file``, which maps the file: a weight's
    pages become resident when the encoder first reads it, so at a peak in the first, full-resolution stage
    the deep stages' weights are not in memory (SANA-1.6B's DC-AE at 1024 px: 552 MiB of weights, the
    precompute peaked 526 MiB under a prediction that counted them all; now -0.7%). The trace's encoder
    stage is what a fresh process grows by to load and run it, within 5% (here 1557 MiB predicted, 1582
    measured, with 37 of 93 MiB of weights read at the peak)."""
    import dataclasses

    from safetensors.torch import save_file
    from tiny_models import tiny_vae

    from blockskip.export.memory.dryrun import trace_precompute

    # a 128-channel first stage (SANA's) at full resolution, where the peak is; wide deep stages
    vae = tiny_vae("AutoencoderDC", 8, encoder_channels=(128, 512, 1024), downsample="pixel_unshuffle").eval()
    enc_spec = {
        "class": "AutoencoderDC",
        "config": dict(vae.config),
        "scaling_factor": 0.41,
        "shift_factor": None,
    }
    weights = {k: v.contiguous() for k, v in vae.encoder.state_dict().items()}
    save_file({f"encoder.{k}": v for k, v in weights.items()}, str(tmp_path / "e.safetensors"))
    total = sum(v.numel() * v.element_size() for v in weights.values())
    side = 512
    spec = dataclasses.replace(load_spec("tiny-random")[0], encoder_spec=enc_spec, vae_factor=4)
    plan = Plan(front_skip=1, back_skip=1, s_min=side // 2, s_max=side, num_samples=1)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        pre = trace_precompute(spec, plan, [2], None, num_images=1)
    expected = pre.encoder_peak - pre.encoder_by_cat.get("cache", 0)
    assert pre.encoder_by_cat["frozen_weights"] < total / 2  # the deep weights are not yet read at the peak
    code = (
        "import json, resource, sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from blockskip.runtime.backends.torch_families.base import materialize\n"
        "from blockskip.runtime.backends.torch_families.latent import build_encoder_skeleton, encode_images\n"
        "from blockskip.runtime.memory import rss_bytes\n"
        "spec = json.loads(sys.argv[2]); enc = build_encoder_skeleton(spec)\n"
        f"x = torch.rand(1, 3, {side}, {side}) * 2 - 1; before = rss_bytes()\n"
        "materialize(enc, load_file(sys.argv[1]))\n"
        "with torch.no_grad(): encode_images(enc.eval(), spec, x)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "e.safetensors"), json.dumps(enc_spec)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    grown = int(r.stdout.split()[-1])
    assert abs(grown - expected) < 0.05 * expected, (grown, expected, total, pre.encoder_by_cat)


def _deep_spec(name: str):
    """A tiny model of ``name``'s family with runs of several blocks of each shape (what composing needs)."""
    from tiny_models import TINY_CONFIGS

    from blockskip.export.memory.dryrun import ModelSpec
    from blockskip.runtime.backends.torch_families import get_family

    cfg = dict(TINY_CONFIGS[name])
    if name == "flux":
        cfg.update(num_layers=5, num_single_layers=6)
    else:
        cfg.update(num_layers=9)
    fam = get_family({"flux": "flux", "sd35": "sd3", "sana": "sana"}[name], cfg)
    text = cfg.get("joint_attention_dim") or cfg["caption_channels"]
    prompt = {"prompt_embeds": (1, 8, text)}
    if "pooled_projection_dim" in cfg:
        prompt["pooled"] = (1, cfg["pooled_projection_dim"])
    channels = cfg["in_channels"] // 4 if name == "flux" else cfg["in_channels"]
    enc = {"class": "TinyAutoencoder", "config": {"factor": 4, "latent_channels": channels}}
    return ModelSpec(fam, enc, prompt, 4, name)


@pytest.mark.parametrize("name", ["flux", "sd35", "sana"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(front_skip=2, back_skip=1, checkpointing=True),
        dict(front_skip=1, base_quant="int8", grad_accum=2),
        dict(back_skip=2, base_quant="nf4", checkpointing=True),
    ],
)
def test_composed_training_trace_is_the_whole_trace(name, kw):
    """The training trace composed from short spans (a block or two of each shape) equals the whole
    span's trace to the byte: every phase, category and step peak."""
    from blockskip.export.memory import dryrun as dr

    spec = _deep_spec(name)
    plan = Plan(s_min=32, s_max=64, num_samples=2, lora_rank=4, **kw)
    trained = plan.trained_indices(spec.family.num_blocks)
    groups = dr.train_groups(spec.family, trained)
    assert max(len(g) for g in groups) > dr.COMPOSE_BLOCKS + 1  # the composition really extrapolates
    lora = _lora(spec, plan)
    whole = dry_run(spec, plan, lora, train_steps=2, compose=False)
    composed = dry_run(spec, plan, lora, train_steps=2)
    assert [r.to_dict() for r in composed] == [r.to_dict() for r in whole]
    # the time prediction's ops (every op of a step: dtype, FLOPs, bytes) compose as exactly
    assert (
        composed[1].cost["step"][0] == whole[1].cost["step"][0]
        and sum(whole[1].cost["step"][0].values()) > 100
    )


@pytest.mark.parametrize("name", ["flux", "sd35", "sana"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(num_samples=6),
        dict(num_samples=7, precompute_chunk=5, front_skip=6, back_skip=2, positions="full"),
        dict(num_samples=5, front_skip=7, back_skip=0, dtype="bfloat16"),
        dict(num_samples=4, front_skip=1, back_skip=6),
        dict(num_samples=4, front_skip=0, back_skip=0),
        dict(num_samples=4, front_skip=2, back_skip=3, back_residual=False),
    ],
)
def test_composed_precompute_trace_is_the_whole_trace(name, kw):
    """Precompute traced over a few samples (and without the repeated blocks of a run of equal ones)
    and extrapolated to the chunk equals the chunk's whole trace: the peaks (encoder, blocks, phase) with
    their bytes per category, the cache entry and the ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blockskip.export.memory import dryrun as dr

    spec = _deep_spec(name)
    plan = Plan(s_min=32, s_max=64, lora_rank=4, **kw)
    trained = plan.trained_indices(spec.family.num_blocks)
    with FakeTensorMode(allow_non_fake_inputs=True):
        # the first trace in a process also counts the encoder's constant buffers (torch.tensor of Python
        # data, made fake once per process): trace once before comparing
        dr.trace_precompute(spec, plan, trained, num_images=3, compose=False)
        whole = dr.trace_precompute(spec, plan, trained, num_images=3, compose=False)
        composed = dr.trace_precompute(spec, plan, trained, num_images=3)
    assert whole.chunk > dr.COMPOSE_SAMPLES + 1  # the composition really extrapolates
    if kw.get("front_skip", 0) >= 6 or kw.get("back_skip", 0) >= 6:  # and really elides blocks
        assert dr._elided_blocks(spec.family.skeleton(), spec.family, trained, plan)
    assert composed == whole
    assert whole.blocks_peak > whole.encoder_peak or name != "flux"  # the blocks' peak is what is composed
    assert sum(whole.blocks_cost.values()) > 100


def test_plan_and_export_take_the_same_plan_options(tmp_path):
    """``blockskip-plan`` takes exactly the plan options ``blockskip-export`` takes (one definition), and the
    same options give the same plan: a search over the built-in model with a pinned split, rank, LoRA
    targets, alpha and no patch sampling ends in the plan the export writes into its bundle."""
    import argparse

    from blockskip.export.cli import add_plan_args

    def plan_options(prog):
        r = subprocess.run(
            [sys.executable, "-m", prog, "--help"], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    p = argparse.ArgumentParser()
    add_plan_args(p)
    opts = [o for a in p._actions for o in a.option_strings if o not in ("-h", "--help")]
    for o in (
        "--skip-ratio",
        "--targets",
        "--alpha",
        "--no-patch-sampling",
        "--positions",
        "--no-residual",
        "--steps",
    ):
        assert o in opts
    for prog in ("blockskip.export.plan_cli", "blockskip.export.cli"):
        text = plan_options(prog)
        missing = [o for o in opts if o not in text]
        assert not missing, (prog, missing)
    args = [
        "--model",
        "tiny-random",
        "--profile",
        "desktop-cpu",
        "--skip-ratio",
        "0.33",
        "--rank",
        "4",
        "--alpha",
        "2",
        "--targets",
        "attn.to_q,attn.to_v",
        "--no-patch-sampling",
        "--steps",
        "7",
        "--s-min",
        "64",
        "--s-max",
        "128",
        "--samples",
        "4",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "blockskip.export.plan_cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)["plan"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockskip.export.cli",
            *args,
            "--prompt",
            "a photo",
            "-o",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    written = Bundle(tmp_path / "b").plan.to_dict()
    for key in (
        "front_skip",
        "back_skip",
        "lora_rank",
        "lora_alpha",
        "lora_targets",
        "patch_sampling",
        "steps",
        "s_min",
        "s_max",
        "span",
        "base_quant",
        "checkpointing",
        "dtype",
        "num_samples",
    ):
        assert planned[key] == written[key], key
    assert planned["lora_targets"] == ["attn.to_q", "attn.to_v"] and planned["steps"] == 7


@pytest.mark.parametrize("model", ["flux-dev", "sd35-medium", "sana-1.6b"])
def test_vae_spec_from_the_constructor_defaults_is_the_built_modules(model):
    """A shipped VAE config is read with the constructor's defaults filled in, without building the
    module: the same encoder spec as diffusers' own config of the module built from the file."""
    import json
    from importlib import resources

    import diffusers
    import torch

    from blockskip.export.families.base import vae_spec
    from blockskip.export.memory import specs

    spec, _ = specs.load_spec(model)
    vae = json.loads((resources.files("blockskip.export") / "configs" / f"{model}.json").read_text())["vae"]
    cls = vae.get("_class_name", "AutoencoderKL")
    with torch.device("meta"):
        built = dict(
            getattr(diffusers, cls).from_config({k: v for k, v in vae.items() if k[0] != "_"}).config
        )
    assert (spec.encoder_spec, spec.vae_factor) == vae_spec(cls, built)
