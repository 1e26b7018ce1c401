"""ExecuTorch specifics: the ``pte`` section of a bundle, the numpy AdamW, the CLI's output and the
refusals. Training against the torch backend (every family, both spans, both delegates) is the shared
contract suite (tests/test_contract.py)."""

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
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model, wrap_model  # noqa: E402
from blockskip.runtime.adamw import AdamW, AdamWConfig  # noqa: E402
from blockskip.runtime.bundle import (
    Bundle,  # noqa: E402
    write_manifest,
)
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402
from blockskip.runtime.tensorfile import read_tensors  # noqa: E402

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


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, photos):
    """A streamed int8 flux bundle (torch + pte), its cache made by the torch backend."""
    root = tmp_path_factory.mktemp("et-flux")
    plan = Plan(front_skip=1, back_skip=2, span="streamed", storage="int8", **PLAN)
    export_bundle(
        wrap_model(build("flux"), "flux"),
        plan,
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=["torch", "pte"],
    )
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    return root


def test_adamw_matches_torch_over_steps():
    """The numpy AdamW is torch.optim.AdamW(foreach=False), step for step (bias corrections, decay)."""
    g = torch.Generator().manual_seed(0)
    p0 = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g)}
    ours = {n: v.numpy().copy() for n, v in p0.items()}
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in p0.items()}
    opt = AdamW(AdamWConfig(lr=3e-3, weight_decay=0.05))
    topt = torch.optim.AdamW(list(ref.values()), lr=3e-3, weight_decay=0.05, foreach=False)
    for _ in range(7):
        grads = {n: torch.randn(v.shape, generator=g) for n, v in p0.items()}
        opt.step(ours, {n: v.numpy() for n, v in grads.items()})
        for n, p in ref.items():
            p.grad = grads[n].clone()
        topt.step()
    for n in p0:
        np.testing.assert_allclose(ours[n], ref[n].detach().numpy(), rtol=2e-7, atol=1e-9)
        st = topt.state[ref[n]]
        np.testing.assert_allclose(opt.state[n]["exp_avg"], st["exp_avg"].numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(
            opt.state[n]["exp_avg_sq"], st["exp_avg_sq"].numpy(), rtol=1e-6, atol=1e-12
        )
        assert float(opt.state[n]["step"][0]) == float(st["step"]) == 7


def test_pte_section_lists_one_program_per_shape_and_role(streamed):
    bundle = Bundle(streamed / "bundle")
    m = bundle.manifest
    assert m["pte"]["delegate"] == "none" and "train" not in m["pte"]  # no resident training program
    shapes = m["stream"]["shapes"]
    # flux: double and single blocks; the trained ones with LoRA, the frozen ones (precompute) without;
    # the head and precompute's embed program
    kinds = {s["kind"] for s in shapes.values()}
    assert kinds == {"double", "single", "head", "embed"}
    assert len(shapes) < len(bundle.manifest["model"]["block_kinds"]) + 2  # per shape, not per block
    for sid, shape in shapes.items():
        roles = set(shape["programs"])
        if sid in ("head", "embed"):
            assert roles == {sid}
        elif shape["targets"]:
            assert roles == {"forward", "vjp"}, sid
        else:
            assert roles == {"forward"}, sid
        for role, prog in shape["programs"].items():
            assert bundle.path(prog["pte"]["file"]).is_file()
            assert prog["pte"]["arena_bytes"] > 0
            # weights are inputs (streamed from the block files), never constants in the program
            assert any(r["name"].startswith("w.") for r in prog["inputs"]), (sid, role)
    # the weights are not inside a program: no stored weight's bytes occur in its file
    for sid, shape in shapes.items():
        if sid in ("head", "embed"):
            continue
        stored = read_tensors(bundle.path(m["model"]["blocks"][shape["example_block"]]))
        big = max((a for a in stored.values() if a.size >= 64), key=lambda a: a.size)
        for prog in shape["programs"].values():
            assert big.tobytes() not in bundle.path(prog["pte"]["file"]).read_bytes(), sid


def test_device_train_cli_end_to_end(streamed, photos, capfd):
    """device-train run --backend executorch: precompute with the block programs, streamed training, and a
    LoRA that loads into the full diffusers model with the torch backend's metadata."""
    root = streamed
    out = root / "out-cli"
    rc = device_cli.main(
        [
            "run",
            str(root / "bundle"),
            "--images",
            str(photos),
            "-o",
            str(out),
            "--backend",
            "executorch",
            "--quiet",
        ]
    )
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    for noise in ("torchao", "ExperimentalWarning", "Traceback"):
        assert noise not in captured.err, captured.err
    log = json.loads((out / "train_log.json").read_text())
    assert (
        log["backend"] == "executorch (streamed)"
        and log["span"] == "streamed"
        and len(log["losses"]) == PLAN["steps"]
    )
    assert log["peak_rss_mib"] > 0
    path = out / "lora.safetensors"
    sd = load_file(path)
    full = build("flux")
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}
    assert any(v.abs().max() > 0 for k, v in sd.items() if ".lora_B." in k)  # it trained
    t = run_train(root / "bundle", root / "cache", root / "out-torch", backend="torch", quiet=True)
    with safe_open(path, "pt") as f_et, safe_open(t["lora"], "pt") as f_t:
        assert f_et.metadata() == f_t.metadata()


def test_train_output_is_clean_in_a_fresh_process(streamed, tmp_path):
    """The loader warnings (torchao, experimental APIs) and the native runtime's cpuinfo lines (printed
    once per process, when its thread pool starts) stay out of device-train's output."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockskip.device_train.cli",
            "train",
            str(streamed / "bundle"),
            "--cache",
            str(streamed / "cache"),
            "-o",
            str(tmp_path / "o"),
            "--backend",
            "executorch",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "LoRA written to" in r.stdout
    assert r.stderr.strip() == "", r.stderr


def test_grad_accumulation_tracks_torch(streamed, tmp_path, photos):
    """grad_accum=2 (the loss scale is a program input): the summed, scaled micro-step gradients give
    torch's steps."""
    shutil.copytree(streamed / "bundle", tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    manifest["plan"]["grad_accum"] = 2
    write_manifest(tmp_path / "bundle" / "manifest.json", manifest)
    run_precompute(tmp_path / "bundle", photos, tmp_path / "cache", quiet=True)
    et = run_train(tmp_path / "bundle", tmp_path / "cache", tmp_path / "et", backend="executorch", quiet=True)
    t = run_train(tmp_path / "bundle", tmp_path / "cache", tmp_path / "t", backend="torch", quiet=True)
    assert et["plan"]["grad_accum"] == t["plan"]["grad_accum"] == 2
    np.testing.assert_allclose(et["losses"], t["losses"], rtol=1e-4)
    a, b = load_file(tmp_path / "et" / "lora.safetensors"), load_file(tmp_path / "t" / "lora.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-3, atol=1e-5)


def test_executorch_backend_refuses_bundle_without_pte(photos, tmp_path, capsys):
    export_bundle(
        load_model("tiny-random"),
        Plan(front_skip=1, back_skip=2, **PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "bundle",
    )
    rc = device_cli.main(
        [
            "run",
            str(tmp_path / "bundle"),
            "--images",
            str(photos),
            "-o",
            str(tmp_path / "o"),
            "--backend",
            "executorch",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--format pte" in err and "Traceback" not in err, err
    run_precompute(tmp_path / "bundle", photos, tmp_path / "cache", quiet=True)
    rc = device_cli.main(
        [
            "train",
            str(tmp_path / "bundle"),
            "--cache",
            str(tmp_path / "cache"),
            "-o",
            str(tmp_path / "o"),
            "--backend",
            "executorch",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--format pte" in err and "Traceback" not in err, err
