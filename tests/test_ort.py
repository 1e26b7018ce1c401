"""ONNX Runtime training: ``--format onnx`` bundles and the ``ort`` backend against the torch backend."""

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file
from tiny_models import build

pytest.importorskip("onnxruntime.training.api")

from blockskip.device_train import cli as device_cli  # noqa: E402
from blockskip.device_train.app import run_precompute, run_train  # noqa: E402
from blockskip.export import cli as export_cli  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model, wrap_model  # noqa: E402
from blockskip.runtime.backends.ort import OrtTrainer  # noqa: E402
from blockskip.runtime.backends.torch import TrainedSpan  # noqa: E402
from blockskip.runtime.backends.torch_io import BlockStore  # noqa: E402
from blockskip.runtime.bundle import Bundle  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

PLAN = dict(s_min=32, s_max=64, num_samples=6, steps=10, lr=3e-3, weight_decay=0.05, lora_rank=4,
            lora_alpha=8.0, checkpoint_every=3)
FAMILIES = {  # tiny model -> (front skip, back skip): a trained middle with a residual after it
    "flux": (1, 2), "sd3": (1, 1), "sd35": (1, 1), "sana": (1, 1),
}


def export_both(root, model, plan, photos, prompt="a photo of sks cat"):
    export_bundle(model, plan, load_profile("desktop-cpu"), prompt, root / "bundle", formats=["torch", "onnx"])
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    return Bundle(root / "bundle")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory, photos):
    name = request.param
    n, m = FAMILIES[name]
    root = tmp_path_factory.mktemp(f"ort-{name}")
    bundle = export_both(root, wrap_model(build(name), name), Plan(front_skip=n, back_skip=m, **PLAN), photos)
    return name, root, bundle


def _random_lora(trainer: OrtTrainer, span: TrainedSpan, seed: int = 1):
    """Both sides start from the same non-zero LoRA (B starts at zero otherwise: A's gradient would be 0)."""
    rng = np.random.default_rng(seed)
    params = dict(span.model.named_parameters())
    for n in trainer.sec["lora"]:
        v = (rng.standard_normal(params[n].shape) * 0.1).astype(np.float32)
        trainer.state.parameters[n] = v
        with torch.no_grad():
            params[n].copy_(torch.from_numpy(v))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def ort_adamw_reference(p, g, m, v, step, lr, wd, betas, eps):
    """ORT's CPU AdamWOptimizer kernel with adam_mode=0, written out: decay, moments, update with
    bias-corrected second moment inside the square root and the first moment's correction dividing."""
    b1, b2 = betas
    p = p - p * lr * wd
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    c1, c2 = 1 - b1**step, 1 - b2**step
    p = p - (lr * m) / (c1 * (np.sqrt(v / c2) + eps))
    return p, m, v


def test_one_step_equals_torch(family_run):
    """Loss, every LoRA gradient and the updated LoRA after one AdamW step match the torch backend."""
    name, root, bundle = family_run
    trainer = OrtTrainer(bundle)
    span = TrainedSpan(BlockStore(bundle), bundle.trained, bundle.manifest["lora"], seed=bundle.plan.seed)
    _random_lora(trainer, span)
    entry_np = load_np(root / "cache" / "entry_00000.safetensors")
    entry_t = load_file(root / "cache" / "entry_00000.safetensors")

    loss_ort = trainer.loss_and_grad(entry_np)
    loss_t = span.loss(entry_t)
    loss_t.backward()
    assert abs(loss_ort - loss_t.item()) <= 1e-5 * abs(loss_t.item())
    params = dict(span.model.named_parameters())
    g_ort, g_t = trainer.grads(), {n: params[n].grad.numpy() for n in trainer.sec["lora"]}
    flat = np.concatenate([g_ort[n].ravel() for n in g_ort]), np.concatenate([g_t[n].ravel() for n in g_ort])
    assert _rel(*flat) <= 1e-5, f"{name}: LoRA gradients differ by {_rel(*flat):.2e} (relative)"
    assert all(np.abs(g_t[n]).max() > 0 for n in g_t), "every LoRA tensor must get a gradient"
    for n in g_ort:  # each tensor on its own, at float32 round-off of its own scale
        assert _rel(g_ort[n], g_t[n]) <= 1e-4, (n, _rel(g_ort[n], g_t[n]))

    before = {n: params[n].detach().numpy().copy() for n in g_ort}
    trainer.update()
    opt = trainer.sec["optimizer"]
    plan = bundle.plan
    # torch's AdamW on the same gradients (Adam's first step is ~lr*sign(g), so a gradient that is tiny
    # next to eps would turn float32 round-off into visible differences; the gradients are compared above)
    with torch.no_grad():
        for n in g_ort:
            params[n].grad.copy_(torch.from_numpy(g_ort[n]))
    torch_opt = torch.optim.AdamW(span.params, lr=plan.lr, weight_decay=plan.weight_decay, foreach=False)
    torch_opt.step()
    for n in g_ort:
        ref, _, _ = ort_adamw_reference(before[n], g_ort[n], 0.0, 0.0, 1, plan.lr, opt["weight_decay"],
                                        opt["betas"], opt["eps"])
        after = trainer.state.parameters[n].data
        np.testing.assert_allclose(after, ref, rtol=1e-5, atol=1e-7)  # ORT did what its formula says
        np.testing.assert_allclose(after, params[n].detach().numpy(), rtol=1e-5, atol=1e-6)  # == torch AdamW
        assert np.abs(after - before[n]).max() > 0.5 * plan.lr  # and the step moved it


def test_ten_steps_track_torch(family_run):
    name, root, bundle = family_run
    log_ort = run_train(root / "bundle", root / "cache", root / "out-ort", backend="ort", quiet=True)
    log_t = run_train(root / "bundle", root / "cache", root / "out-torch", backend="torch", quiet=True)
    a, b = np.array(log_ort["losses"]), np.array(log_t["losses"])
    assert len(a) == len(b) == PLAN["steps"]
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert b.min() < b[0]  # it trains (the curve is not flat)
    lo, lt = load_np(root / "out-ort" / "lora.safetensors"), load_np(root / "out-torch" / "lora.safetensors")
    assert lo.keys() == lt.keys()
    for k in lo:
        np.testing.assert_allclose(lo[k], lt[k], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_ort(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("tiny-ort")
    plan = Plan(front_skip=1, back_skip=2, **PLAN)
    export_bundle(load_model("tiny-random"), plan, load_profile("desktop-cpu"), "a photo of sks cat", root / "bundle",
                  formats=["onnx"])
    return root


def test_onnx_only_bundle_has_no_block_safetensors(tiny_ort):
    bundle = Bundle(tiny_ort / "bundle")
    files = bundle.manifest["files"]
    assert bundle.manifest["formats"] == ["onnx"]
    assert not [f for f in files if f.startswith("model/blocks/")]
    sec = bundle.manifest["onnx"]
    assert sec["opset"] == 18 and sec["train"]["optimizer"]["adam_mode"] == 0
    import onnx

    for rel in [sec["train"]["files"][k] for k in ("training", "eval", "optimizer")] + [b["file"] for b in sec["blocks"]]:
        m = onnx.load(str(bundle.path(rel)), load_external_data=False)
        assert m.ir_version == 10, rel
        assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {18}, rel
    # precompute streams only the blocks it needs, up to the end of the back skip
    assert len(sec["blocks"]) == 6


def test_device_train_cli_ort_end_to_end(tiny_ort, photos, capsys):
    root = tiny_ort
    rc = device_cli.main(["run", str(root / "bundle"), "--images", str(photos), "-o", str(root / "out"),
                          "--backend", "ort", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    log = json.loads((root / "out" / "train_log.json").read_text())
    assert log["backend"] == "ort" and len(log["losses"]) == PLAN["steps"]
    cache = json.loads((root / "out" / "cache" / "index.json").read_text())
    assert cache["max_resident_blocks"] == 1  # one block session alive at a time
    # the LoRA loads into the full diffusers model: no missing, no unexpected keys
    path = root / "out" / "lora.safetensors"
    sd = load_file(path)
    full = load_model("tiny-random").transformer
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}
    assert any(v.abs().max() > 0 for k, v in sd.items() if ".lora_B." in k)  # it trained


def test_torch_backend_refuses_onnx_only_bundle(tiny_ort, photos, tmp_path, capsys):
    rc = device_cli.main(["run", str(tiny_ort / "bundle"), "--images", str(photos), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--backend ort" in err and "Traceback" not in err


def test_ort_backend_refuses_torch_only_bundle(photos, tmp_path, capsys):
    export_bundle(load_model("tiny-random"), Plan(front_skip=1, back_skip=2, **PLAN), load_profile("desktop-cpu"),
                  "a photo of sks cat", tmp_path / "bundle")
    rc = device_cli.main(["run", str(tmp_path / "bundle"), "--images", str(photos), "-o", str(tmp_path / "o"),
                          "--backend", "ort"])
    err = capsys.readouterr().err
    assert rc == 2 and "--format onnx" in err and "Traceback" not in err


def test_resume_equals_uninterrupted(family_run, tmp_path):
    name, root, bundle = family_run
    if name != "flux":
        pytest.skip("one family is enough for resume")
    full = run_train(root / "bundle", root / "cache", tmp_path / "a", backend="ort", quiet=True)
    part = run_train(root / "bundle", root / "cache", tmp_path / "b", backend="ort", quiet=True, stop_after=4)
    assert len(part["losses"]) == 4 and not (tmp_path / "b" / "lora.safetensors").exists()
    # checkpoint_every=3: the run stopped after step 4 with its checkpoint at step 3
    rest = run_train(root / "bundle", root / "cache", tmp_path / "b", backend="ort", quiet=True)
    assert rest["resumed_from"] == 3
    np.testing.assert_allclose(rest["losses"], full["losses"], rtol=1e-6)
    a, b = load_np(tmp_path / "a" / "lora.safetensors"), load_np(tmp_path / "b" / "lora.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-8)


def test_checkpoint_of_the_other_backend_is_refused(family_run, tmp_path, photos, capsys):
    name, root, bundle = family_run
    if name != "flux":
        pytest.skip("one family is enough")
    run_train(root / "bundle", root / "cache", tmp_path / "o", backend="torch", quiet=True, stop_after=3)
    rc = device_cli.main(["train", str(root / "bundle"), "--cache", str(root / "cache"), "-o", str(tmp_path / "o"),
                          "--backend", "ort"])
    err = capsys.readouterr().err
    assert rc == 2 and "torch backend" in err and "--backend torch" in err


def test_ort_precompute_matches_torch_precompute(family_run, tmp_path, photos):
    name, root, bundle = family_run
    run_precompute(root / "bundle", photos, tmp_path / "cache", backend="ort", quiet=True)
    for k in range(PLAN["num_samples"]):
        a = load_np(tmp_path / "cache" / f"entry_{k:05d}.safetensors")
        b = load_np(root / "cache" / f"entry_{k:05d}.safetensors")
        assert a.keys() == b.keys()
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=2e-5, err_msg=f"{name} entry {k} {n}")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "bfloat16"], "float32"),
    (["--base-quant", "int8"], "--base-quant"),
    (["--optimizer", "adamw8bit"], "AdamW"),
    (["--vae-tiling"], "--vae-tiling"),
])
def test_onnx_format_refuses_what_it_cannot_train(tmp_path, capsys, args, message):
    rc = export_cli.main(["--model", "tiny-random", "--profile", "desktop-cpu", "--prompt", "x", "-o", str(tmp_path / "b"),
                          "-n", "1", "-m", "2", "--rank", "4", "--checkpointing", "off", "--format", "onnx", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "b").exists()


def test_unknown_format_is_refused(tmp_path, capsys):
    rc = export_cli.main(["--model", "tiny-random", "--prompt", "x", "-o", str(tmp_path / "b"), "--format", "torch,tflite"])
    err = capsys.readouterr().err
    assert rc == 2 and "tflite" in err and "torch, onnx" in err


def test_plain_onnxruntime_is_not_installed_beside_the_training_package():
    """Both own the onnxruntime/ folder: plain onnxruntime would silently break onnxruntime.training."""
    importlib.metadata.distribution("onnxruntime-training-cpu")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("onnxruntime")

