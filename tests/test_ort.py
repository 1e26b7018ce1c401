"""ONNX Runtime specifics: the ``onnx`` section of a bundle, the CLI, the refusals and the install. Training
against the torch backend (every family, both spans) is the shared contract suite (tests/test_contract.py)."""

import importlib.metadata
import json

import numpy as np
import pytest
from safetensors.torch import load_file

pytest.importorskip("onnxruntime.training.api")

from blockskip.device_train import cli as device_cli  # noqa: E402
from blockskip.export import cli as export_cli  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime.bundle import Bundle  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

PLAN = dict(s_min=32, s_max=64, num_samples=6, steps=10, lr=3e-3, weight_decay=0.05, lora_rank=4,
            lora_alpha=8.0, checkpoint_every=3)
@pytest.fixture(scope="module")
def tiny_ort(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("tiny-ort")
    plan = Plan(front_skip=1, back_skip=2, **PLAN)
    export_bundle(load_model("tiny-random"), plan, load_profile("desktop-cpu"), "a photo of sks cat", root / "bundle",
                  formats=["onnx"])
    return root


def test_onnx_section_and_programs(tiny_ort):
    """Opset 18 / IR 10 everywhere; the stream programs take the block weights as inputs (no weight
    initialisers: they stream from the block files, which an onnx-only bundle holds for that)."""
    import onnx

    bundle = Bundle(tiny_ort / "bundle")
    m = bundle.manifest
    assert m["formats"] == ["onnx"]
    sec = m["onnx"]
    assert sec["opset"] == 18 and sec["train"]["optimizer"]["adam_mode"] == 0
    progs = [p["onnx"]["file"] for s in m["stream"]["shapes"].values() for p in s["programs"].values()]
    assert progs and len(progs) == len(set(progs))
    for rel in [sec["train"]["files"][k] for k in ("training", "eval", "optimizer")] + progs:
        proto = onnx.load(str(bundle.path(rel)), load_external_data=False)
        assert proto.ir_version == 10, rel
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}, rel
        if rel in progs:
            big = [i.name for i in proto.graph.initializer if np.prod(i.dims) > 64]
            assert not big, (rel, big[:5])
            assert any(i.name.startswith("w.") for i in proto.graph.input), rel
    # the back residual f(out) - f(in) runs the skipped blocks once: every block is stored, in float32
    blocks = m["model"]["blocks"]
    assert all(blocks) and m["stream"]["storage"] == "float32"


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


@pytest.mark.parametrize("args, message", [
    (["--dtype", "bfloat16"], "float32"),
    (["--base-quant", "int8"], "--base-quant"),
    (["--optimizer", "adamw8bit"], "AdamW"),
    (["--span", "streamed", "--storage", "bfloat16"], "bfloat16"),
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

