"""The formats of ``runtime/formats.py`` as the native runner and the program formats write them: a
tiny resident-span bundle with ExecuTorch (and, when ONNX Runtime training is installed, ONNX)
training programs, its cache, a Python ExecuTorch run, a native run and a native precompute; their
files validate and name the same tensors, and the training programs' optimizer records validate
(mutated copies fail)."""

import copy
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip(
    "executorch.extension.training", reason="the native runner and its bundles need executorch"
)
jsonschema = pytest.importorskip("jsonschema")

from test_formats import PLAN, check_run, documents  # noqa: E402
from test_native import run_native  # noqa: E402

from blockskip.device_train.app import run_precompute, run_train  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime import formats  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402

pytestmark = pytest.mark.slow


def _has_ort_training() -> bool:
    try:
        import onnxruntime.training  # noqa: F401
    except ImportError:
        return False
    return True


FORMATS = ["torch", "pte"] + (["onnx"] if _has_ort_training() else [])


@pytest.fixture(scope="module")
def runs(runner, tmp_path_factory, photos) -> Path:
    """root/bundle (resident span, FORMATS), root/cache, root/out (Python ExecuTorch), root/native."""
    root = tmp_path_factory.mktemp("formats-native")
    export_bundle(
        load_model("tiny-random"),
        Plan(**PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=FORMATS,
    )
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    run_train(root / "bundle", root / "cache", root / "out", backend="executorch", quiet=True)
    run_native(runner, root / "bundle", root / "cache", root / "native", "--quiet")
    return root


def test_python_executorch_run_files_validate(runs):
    check_run(runs)


def test_native_run_files_validate_and_match_python(runs):
    py = documents(runs)
    out = runs / "native"
    nat = {
        "checkpoint": formats.safetensors_header(out / formats.CHECKPOINT_DIR / formats.CHECKPOINT),
        "train_log": json.loads((out / formats.TRAIN_LOG).read_text()),
        "lora": formats.safetensors_header(out / formats.LORA_FILE),
    }
    for kind, doc in nat.items():
        formats.validate(kind, doc)
    for kind in ("checkpoint", "lora"):  # the same tensor names, and the same metadata keys
        assert set(nat[kind]) == set(py[kind]), kind
        assert set(nat[kind]["__metadata__"]) == set(py[kind]["__metadata__"]), kind
    assert nat["train_log"]["backend"] == "native"
    assert (
        nat["train_log"]["cache_source"]
        == py["train_log"]["cache_source"]
        == py["cache_index"]["source_sha256"]
    )
    assert nat["lora"]["__metadata__"] == py["lora"]["__metadata__"] == py["manifest"]["lora"]["metadata"]
    log = json.loads(nat["checkpoint"]["__metadata__"][formats.META_LOG])
    assert log["plan"] == py["manifest"]["plan"]
    assert int(nat["checkpoint"]["__metadata__"][formats.META_STEP]) == PLAN["steps"]


def test_native_precompute_files_validate(runs, runner, photos, tmp_path):
    """The native runner's cache: its index and shards validate, with the Python cache's identity."""
    r = subprocess.run(
        [
            str(runner),
            "precompute",
            str(runs / "bundle"),
            "--images",
            str(photos),
            "--cache",
            str(tmp_path / "cache"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "cache" / formats.CACHE_INDEX).read_text())
    formats.validate("cache_index", index)
    for rec in index["entries"].values():
        formats.validate("cache_entry", formats.safetensors_header(tmp_path / "cache" / rec["file"]))
    py = json.loads((runs / "cache" / formats.CACHE_INDEX).read_text())
    assert index["source"] == py["source"] and index["source_sha256"] == py["source_sha256"]
    assert sorted(index["entries"]) == sorted(py["entries"])


def _optimizer_records(manifest: dict) -> dict[str, dict]:
    return {
        fmt: manifest[fmt]["train"]["optimizer"]
        for fmt in ("pte", "onnx")
        if "train" in manifest.get(fmt, {})
    }


def test_optimizer_records_validate(runs):
    manifest = documents(runs)["manifest"]
    records = _optimizer_records(manifest)
    assert sorted(records) == sorted(f for f in FORMATS if f != "torch")
    for rec in records.values():
        formats.validate("optimizer", rec)
        assert rec["weight_decay"] == manifest["plan"]["weight_decay"]


@pytest.mark.parametrize(
    "name,change",
    [
        ("no betas", lambda r: r.pop("betas")),
        ("three betas", lambda r: r.update(betas=[*r["betas"], 0.5])),
        ("beta of one", lambda r: r.update(betas=[r["betas"][0], 1.0])),
        ("another optimizer", lambda r: r.update(type="sgd")),
        ("eps as text", lambda r: r.update(eps=str(r["eps"]))),
        ("negative weight decay", lambda r: r.update(weight_decay=-1.0)),
        ("unknown key", lambda r: r.update(momentum=0.9)),
    ],
)
def test_mutated_optimizer_records_fail(runs, name, change):
    for rec in _optimizer_records(documents(runs)["manifest"]).values():
        bad = copy.deepcopy(rec)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            formats.validate("optimizer", bad)
