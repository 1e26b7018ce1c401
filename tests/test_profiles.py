"""Device profiles: every shipped profile validates, and malformed files name the field and line."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blockskip.runtime.errors import ProfileError
from blockskip.runtime.profiles import (
    BACKENDS,
    DTYPES,
    ENGINES,
    GIB,
    MIB,
    Profile,
    available_profiles,
    key_lines,
    load_profile,
)

SHIPPED = [
    "desktop-cpu",
    "jetson-agx-orin-64gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "snapdragon8",
    "snapdragon8-gen2",
]
ANDROID = ["snapdragon8", "snapdragon8-gen2"]
JETSON = ["jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"]
# vendor figures (GB/s): Qualcomm product briefs (LPDDR5X 4800 / 4200 MHz), NVIDIA Jetson data sheets
BANDWIDTH = {
    "snapdragon8": 76.8,
    "snapdragon8-gen2": 67.2,
    "jetson-orin-nano-8gb": 68.0,
    "jetson-orin-nx-16gb": 102.4,
    "jetson-agx-orin-64gb": 204.8,
}
PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"

# A valid profile in the documented layout; line numbers below refer to this text.
GOOD = """\
name = "test"
description = "a test device"
[memory]
ram_gib = 12.0
budget_gib = 5.5
runtime_overhead_mib = 150.0
cuda_context_mib = 0.0
allocator_slack = 0.05
safety_margin_mib = 256.0
alloc_round_bytes = 64
bandwidth_gbs = 76.8
[storage]
cache_budget_gib = 8.0
read_mbs = 4200.0
[compute]
default_dtype = "float16"
[compute.dtypes]
cpu = ["float32", "bfloat16"]
gpu = ["float16", "int8"]
[backends]
available = ["executorch-xnnpack", "onnxruntime-training"]
"""
LINE = {line.split(" =")[0].strip("[]"): i for i, line in enumerate(GOOD.splitlines(), 1)}


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def replace(key: str, new_line: str | None) -> str:
    """GOOD with the line of ``key`` replaced (``None``: removed)."""
    lines = GOOD.splitlines()
    i = LINE[key] - 1
    if new_line is None:
        del lines[i]
    else:
        lines[i] = new_line
    return "\n".join(lines) + "\n"


def error_of(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ProfileError) as e:
        load_profile(str(p))
    msg = str(e.value)
    assert msg.startswith(str(p)), msg
    assert "\n" not in msg  # the CLIs print errors on one line
    return msg


# --- shipped profiles ---------------------------------------------------------------------------


def test_the_expected_profiles_ship():
    assert available_profiles() == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_validates(name):
    p = load_profile(name)
    assert isinstance(p, Profile)
    assert p.name == name  # the name in the file matches the file name
    assert p.description
    assert 0 < p.budget_gib <= p.ram_gib
    assert p.fixed_overhead_bytes < p.budget_bytes
    assert p.budget_bytes == int(p.budget_gib * GIB)
    assert p.fixed_overhead_bytes == int(
        (p.runtime_overhead_mib + p.cuda_context_mib + p.safety_margin_mib) * MIB
    )
    assert 0 <= p.allocator_slack < 1
    assert p.alloc_round_bytes in (16, 64, 512)
    assert p.bandwidth_gbs > 0 and p.storage_read_mbs > 0 and p.cache_budget_gib > 0
    assert p.backends and set(p.backends) <= set(BACKENDS)
    assert p.dtypes and set(p.dtypes) <= set(ENGINES)
    assert all(v and set(v) <= set(DTYPES) for v in p.dtypes.values())
    assert p.supports(p.dtype)
    # the attributes the exporter relies on
    assert p.raw["name"] == name and p.raw["compute"]["default_dtype"] == p.dtype
    assert p.dtype in ("float32", "bfloat16", "float16")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_file_starts_with_its_command(name):
    first = (PROFILES_DIR / f"{name}.toml").read_text().splitlines()[0]
    assert first.startswith("# blockskip-") and f"--profile {name}" in first


@pytest.mark.parametrize("name", ANDROID)
def test_android_budget_is_40_to_50_percent_of_ram(name):
    p = load_profile(name)
    assert 0.40 <= p.budget_gib / p.ram_gib <= 0.50
    assert p.cuda_context_mib == 0 and "torch-cuda" not in p.backends


@pytest.mark.parametrize("name", JETSON)
def test_jetson_has_cuda_context_and_caching_allocator_rounding(name):
    p = load_profile(name)
    assert p.cuda_context_mib > 0 and p.alloc_round_bytes == 512 and "torch-cuda" in p.backends
    assert {"float16", "bfloat16"} <= set(p.dtypes["gpu"])  # Orin tensor cores


@pytest.mark.parametrize("name", sorted(BANDWIDTH))
def test_bandwidth_is_the_vendor_figure(name):
    assert load_profile(name).bandwidth_gbs == BANDWIDTH[name]


def test_desktop_profile_matches_the_torch_cpu_exporter():
    p = load_profile("desktop-cpu")
    assert p.dtype == "float32" and p.backends[0] == "torch-cpu" and p.cuda_context_mib == 0


def test_profile_helpers():
    p = load_profile("jetson-orin-nx-16gb")
    assert p.round_alloc(1) == 512 and p.round_alloc(512) == 512 and p.round_alloc(513) == 1024
    assert p.predicted_bytes([]) == p.fixed_overhead_bytes
    assert p.predicted_bytes([100, 1000]) == p.fixed_overhead_bytes + round((512 + 1024) * 1.10)
    assert p.supports("bfloat16", "gpu") and not p.supports("bfloat16", "cpu")
    assert hash(p) == hash(load_profile("jetson-orin-nx-16gb"))  # frozen, hashable despite dicts


# --- lookup ---------------------------------------------------------------------------------------


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ProfileError) as e:
        load_profile("pixel-phone")
    msg = str(e.value)
    assert "unknown profile 'pixel-phone'" in msg
    for name in SHIPPED:
        assert name in msg


def test_missing_profile_file(tmp_path):
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(str(tmp_path / "nope.toml"))


def test_profile_by_path(tmp_path):
    p = load_profile(write(tmp_path, GOOD, "my-phone.toml"))  # a Path works as well as a str
    assert p.name == "test" and p.ram_gib == 12.0 and p.budget_gib == 5.5
    assert p.dtype == "float16" and p.backends == ("executorch-xnnpack", "onnxruntime-training")
    assert p.dtypes == {"cpu": ("float32", "bfloat16"), "gpu": ("float16", "int8")}
    assert p.storage_read_mbs == 4200.0 and p.cache_budget_gib == 8.0 and p.alloc_round_bytes == 64
    assert p.fixed_overhead_bytes == int((150 + 0 + 256) * MIB)


def test_shipped_file_by_path_equals_by_name():
    by_path = load_profile(str(PROFILES_DIR / "snapdragon8.toml"))
    assert by_path.raw == load_profile("snapdragon8").raw


# --- malformed files: the message names the field and its line ----------------------------------


def test_toml_syntax_error_names_the_line(tmp_path):
    msg = error_of(tmp_path, replace("budget_gib", "budget_gib = = 5.5"))
    assert f"line {LINE['budget_gib']}:" in msg and "invalid TOML" in msg


def test_duplicate_key_is_a_syntax_error_with_its_line(tmp_path):
    text = GOOD.replace("bandwidth_gbs = 76.8\n", "bandwidth_gbs = 76.8\nram_gib = 8.0\n")
    msg = error_of(tmp_path, text)
    assert f"line {LINE['bandwidth_gbs'] + 1}:" in msg


@pytest.mark.parametrize(
    "key, bad, words",
    [
        ("budget_gib", "budget_gib = 20.0", ["memory.budget_gib must be <= memory.ram_gib", "20.0 > 12.0"]),
        ("ram_gib", 'ram_gib = "12"', ["memory.ram_gib must be a number", "string"]),
        ("ram_gib", "ram_gib = true", ["memory.ram_gib must be a number", "boolean"]),
        ("alloc_round_bytes", "alloc_round_bytes = 64.0", ["memory.alloc_round_bytes must be an integer"]),
        ("alloc_round_bytes", "alloc_round_bytes = 100", ["memory.alloc_round_bytes", "power of two"]),
        ("safety_margin_mib", "safety_margin_mib = -1.0", ["memory.safety_margin_mib must be >= 0", "-1.0"]),
        ("cuda_context_mib", "cuda_context_mib = -600", ["memory.cuda_context_mib must be >= 0"]),
        ("bandwidth_gbs", "bandwidth_gbs = 0", ["memory.bandwidth_gbs must be > 0"]),
        ("bandwidth_gbs", "bandwidth_gbs = nan", ["memory.bandwidth_gbs must be a finite number"]),
        ("allocator_slack", "allocator_slack = 1.5", ["memory.allocator_slack", "fraction"]),
        ("read_mbs", "read_mbs = -4200.0", ["storage.read_mbs must be > 0"]),
        ("cache_budget_gib", "cache_budget_gib = -1", ["storage.cache_budget_gib must be >= 0"]),
        ("default_dtype", 'default_dtype = "fp16"', ["compute.default_dtype", "'fp16'", "float16"]),
        ("gpu", 'gpu = ["float16", "fp8"]', ["compute.dtypes.gpu", "unknown dtype 'fp8'"]),
        ("gpu", 'gpu = "float16"', ["compute.dtypes.gpu must be a list"]),
        ("gpu", "gpu = []", ["compute.dtypes.gpu", "at least one dtype"]),
        ("gpu", 'dsp = ["int8"]', ["unknown engine compute.dtypes.dsp"]),
        (
            "available",
            'available = ["executorch", "torch-cpu"]',
            ["backends.available", "unknown backend 'executorch'", "torch-cuda"],
        ),
        ("available", 'available = ["torch-cpu", "torch-cpu"]', ["backends.available", "not repeat"]),
        ("available", "available = []", ["backends.available", "at least one backend"]),
        ("cache_budget_gib", "cache_gib = 8.0", ["unknown field storage.cache_gib", "cache_budget_gib"]),
        ("name", "name = 3", ["name must be a string"]),
        ("description", 'descripton = "typo"', ["unknown field descripton"]),
    ],
)
def test_bad_field_names_field_and_line(tmp_path, key, bad, words):
    msg = error_of(tmp_path, replace(key, bad))
    assert f" line {LINE[key]}: " in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "key, field, table_line",
    [
        ("cuda_context_mib", "memory.cuda_context_mib", "memory"),
        ("read_mbs", "storage.read_mbs", "storage"),
        ("default_dtype", "compute.default_dtype", "compute"),
        ("available", "backends.available", "backends"),
        ("description", "description", None),  # top level: the document starts at line 1
    ],
)
def test_missing_field_names_field_and_its_table_line(tmp_path, key, field, table_line):
    msg = error_of(tmp_path, replace(key, None))
    line = LINE[table_line] if table_line else 1
    assert f" line {line}: missing field {field}" in msg, msg


def test_missing_table(tmp_path):
    text = GOOD.replace("[storage]\ncache_budget_gib = 8.0\nread_mbs = 4200.0\n", "")
    assert "line 1: missing table [storage]" in error_of(tmp_path, text)
    text = GOOD.replace('[compute.dtypes]\ncpu = ["float32", "bfloat16"]\ngpu = ["float16", "int8"]\n', "")
    assert f"line {LINE['compute']}: missing table [compute.dtypes]" in error_of(tmp_path, text)


def test_table_of_the_wrong_type(tmp_path):
    text = "backends = 3\n" + GOOD.replace(
        '[backends]\navailable = ["executorch-xnnpack", "onnxruntime-training"]\n', ""
    )
    assert "line 1: backends must be a table (got integer 3)" in error_of(tmp_path, text)
    text = GOOD.replace("[compute.dtypes]", "dtypes = 3\n[other]")
    msg = error_of(tmp_path, text)
    # wrong fields come before missing/unknown follow-ups, which are counted
    assert f"line {LINE['compute'] + 2}: compute.dtypes must be a table" in msg and "more problem" in msg


def test_default_dtype_must_be_listed_by_an_engine(tmp_path):
    text = GOOD.replace('gpu = ["float16", "int8"]', 'gpu = ["int8"]')
    msg = error_of(tmp_path, text)
    assert f"line {LINE['default_dtype']}: compute.default_dtype 'float16'" in msg
    assert "at least one engine" in msg


def test_budget_must_exceed_fixed_overheads(tmp_path):
    msg = error_of(tmp_path, replace("safety_margin_mib", "safety_margin_mib = 6000.0"))
    assert f"line {LINE['budget_gib']}: memory.budget_gib must exceed the fixed overheads" in msg


def test_old_flat_layout_is_rejected_with_a_line(tmp_path):
    old = 'name = "old"\ndescription = "d"\nram_gib = 12.0\nbudget_gib = 5.5\n'
    msg = error_of(tmp_path, old)
    assert "line 3: unknown field ram_gib" in msg


# --- the line scanner ---------------------------------------------------------------------------


def test_key_lines_handles_comments_strings_arrays_and_dotted_keys():
    text = textwrap.dedent(
        '''\
        # a comment with key = value
        name = "a # not a comment"
        description = """
        fake = 1
        [fake]
        """
        [compute.dtypes]
        cpu = [
          "float32",  # ] tricky
        ]
        [memory]
        "ram_gib" = 1
        bandwidth.inner = 2
        [compute]
        default_dtype = 'float16'
        '''
    )
    lines = key_lines(text)
    assert lines[("name",)] == 2 and lines[("description",)] == 3
    assert ("fake",) not in lines
    assert lines[("compute", "dtypes")] == 7 and lines[("compute", "dtypes", "cpu")] == 8
    assert lines[("memory", "ram_gib")] == 12 and lines[("memory", "bandwidth", "inner")] == 13
    assert lines[("compute",)] == 14  # the explicit header wins over the implied table
    assert lines[("compute", "default_dtype")] == 15


def test_inline_table_errors_point_at_the_enclosing_key(tmp_path):
    text = GOOD.replace(
        '[compute.dtypes]\ncpu = ["float32", "bfloat16"]\ngpu = ["float16", "int8"]\n',
        'dtypes = { cpu = ["float32"], gpu = ["fp8"] }\n',
    )
    msg = error_of(tmp_path, text)
    assert f"line {LINE['compute'] + 2}: compute.dtypes.gpu" in msg and "'fp8'" in msg


# --- stays lean ----------------------------------------------------------------------------------


def test_profiles_module_imports_no_torch_or_numpy():
    """The module itself pulls in neither torch nor numpy. (The package ``blockskip.runtime``'s
    ``__init__`` imports numpy through plan/schedule, so it is bypassed here with a bare package.)"""
    runtime_dir = Path(__file__).resolve().parents[1] / "runtime"
    code = textwrap.dedent(
        f"""
        import sys, types
        import blockskip
        pkg = types.ModuleType("blockskip.runtime")
        pkg.__path__ = [{str(runtime_dir)!r}]
        sys.modules["blockskip.runtime"] = pkg
        import blockskip.runtime.profiles as m
        m.load_profile("snapdragon8"); m.load_profile("jetson-agx-orin-64gb")
        heavy = sorted({{k.split(".")[0] for k in sys.modules}} & {{"torch", "numpy"}})
        assert not heavy, heavy
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_importing_the_profiles_module_does_not_import_torch():
    code = (
        "import sys, blockskip.runtime.profiles as m; m.load_profile('desktop-cpu');"
        "assert 'torch' not in sys.modules; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
