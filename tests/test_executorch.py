"""ExecuTorch training: ``--format pte`` bundles and the ``executorch`` backend against the torch backend."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import build

pytest.importorskip("executorch.extension.training")

from blockskip.device_train import cli as device_cli  # noqa: E402
from blockskip.device_train.app import run_precompute, run_train  # noqa: E402
from blockskip.export import onnx_export  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model, wrap_model  # noqa: E402
from blockskip.runtime.backends.executorch import AdamW, EtTrainer  # noqa: E402
from blockskip.runtime.backends.torch import TrainedSpan, blocks_to_run  # noqa: E402
from blockskip.runtime.backends.torch_io import BlockStore  # noqa: E402
from blockskip.runtime.bundle import Bundle  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

PLAN = dict(s_min=32, s_max=64, num_samples=6, steps=10, lr=3e-3, weight_decay=0.05, lora_rank=4,
            lora_alpha=8.0, checkpoint_every=3)
FAMILIES = {  # tiny model -> (front skip, back skip): a trained middle with a residual after it
    "flux": (1, 2), "sd3": (1, 1), "sd35": (1, 1), "sana": (1, 1),
}
FULL = ("flux", "none")  # the one bundle that also carries the per-block precompute programs
RUNS = [(name, delegate) for delegate in ("none", "xnnpack") for name in FAMILIES]


def export_pte(root, name, delegate, photos, blocks=True):
    """torch + pte bundle of the tiny ``name`` model, its cache precomputed with the torch backend.
    Without ``blocks`` the bundle has no per-block precompute programs (the training tests need only
    the training program; lowering every block is most of an export's time)."""
    n, m = FAMILIES[name]
    with pytest.MonkeyPatch.context() as mp:
        if not blocks:
            mp.setattr(onnx_export, "block_io_examples", lambda *a, **k: [])
        export_bundle(wrap_model(build(name), name), Plan(front_skip=n, back_skip=m, **PLAN),
                      load_profile("desktop-cpu"), "a photo of sks cat", root / "bundle", formats=["torch", "pte"],
                      delegate=delegate)
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    return Bundle(root / "bundle")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, photos):
    """(name, delegate) -> (root, bundle), exported on first use: each bundle once per module."""
    made = {}

    def get(name, delegate):
        if (name, delegate) not in made:
            root = tmp_path_factory.mktemp(f"et-{name}-{delegate}")
            made[name, delegate] = root, export_pte(root, name, delegate, photos, blocks=(name, delegate) == FULL)
        return made[name, delegate]

    return get


@pytest.fixture(scope="module", params=RUNS, ids=[f"{n}-{d}" for n, d in RUNS])
def family_run(request, bundles):
    name, delegate = request.param
    return (name, delegate, *bundles(name, delegate))


@pytest.fixture(scope="module")
def torch_logs():
    """The torch backend's 10-step log per family (the same for both delegates' bundles)."""
    return {}


def _torch_log(torch_logs, name, root):
    if name not in torch_logs:
        torch_logs[name] = run_train(root / "bundle", root / "cache", root / "out-torch", backend="torch", quiet=True)
    return torch_logs[name]


def _random_lora(trainer: EtTrainer, span: TrainedSpan, seed: int = 1):
    """Both sides start from the same non-zero LoRA (B starts at zero otherwise: A's gradient would be 0)."""
    rng = np.random.default_rng(seed)
    params = dict(span.model.named_parameters())
    for n, p in trainer.parameters().items():
        v = torch.from_numpy((rng.standard_normal(tuple(p.shape)) * 0.1).astype(np.float32))
        with torch.no_grad():
            p.copy_(v)
            params[n].copy_(v)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_one_step_equals_torch(family_run):
    """Loss, every LoRA gradient and the updated LoRA after one AdamW step match the torch backend."""
    name, delegate, root, bundle = family_run
    trainer = EtTrainer(bundle)
    span = TrainedSpan(BlockStore(bundle), bundle.trained, bundle.manifest["lora"], seed=bundle.plan.seed)
    _random_lora(trainer, span)
    entry = load_file(root / "cache" / "entry_00000.safetensors")

    loss_et = trainer.loss_and_grad(entry)
    loss_t = span.loss(entry)
    loss_t.backward()
    assert abs(loss_et - loss_t.item()) <= 1e-5 * abs(loss_t.item()), (loss_et, loss_t.item())
    params = dict(span.model.named_parameters())
    g_et = {n: g.numpy().copy() for n, g in trainer.grads().items()}
    g_t = {n: params[n].grad.numpy() for n in g_et}
    assert set(g_et) == set(trainer.sec["lora"])
    flat = np.concatenate([g_et[n].ravel() for n in g_et]), np.concatenate([g_t[n].ravel() for n in g_et])
    assert _rel(*flat) <= 1e-5, f"{name}/{delegate}: LoRA gradients differ by {_rel(*flat):.2e} (relative)"
    assert all(np.abs(g_t[n]).max() > 0 for n in g_t), "every LoRA tensor must get a gradient"
    for n in g_et:  # each tensor on its own, at float32 round-off of its own scale
        assert _rel(g_et[n], g_t[n]) <= 1e-4, (n, _rel(g_et[n], g_t[n]))

    before = {n: params[n].detach().clone() for n in g_et}
    trainer.update()
    # torch's AdamW on the same gradients (Adam's first step is ~lr*sign(g), so a gradient that is tiny
    # next to eps would turn float32 round-off into visible differences; the gradients are compared above)
    with torch.no_grad():
        for n in g_et:
            params[n].grad.copy_(torch.from_numpy(g_et[n]))
    opt = trainer.sec["optimizer"]
    torch_opt = torch.optim.AdamW(span.params, lr=bundle.plan.lr, weight_decay=opt["weight_decay"],
                                  betas=tuple(opt["betas"]), eps=opt["eps"], foreach=False)
    torch_opt.step()
    after = trainer.parameters()
    for n in g_et:
        np.testing.assert_allclose(after[n].numpy(), params[n].detach().numpy(), rtol=1e-6, atol=1e-8)
        assert (after[n] - before[n]).abs().max() > 0.5 * bundle.plan.lr  # and the step moved it
    # the program computes with the updated weights: its loss is torch's loss at the new LoRA
    loss_et = trainer.loss_and_grad(entry)
    with torch.no_grad():
        loss_t = span.loss(entry).item()
    assert abs(loss_et - loss_t) <= 1e-5 * abs(loss_t), (loss_et, loss_t)


def test_ten_steps_track_torch(family_run, torch_logs):
    name, delegate, root, bundle = family_run
    log_et = run_train(root / "bundle", root / "cache", root / "out-et", backend="executorch", quiet=True)
    log_t = _torch_log(torch_logs, name, root)
    a, b = np.array(log_et["losses"]), np.array(log_t["losses"])
    assert log_et["backend"] == "executorch" and log_et["delegate"] == delegate
    assert len(a) == len(b) == PLAN["steps"] and len(log_et["step_seconds"]) == PLAN["steps"]
    assert log_et["peak_rss_mib"] > 0
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert b.min() < b[0]  # it trains (the curve is not flat)
    le, lt = load_file(root / "out-et" / "lora.safetensors"), load_file(log_t["lora"])
    assert le.keys() == lt.keys()
    for k in le:
        np.testing.assert_allclose(le[k].numpy(), lt[k].numpy(), rtol=1e-3, atol=1e-5)
    with safe_open(root / "out-et" / "lora.safetensors", "pt") as f_et, safe_open(log_t["lora"], "pt") as f_t:
        assert f_et.metadata() == f_t.metadata()


def test_adamw_matches_torch_over_steps():
    """The backend's AdamW is torch.optim.AdamW(foreach=False), step for step (bias corrections, decay)."""
    g = torch.Generator().manual_seed(0)
    p0 = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}
    ours = {n: v.clone() for n, v in p0.items()}
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in p0.items()}
    opt = AdamW(3e-3, (0.9, 0.999), 1e-8, 0.05)
    topt = torch.optim.AdamW(list(ref.values()), lr=3e-3, weight_decay=0.05, foreach=False)
    for _ in range(7):
        grads = {n: torch.randn(v.shape, generator=g) for n, v in p0.items()}
        opt.step(ours, grads)
        for n, p in ref.items():
            p.grad = grads[n].clone()
        topt.step()
    for n in p0:
        torch.testing.assert_close(ours[n], ref[n].detach(), rtol=0, atol=0)
        st = topt.state[ref[n]]
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[n][k], st[k], rtol=0, atol=0)


@pytest.fixture(scope="module")
def full_run(bundles):
    """The flux bundle with every program (blocks and encoder too), its cache made by the torch backend."""
    return bundles(*FULL)


def test_pte_section(full_run):
    root, bundle = full_run
    sec = bundle.manifest["pte"]
    assert sec["delegate"] == "none" and sec["train"]["inputs"][-1] == "loss_scale"
    # precompute runs only the blocks it needs, up to the end of the back skip (here: all of them)
    assert len(sec["blocks"]) == blocks_to_run(bundle.trained, len(bundle.manifest["model"]["blocks"])) == 5
    for rel in [sec["train"]["file"], sec["train"]["data"], sec["encoder"]["file"]] + [b["file"] for b in sec["blocks"]]:
        assert bundle.path(rel).is_file()


def test_device_train_cli_executorch_end_to_end(full_run, photos, capfd):
    """device-train run --backend executorch: the ExecuTorch precompute writes the torch backend's cache,
    training writes a LoRA that loads into the full diffusers model, and stderr stays free of loader noise."""
    root, bundle = full_run
    out = root / "out-cli"
    rc = device_cli.main(["run", str(root / "bundle"), "--images", str(photos), "-o", str(out),
                          "--backend", "executorch", "--quiet"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    # ExecuTorch's native [cpuinfo_utils.cpp] lines: whether they show up here depends on what this test
    # process ran before (the fixtures' exports); test_train_output_is_clean_in_a_fresh_process checks them
    for noise in ("torchao", "ExperimentalWarning", "Traceback"):
        assert noise not in captured.err, captured.err
    log = json.loads((out / "train_log.json").read_text())
    assert log["backend"] == "executorch" and len(log["losses"]) == PLAN["steps"]
    cache = json.loads((out / "cache" / "index.json").read_text())
    assert cache["max_resident_blocks"] == 1  # one block program loaded at a time
    # the same cache as the torch backend's precompute
    for k in range(PLAN["num_samples"]):
        a = load_file(out / "cache" / f"entry_{k:05d}.safetensors")
        b = load_file(root / "cache" / f"entry_{k:05d}.safetensors")
        assert a.keys() == b.keys()
        for n in a:
            np.testing.assert_allclose(a[n].numpy(), b[n].numpy(), rtol=1e-4, atol=2e-5, err_msg=f"entry {k} {n}")
    # the LoRA loads into the full diffusers model: no missing, no unexpected keys
    path = out / "lora.safetensors"
    sd = load_file(path)
    full = build("flux")
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}
    assert any(v.abs().max() > 0 for k, v in sd.items() if ".lora_B." in k)  # it trained


def test_train_output_is_clean_in_a_fresh_process(full_run, tmp_path):
    """The loader warnings (torchao, experimental APIs) and the native runtime's cpuinfo lines (printed
    once per process, when its thread pool starts) stay out of device-train's output."""
    root, bundle = full_run
    r = subprocess.run([sys.executable, "-m", "blockskip.device_train.cli", "train", str(root / "bundle"), "--cache",
                        str(root / "cache"), "-o", str(tmp_path / "o"), "--backend", "executorch", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "LoRA written to" in r.stdout
    assert r.stderr.strip() == "", r.stderr


def test_resume_equals_uninterrupted(full_run, tmp_path):
    root, bundle = full_run
    full = run_train(root / "bundle", root / "cache", tmp_path / "a", backend="executorch", quiet=True)
    part = run_train(root / "bundle", root / "cache", tmp_path / "b", backend="executorch", quiet=True, stop_after=4)
    assert len(part["losses"]) == 4 and not (tmp_path / "b" / "lora.safetensors").exists()
    # checkpoint_every=3: the run stopped after step 4 with its checkpoint at step 3
    rest = run_train(root / "bundle", root / "cache", tmp_path / "b", backend="executorch", quiet=True)
    assert rest["resumed_from"] == 3 and rest["backend"] == "executorch"
    np.testing.assert_allclose(rest["losses"], full["losses"], rtol=1e-6)
    a, b = load_file(tmp_path / "a" / "lora.safetensors"), load_file(tmp_path / "b" / "lora.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-8)


def test_checkpoints_move_between_torch_and_executorch(full_run, tmp_path):
    """The two backends write the same checkpoint file (same tensors, same AdamW): a torch run resumed by
    the executorch backend, and the other way round, follow the uninterrupted torch run."""
    root, bundle = full_run
    full = run_train(root / "bundle", root / "cache", tmp_path / "t", backend="torch", quiet=True)
    run_train(root / "bundle", root / "cache", tmp_path / "te", backend="torch", quiet=True, stop_after=4)
    run_train(root / "bundle", root / "cache", tmp_path / "et", backend="executorch", quiet=True, stop_after=4)
    keys = {}
    for d in ("te", "et"):
        with safe_open(tmp_path / d / "checkpoint" / "checkpoint.safetensors", "pt") as f:
            keys[d] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            assert f.metadata()["step"] == "3"
    assert keys["te"] == keys["et"]  # the same names and shapes
    te = run_train(root / "bundle", root / "cache", tmp_path / "te", backend="executorch", quiet=True)
    et = run_train(root / "bundle", root / "cache", tmp_path / "et", backend="torch", quiet=True)
    assert te["resumed_from"] == et["resumed_from"] == 3
    assert te["backend"] == "executorch" and et["backend"] == "torch"
    np.testing.assert_allclose(te["losses"], full["losses"], rtol=1e-4)
    np.testing.assert_allclose(et["losses"], full["losses"], rtol=1e-4)
    ref = load_file(tmp_path / "t" / "lora.safetensors")
    for d in ("te", "et"):
        lo = load_file(tmp_path / d / "lora.safetensors")
        for k in ref:
            np.testing.assert_allclose(lo[k].numpy(), ref[k].numpy(), rtol=1e-3, atol=1e-5)


def test_grad_accumulation_tracks_torch(full_run, tmp_path, photos):
    """grad_accum=2 (a plan setting; the training program takes the loss scale as an input): the summed,
    scaled micro-step gradients give torch's steps."""
    root, _ = full_run
    shutil.copytree(root / "bundle", tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    manifest["plan"]["grad_accum"] = 2
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    run_precompute(tmp_path / "bundle", photos, tmp_path / "cache", quiet=True)
    et = run_train(tmp_path / "bundle", tmp_path / "cache", tmp_path / "et", backend="executorch", quiet=True)
    t = run_train(tmp_path / "bundle", tmp_path / "cache", tmp_path / "t", backend="torch", quiet=True)
    assert et["plan"]["grad_accum"] == t["plan"]["grad_accum"] == 2
    np.testing.assert_allclose(et["losses"], t["losses"], rtol=1e-4)
    a, b = load_file(tmp_path / "et" / "lora.safetensors"), load_file(tmp_path / "t" / "lora.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-3, atol=1e-5)


def test_checkpoint_of_other_photos_is_refused(full_run, tmp_path, capsys):
    root, bundle = full_run
    from conftest import write_photos

    run_train(root / "bundle", root / "cache", tmp_path / "o", backend="executorch", quiet=True, stop_after=3)
    other = write_photos(tmp_path / "other", n=2, size=(130, 140))
    run_precompute(root / "bundle", other, tmp_path / "cache2", quiet=True)
    rc = device_cli.main(["train", str(root / "bundle"), "--cache", str(tmp_path / "cache2"), "-o", str(tmp_path / "o"),
                          "--backend", "executorch"])
    err = capsys.readouterr().err
    assert rc == 2 and "other photos" in err and "Traceback" not in err, err


def test_ort_checkpoint_is_refused(full_run, tmp_path, capsys):
    root, bundle = full_run
    (tmp_path / "o" / "checkpoint").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint" / "ort_checkpoint").write_bytes(b"x")
    rc = device_cli.main(["train", str(root / "bundle"), "--cache", str(root / "cache"), "-o", str(tmp_path / "o"),
                          "--backend", "executorch"])
    err = capsys.readouterr().err
    assert rc == 2 and "ort backend" in err and "--backend ort" in err, err


def test_executorch_backend_refuses_bundle_without_pte(photos, tmp_path, capsys):
    export_bundle(load_model("tiny-random"), Plan(front_skip=1, back_skip=2, **PLAN), load_profile("desktop-cpu"),
                  "a photo of sks cat", tmp_path / "bundle")
    rc = device_cli.main(["run", str(tmp_path / "bundle"), "--images", str(photos), "-o", str(tmp_path / "o"),
                          "--backend", "executorch"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format pte" in err and "Traceback" not in err, err
    run_precompute(tmp_path / "bundle", photos, tmp_path / "cache", quiet=True)
    rc = device_cli.main(["train", str(tmp_path / "bundle"), "--cache", str(tmp_path / "cache"),
                          "-o", str(tmp_path / "o"), "--backend", "executorch"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format pte" in err and "Traceback" not in err, err
