"""The native runner's C++ unit tests (device_train/native/tests), run by ctest in build/native as
``make test`` runs them: the JSON reader and writer, SHA-256, the safetensors reader and writer and
AdamW. Built with the runner (the ``runner`` fixture builds build/native as ``make native`` does, and
skips, saying why, where it cannot)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import BUILD

TESTS = BUILD / "device_train" / "native" / "blockskip-native-tests"
SUITES = ["json", "sha256", "safetensors", "adamw"]
# a few cases of each suite that must have run and passed
CASES = [
    "json.nested_objects_and_arrays",
    "json.numbers",
    "json.strings_and_escapes",
    "json.literals_and_whitespace",
    "json.refuses_malformed_input",
    "sha256.nist_vectors",
    "sha256.incremental_updates_split_anywhere",
    "safetensors.reads_a_valid_file",
    "safetensors.refuses_bad_header_length",
    "safetensors.refuses_a_header_that_is_not_json",
    "safetensors.refuses_malformed_tensor_entries",
    "safetensors.refuses_overlapping_tensors",
    "adamw.matches_the_formulas_with_the_runners_settings",
    "adamw.weight_decay_is_decoupled",
]


def _ctest() -> str:
    venv = Path(sys.executable).parent / "ctest"  # `make native` puts CMake (and ctest) into the venv
    found = str(venv) if venv.is_file() else shutil.which("ctest")
    assert found, "ctest not found (it comes with CMake: pip install 'cmake>=3.28')"
    return found


def test_native_unit_tests_pass_under_ctest(runner: Path) -> None:
    assert TESTS.is_file(), f"{TESTS} was not built (configured with -DBLOCKSKIP_BUILD_TESTS=OFF?)"
    r = subprocess.run(
        [_ctest(), "--output-on-failure", "-V"],
        cwd=BUILD,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"ctest failed:\n{out[-6000:]}"
    # CMake 4 writes "100% tests passed out of 4", earlier versions "..., 0 tests failed out of 4"
    assert re.search(r"100% tests passed(, 0 tests failed)? out of 4\b", out), out[-3000:]
    for suite in SUITES:
        assert re.search(rf"Test +#\d+: native_{suite} \.+ +Passed", out), f"native_{suite} did not pass"
    for case in CASES:
        assert f"[  OK  ] {case}" in out, f"{case} did not run and pass:\n{out[-3000:]}"
    assert "[ FAIL ]" not in out
    # each suite reports its cases and checks, none failed
    summaries = re.findall(r"(\d+) cases, (\d+) failed; (\d+) checks, (\d+) failed", out)
    assert len(summaries) == len(SUITES), out[-3000:]
    for cases, failed_cases, checks, failed_checks in summaries:
        assert int(cases) > 0 and int(checks) > int(cases)
        assert failed_cases == "0" and failed_checks == "0"


def test_the_test_binary_fails_on_an_unknown_suite(runner: Path) -> None:
    """A suite name with no cases is a failure, so a test registered under a misspelled suite cannot
    pass by running nothing."""
    assert TESTS.is_file()
    r = subprocess.run([str(TESTS), "no_such_suite"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert 'no test cases in suite "no_such_suite"' in r.stderr
    listed = subprocess.run([str(TESTS), "--list"], capture_output=True, text=True, timeout=60, check=True)
    assert set(CASES) <= set(listed.stdout.split())
