"""The backend contract: every backend (torch, ort, executorch with portable kernels and with XNNPACK,
the native runner) passes the same tests, for every family and both spans (resident, block-streamed).

The reference is the torch backend's resident span (peft LoRA on the loaded blocks, autograd, torch's
AdamW) on the same bundle: it reads the same stored weights, so a streamed int8 or int4 span is held
to it as tightly as a float32 one.
"""

import json
import random
import shutil
import subprocess
import time

import numpy as np
import pytest
from backends import HARNESSES, grads_of, native_available, set_lora
from safetensors.numpy import load_file as load_np
from tiny_models import build

pytest.importorskip("executorch.extension.training")
pytest.importorskip("onnxruntime.training.api")

from blockskip.device_train import cli as device_cli  # noqa: E402
from blockskip.device_train.app import run_precompute  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import wrap_model  # noqa: E402
from blockskip.runtime.backends.torch import TorchTrainer  # noqa: E402
from blockskip.runtime.bundle import (
    Bundle,  # noqa: E402
    write_manifest,
)
from blockskip.runtime.cache import source_digest  # noqa: E402
from blockskip.runtime.driver import train as drive  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

PLAN = dict(
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=10,
    lr=3e-3,
    weight_decay=0.05,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=3,
)
# tiny model -> (front skip, back skip, storage of the streamed bundle): a trained middle with a residual
# after it; the storages cover every layout (int8, int4 with a conv and an int8 fallback, float16)
FAMILIES = {"flux": (1, 2, "int8"), "sd3": (1, 1, "float16"), "sd35": (1, 1, "int4"), "sana": (1, 1, "int4")}
SPANS = ("resident", "streamed")
CASES = [(h, f, s) for s in SPANS for h in HARNESSES for f in FAMILIES]


def _ids(case):
    return "-".join(case)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, photos):
    """(family, span, delegate) -> bundle folder root (``bundle``, ``cache`` made by the torch backend);
    each exported on first use. Portable bundles carry torch, onnx and pte; XNNPACK ones pte only."""
    made = {}

    def get(family, span, delegate="none"):
        key = (family, span, delegate)
        if key not in made:
            n, m, storage = FAMILIES[family]
            root = tmp_path_factory.mktemp(f"{family}-{span}-{delegate}")
            plan = Plan(
                front_skip=n, back_skip=m, span=span, storage=storage if span == "streamed" else None, **PLAN
            )
            formats = ["torch", "onnx", "pte"] if delegate == "none" else ["torch", "pte"]
            export_bundle(
                wrap_model(build(family), family),
                plan,
                load_profile("desktop-cpu"),
                "a photo of sks cat",
                root / "bundle",
                formats=formats,
                delegate=delegate,
            )
            run_precompute(root / "bundle", photos, root / "cache", quiet=True)
            made[key] = root
        return made[key]

    return get


@pytest.fixture(scope="module")
def references():
    """The torch resident span's 10-step log per bundle (the reference of every backend)."""
    logs = {}

    def get(root):
        if root not in logs:
            bundle = Bundle(root / "bundle")
            logs[root] = drive(bundle, root / "cache", root / "ref", lambda out: TorchTrainer(bundle))
        return logs[root]

    return get


def _harness(name):
    h = HARNESSES[name]
    if name == "native" and not native_available():
        pytest.skip("the native runner is not built (make native)")
    return h


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("case", [c for c in CASES if HARNESSES[c[0]].python], ids=_ids)
def test_one_step_equals_the_torch_resident_step(case, bundles, tmp_path):
    """Loss, every LoRA gradient and the LoRA after one AdamW step equal the torch resident span's."""
    name, family, span = case
    h = _harness(name)
    root = bundles(family, span, h.delegate)
    bundle = Bundle(root / "bundle")
    ours, ref = h.trainer(root / "bundle", tmp_path / "o"), TorchTrainer(bundle)
    rng = np.random.default_rng(1)  # B starts at zero: from there A's gradient would be 0
    lora = {n: (rng.standard_normal(a.shape) * 0.1).astype(np.float32) for n, a in ref.lora().items()}
    set_lora(ours, lora)
    set_lora(ref, lora)
    entry = root / "cache" / "entry_00000.safetensors"
    loss, loss_ref = (
        ours.loss_and_grad(ours.load_entry(entry), 1.0),
        ref.loss_and_grad(ref.load_entry(entry), 1.0),
    )
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref), (loss, loss_ref)
    g, g_ref = grads_of(ours), grads_of(ref)
    assert set(g) == set(g_ref) == set(lora)
    flat = np.concatenate([g[n].ravel() for n in g]), np.concatenate([g_ref[n].ravel() for n in g])
    assert _rel(*flat) <= 1e-5, f"LoRA gradients differ by {_rel(*flat):.2e} (relative)"
    assert all(np.abs(g_ref[n]).max() > 0 for n in g_ref), "every LoRA tensor must get a gradient"
    for n in g:  # each tensor on its own, at float32 round-off of its own scale
        assert _rel(g[n], g_ref[n]) <= 1e-4, (n, _rel(g[n], g_ref[n]))
    # the update: ours on its gradients against torch's AdamW on the same gradients (Adam's first step is
    # ~lr*sign(g): compared on equal gradients, float32 round-off cannot turn into visible differences)
    set_lora(ref, lora)
    params = dict(ref.span.model.named_parameters())
    import torch

    with torch.no_grad():
        for n in g:
            params[n].grad.copy_(torch.from_numpy(g[n]))
    ours.update()
    ref.update()
    after, after_ref = ours.lora(), ref.lora()
    for n in g:
        np.testing.assert_allclose(after[n], after_ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
        assert np.abs(after[n] - lora[n]).max() > 0.5 * bundle.plan.lr  # the step moved it
    close = getattr(ours, "close", None)
    if close:
        close()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_ten_steps_track_the_torch_resident_run(case, bundles, references, tmp_path):
    name, family, span = case
    h = _harness(name)
    root = bundles(family, span, h.delegate)
    log = h.train(root / "bundle", root / "cache", tmp_path / "o")
    ref_root = bundles(family, span)
    ref = references(ref_root)
    a, b = np.array(log["losses"]), np.array(ref["losses"])
    assert len(a) == len(b) == PLAN["steps"] and len(log["step_seconds"]) == PLAN["steps"]
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert b.min() < b[0]  # it trains (the curve is not flat)
    if span == "streamed":
        assert log.get("span") == "streamed"
    lo, lr = load_np(tmp_path / "o" / "lora.safetensors"), load_np(ref_root / "ref" / "lora.safetensors")
    assert lo.keys() == lr.keys()
    for k in lo:
        np.testing.assert_allclose(lo[k], lr[k], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", ["ort", "executorch"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_precompute_writes_the_torch_backends_cache(name, family, bundles, photos, tmp_path):
    """Precompute through the block programs (stored weights streamed into each shape's forward program)
    writes the torch backend's cache, for a streamed bundle's storage too."""
    root = bundles(family, "streamed")
    HARNESSES[name].precompute(root / "bundle", photos, tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["max_resident_blocks"] == 1
    for k in range(PLAN["num_samples"]):
        a = load_np(tmp_path / "cache" / f"entry_{k:05d}.safetensors")
        b = load_np(root / "cache" / f"entry_{k:05d}.safetensors")
        assert a.keys() == b.keys()
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=2e-5, err_msg=f"{family} entry {k} {n}")


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("name", list(HARNESSES))
def test_resume_equals_uninterrupted(name, span, bundles, tmp_path):
    """Stopped after step 4 (checkpoint at 3) and run again: the same losses and a bitwise equal LoRA."""
    h = _harness(name)
    root = bundles("flux", span, h.delegate)
    full = h.train(root / "bundle", root / "cache", tmp_path / "a")
    part = h.train(root / "bundle", root / "cache", tmp_path / "b", stop_after=4)
    assert len(part["losses"]) == 4 and not (tmp_path / "b" / "lora.safetensors").exists()
    rest = h.train(root / "bundle", root / "cache", tmp_path / "b")
    assert rest["resumed_from"] == 3
    np.testing.assert_allclose(rest["losses"], full["losses"], rtol=1e-6)
    a, b = load_np(tmp_path / "a" / "lora.safetensors"), load_np(tmp_path / "b" / "lora.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HARNESSES))
def test_kill_9_anywhere_then_resume_is_bitwise_equal(name, bundles, tmp_path):
    """A streamed run killed with SIGKILL at a random moment after its first checkpoint, then run again,
    ends with the uninterrupted run's LoRA, bit for bit."""
    h = _harness(name)
    root = bundles("flux", "streamed", h.delegate)
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle", bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    # a longer run, so the kill lands inside it (the native runner and ort take milliseconds a step)
    m["plan"].update(steps=400 if name in ("native", "ort") else 24, checkpoint_every=2)
    write_manifest(bundle / "manifest.json", m)
    shutil.copytree(root / "cache", tmp_path / "cache")
    _retarget_cache(tmp_path / "cache", bundle)
    # the uninterrupted run, timed from its first checkpoint to its end: the kill lands inside that window
    # on any machine, however fast it runs the steps
    rest_s = _run_after_first_checkpoint(
        h.command(bundle, tmp_path / "cache", tmp_path / "a"), tmp_path / "a"
    )
    assert rest_s > 0.0, rest_s
    rnd = random.Random(name)
    _run_after_first_checkpoint(
        h.command(bundle, tmp_path / "cache", tmp_path / "b"),
        tmp_path / "b",
        kill_after=rnd.uniform(0.05, 0.6) * rest_s,
    )
    assert not (tmp_path / "b" / "lora.safetensors").exists(), "the run ended before the kill; make it longer"
    log = h.train(bundle, tmp_path / "cache", tmp_path / "b")
    assert log["resumed_from"] > 0
    a, b = load_np(tmp_path / "a" / "lora.safetensors"), load_np(tmp_path / "b" / "lora.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _run_after_first_checkpoint(cmd, out, kill_after=None) -> float:
    """Runs `cmd`; returns the seconds from its first checkpoint to its LoRA file (its last step), or, with
    `kill_after`, SIGKILLs it that many seconds after its first checkpoint."""
    ckpt, lora = out / "checkpoint" / "checkpoint.safetensors", out / "lora.safetensors"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.002)
    assert ckpt.exists(), "no checkpoint was written"
    t1 = time.time()
    if kill_after is None:
        while not lora.exists() and proc.poll() is None:
            time.sleep(0.002)
        t2 = time.time()
        assert proc.wait() == 0
        return t2 - t1
    time.sleep(kill_after)
    proc.kill()
    proc.wait()
    return time.time() - t1


def _retarget_cache(cache, bundle) -> None:
    """A copied cache made for the original bundle, re-labelled for the edited copy (same tensors)."""
    from blockskip.runtime.files import sha256_file

    idx = json.loads((cache / "index.json").read_text())
    idx["source"]["bundle"] = sha256_file(bundle / "manifest.json")
    idx["source_sha256"] = source_digest(idx["source"])  # the identity of what it now claims
    (cache / "index.json").write_text(json.dumps(idx))


@pytest.mark.parametrize("name", [n for n in HARNESSES if n != "executorch-xnnpack"])
def test_checkpoint_of_other_photos_is_refused(name, bundles, photos, tmp_path, capsys):
    from conftest import write_photos

    h = _harness(name)
    root = bundles("flux", "streamed")
    h.train(root / "bundle", root / "cache", tmp_path / "o", stop_after=3)
    other = write_photos(tmp_path / "other", n=2, size=(130, 140))
    run_precompute(root / "bundle", other, tmp_path / "cache2", quiet=True)
    if h.python:
        rc = device_cli.main(
            [
                "train",
                str(root / "bundle"),
                "--cache",
                str(tmp_path / "cache2"),
                "-o",
                str(tmp_path / "o"),
                "--backend",
                h.backend,
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and "other photos" in err and "Traceback" not in err, err
    else:
        r = subprocess.run(
            h.command(root / "bundle", tmp_path / "cache2", tmp_path / "o"), capture_output=True, text=True
        )
        assert r.returncode == 1 and "other photos" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["torch", "executorch", "ort"])
def test_a_checkpoint_of_another_backend_family_is_refused(name, bundles, tmp_path, capsys):
    """The shared checkpoint and ORT's own one are not interchangeable: each is refused by the others with
    the backend that resumes it."""
    root = bundles("flux", "resident")
    own = "ort_checkpoint" if name == "ort" else "checkpoint.safetensors"
    foreign = "checkpoint.safetensors" if name == "ort" else "ort_checkpoint"
    (tmp_path / "o" / "checkpoint").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint" / foreign).write_bytes(b"x")
    rc = device_cli.main(
        [
            "train",
            str(root / "bundle"),
            "--cache",
            str(root / "cache"),
            "-o",
            str(tmp_path / "o"),
            "--backend",
            name,
        ]
    )
    err = capsys.readouterr().err
    want = "--backend torch" if foreign == "checkpoint.safetensors" else "--backend ort"
    assert rc == 2 and want in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "checkpoint" / own).exists()


@pytest.mark.parametrize("name", ["torch", "executorch", "ort"])
def test_streamed_checkpoints_move_between_backends(name, bundles, tmp_path):
    """A streamed run's checkpoint is the shared one: a torch run stopped at step 4 and resumed by each
    backend follows the uninterrupted torch run."""
    root = bundles("flux", "streamed")
    full = HARNESSES["torch"].train(root / "bundle", root / "cache", tmp_path / "full")
    HARNESSES["torch"].train(root / "bundle", root / "cache", tmp_path / "o", stop_after=4)
    rest = HARNESSES[name].train(root / "bundle", root / "cache", tmp_path / "o")
    assert rest["resumed_from"] == 3
    np.testing.assert_allclose(rest["losses"], full["losses"], rtol=1e-4)
