"""The two CLIs on bad input: non-zero exit, one actionable line on stderr, no traceback (unless --debug),
and nothing already written is lost."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from blockskip.device_train.cli import main as train_main
from blockskip.export.cli import main as export_main

EXPORT = "blockskip-export"
TRAIN = "device-train"
MAINS = {EXPORT: export_main, TRAIN: train_main}
MODULES = {EXPORT: "blockskip.export.cli", TRAIN: "blockskip.device_train.cli"}
GOOD_EXPORT = [
    "--model",
    "tiny-random",
    "--profile",
    "desktop-cpu",
    "--prompt",
    "a photo of sks cat",
    "-n",
    "1",
    "-m",
    "2",
    "--samples",
    "4",
    "--steps",
    "2",
]


def make_photos(folder: Path, n: int = 3, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = (np.random.default_rng(seed + i).random((72 + 8 * i, 96, 3)) * 255).astype("uint8")
        Image.fromarray(a).save(folder / f"photo_{i}.png")
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def call(prog: str, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything earlier
    rc = MAINS[prog]([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_sub(prog: str, argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", MODULES[prog], *map(str, argv)], capture_output=True, text=True, timeout=120
    )


def assert_user_error(rc: int, err: str, prog: str, *words: str) -> str:
    """A typed error: exit 2, exactly one line ``PROG: error: ...`` naming ``words``, no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    assert rc == 2, (rc, line)
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One exported bundle and one finished run (cache + LoRA) shared by the module: treat as read-only."""
    root = tmp_path_factory.mktemp("cli")
    photos = make_photos(root / "photos")
    bundle, run = root / "bundle", root / "run"
    assert export_main([*GOOD_EXPORT, "-o", str(bundle)]) == 0
    assert train_main(["run", str(bundle), "--images", str(photos), "-o", str(run), "--quiet"]) == 0
    assert (run / "lora.safetensors").is_file() and (run / "cache" / "index.json").is_file()
    return SimpleNamespace(root=root, photos=photos, bundle=bundle, run=run, cache=run / "cache")


@pytest.fixture
def bundle_copy(work, tmp_path) -> Path:
    return Path(shutil.copytree(work.bundle, tmp_path / "bundle"))


@pytest.fixture
def run_copy(work, tmp_path) -> Path:
    return Path(shutil.copytree(work.run, tmp_path / "run"))


# --------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("prog,argv", [(EXPORT, ["--help"]), (TRAIN, ["--help"]), (TRAIN, ["run", "--help"])])
def test_help_exits_zero_and_shows_an_example(prog, argv):
    r = run_sub(prog, argv)
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout.lower()
    assert prog in r.stdout


# --------------------------------------------------------------------------------------------
# blockskip-export


def test_export_unknown_profile_lists_available(tmp_path, capsys):
    rc, out, err = call(EXPORT, [*GOOD_EXPORT, "--profile", "pixel-phone", "-o", tmp_path / "b"], capsys)
    assert_user_error(rc, err, EXPORT, "unknown profile", "'pixel-phone'", "desktop-cpu", "snapdragon8")
    assert not (tmp_path / "b").exists()


def test_export_debug_shows_the_traceback(tmp_path):
    r = run_sub(EXPORT, [*GOOD_EXPORT, "--profile", "pixel-phone", "-o", tmp_path / "b", "--debug"])
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "ProfileError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("blockskip-export: error: unknown profile")
    # the same command without --debug: one line
    r = run_sub(EXPORT, [*GOOD_EXPORT, "--profile", "pixel-phone", "-o", tmp_path / "b"])
    assert_user_error(r.returncode, r.stderr, EXPORT, "unknown profile")


def test_export_model_folder_that_does_not_exist(tmp_path, capsys):
    rc, _, err = call(
        EXPORT, [*GOOD_EXPORT, "--model", tmp_path / "no-such-model", "-o", tmp_path / "b"], capsys
    )
    assert_user_error(rc, err, EXPORT, "no-such-model", "not a diffusers model folder", "--model tiny")


def test_export_folder_that_is_not_a_diffusers_model(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "readme.txt").write_text("hello")
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "--model", tmp_path / "photos", "-o", tmp_path / "b"], capsys)
    assert_user_error(rc, err, EXPORT, "not a diffusers model folder", "transformer/config.json")


def test_export_unsupported_transformer_class(tmp_path, capsys):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel"})
    )
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "--model", tmp_path / "m", "-o", tmp_path / "b"], capsys)
    assert_user_error(rc, err, EXPORT, "UNet2DConditionModel", "FluxTransformer2DModel")


def test_export_model_folder_with_a_corrupt_config(tmp_path, capsys):
    """A torn transformer/config.json is a ModelError naming the file, not an internal error."""
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text("{not json")
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "--model", tmp_path / "m", "-o", tmp_path / "b"], capsys)
    assert_user_error(rc, err, EXPORT, "config.json")


def test_export_model_folder_without_weights(tmp_path, capsys):
    """A config without weights is a ModelError, with no diffusers log lines before it."""
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel"})
    )
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "--model", tmp_path / "m", "-o", tmp_path / "b"], capsys)
    assert_user_error(rc, err, EXPORT, "transformer")


def test_export_plan_that_does_not_fit(tmp_path, capsys):
    argv = [*GOOD_EXPORT, "-n", "5", "-m", "5", "-o", tmp_path / "b"]
    rc, _, err = call(EXPORT, argv, capsys)
    assert_user_error(rc, err, EXPORT, "6 blocks", "at most 5")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--s-min", "128", "--s-max", "64"], ["s_min (128)", "s_max (64)"]),
        (["--s-min", "42"], ["s_min = 42", "granularity", "try 40"]),
        (["--trained", "1,x"], ["--trained", "comma-separated"]),
        (["--trained", "2,9"], ["[9]", "out of range", "0..5"]),
        (["--targets", "bogus"], ["bogus", "attn.to_q"]),
        (["--rank", "0"], ["rank"]),
    ],
)
def test_export_bad_plan_values(tmp_path, capsys, extra, words):
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, *extra, "-o", tmp_path / "b"], capsys)
    assert_user_error(rc, err, EXPORT, *words)
    assert not (tmp_path / "b").exists()


def test_export_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "-o", tmp_path / "afile" / "sub"], capsys)
    assert_user_error(rc, err, EXPORT, "cannot create", "afile", "-o")
    assert (tmp_path / "afile").read_text() == "x"


def test_export_output_that_is_a_file(tmp_path, capsys):
    """``-o`` naming an existing file is an OutputError, not an internal error."""
    (tmp_path / "afile").write_text("x")
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "-o", tmp_path / "afile"], capsys)
    assert_user_error(rc, err, EXPORT, "afile", "-o")
    assert (tmp_path / "afile").read_text() == "x"


def test_export_into_a_non_bundle_folder_is_refused(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.txt").write_text("precious")
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "-o", tmp_path / "docs", "--force"], capsys)
    assert_user_error(rc, err, EXPORT, "not a bundle", "-o")
    assert (tmp_path / "docs" / "thesis.txt").read_text() == "precious"


def test_existing_bundle_needs_force_and_is_left_intact(bundle_copy, capsys):
    before = tree_digest(bundle_copy)
    mtime = (bundle_copy / "manifest.json").stat().st_mtime_ns
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "--seed", "7", "-o", bundle_copy], capsys)
    assert_user_error(rc, err, EXPORT, "already exists", "--force")
    assert tree_digest(bundle_copy) == before
    assert (bundle_copy / "manifest.json").stat().st_mtime_ns == mtime
    # a failing --force export (bad plan) does not destroy it either
    rc, _, err = call(EXPORT, [*GOOD_EXPORT, "-n", "5", "-m", "5", "--force", "-o", bundle_copy], capsys)
    assert_user_error(rc, err, EXPORT, "at most 5")
    assert tree_digest(bundle_copy) == before
    assert [p.name for p in bundle_copy.parent.iterdir()] == ["bundle"]  # no temp folder left behind


# --------------------------------------------------------------------------------------------
# device-train: photos


def test_train_missing_image_folder(work, tmp_path, capsys):
    rc, _, err = call(
        TRAIN, ["run", work.bundle, "--images", tmp_path / "nope", "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "'" + str(tmp_path / "nope") + "'", "does not exist", "--images")


def test_train_images_is_a_file(work, tmp_path, capsys):
    (tmp_path / "pic.png").write_bytes(b"x")
    rc, _, err = call(
        TRAIN,
        ["run", work.bundle, "--images", tmp_path / "pic.png", "-o", tmp_path / "out", "--quiet"],
        capsys,
    )
    assert_user_error(rc, err, TRAIN, "not a folder", "--images")


def test_train_empty_image_folder(work, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    rc, _, err = call(
        TRAIN, ["run", work.bundle, "--images", tmp_path / "empty", "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "no images", ".png")


def test_corrupt_photo_is_named_and_nothing_written_is_lost(work, run_copy, tmp_path, capsys):
    photos = Path(shutil.copytree(work.photos, tmp_path / "photos"))
    (photos / "x.png").write_bytes(np.random.default_rng(0).bytes(777))
    before = tree_digest(run_copy)
    rc, _, err = call(TRAIN, ["run", work.bundle, "--images", photos, "-o", run_copy, "--quiet"], capsys)
    assert_user_error(rc, err, TRAIN, "x.png", "cannot read image", "remove or replace")
    assert tree_digest(run_copy) == before  # cache index, shards, checkpoint and LoRA all kept
    rc, _, err = call(
        TRAIN,
        ["precompute", work.bundle, "--images", photos, "--cache", run_copy / "cache", "--quiet"],
        capsys,
    )
    assert_user_error(rc, err, TRAIN, "x.png")
    assert tree_digest(run_copy) == before


def test_too_small_photo(work, tmp_path, capsys):
    from PIL import Image

    photos = make_photos(tmp_path / "photos", n=1)
    Image.new("RGB", (4, 300)).save(photos / "sliver.png")
    rc, _, err = call(
        TRAIN, ["precompute", work.bundle, "--images", photos, "--cache", tmp_path / "c", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "sliver.png", "too small")


# --------------------------------------------------------------------------------------------
# device-train: bundle


def test_bundle_folder_without_manifest(work, tmp_path, capsys):
    (tmp_path / "b").mkdir()
    rc, _, err = call(
        TRAIN, ["run", tmp_path / "b", "--images", work.photos, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "not a bundle", "manifest.json", "blockskip-export")


def test_bundle_manifest_not_json(bundle_copy, work, tmp_path, capsys):
    (bundle_copy / "manifest.json").write_text("{torn")
    rc, _, err = call(
        TRAIN, ["run", bundle_copy, "--images", work.photos, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "manifest.json", "not valid JSON")


def test_train_debug_shows_the_traceback(tmp_path):
    (tmp_path / "b").mkdir()
    argv = ["train", tmp_path / "b", "-o", tmp_path / "out", "--quiet"]
    r = run_sub(TRAIN, [*argv, "--debug"])
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "BundleError" in r.stderr
    r = run_sub(TRAIN, argv)
    assert_user_error(r.returncode, r.stderr, TRAIN, "not a bundle")


@pytest.mark.parametrize("rel", ["model/blocks/block_002.safetensors", "model/head.safetensors"])
@pytest.mark.parametrize("how", ["flip", "append"])
def test_altered_bundle_file_is_refused_by_name(work, bundle_copy, tmp_path, capsys, rel, how):
    path = bundle_copy / rel
    if how == "flip":
        flip_byte(path)  # same size: only the sha256 tells
    else:
        path.write_bytes(path.read_bytes() + b"\0")
    # train from the (complete) cache: the manifest is unchanged, so the cache is accepted
    rc, _, err = call(
        TRAIN, ["train", bundle_copy, "--cache", work.cache, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, repr(rel), "sha256")
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    # precompute into a fresh cache reads every block and refuses too
    rc, _, err = call(
        TRAIN, ["run", bundle_copy, "--images", work.photos, "-o", tmp_path / "out2", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, repr(rel), "sha256")


def test_unknown_backend(work, tmp_path, capsys):
    rc, _, err = call(
        TRAIN,
        ["run", work.bundle, "--images", work.photos, "-o", tmp_path / "out", "--backend", "onnx", "--quiet"],
        capsys,
    )
    assert_user_error(rc, err, TRAIN, "'onnx'", "available", "torch")


# --------------------------------------------------------------------------------------------
# device-train: cache and output


def test_precompute_needs_cache(work, capsys):
    rc, _, err = call(TRAIN, ["precompute", work.bundle, "--images", work.photos, "--quiet"], capsys)
    assert_user_error(rc, err, TRAIN, "--cache")


def test_train_without_cache(work, tmp_path, capsys):
    rc, _, err = call(
        TRAIN,
        ["train", work.bundle, "--cache", tmp_path / "nocache", "-o", tmp_path / "out", "--quiet"],
        capsys,
    )
    assert_user_error(rc, err, TRAIN, "device-train precompute")


def test_train_with_incomplete_cache(work, tmp_path, capsys):
    cache = Path(shutil.copytree(work.cache, tmp_path / "cache"))
    (cache / "entry_00003.safetensors").unlink()
    rc, _, err = call(
        TRAIN, ["train", work.bundle, "--cache", cache, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "incomplete", "1 of 4", "precompute")


def test_train_with_corrupt_cache_index(work, tmp_path, capsys):
    cache = Path(shutil.copytree(work.cache, tmp_path / "cache"))
    (cache / "index.json").write_text('{"source": ')
    rc, _, err = call(
        TRAIN, ["train", work.bundle, "--cache", cache, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "index.json", "corrupt")


def test_cache_of_another_bundle_is_refused(work, tmp_path, capsys):
    other = tmp_path / "other"
    assert export_main([*GOOD_EXPORT, "--seed", "3", "-o", str(other)]) == 0
    rc, _, err = call(
        TRAIN, ["train", other, "--cache", work.cache, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "another bundle")


def test_altered_cache_shard_is_detected_then_rebuilt(work, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    cache = Path(shutil.copytree(work.cache, tmp_path / "cache"))
    index = json.loads((cache / "index.json").read_text())
    shard = cache / "entry_00000.safetensors"
    assert index["entries"]["0"]["sha256"] == digest(shard)
    flip_byte(shard)
    others = {p.name: digest(p) for p in cache.glob("entry_*.safetensors") if p != shard}

    rc, _, err = call(
        TRAIN, ["train", work.bundle, "--cache", cache, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "entry_00000.safetensors", "sha256", "device-train precompute")
    assert not (tmp_path / "out" / "lora.safetensors").exists()

    rc, out, err = call(
        TRAIN, ["precompute", work.bundle, "--images", work.photos, "--cache", cache, "--quiet"], capsys
    )
    assert rc == 0, err
    assert "cache ready" in out
    new_index = json.loads((cache / "index.json").read_text())
    assert new_index["entries"]["0"]["sha256"] == digest(shard)
    assert {p.name: digest(p) for p in cache.glob("entry_*.safetensors") if p != shard} == others  # only it
    # the same sample again (a chunk of one may round differently from the first chunk of four)
    a, b = load_file(work.cache / shard.name), load_file(shard)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-5)

    rc, out, err = call(
        TRAIN, ["train", work.bundle, "--cache", cache, "-o", tmp_path / "out", "--quiet"], capsys
    )
    assert rc == 0, err
    assert "LoRA written" in out
    a, b = load_file(work.run / "lora.safetensors"), load_file(tmp_path / "out" / "lora.safetensors")
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cmd", ["run", "train"])
def test_output_under_a_regular_file(work, tmp_path, capsys, cmd):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    argv = (
        ["run", work.bundle, "--images", work.photos, "-o", out]
        if cmd == "run"
        else ["train", work.bundle, "--cache", work.cache, "-o", out]
    )
    rc, _, err = call(TRAIN, [*argv, "--quiet"], capsys)
    assert_user_error(rc, err, TRAIN, "cannot create", "afile", "-o")
    assert (tmp_path / "afile").read_text() == "x"


def test_output_that_is_a_file(work, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, _, err = call(
        TRAIN, ["train", work.bundle, "--cache", work.cache, "-o", tmp_path / "afile", "--quiet"], capsys
    )
    assert_user_error(rc, err, TRAIN, "afile", "-o")
    assert (tmp_path / "afile").read_text() == "x"


def test_new_photos_into_the_same_output_do_not_reuse_the_old_training(work, run_copy, tmp_path, capsys):
    """``device-train run`` with other photos into a finished run's -o must not 'resume' the old checkpoint
    (training nothing and rewriting the old LoRA): it trains anew or refuses before touching anything."""
    photos_b = make_photos(tmp_path / "photos_b", seed=100)
    old_lora = digest(run_copy / "lora.safetensors")
    rc, _, err = call(TRAIN, ["run", work.bundle, "--images", photos_b, "-o", run_copy, "--quiet"], capsys)
    if rc == 0:  # accepted: then it must really train on the new photos
        log = json.loads((run_copy / "train_log.json").read_text())
        assert log["resumed_from"] == 0
        assert digest(run_copy / "lora.safetensors") != old_lora
    else:  # or refused with a clear message, before touching anything
        assert_user_error(rc, err, TRAIN, "checkpoint")
        assert digest(run_copy / "lora.safetensors") == old_lora
