"""The on-disk formats (``runtime/formats.py``): the generated schema files and C++ header are up to
date, files the Python runtime writes validate against their schemas, mutated copies do not, and the
readers take their names from the one declaration."""

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
from conftest import export_and_precompute

from blockskip.runtime import formats, schema_check
from blockskip.runtime.plan import Plan

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "docs" / "schemas"
PLAN = dict(
    front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=3, steps=2, checkpoint_every=1, lora_rank=4
)


# --- the generated files ----------------------------------------------------------------------------


def test_schema_files_are_up_to_date():
    """docs/schemas holds one file per format, each as the module writes it (else: run
    `python -m blockskip.runtime.formats --write docs/schemas`)."""
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(
        f"{k}.schema.json" for k in formats.KINDS
    )
    for kind in formats.KINDS:
        assert (SCHEMAS / f"{kind}.schema.json").read_text() == formats.schema_text(kind), kind


def test_cpp_header_is_up_to_date():
    assert (ROOT / formats.HEADER).read_text() == formats.cpp_header()


def test_cpp_header_declares_the_python_values():
    """Each constant of formats.h, parsed back, is the Python value of the same name."""
    text = formats.cpp_header()
    got = dict(re.findall(r"inline constexpr (?:char|int) (k\w+)(?:\[\])? = (.+);", text))
    assert len(got) == len(formats.CPP_NAMES)
    for name in formats.CPP_NAMES:
        assert json.loads(got[formats._cpp_name(name)]) == getattr(formats, name), name


def test_check_command_finds_stale_files(tmp_path, capsys):
    out, header = tmp_path / "schemas", tmp_path / "formats.h"
    assert formats.main(["--check", str(out), "--header", str(header)]) == 1  # nothing written yet
    assert formats.main(["--write", str(out), "--header", str(header)]) == 0
    assert formats.main(["--check", str(out), "--header", str(header)]) == 0
    p = out / "checkpoint.schema.json"
    p.write_text(p.read_text().replace(formats.PARAM.replace(".", "\\\\."), "parameter\\\\."))
    capsys.readouterr()
    assert formats.main(["--check", str(out), "--header", str(header)]) == 1
    assert capsys.readouterr().err.split() == ["out", "of", "date:", str(p)]


@pytest.mark.parametrize("kind", formats.KINDS)
def test_schemas_are_draft_2020_12(kind):
    s = formats.schema(kind)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)


def test_plan_schema_follows_the_plan():
    """The plan's schema is derived from the Plan dataclass: every field required, no other."""
    plan = formats.schema("manifest")["$defs"]["Plan"]
    assert plan["required"] == list(Plan().to_dict()) and plan["additionalProperties"] is False


# --- the readers use the declared names --------------------------------------------------------------

# literals the declaration owns: none of these readers spells them any more
OWNED = [
    '"param.',
    '"opt.',
    '"in."',
    '"c."',
    '"delta.',
    '"target"',
    '"index.json"',
    '"checkpoint.safetensors"',
    '"manifest.json"',
    '"state.',
    '"grad_in.',
    '"lora_grad.',
    '"lora."',
    '"source_sha256"',
]


@pytest.mark.parametrize(
    "rel", ["runtime/cache.py", "runtime/checkpoint.py", "runtime/stream.py", "runtime/bundle.py"]
)
def test_python_readers_take_the_declared_names(rel):
    code = [line for line in (ROOT / rel).read_text().splitlines() if not line.lstrip().startswith("#")]
    body = "\n".join(code)
    assert "blockskip.runtime.formats import" in body
    found = [lit for lit in OWNED if lit in body.replace('f"', '"')]
    assert not found, f"{rel} spells {found}; take them from runtime/formats.py"


@pytest.mark.parametrize("rel", ["bundle.cpp", "stream.cpp", "driver.cpp"])
def test_native_readers_take_the_declared_names(rel):
    text = (ROOT / "device_train" / "native" / rel).read_text()
    assert '#include "formats.h"' in text
    code = "\n".join(line.split("//")[0] for line in text.splitlines())
    strings = set(re.findall(r'"(?:[^"\\]|\\.)*"', code))
    whole = {lit if lit.endswith('"') else lit + '"' for lit in OWNED}
    found = sorted(s for s in strings if s in whole or s.startswith(('"param.', '"opt.', '"delta.', '"in.')))
    assert not found, f"{rel} spells {found}; use formats.h"


# --- the cache's identity ---------------------------------------------------------------------------


def test_source_digest_is_the_ascii_escaped_sorted_dump():
    source = {"images": {"b.png": "1" * 64, "café.png": "2" * 64}, "bundle": "3" * 64}
    text = (
        '{"bundle": "'
        + "3" * 64
        + '", "images": {"b.png": "'
        + "1" * 64
        + '", "caf\\u00e9.png": "'
        + "2" * 64
        + '"}}'
    )
    assert formats.source_digest(source) == hashlib.sha256(text.encode("ascii")).hexdigest()
    assert formats.source_digest(dict(reversed(source.items()))) == formats.source_digest(source)


# --- files the Python runtime writes ----------------------------------------------------------------


def _train(root: Path, plan: dict, photos: Path) -> Path:
    from blockskip.device_train.app import run_train

    export_and_precompute(root, Plan(**plan), photos)
    run_train(root / "bundle", root / "cache", root / "out", quiet=True)
    return root


@pytest.fixture(scope="module")
def resident(tmp_path_factory, photos) -> Path:
    """A tiny torch bundle (resident span), its cache and a torch-backend run in root/out."""
    return _train(tmp_path_factory.mktemp("formats-resident"), PLAN, photos)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, photos) -> Path:
    """The same with a block-streamed span over int8 weights (runtime/stream.py writes the checkpoint)."""
    return _train(
        tmp_path_factory.mktemp("formats-streamed"), {**PLAN, "span": "streamed", "storage": "int8"}, photos
    )


def documents(root: Path) -> dict[str, object]:
    """Every file of a run, parsed: kind -> document (the first cache shard for cache_entry)."""
    return {
        "manifest": json.loads((root / "bundle" / formats.MANIFEST).read_text()),
        "cache_index": json.loads((root / "cache" / formats.CACHE_INDEX).read_text()),
        "cache_entry": formats.safetensors_header(root / "cache" / formats.shard_name(0)),
        "checkpoint": formats.safetensors_header(root / "out" / formats.CHECKPOINT_DIR / formats.CHECKPOINT),
        "train_log": json.loads((root / "out" / formats.TRAIN_LOG).read_text()),
        "lora": formats.safetensors_header(root / "out" / formats.LORA_FILE),
    }


def check_run(root: Path) -> dict:
    docs = documents(root)
    for kind, doc in docs.items():
        formats.validate(kind, doc)
    index = docs["cache_index"]
    for k in range(len(index["schedule"]["entries"])):
        formats.validate("cache_entry", formats.safetensors_header(root / "cache" / formats.shard_name(k)))
    # the identity as documented: the manifest's bytes, the photos' bytes, the sorted dump
    assert (
        index["source"]["bundle"]
        == hashlib.sha256((root / "bundle" / formats.MANIFEST).read_bytes()).hexdigest()
    )
    assert (
        index["source_sha256"] == formats.source_digest(index["source"]) == docs["train_log"]["cache_source"]
    )
    return docs


def test_python_run_files_validate(resident):
    docs = check_run(resident)
    ckpt = docs["checkpoint"]
    params = {k[len(formats.PARAM) :] for k in ckpt if k.startswith(formats.PARAM)}
    assert params and all(formats.opt_key(s, n) in ckpt for n in params for s in formats.ADAMW_STATE)
    assert json.loads(ckpt["__metadata__"]["log"])["cache_source"] == docs["train_log"]["cache_source"]


@pytest.mark.slow
def test_python_streamed_run_files_validate(streamed):
    docs = check_run(streamed)
    assert docs["train_log"]["span"] == "streamed" and docs["manifest"]["stream"]["storage"] == "int8"
    ckpt = docs["checkpoint"]
    params = {k[len(formats.PARAM) :] for k in ckpt if k.startswith(formats.PARAM)}
    assert {k for k in ckpt if k != "__metadata__"} == {formats.PARAM + n for n in params} | {
        formats.opt_key(s, n) for n in params for s in formats.ADAMW_STATE
    }


# --- mutated copies fail ---------------------------------------------------------------------------


def _first(d: dict, prefix: str) -> str:
    return next(k for k in d if k.startswith(prefix))


def _del(*path):
    def f(doc):
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]

    return f


def _set(value, *path):
    def f(doc):
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value

    return f


def _rename(prefix, new):
    def f(doc):
        k = _first(doc, prefix)
        doc[new + k[len(prefix) :]] = doc.pop(k)

    return f


def _drop_all(prefix):
    def f(doc):
        for k in [k for k in doc if k.startswith(prefix)]:
            del doc[k]

    return f


def _in_first_tensor(prefix, field, value):
    def f(doc):
        doc[_first(doc, prefix)][field] = value

    return f


def _first_file(field, value):
    def f(doc):
        doc["files"][next(iter(doc["files"]))][field] = value

    return f


def _log(change):
    def f(doc):
        log = json.loads(doc["__metadata__"]["log"])
        change(log)
        doc["__metadata__"]["log"] = json.dumps(log)

    return f


MUTATIONS = {
    "manifest": {
        "no plan": _del("plan"),
        "no files": _del("files"),
        "steps as text": _set("2", "plan", "steps"),
        "unknown plan field": _set(1, "plan", "not_a_field"),
        "another generator": _set("mt19937", "schedule", "rng"),
        "another schema version": _set(formats.SCHEMA_VERSION + 1, "schema_version"),
        "no lora metadata format": _del("lora", "metadata", "format"),
        "stream.train pair of one": _set([[1]], "stream", "train"),
        "bad file digest": _first_file("sha256", "not-a-digest"),
        "negative size": _first_file("size", -1),
    },
    "cache_index": {
        "no identity": _del("source_sha256"),
        "no schedule": _del("schedule"),
        "entry key not a number": lambda d: d["entries"].update(a=d["entries"]["0"]),
        "shard outside the cache": lambda d: d["entries"]["0"].update(file="../entry_00000.safetensors"),
        "photo digest a number": lambda d: d["source"]["images"].update(
            {next(iter(d["source"]["images"])): 5}
        ),
        "timestep as text": lambda d: d["schedule"]["entries"][0].update(t="1"),
        "unknown key": _set(True, "extra"),
    },
    "cache_entry": {
        "no target": _del("target"),
        "no in. tensor": _drop_all(formats.ENTRY_IN),
        "unknown tensor": _rename(formats.ENTRY_IN, "input."),
        "int8 constant": _in_first_tensor(formats.ENTRY_CONST, "dtype", "I8"),
        "delta without block": lambda d: d.update({"delta.hidden": d["target"]}),
        "shape as text": _in_first_tensor(formats.ENTRY_IN, "shape", "1x16"),
    },
    "checkpoint": {
        "no metadata": _del("__metadata__"),
        "no log": _del("__metadata__", "log"),
        "step not a number": _set("two", "__metadata__", "step"),
        "no parameter": _drop_all(formats.PARAM),
        "step of two values": _in_first_tensor(formats.OPT_STEP, "shape", [2]),
        "unknown tensor": _rename(formats.PARAM, "weight."),
        "log without identity": _log(lambda log: log.pop("cache_source")),
        "log losses as text": _log(lambda log: log.update(losses="0.5")),
        "log not JSON": _set("{not json", "__metadata__", "log"),
    },
    "train_log": {
        "no losses": _del("losses"),
        "no plan": _del("plan"),
        "loss as text": _set(["0.5"], "losses"),
        "negative resume": _set(-1, "resumed_from"),
        "identity not a digest": _set("abc", "cache_source"),
        "unknown span": _set("partial", "span"),
    },
    "lora": {
        "no metadata": _del("__metadata__"),
        "no format": _del("__metadata__", "format"),
        "metadata value a number": _set(1, "__metadata__", "format"),
        "adapter metadata not JSON": _set("{", "__metadata__", "lora_adapter_metadata"),
        "adapter metadata without rank": lambda d: d["__metadata__"].update(
            lora_adapter_metadata=json.dumps(
                {
                    k: v
                    for k, v in json.loads(d["__metadata__"]["lora_adapter_metadata"]).items()
                    if k != "transformer.r"
                }
            )
        ),
        "peft name": _rename(formats.LORA_PREFIX, ""),
        "float16 tensor": _in_first_tensor(formats.LORA_PREFIX, "dtype", "F16"),
    },
}


@pytest.mark.parametrize("kind,name", [(k, n) for k, ms in MUTATIONS.items() for n in ms])
def test_mutated_copies_fail(resident, kind, name):
    doc = documents(resident)[kind]
    formats.validate(kind, doc)  # the original passes
    bad = copy.deepcopy(doc)
    MUTATIONS[kind][name](bad)
    assert bad != doc
    with pytest.raises(jsonschema.ValidationError):
        formats.validate(kind, bad)
    # the runtime's own checker (no jsonschema) accepts the original and refuses the copy too
    assert schema_check.problem(kind, doc) is None
    assert schema_check.problem(kind, bad) is not None


def test_validate_refuses_an_unknown_kind():
    with pytest.raises(KeyError, match="unknown format"):
        formats.validate("bundle", {})
