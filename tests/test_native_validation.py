"""The native runner trusts nothing it reads: `blockskip-train-native check KIND FILE` (the runner's own
checks of a manifest, cache index, cache shard or checkpoint) refuses what the Python runtime refuses,
with the same sentence (runtime/schema_check.py and device_train/native/schema.cpp read the same generated
schemas and rules), and the train command refuses damaged bundles, caches and checkpoints with one line
and exit status 2. Checkpoints carry an integrity record both runtimes write and check, so each resumes
the other's."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import export_and_precompute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockskip.runtime import formats, schema_check
from blockskip.runtime.checkpoint import checkpoint_metadata
from blockskip.runtime.plan import Plan
from blockskip.runtime.tensorfile import TensorFile, write_tensors

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=4,
    grad_accum=1,
    lr=3e-3,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=2,
)


def check(runner: Path, kind: str, path: Path) -> tuple[int, str]:
    r = subprocess.run([str(runner), "check", kind, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 2), (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "internal" not in r.stdout
    return r.returncode, r.stdout.strip()


@pytest.fixture(scope="module")
def docs(tmp_path_factory, photos):
    """A manifest and a cache index the tiny pipeline wrote (torch bundle, Python precompute)."""
    root = export_and_precompute(tmp_path_factory.mktemp("validation"), Plan(**PLAN), photos)
    return (
        json.loads((root / "bundle" / formats.MANIFEST).read_text()),
        json.loads((root / "cache" / formats.CACHE_INDEX).read_text()),
        root,
    )


def _set(doc, path, value):
    d = copy.deepcopy(doc)
    x = d
    for p in path[:-1]:
        x = x[p]
    if value is _DELETE:
        del x[path[-1]]
    else:
        x[path[-1]] = value
    return d


_DELETE = object()

# (kind, path, new value, the key the refusal names)
MUTATIONS = [
    ("manifest", ["plan", "steps"], "10", "plan.steps"),
    ("manifest", ["plan", "steps"], 0, "plan.steps"),
    ("manifest", ["plan", "steps"], 10**8, "plan.steps"),
    ("manifest", ["plan", "steps"], 4.0, "plan.steps"),
    ("manifest", ["plan", "steps"], True, "plan.steps"),
    ("manifest", ["plan", "lr"], -1.0, "plan.lr"),
    ("manifest", ["plan", "span"], "sideways", "plan.span"),
    ("manifest", ["plan", "surprise"], 1, "plan.surprise"),
    ("manifest", ["plan", "grad_accum"], 10**5, "plan.grad_accum"),
    ("manifest", ["lora", "rank"], 5000, "lora.rank"),
    ("manifest", ["family"], _DELETE, "family"),
    ("manifest", ["files"], [], "files"),
    ("manifest", ["formats"], [], "formats"),
    ("manifest", ["schema_version"], 1, "schema version"),
    # each rule broken
    ("manifest", ["schedule", "s_min"], 36, "schedule.s_min"),  # multiple_of granularity (and plan.s_min)
    ("manifest", ["schedule", "s_max"], 68, "schedule.s_max"),
    ("manifest", ["plan", "seed"], 99, "plan.seed"),  # eq schedule.seed
    ("manifest", ["lora", "rank"], 8, "lora.rank"),  # eq plan.lora_rank
    ("manifest", ["model", "block_kinds"], ["double"], "model.block_kinds"),  # same_length
    ("manifest", ["model", "trained"], [99], "model.trained[0]"),  # index_into
    ("manifest", ["prompt"], "nowhere.safetensors", "prompt"),  # key_in files
    ("cache_index", ["schedule", "entries", 3, "image"], 7, "schedule.entries[3].image"),  # lt num_images
    ("cache_index", ["schedule", "entries", 3, "t"], 1001, "schedule.entries[3].t"),  # le T
    ("cache_index", ["schedule", "entries", 2, "side"], 4096, "schedule.entries[2].side"),  # le s_max
    ("cache_index", ["schedule", "meta", "s_min"], 33, "schedule.meta.s_min"),  # multiple_of
    (
        "cache_index",
        ["entries", "99"],
        {"file": "entry_00099.safetensors", "sha256": "0" * 64},
        "entries",
    ),  # keys_index
    ("cache_index", ["entries", "01"], {"file": "entry_00001.safetensors", "sha256": "0" * 64}, "entries.01"),
    ("cache_index", ["schedule", "entries"], [], "schedule.entries"),
    ("cache_index", ["schedule", "entries", 0, "sigma"], 0, "schedule.entries[0].sigma"),
    ("cache_index", ["source_sha256"], "X", "source_sha256"),
    ("cache_index", ["source"], _DELETE, "source"),
    ("cache_index", ["schedule", "meta", "num_images"], 10**6, "schedule.meta.num_images"),
]


@pytest.mark.parametrize(
    "kind,path,value,key",
    MUTATIONS,
    ids=[f"{m[0]}:{'.'.join(map(str, m[1]))}={m[2]!r}"[:60] for m in MUTATIONS],
)
def test_a_mutation_is_refused_naming_its_key(kind, path, value, key, docs, runner, tmp_path):
    manifest, index, _ = docs
    doc = _set(manifest if kind == "manifest" else index, path, value)
    if kind == "manifest":
        doc = formats.seal_manifest(doc)  # sealed: the schema is what refuses it
    p = tmp_path / "doc.json"
    p.write_text(json.dumps(doc))
    rc, out = check(runner, kind, p)
    assert rc == 2 and key in out, out
    assert len(out.splitlines()) == 1
    want = schema_check.problem(kind, doc)
    if path != ["schema_version"]:  # (the version is checked first, in its own words)
        assert want in out, (want, out)


def test_the_documents_as_written_are_accepted(docs, runner, tmp_path):
    manifest, index, root = docs
    assert check(runner, "manifest", root / "bundle" / formats.MANIFEST) == (0, "ok")
    assert check(runner, "cache_index", root / "cache" / formats.CACHE_INDEX) == (0, "ok")
    for shard in sorted((root / "cache").glob("entry_*.safetensors")):
        assert check(runner, "cache_entry", shard) == (0, "ok")


def test_integrity_depth_and_duplicate_keys(docs, runner, tmp_path):
    manifest, index, root = docs
    p = tmp_path / "m.json"
    # edited without sealing: the integrity record refuses it
    p.write_text(json.dumps({**manifest, "prompt_text": manifest["prompt_text"] + "!"}, indent=1))
    rc, out = check(runner, "manifest", p)
    assert rc == 2 and "integrity record (canonical_sha256)" in out, out
    # any layout of the same values is the same manifest (the record is over the canonical form)
    p.write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=3, ensure_ascii=False))
    assert check(runner, "manifest", p) == (0, "ok")
    # the canonical form is Python's, byte for byte: escapes of any character, floats as repr, big integers
    odd = formats.seal_manifest(
        {
            **manifest,
            "prompt_text": 'caf\u00e9 \U0001f431 \x7f\t"\\ \u2028',
            "extra": [1e16, 1e-7, -0.0, 5e-324, 0.1 + 0.2, 12345678901234567890123, -0],
        }
    )
    for ensure_ascii in (True, False):
        p.write_text(json.dumps(odd, ensure_ascii=ensure_ascii), encoding="utf-8")
        assert check(runner, "manifest", p) == (0, "ok")
    # nested too deep, duplicate keys, NaN: not read at all
    deep = formats.seal_manifest({**manifest, "memory": {"x": json.loads("[" * 70 + "]" * 70)}})
    p.write_text(json.dumps(deep))
    rc, out = check(runner, "manifest", p)
    assert rc == 2 and "nested deeper than 64 levels" in out, out
    text = json.dumps(index)
    p.write_text('{"source_sha256": "' + "0" * 64 + '", ' + text[1:])
    rc, out = check(runner, "cache_index", p)
    assert rc == 2 and 'the key "source_sha256" appears twice' in out, out
    p.write_text(json.dumps(index).replace('"sigma": ', '"sigma": NaN, "x": ', 1))
    rc, out = check(runner, "cache_index", p)
    assert rc == 2 and "NaN" in out, out


# --- hypothesis: the runner's verdict is the Python runtime's --------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def _paths(doc, prefix=()):
    """Every path to a value (limited: the first entries of long lists and objects)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k in list(doc)[:8]:
            out += _paths(doc[k], (*prefix, k))
    elif isinstance(doc, list):
        for i in range(min(len(doc), 4)):
            out += _paths(doc[i], (*prefix, i))
    return out


@st.composite
def _mutation(draw, doc):
    paths = _paths(doc)
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths))
        parent = doc
        try:
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict) and not isinstance(path[-1], str):
                continue  # an earlier change made a list an object: JSON keys are strings
            if isinstance(parent, dict) and draw(st.booleans()) and path[-1] in parent:
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(_json)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change removed this path
    return doc


@pytest.mark.parametrize("kind", ["manifest", "cache_index"])
def test_the_verdict_is_the_python_runtimes(kind, docs, runner, tmp_path_factory):
    manifest, index, _ = docs
    base = manifest if kind == "manifest" else index
    folder = tmp_path_factory.mktemp(f"hyp-{kind}")

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mutation(base))
    def run(doc):
        if kind == "manifest":
            doc = formats.seal_manifest(doc)
        p = folder / "doc.json"
        p.write_text(json.dumps(doc))
        want = schema_check.problem(kind, doc)
        rc, out = check(runner, kind, p)
        assert (rc == 0) == (want is None), (want, out)
        if want is not None and doc.get("schema_version") == formats.SCHEMA_VERSION:
            assert want in out, (want, out)

    run()


# --- the train command refuses damaged inputs --------------------------------------------------------


@pytest.fixture(scope="module")
def native_run(runner, tmp_path_factory, photos):
    """A pte bundle and a native run stopped after step 2 (a checkpoint at step 2, the cache): read-only."""
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.runtime.profiles import load_profile

    pytest.importorskip(
        "executorch.extension.pybindings.portable_lib", reason="exporting pte needs executorch"
    )
    root = tmp_path_factory.mktemp("native-damaged")
    export_bundle(
        load_model("tiny-random"),
        Plan(**PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=["pte"],
    )
    r = subprocess.run(
        [
            str(runner),
            "run",
            str(root / "bundle"),
            "--images",
            str(photos),
            "-o",
            str(root / "run"),
            "--stop-after",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert (root / "run" / "checkpoint" / "checkpoint.safetensors").is_file()
    return root


def _train(runner, bundle, cache, out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(runner), "train", str(bundle), "--cache", str(cache), "-o", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _refused(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("blockskip-train-native: error: ") and needle in lines[0]
    ), r.stderr


def _copy_run(native_run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    bundle, out = tmp_path / "bundle", tmp_path / "run"
    shutil.copytree(native_run / "bundle", bundle)
    shutil.copytree(native_run / "run", out)
    return bundle, out / "cache", out


def test_a_flipped_bit_in_the_manifest(native_run, runner, tmp_path):
    bundle, cache, out = _copy_run(native_run, tmp_path)
    m = bundle / formats.MANIFEST
    data = bytearray(m.read_bytes())
    at = data.index(b'"prompt_text": "') + len(b'"prompt_text": "')
    data[at] ^= 0x01  # "a" -> "`": still JSON, another manifest
    m.write_bytes(bytes(data))
    _refused(_train(runner, bundle, cache, out), "does not match its integrity record (canonical_sha256)")


def test_a_damaged_checkpoint_is_not_resumed(native_run, runner, tmp_path):
    bundle, cache, out = _copy_run(native_run, tmp_path)
    ckpt = out / "checkpoint" / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    # a flipped bit in the data
    data = bytearray(good)
    data[-3] ^= 0x10
    ckpt.write_bytes(bytes(data))
    _refused(_train(runner, bundle, cache, out), "does not match its integrity record (sha256)")
    assert not (out / "lora.safetensors").exists()
    # a NaN, resealed (so the finite check is what refuses it)
    ckpt.write_bytes(good)
    t = TensorFile(ckpt)
    tensors = {k: np.array(v) for k, v in t.arrays.items()}
    name = sorted(k for k in tensors if k.startswith("param."))[0]
    tensors[name].reshape(-1)[0] = np.nan
    step, log = int(t.metadata["step"]), json.loads(t.metadata["log"])
    write_tensors(ckpt, tensors, checkpoint_metadata(tensors, step, log))
    _refused(_train(runner, bundle, cache, out), f"holds NaN or Inf values ({name})")
    assert "Delete " + str(out / "checkpoint") + " to start over" in _train(runner, bundle, cache, out).stderr
    # the check subcommand says the same
    rc, text = check(runner, "checkpoint", ckpt)
    assert rc == 2 and "NaN or Inf" in text
    ckpt.write_bytes(good)
    assert check(runner, "checkpoint", ckpt) == (0, "ok")


def test_a_cache_shard_holding_a_nan(native_run, runner, tmp_path):
    from blockskip.runtime.files import sha256_file

    bundle, cache, out = _copy_run(native_run, tmp_path)
    shutil.rmtree(out / "checkpoint")
    shard = cache / "entry_00000.safetensors"
    t = {k: np.array(v) for k, v in TensorFile(shard).arrays.items()}
    t["target"].reshape(-1)[5] = np.inf
    write_tensors(shard, t)
    idx = json.loads((cache / formats.CACHE_INDEX).read_text())
    idx["entries"]["0"]["sha256"] = sha256_file(shard)
    (cache / formats.CACHE_INDEX).write_text(json.dumps(idx))
    r = _train(runner, bundle, cache, out)
    _refused(r, "holds NaN or Inf values (target)")
    assert not (out / "checkpoint").exists() and not (out / "lora.safetensors").exists()


def test_an_index_whose_schedule_was_cut(native_run, runner, tmp_path):
    bundle, cache, out = _copy_run(native_run, tmp_path)
    idx = json.loads((cache / formats.CACHE_INDEX).read_text())
    idx["schedule"]["entries"] = idx["schedule"]["entries"][:3]
    idx["entries"] = {k: v for k, v in idx["entries"].items() if int(k) < 3}
    (cache / formats.CACHE_INDEX).write_text(json.dumps(idx))
    _refused(_train(runner, bundle, cache, out), "its schedule is not the one the bundle makes for 3 photos")


def test_checkpoints_move_between_the_runtimes(native_run, runner, tmp_path):
    """A checkpoint the native runner wrote (with its integrity record) resumes in the Python executorch
    backend, and the one Python writes resumes in the native runner; both end at the same LoRA."""
    from blockskip.device_train import cli as device_cli

    bundle, cache, out = _copy_run(native_run, tmp_path)
    full = tmp_path / "full"
    assert _train(runner, bundle, cache, full).returncode == 0
    # native stopped at 2 -> Python to the end
    assert (
        device_cli.main(
            [
                "train",
                str(bundle),
                "--cache",
                str(cache),
                "-o",
                str(out),
                "--backend",
                "executorch",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "train_log.json").read_text())["resumed_from"] == 2
    # Python's step-4 checkpoint -> the native runner resumes it (at the end: it writes the LoRA again)
    (out / "lora.safetensors").unlink()
    r = _train(runner, bundle, cache, out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train_log.json").read_text())["resumed_from"] == 4
    from safetensors.numpy import load_file

    a, b = load_file(out / "lora.safetensors"), load_file(full / "lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)
