"""The native runner (device_train/native, ``blockskip-train-native``): a C++ program over ExecuTorch's
runtime that trains a ``--format pte`` bundle's LoRA from a residual cache, against the Python
ExecuTorch training loop (same program, same cache order, PyTorch's AdamW)."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BINARY  # noqa: F401  (other test modules import it from here)
from safetensors import safe_open
from safetensors.numpy import load_file as load_np

pytest.importorskip(
    "executorch.extension.training", reason="the native runner and its reference need executorch"
)

from blockskip.device_train.app import run_precompute  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime.bundle import (
    Bundle,  # noqa: E402
    write_manifest,
)
from blockskip.runtime.cache import ResidualCache, source_digest  # noqa: E402
from blockskip.runtime.errors import BlockSkipError  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

# grad_accum 2 over 3 entries: the order wraps and every step sums two micro-steps; alpha/rank = 2 is
# folded into lora_B on save; checkpoints every 2 steps for the resume test
PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=3,
    steps=6,
    grad_accum=2,
    lr=3e-3,
    weight_decay=0.05,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=2,
)
XNN_PLAN = {**PLAN, "steps": 3, "grad_accum": 1, "num_samples": 2, "checkpoint_every": 3}


def run_native(runner: Path, bundle, cache, out, *extra, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(runner), str(bundle), "--cache", str(cache), "-o", str(out), *map(str, extra)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, f"runner failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def python_reference(bundle_dir: Path, cache_dir: Path, steps: int | None = None):
    """The Python ExecuTorch training loop: TrainingModule's forward-backward over the cache in the
    backends' order, gradients summed over the micro-steps, torch's AdamW on the program's weights.
    Returns (losses, {peft name: LoRA tensor})."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import TrainingModule

    m = json.loads((bundle_dir / "manifest.json").read_text())
    sec, plan = m["pte"]["train"], m["plan"]
    opt = sec["optimizer"]
    cache = ResidualCache(cache_dir)
    K, ga = len(cache.schedule), plan["grad_accum"]
    steps = plan["steps"] if steps is None else steps
    tm = TrainingModule(_load_for_executorch(str(bundle_dir / sec["file"]), str(bundle_dir / sec["data"])))
    names = sec["inputs"][:-1]
    scale = torch.tensor([1.0 / ga], dtype=torch.float32)
    order = [(s * ga + j) % K for s in range(steps) for j in range(ga)]
    losses, optim, pos = [], None, 0
    for _ in range(steps):
        total, gsum = 0.0, None
        for _ in range(ga):
            entry = load_np(cache.path(order[pos]))
            pos += 1
            out = tm.forward_backward("forward", [torch.from_numpy(entry[n]) for n in names] + [scale])
            total += float(out[0].reshape(-1)[0]) / float(scale[0]) / ga
            g = tm.named_gradients()
            gsum = {k: v.clone() for k, v in g.items()} if gsum is None else {k: gsum[k] + g[k] for k in gsum}
        params = tm.named_parameters()  # alias the program's mutable weights
        if optim is None:
            optim = torch.optim.AdamW(
                list(params.values()),
                lr=plan["lr"],
                betas=tuple(opt["betas"]),
                eps=opt["eps"],
                weight_decay=opt["weight_decay"],
                foreach=False,
            )
        for k, p in params.items():
            p.grad = gsum[k]
        optim.step()
        losses.append(total)
    return losses, {k: v.detach().clone().numpy() for k, v in tm.named_parameters().items()}


def _export(root: Path, plan: dict, photos: Path, delegate: str = "none") -> Path:
    export_bundle(
        load_model("tiny-random"),
        Plan(**plan),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=["torch", "pte"],
        delegate=delegate,
    )
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    return root


@pytest.fixture(scope="module")
def trained(runner, tmp_path_factory, photos):
    """A tiny --format torch,pte bundle, its cache, and one uninterrupted native run in root/full."""
    root = _export(tmp_path_factory.mktemp("native"), PLAN, photos)
    run_native(runner, root / "bundle", root / "cache", root / "full")
    return root


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def _diffusers(name: str) -> str:
    return "transformer." + name.replace(".default.", ".")


def test_losses_match_python_executorch(trained):
    log = json.loads((trained / "full" / "train_log.json").read_text())
    ref_losses, ref_params = python_reference(trained / "bundle", trained / "cache")
    assert log["backend"] == "native" and log["resumed_from"] == 0
    assert len(log["losses"]) == PLAN["steps"] == len(log["step_seconds"])
    assert _rel(log["losses"], ref_losses) <= 1e-5, (log["losses"], ref_losses)
    assert log["losses"][0] != log["losses"][-1]  # it trained
    # the LoRA it wrote is the reference's (lora_B carries alpha/rank)
    lora = load_np(trained / "full" / "lora.safetensors")
    scale = PLAN["lora_alpha"] / PLAN["lora_rank"]
    for name, ref in ref_params.items():
        got = lora[_diffusers(name)] / (scale if ".lora_B." in name else 1.0)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(ref).max())))
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if ".lora_B." in k)


def test_matches_the_executorch_backend(trained, tmp_path):
    pytest.importorskip("blockskip.runtime.backends.executorch", reason="no Python executorch backend here")
    from blockskip.device_train.app import run_train

    log = run_train(trained / "bundle", trained / "cache", tmp_path / "py", backend="executorch", quiet=True)
    native = json.loads((trained / "full" / "train_log.json").read_text())
    assert _rel(native["losses"], log["losses"]) <= 1e-5, (native["losses"], log["losses"])
    a, b = load_np(trained / "full" / "lora.safetensors"), load_np(tmp_path / "py" / "lora.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_lora_loads_into_diffusers(trained):
    path = trained / "full" / "lora.safetensors"
    sd = load_np(path)
    manifest = json.loads((trained / "bundle" / "manifest.json").read_text())
    assert set(sd) == {_diffusers(n) for n in manifest["pte"]["train"]["lora"]}
    with safe_open(path, "np") as f:
        assert f.metadata() == manifest["lora"]["metadata"]
    full = load_model("tiny-random").transformer
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}  # no missing, no unexpected keys
    params = dict(full.named_parameters())
    for k, v in sd.items():
        name = (
            k.removeprefix("transformer.")
            .replace(".lora_A.", ".lora_A.subject.")
            .replace(".lora_B.", ".lora_B.subject.")
        )
        np.testing.assert_array_equal(params[name].detach().numpy(), v)


def test_checkpoint_is_the_torch_backends_format(trained):
    from blockskip.runtime.backends.torch import TorchTrainer

    ckpt = trained / "full" / "checkpoint" / "checkpoint.safetensors"
    tensors = load_np(ckpt)
    with safe_open(ckpt, "np") as f:
        meta = f.metadata()
    names = json.loads((trained / "bundle" / "manifest.json").read_text())["pte"]["train"]["lora"]
    want = {f"{kind}.{n}" for n in names for kind in ("param", "opt.exp_avg", "opt.exp_avg_sq", "opt.step")}
    assert set(tensors) == want
    steps = PLAN["steps"]
    assert all(tensors[f"opt.step.{n}"].tolist() == [float(steps)] for n in names)
    assert meta["step"] == str(steps)
    saved = json.loads(meta["log"])
    cache_source = ResidualCache(trained / "cache").source_sha256()
    assert saved["cache_source"] == cache_source and len(saved["losses"]) == steps
    assert json.loads((trained / "full" / "train_log.json").read_text())["cache_source"] == cache_source

    # the torch backend resumes from it: weights, AdamW state and step
    trainer = TorchTrainer(Bundle(trained / "bundle"))
    step, log = trainer.load_checkpoint(ckpt)
    assert step == steps and log["losses"] == saved["losses"]
    params = dict(trainer.span.model.named_parameters())
    for n in names:
        np.testing.assert_array_equal(params[n].detach().numpy(), tensors[f"param.{n}"])
        st = trainer.opt.state[params[n]]
        assert float(st["step"]) == steps
        np.testing.assert_array_equal(st["exp_avg_sq"].numpy(), tensors[f"opt.exp_avg_sq.{n}"])


def test_schedule_and_noise_are_the_python_runtimes(runner, tmp_path):
    """`blockskip-train-native schedule` draws the patch schedule and the noise from the shared generator
    (docs/formats.md) exactly as the Python runtime does: same entries, same float32 noise."""
    from blockskip.runtime.rng import normals

    plan = Plan(front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=40, timestep_shift=3.0, seed=11)
    export_bundle(
        load_model("tiny-random"),
        plan,
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "b",
        formats=["torch"],
    )
    r = subprocess.run(
        [str(runner), "schedule", str(tmp_path / "b"), "--images", "5", "--noise-values", "33"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ref = Bundle(tmp_path / "b").schedule(5).to_json()
    assert got["entries"] == ref["entries"] and got["meta"] == ref["meta"]
    assert len({e["image"] for e in got["entries"]}) == 5 and len({e["side"] for e in got["entries"]}) > 3
    for values, e in zip(got["noise_values"], got["entries"]):
        np.testing.assert_array_equal(np.array(values, dtype=np.float32), normals(e["noise_seed"], 33))
    r = subprocess.run(
        [str(runner), "schedule", str(tmp_path / "b")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--images" in r.stderr


def test_the_cache_identity_is_checked(trained, runner, tmp_path):
    """The index records the cache's identity when it is written, and both runtimes check it is the digest
    of the source it records: an edited identity, or an index without one, is refused (exit 2), not
    trained on."""
    index = json.loads((trained / "cache" / "index.json").read_text())
    assert index["source_sha256"] == source_digest(index["source"])
    cache = tmp_path / "cache"
    shutil.copytree(trained / "cache", cache)
    index["source_sha256"] = "ab" * 32  # a stored identity no derivation would give
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(BlockSkipError, match="source_sha256 is not the digest of source"):
        ResidualCache(cache)
    r = run_native(runner, trained / "bundle", cache, tmp_path / "o", "--stop-after", 1, check=False)
    assert r.returncode == 2 and "source_sha256 is not the digest of source" in r.stderr, r.stderr
    del index["source_sha256"]  # written before the identity was stored
    (cache / "index.json").write_text(json.dumps(index))
    r = run_native(runner, trained / "bundle", cache, tmp_path / "o2", "--stop-after", 1, check=False)
    assert r.returncode == 2 and "source_sha256 is missing" in r.stderr, r.stderr
    assert not (tmp_path / "o" / "checkpoint").exists() and not (tmp_path / "o2" / "checkpoint").exists()


def test_resume_equals_uninterrupted(trained, runner, tmp_path):
    out = tmp_path / "resumed"
    r = run_native(runner, trained / "bundle", trained / "cache", out, "--stop-after", 3)
    assert "step 3/6" in r.stdout and "step 4/6" not in r.stdout
    assert not (out / "lora.safetensors").exists()
    assert len(json.loads((out / "train_log.json").read_text())["losses"]) == 3
    with safe_open(out / "checkpoint" / "checkpoint.safetensors", "np") as f:
        assert f.metadata()["step"] == "2"  # checkpoint_every 2: step 3 is not saved
    r = run_native(runner, trained / "bundle", trained / "cache", out)
    assert "resuming from step 2" in r.stdout
    log = json.loads((out / "train_log.json").read_text())
    full = json.loads((trained / "full" / "train_log.json").read_text())
    assert log["resumed_from"] == 2
    assert log["losses"] == full["losses"]
    a, b = load_np(out / "lora.safetensors"), load_np(trained / "full" / "lora.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # a finished run resumes to the end and writes the same LoRA again
    r = run_native(runner, trained / "bundle", trained / "cache", out, "--quiet")
    assert r.stdout == "" and json.loads((out / "train_log.json").read_text())["resumed_from"] == 6


def test_bad_inputs_are_refused(trained, runner, tmp_path):
    bundle, cache = trained / "bundle", trained / "cache"
    r = subprocess.run([str(runner), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--stop-after" in r.stdout
    r = subprocess.run([str(runner), str(bundle)], capture_output=True, text=True)
    assert r.returncode == 2 and "--cache" in r.stderr

    def fails(b, c, out, needle, *extra, code=1):  # 2: a damaged input
        r = run_native(runner, b, c, out, *extra, check=False)
        assert r.returncode == code and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr

    fails(tmp_path / "nothing", cache, tmp_path / "o1", "does not exist")
    # a torch-only bundle
    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    m = json.loads((bundle / "manifest.json").read_text())
    write_manifest(
        torch_only / "manifest.json", {**{k: v for k, v in m.items() if k != "pte"}, "formats": ["torch"]}
    )
    fails(torch_only, cache, tmp_path / "o2", "--format pte")
    # a cache made for another bundle
    other = tmp_path / "other_cache"
    shutil.copytree(cache, other)
    idx = json.loads((other / "index.json").read_text())
    idx["source"]["bundle"] = "0" * 64
    idx["source_sha256"] = source_digest(idx["source"])  # the identity of what it now claims
    (other / "index.json").write_text(json.dumps(idx))
    fails(bundle, other, tmp_path / "o3", "another bundle")
    # a corrupt shard
    bad = tmp_path / "bad_cache"
    shutil.copytree(cache, bad)
    shard = bad / "entry_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    fails(bundle, bad, tmp_path / "o4", "sha256", code=2)
    # a checkpoint of a run on other photos
    photos_cache = tmp_path / "photos_cache"
    shutil.copytree(cache, photos_cache)
    idx = json.loads((photos_cache / "index.json").read_text())
    idx["source"]["images"] = {"other.png": "1" * 64}
    idx["source_sha256"] = source_digest(idx["source"])  # the identity of what it now claims
    (photos_cache / "index.json").write_text(json.dumps(idx))
    out = tmp_path / "o5"
    shutil.copytree(trained / "full" / "checkpoint", out / "checkpoint")
    fails(bundle, photos_cache, out, "other photos")


@pytest.fixture(scope="module")
def xnnpack_run(runner, tmp_path_factory, photos):
    root = _export(tmp_path_factory.mktemp("native-xnnpack"), XNN_PLAN, photos, delegate="xnnpack")
    run_native(runner, root / "bundle", root / "cache", root / "out")
    return root


@pytest.mark.slow  # exporting the XNNPACK-lowered programs takes about a minute and a half
def test_xnnpack_delegated_bundle(xnnpack_run):
    root = xnnpack_run
    assert json.loads((root / "bundle" / "manifest.json").read_text())["pte"]["delegate"] == "xnnpack"
    log = json.loads((root / "out" / "train_log.json").read_text())
    ref_losses, _ = python_reference(root / "bundle", root / "cache")
    assert len(log["losses"]) == XNN_PLAN["steps"]
    assert _rel(log["losses"], ref_losses) <= 1e-5, (log["losses"], ref_losses)
