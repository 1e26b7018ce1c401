"""``blockskip-train-native --events FILE``: the native runner's events are the same records as
``device-train``'s (``docs/schemas/event.schema.json``): they parse, validate and are complete, and with
``--events -`` stdout holds nothing else. ``--lora-format all``: the runner's kohya and comfy files are
the bytes ``device-train convert-lora`` makes of its ``lora.safetensors`` (one mapping,
``runtime/lora_layouts.py``, generated into ``lora_layouts.h``)."""

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip(
    "executorch.extension.pybindings.portable_lib", reason="the bundle's programs need executorch"
)

from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime.formats import validate  # noqa: E402
from blockskip.runtime.lora_layouts import convert_file  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

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
    precompute_chunk=2,
)


def parse(text: str) -> list[dict]:
    events = [json.loads(x) for x in text.splitlines()]
    for e in events:
        validate("event", e)
    return events


def test_native_run_events(runner, photos, tmp_path):
    export_bundle(
        load_model("tiny-random"),
        Plan(**PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "bundle",
        formats=["pte"],
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [
            str(runner),
            "run",
            str(tmp_path / "bundle"),
            "--images",
            str(photos),
            "-o",
            str(out),
            "--events",
            "-",
            "--lora-format",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3/3" in r.stderr  # the messages moved to stderr
    events = parse(r.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "phase_start" and events[0]["phase"] == "precompute"
    assert kinds[-2:] == ["phase_end", "done"]
    phases = [(e["event"], e["phase"]) for e in events if e["event"].startswith("phase_")]
    assert phases == [
        ("phase_start", "precompute"),
        ("phase_end", "precompute"),
        ("phase_start", "train"),
        ("phase_end", "train"),
    ]
    progress = [e for e in events if e["event"] == "precompute_progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == PLAN["num_samples"]
    steps = [e for e in events if e["event"] == "step"]
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in steps] == [1, 2, 3] and [e["loss"] for e in steps] == log["losses"]
    assert steps[-1]["eta_seconds"] == 0 and all(e["peak_rss_mib"] > 0 for e in steps)
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 3]
    done = events[-1]["outputs"]
    assert set(done) == {"cache", "lora", "lora_kohya", "lora_comfy", "train_log"}
    assert all(Path(p).exists() for p in done.values())
    family = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["family"]
    for fmt in ("kohya", "comfy"):
        convert_file(out / "lora.safetensors", tmp_path / f"{fmt}.safetensors", family, fmt)
        assert Path(done[f"lora_{fmt}"]).read_bytes() == (tmp_path / f"{fmt}.safetensors").read_bytes()

    # a refused run ends with its typed error (an events file is appended to)
    ev = tmp_path / "events.jsonl"
    r = subprocess.run(
        [
            str(runner),
            "train",
            str(tmp_path / "bundle"),
            "--cache",
            str(tmp_path / "none"),
            "-o",
            str(tmp_path / "out2"),
            "--events",
            str(ev),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    last = parse(ev.read_text())[-1]
    assert last["event"] == "error" and last["kind"] in ("InputError", "FormatError") and last["message"]


def test_native_refuses_a_lora_that_changes_nothing(runner, photos, tmp_path, monkeypatch):
    """A run whose LoRA is too small to matter (lr 1e-30) finishes its steps with the first-step check
    out of the way (Python, executorch backend: the shared checkpoint); the native runner resuming the
    finished checkpoint checks the trained LoRA against the loss without LoRA in its log and refuses."""
    from blockskip.device_train import cli as device_cli
    from blockskip.runtime import driver

    export_bundle(
        load_model("tiny-random"),
        Plan(**{**PLAN, "lr": 1e-30}),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "bundle",
        formats=["pte"],
    )
    monkeypatch.setattr(driver, "check_lora_moves", lambda *a: None)
    out = tmp_path / "out"
    assert (
        device_cli.main(
            [
                "run",
                str(tmp_path / "bundle"),
                "--images",
                str(photos),
                "-o",
                str(out),
                "--backend",
                "executorch",
                "--quiet",
            ]
        )
        == 2
    )
    assert (out / "checkpoint" / "checkpoint.safetensors").is_file() and not (
        out / "lora.safetensors"
    ).exists()
    ev = tmp_path / "events.jsonl"
    r = subprocess.run(
        [
            str(runner),
            "train",
            str(tmp_path / "bundle"),
            "--cache",
            str(out / "cache"),
            "-o",
            str(out),
            "--events",
            str(ev),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "does not change the model's output" in r.stderr, r.stderr[-2000:]
    last = parse(ev.read_text())[-1]
    assert last["event"] == "error" and last["kind"] == "InputError"
    assert not (out / "lora.safetensors").exists()
