"""What ``device-train`` hands back besides the LoRA: the other LoRA layouts (``--lora-format``), the
converter for existing outputs (``device-train convert-lora``)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import export_and_precompute

from blockskip.device_train import cli as device_cli
from blockskip.runtime import lora_layouts as L
from blockskip.runtime.plan import Plan
from blockskip.runtime.tensorfile import read_tensors

PLAN = dict(front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=4, steps=3, grad_accum=1, lr=3e-3,
            lora_rank=4, lora_alpha=8.0, checkpoint_every=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, photos) -> Path:
    return export_and_precompute(tmp_path_factory.mktemp("outputs"), Plan(**PLAN), photos)


def family(root: Path) -> str:
    return json.loads((root / "bundle" / "manifest.json").read_text())["family"]


def test_train_writes_every_layout_and_the_converter_agrees(prepared, tmp_path):
    out = tmp_path / "out"
    assert device_cli.main(["train", str(prepared / "bundle"), "--cache", str(prepared / "cache"), "-o", str(out),
                            "--quiet", "--lora-format", "all"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert set(log["lora_files"]) == set(L.FORMATS)
    lora = read_tensors(out / "lora.safetensors")
    fam = family(prepared)
    for fmt in ("kohya", "comfy"):
        written = read_tensors(log["lora_files"][fmt])
        assert all(k.startswith(L.PREFIX[fmt]) for k in written)
        back = L.to_diffusers(written, fam, fmt)
        assert set(back) == set(lora)
        for k in lora:
            np.testing.assert_array_equal(back[k], lora[k])
        conv = tmp_path / f"{fmt}.safetensors"
        assert device_cli.main(["convert-lora", str(out / "lora.safetensors"), "--family", fam, "--format", fmt,
                                "-o", str(conv)]) == 0
        assert conv.read_bytes() == Path(log["lora_files"][fmt]).read_bytes()


def test_convert_refuses_a_missing_file(tmp_path, capsys):
    assert device_cli.main(["convert-lora", str(tmp_path / "none.safetensors"), "--family", "flux",
                            "--format", "kohya", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
