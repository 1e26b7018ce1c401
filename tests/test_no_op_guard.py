"""A run that would hand back a LoRA that changes nothing is refused (``NumericsError``), nothing is
written as the LoRA, and the run's events end with the typed error."""

import json
from pathlib import Path

import pytest
from conftest import export_and_precompute

from blockskip.device_train import cli as device_cli
from blockskip.runtime import driver
from blockskip.runtime.backends import torch as torch_backend
from blockskip.runtime.plan import Plan

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=4,
    steps=3,
    grad_accum=1,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def tiny_lr(tmp_path_factory, photos) -> Path:
    """A plan whose learning rate moves the LoRA by ~1e-30: non-zero, but below float32's resolution of
    the weights it adds to."""
    return export_and_precompute(tmp_path_factory.mktemp("tiny-lr"), Plan(**PLAN, lr=1e-30), photos)


def train(root: Path, out: Path, capsys) -> tuple[int, str, list[dict]]:
    ev = out.parent / f"{out.name}.events"
    rc = device_cli.main(
        [
            "train",
            str(root / "bundle"),
            "--cache",
            str(root / "cache"),
            "-o",
            str(out),
            "--quiet",
            "--events",
            str(ev),
        ]
    )
    events = [json.loads(x) for x in ev.read_text().splitlines()]
    return rc, capsys.readouterr().err, events


def refused(rc, err, events, out: Path, words: str) -> None:
    assert rc == 2
    assert words in err
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "NumericsError"
    assert not any(e["event"] == "done" for e in events)
    assert not (out / "lora.safetensors").exists()


def test_a_lora_that_does_not_change_the_loss_is_refused_at_the_first_step(tiny_lr, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err, events = train(tiny_lr, out, capsys)
    refused(rc, err, events, out, "changed the LoRA but not the loss")


def test_a_lora_left_at_zero_is_refused(tiny_lr, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        torch_backend.TorchTrainer, "update", lambda self: self.opt.zero_grad(set_to_none=True)
    )
    out = tmp_path / "out"
    rc, err, events = train(tiny_lr, out, capsys)
    refused(rc, err, events, out, "left every LoRA B at zero")


def test_the_trained_lora_is_checked_against_none_after_training(tiny_lr, tmp_path, capsys, monkeypatch):
    """With the first-step check out of the way, the check after the last step refuses the LoRA, and so
    does a rerun that resumes from the finished checkpoint (the loss without LoRA is in its log)."""
    monkeypatch.setattr(driver, "check_lora_moves", lambda *a: None)
    out = tmp_path / "out"
    rc, err, events = train(tiny_lr, out, capsys)
    refused(rc, err, events, out, "does not change the model's output")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    rc, err, events = train(tiny_lr, out, capsys)
    refused(rc, err, events, out, "does not change the model's output")
    rerun = events[
        max(i for i, e in enumerate(events) if e["event"] == "phase_start") :
    ]  # the file is appended to
    assert rerun[0]["event"] == "phase_start" and not any(e["event"] == "step" for e in rerun)
