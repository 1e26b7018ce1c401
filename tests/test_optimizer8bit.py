"""bitsandbytes' 8-bit AdamW: trains, resumes exactly, and the dry run sees its smaller state."""

import pytest
import torch
from safetensors.torch import load_file

from blockskip.device_train.app import run_precompute, run_train
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model, lora_target_names
from blockskip.export.memory.dryrun import dry_run
from blockskip.export.memory.specs import load_spec
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile

pytest.importorskip("bitsandbytes")
PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=4,
    steps=4,
    lr=1e-3,
    lora_rank=64,
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("opt8")
    logs = {}
    for opt in ("adamw", "adamw8bit"):
        export_bundle(
            load_model("tiny-random"),
            Plan(**PLAN, optimizer=opt),
            load_profile("desktop-cpu"),
            "a photo",
            root / opt / "b",
        )
        run_precompute(root / opt / "b", photos, root / opt / "c", quiet=True)
        logs[opt] = run_train(root / opt / "b", root / opt / "c", root / opt / "o", quiet=True)
    return root, logs


def test_8bit_adamw_tracks_adamw(runs):
    _, logs = runs
    a, b = logs["adamw"]["losses"], logs["adamw8bit"]["losses"]
    assert a[0] == pytest.approx(b[0], rel=1e-6)  # same data, same start
    assert b == pytest.approx(a, rel=0.05)


def test_8bit_adamw_resumes_exactly(runs, tmp_path):
    root, logs = runs
    d = root / "adamw8bit"
    run_train(d / "b", d / "c", tmp_path / "o", quiet=True, stop_after=3)
    again = run_train(d / "b", d / "c", tmp_path / "o", quiet=True)
    assert again["resumed_from"] == 2
    assert again["losses"] == pytest.approx(logs["adamw8bit"]["losses"], rel=1e-6)
    ck = load_file(tmp_path / "o" / "checkpoint" / "checkpoint.safetensors")
    assert any(k.startswith("opt.state1.") and v.dtype == torch.uint8 for k, v in ck.items())


def test_dry_run_sees_the_8bit_state():
    spec, _ = load_spec("tiny-random")
    out = {}
    for opt in ("adamw", "adamw8bit"):
        plan = Plan(**PLAN, optimizer=opt)
        trained = plan.trained_indices(spec.family.num_blocks)
        lora = {
            "rank": plan.lora_rank,
            "alpha": plan.alpha,
            "targets": lora_target_names(spec.family, trained),
        }
        out[opt] = dry_run(spec, plan, lora)[1].tensors["optimizer"]
    # two fp32 moments vs two uint8 moments (+ block scales; tensors under 4096 elements stay 32-bit)
    assert out["adamw8bit"] < 0.5 * out["adamw"]
