"""Nothing the device reads is trusted: a table of damaged bundles, caches and checkpoints, each given to
``device-train train`` and to the native runner. Each must end in a typed refusal that names what is
wrong (one ``error:`` line, exit 2 / 1, no traceback, no crash) and never in a LoRA written from
damaged data. Manifests are resealed after a change (``bundle.write_manifest``) so that the declared
format, not the integrity record, is what refuses them; separate cases flip bits without resealing.
Hypothesis mutations of the manifest and the cache index: never an untyped exception."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockskip.device_train.cli import main as train_main
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model
from blockskip.runtime import formats
from blockskip.runtime.bundle import Bundle, write_manifest
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile
from blockskip.runtime.tensorfile import TensorFile, canonical_digest, write_tensors

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=4,
    steps=2,
    checkpoint_every=1,
    lora_rank=4,
    lr=3e-3,
    span="streamed",
    storage="int8",
)


@pytest.fixture(scope="module")
def good(tmp_path_factory, photos):
    """A streamed bundle (torch and pte), its cache and a finished run with its checkpoint: read-only."""
    root = tmp_path_factory.mktemp("damaged")
    export_bundle(
        load_model("tiny-random"),
        Plan(**PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=["torch", "pte"],
    )
    assert (
        train_main(["run", str(root / "bundle"), "--images", str(photos), "-o", str(root / "run"), "--quiet"])
        == 0
    )
    ckpt = root / "run" / formats.CHECKPOINT_DIR / formats.CHECKPOINT
    assert ckpt.is_file() and (root / "run" / "cache" / formats.CACHE_INDEX).is_file()
    (root / "run" / "lora.safetensors").unlink()  # a finished run without its LoRA: train resumes at the end
    return SimpleNamespace(root=root, bundle=root / "bundle", run=root / "run")


# --- damage -------------------------------------------------------------------------------------


def manifest(change):
    def damage(w):
        m = json.loads((w.bundle / formats.MANIFEST).read_text())
        change(m)
        write_manifest(w.bundle / formats.MANIFEST, m)
        # the cache as if precomputed for this manifest, so its own check is what refuses it
        from blockskip.runtime.files import sha256_file

        p = w.cache / formats.CACHE_INDEX
        d = json.loads(p.read_text())
        d["source"]["bundle"] = sha256_file(w.bundle / formats.MANIFEST)
        d["source_sha256"] = formats.source_digest(d["source"])
        p.write_text(json.dumps(d))
        shutil.rmtree(w.out / formats.CHECKPOINT_DIR)  # a checkpoint of the old manifest's run

    return damage


def manifest_text(change):
    def damage(w):
        p = w.bundle / formats.MANIFEST
        p.write_text(change(p.read_text()))

    return damage


def index(change):
    def damage(w):
        p = w.cache / formats.CACHE_INDEX
        d = json.loads(p.read_text())
        p.write_text(json.dumps(d if change(d) is None else [d]))

    return damage


def shard(change, k: int = 0):
    """Rewrite shard k with ``change(tensors)`` and record its new sha256 (as if precompute had made it)."""

    def damage(w):
        p = w.cache / formats.shard_name(k)
        t = {n: np.array(a) for n, a in TensorFile(p).arrays.items()}
        change(t)
        write_tensors(p, t)
        reseal_shard(w, k)
        shutil.rmtree(w.out / formats.CHECKPOINT_DIR)  # train from the first step, reading the shards

    return damage


def reseal_shard(w, k: int) -> None:
    from blockskip.runtime.files import sha256_file

    p = w.cache / formats.CACHE_INDEX
    d = json.loads(p.read_text())
    d["entries"][str(k)]["sha256"] = sha256_file(w.cache / formats.shard_name(k))
    p.write_text(json.dumps(d))


def shard_bytes(data: bytes, k: int = 0):
    def damage(w):
        (w.cache / formats.shard_name(k)).write_bytes(data)
        reseal_shard(w, k)

    return damage


def checkpoint(change, reseal: bool = True):
    def damage(w):
        p = w.out / formats.CHECKPOINT_DIR / formats.CHECKPOINT
        f = TensorFile(p)
        t = {n: np.array(a) for n, a in f.arrays.items()}
        meta = dict(f.metadata)
        change(t, meta)
        if reseal:
            meta = {k: v for k, v in meta.items() if k != formats.META_SHA256}
            meta[formats.META_SHA256] = canonical_digest(t, meta)
        write_tensors(p, t, meta)

    return damage


def flip(rel_of, where: float):
    def damage(w):
        p = rel_of(w)
        data = bytearray(p.read_bytes())
        data[int(len(data) * where)] ^= 0x40
        p.write_bytes(bytes(data))

    return damage


def first_param(t: dict) -> str:
    return sorted(n for n in t if n.startswith(formats.PARAM))[0]


def _set(*path_value):
    *path, value = path_value

    def change(d):
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return change


def _del(*path):
    def change(d):
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return change


def _nested(depth: int):
    return "[" * depth + "]" * depth


def _pickle_shard() -> bytes:
    import pickle

    return pickle.dumps({"in.hidden": [1.0, 2.0]})


def _flip_lr(text: str) -> str:
    return text.replace('"lr": 0.003', '"lr": 0.002', 1)


CASES = {
    # manifest: the declared format (resealed)
    "steps a string": (manifest(_set("plan", "steps", "10")), ["plan.steps", "integer"]),
    "steps 0": (manifest(_set("plan", "steps", 0)), ["plan.steps", ">= 1"]),
    "steps -1": (manifest(_set("plan", "steps", -1)), ["plan.steps"]),
    "checkpoint_every 0": (manifest(_set("plan", "checkpoint_every", 0)), ["plan.checkpoint_every"]),
    "vae_factor 0": (manifest(_set("vae_factor", 0)), ["vae_factor"]),
    "no lora section": (manifest(_del("lora")), ["lora", "missing"]),
    "no encoder section": (manifest(_del("encoder")), ["encoder", "missing"]),
    "model.blocks one short": (manifest(lambda m: m["model"]["blocks"].pop()), ["model.blocks"]),
    "lora_rank a string": (manifest(_set("plan", "lora_rank", "16")), ["plan.lora_rank"]),
    "lora_rank 0": (manifest(_set("plan", "lora_rank", 0)), ["plan.lora_rank"]),
    "lora.rank not the plan's": (manifest(_set("lora", "rank", 8)), ["lora.rank", "plan.lora_rank"]),
    "grad_accum 0": (manifest(_set("plan", "grad_accum", 0)), ["plan.grad_accum"]),
    "num_samples 10**9": (
        manifest(_set("schedule", "num_samples", 10**9)),
        ["schedule.num_samples", "100000"],
    ),
    "s_min off the granularity": (
        manifest(lambda m: m["schedule"].update(s_min=m["schedule"]["granularity"] + 1)),
        ["schedule.s_min"],
    ),
    "nested 200000 deep": (
        manifest_text(lambda s: s.replace('"prompt_text": ', f'"prompt_text": {_nested(200000)}, "x": ', 1)),
        ["nested"],
    ),
    "trained block out of range": (manifest(_set("model", "trained", [0, 99])), ["model.trained[1]"]),
    "stream shape unknown": (
        manifest(lambda m: m["stream"]["train"][0].__setitem__(1, "nope")),
        ["stream.train[0][1]", "stream.shapes"],
    ),
    "block file not listed": (
        manifest(lambda m: m["files"].pop(m["model"]["blocks"][0])),
        ["model.blocks[0]"],
    ),
    "lr 0": (manifest(_set("plan", "lr", 0.0)), ["plan.lr"]),
    "a JSON array": (manifest_text(lambda s: "[1, 2]"), ["manifest"]),
    "a byte-order mark": (manifest_text(lambda s: "\ufeff" + s), ["manifest.json"]),
    "duplicate key": (manifest_text(lambda s: s.replace("{", '{"family": "flux", ', 1)), ["twice"]),
    # manifest: its integrity record (not resealed)
    "lr bit flip": (manifest_text(_flip_lr), ["integrity"]),
    "integrity record removed": (
        manifest_text(lambda s: s.replace('"canonical_sha256"', '"canonical_sha"')),
        ["integrity"],
    ),
    # the cache index
    "index a JSON array": (index(lambda d: True), ["index.json"]),
    "entry without sha256": (index(_del("entries", "0", "sha256")), ["entries.0.sha256", "missing"]),
    "schedule cut in half": (
        index(lambda d: d["schedule"].__setitem__("entries", d["schedule"]["entries"][:2])),
        ["schedule"],
    ),
    "schedule entry edited": (index(lambda d: d["schedule"]["entries"][1].__setitem__("t", 1)), ["schedule"]),
    "image index out of range": (
        index(lambda d: d["schedule"]["entries"][0].__setitem__("image", 7)),
        ["schedule.entries[0].image"],
    ),
    "identity edited": (index(lambda d: d.__setitem__("source_sha256", "0" * 64)), ["source_sha256"]),
    "entry key beyond the schedule": (
        index(lambda d: d["entries"].__setitem__("9", d["entries"]["0"])),
        ["entries"],
    ),
    # cache shards (their sha256 updated, as if precompute had written them)
    "NaN in a shard": (
        shard(lambda t: t[sorted(n for n in t if n.startswith("in."))[0]].flat.__setitem__(0, np.nan)),
        ["NaN", formats.shard_name(0)],
    ),
    "Inf in a target": (
        shard(lambda t: t["target"].flat.__setitem__(3, np.inf), k=2),
        ["NaN or Inf", "target"],
    ),
    "a target whose loss overflows": (
        shard(lambda t: t["target"].__setitem__(..., 3e38)),
        ["non-finite loss"],
    ),
    "a pickle as shard": (shard_bytes(_pickle_shard()), [formats.shard_name(0)]),
    "shard without its target": (shard(lambda t: t.pop("target")), ["target", "missing"]),
    "shard path is a folder": (
        lambda w: ((w.cache / formats.shard_name(1)).unlink(), (w.cache / formats.shard_name(1)).mkdir()),
        ["incomplete", "precompute"],
    ),
    # checkpoints
    "checkpoint bit flip": (
        flip(lambda w: w.out / formats.CHECKPOINT_DIR / formats.CHECKPOINT, 0.7),
        ["checkpoint"],
    ),
    "checkpoint exponent flip": (
        checkpoint(
            lambda t, m: (
                t[first_param(t)]
                .view(np.uint32)
                .flat.__setitem__(0, t[first_param(t)].view(np.uint32).flat[0] ^ 0x40000000)
            ),
            reseal=False,
        ),
        ["integrity"],
    ),
    "checkpoint NaN resealed": (
        checkpoint(lambda t, m: t[first_param(t)].flat.__setitem__(0, np.nan)),
        ["NaN"],
    ),
    "checkpoint step not a number": (checkpoint(lambda t, m: m.__setitem__("step", "two")), ["step"]),
    "checkpoint truncated": (
        lambda w: (w.out / formats.CHECKPOINT_DIR / formats.CHECKPOINT).write_bytes(
            (w.out / formats.CHECKPOINT_DIR / formats.CHECKPOINT).read_bytes()[:100]
        ),
        ["checkpoint"],
    ),
    "checkpoint without its record": (
        checkpoint(lambda t, m: m.pop(formats.META_SHA256), reseal=False),
        ["sha256"],
    ),
}


@pytest.fixture
def work(good, tmp_path):
    shutil.copytree(good.bundle, tmp_path / "bundle")
    shutil.copytree(good.run, tmp_path / "out")
    return SimpleNamespace(bundle=tmp_path / "bundle", out=tmp_path / "out", cache=tmp_path / "out" / "cache")


def _one_error_line(err: str, prog: str) -> str:
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_python_refuses_damaged_input(work, name, capsys):
    damage, words = CASES[name]
    damage(work)
    capsys.readouterr()
    rc = train_main(["train", str(work.bundle), "--cache", str(work.cache), "-o", str(work.out), "--quiet"])
    line = _one_error_line(capsys.readouterr().err, "device-train")
    assert rc == 2, line
    for w in words:
        assert w in line, (w, line)
    assert not (work.out / "lora.safetensors").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_native_refuses_damaged_input(runner, work, name):
    damage, words = CASES[name]
    damage(work)
    r = subprocess.run(
        [str(runner), "train", str(work.bundle), "--cache", str(work.cache), "-o", str(work.out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = _one_error_line(r.stderr, "blockskip-train-native")
    assert r.returncode in (1, 2), (r.returncode, line)
    for w in words:
        assert w in line, (w, line)
    assert not (work.out / "lora.safetensors").exists()


# changes a reader may accept: what the device does not read (the profile it was planned for is a record)
ACCEPTED = {
    "undamaged": lambda w: None,
    "profile edited and resealed": manifest(_set("profile", "memory", "plenty")),
    "prompt text edited and resealed": manifest(_set("prompt_text", "a photo of sks dog")),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_python_accepts_what_it_may(work, name, capsys):
    """Accepted copies train and write the LoRA (so each case above is refused for its damage, not for
    something else)."""
    ACCEPTED[name](work)
    assert (
        train_main(["train", str(work.bundle), "--cache", str(work.cache), "-o", str(work.out), "--quiet"])
        == 0
    )
    assert (work.out / "lora.safetensors").is_file()


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_native_accepts_what_it_may(runner, work, name):
    ACCEPTED[name](work)
    r = subprocess.run(
        [str(runner), "train", str(work.bundle), "--cache", str(work.cache), "-o", str(work.out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (work.out / "lora.safetensors").is_file()


# --- property-based: mutated JSON is refused with a typed error or read whole -------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, data):
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON)
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_manifests_are_refused_or_read_whole(good, tmp_path_factory, data):
    """A resealed mutation: Bundle() refuses it with a typed error, or every value the runtime reads from it
    (plan, schedule, trained blocks, files) is read without an untyped exception."""
    root = tmp_path_factory.mktemp("mut")
    m = json.loads((good.bundle / formats.MANIFEST).read_text())
    write_manifest(root / formats.MANIFEST, _mutate(m, data))
    try:
        b = Bundle(root)
        b.plan.validate(len(b.manifest["model"]["blocks"]), b.manifest["schedule"]["granularity"])
        schedule = b.schedule(3)
    except BlockSkipError:
        return
    assert len(schedule) == b.manifest["schedule"]["num_samples"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_training_on_a_mutated_manifest_is_refused_or_runs(good, tmp_path_factory, data, capsys):
    """The whole of ``device-train train`` on a resealed mutation (the cache re-pointed at it): a typed
    refusal (exit 2) or a run that finishes, never an internal error."""
    root = tmp_path_factory.mktemp("mutrun")
    w = SimpleNamespace(bundle=root / "bundle", out=root / "out", cache=root / "out" / "cache")
    shutil.copytree(good.bundle, w.bundle)
    shutil.copytree(good.run, w.out)

    def change(m):
        new = _mutate(m, data)
        m.clear()
        m.update(new)

    manifest(change)(w)
    capsys.readouterr()
    rc = train_main(["train", str(w.bundle), "--cache", str(w.cache), "-o", str(w.out), "--quiet"])
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    assert rc in (0, 2), err
    assert (rc == 0) == (w.out / "lora.safetensors").is_file()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_cache_indexes_are_refused_or_read_whole(good, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("mutidx")
    d = json.loads((good.run / "cache" / formats.CACHE_INDEX).read_text())
    (root / formats.CACHE_INDEX).write_text(json.dumps(_mutate(d, data)))
    bundle = Bundle(good.bundle)
    try:
        c = ResidualCache(root)
        c.check_complete(bundle)
    except BlockSkipError:
        return
    assert len(c.schedule) == bundle.manifest["schedule"]["num_samples"]
