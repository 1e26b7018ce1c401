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

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=4,
    steps=3,
    grad_accum=1,
    lr=3e-3,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, photos) -> Path:
    return export_and_precompute(tmp_path_factory.mktemp("outputs"), Plan(**PLAN), photos)


def family(root: Path) -> str:
    return json.loads((root / "bundle" / "manifest.json").read_text())["family"]


def test_train_writes_every_layout_and_the_converter_agrees(prepared, tmp_path):
    out = tmp_path / "out"
    assert (
        device_cli.main(
            [
                "train",
                str(prepared / "bundle"),
                "--cache",
                str(prepared / "cache"),
                "-o",
                str(out),
                "--quiet",
                "--lora-format",
                "all",
            ]
        )
        == 0
    )
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
        assert (
            device_cli.main(
                [
                    "convert-lora",
                    str(out / "lora.safetensors"),
                    "--family",
                    fam,
                    "--format",
                    fmt,
                    "-o",
                    str(conv),
                ]
            )
            == 0
        )
        assert conv.read_bytes() == Path(log["lora_files"][fmt]).read_bytes()


def test_convert_refuses_a_missing_file(tmp_path, capsys):
    assert (
        device_cli.main(
            [
                "convert-lora",
                str(tmp_path / "none.safetensors"),
                "--family",
                "flux",
                "--format",
                "kohya",
                "-o",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


# --- --events -----------------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict]:
    from blockskip.runtime.formats import validate

    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for e in lines:
        validate("event", e)
    times = [e["time"] for e in lines]
    assert times == sorted(times)
    return lines


def test_events_of_precompute_and_train_are_complete(prepared, photos, tmp_path):
    ev = tmp_path / "events.jsonl"
    cache = tmp_path / "cache"
    assert (
        device_cli.main(
            [
                "precompute",
                str(prepared / "bundle"),
                "--images",
                str(photos),
                "--cache",
                str(cache),
                "--quiet",
                "--events",
                str(ev),
            ]
        )
        == 0
    )
    pre = read_events(ev)
    assert [e["event"] for e in pre[:1] + pre[-2:]] == ["phase_start", "phase_end", "done"]
    progress = [e for e in pre if e["event"] == "precompute_progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert [e["done"] for e in progress] == list(range(1, len(progress) + 1))
    assert pre[-1]["outputs"] == {"cache": str(cache)}

    ev.unlink()
    out = tmp_path / "out"
    assert (
        device_cli.main(
            [
                "train",
                str(prepared / "bundle"),
                "--cache",
                str(cache),
                "-o",
                str(out),
                "--quiet",
                "--lora-format",
                "kohya",
                "--events",
                str(ev),
            ]
        )
        == 0
    )
    tr = read_events(ev)
    kinds = [e["event"] for e in tr]
    assert kinds[0] == "phase_start" and kinds[-2:] == ["phase_end", "done"]
    steps = [e for e in tr if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, PLAN["steps"] + 1))
    log = json.loads((out / "train_log.json").read_text())
    assert [e["loss"] for e in steps] == log["losses"]
    assert steps[-1]["eta_seconds"] == 0 and all(e["peak_rss_mib"] > 0 for e in steps)
    assert [e["step"] for e in tr if e["event"] == "checkpoint"] == [2, 3]
    done = tr[-1]["outputs"]
    assert set(done) == {"cache", "lora", "lora_kohya", "train_log"}
    assert all(Path(p).exists() for p in done.values())


def test_events_on_stdout_and_a_typed_error(prepared, tmp_path, capsys):
    rc = device_cli.main(
        [
            "train",
            str(prepared / "bundle"),
            "--cache",
            str(tmp_path / "nothing"),
            "-o",
            str(tmp_path / "out"),
            "--quiet",
            "--events",
            "-",
        ]
    )
    assert rc == 2
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1]["event"] == "error" and lines[-1]["kind"] == "CacheError"
