"""`make lint` (what .ci/run runs before the tests) fails on a lint, format or type error.

Each check runs with the project's own configuration (pyproject.toml) on a small deliberately broken
copy in a temporary folder, and on the same file fixed, so the test sees both outcomes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

GOOD = "def scale(x: int) -> int:\n    return 2 * x\n"
TYPE_ERROR = "def scale(x: int) -> str:\n    return 2 * x\n"
UNTYPED = "def scale(x):\n    return 2 * x\n"  # fine for plain mypy, an error under strict


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} is not installed (pip install -e '.[dev]')")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """mypy with the project's config on blockskip.runtime.broken (a strict module) holding `source`."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pkg = tmp_path / "build" / "mypy" / "blockskip" / "runtime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text(source)
    return _run("mypy", "--cache-dir", os.devnull, "-p", "blockskip.runtime.broken", cwd=tmp_path)


def test_mypy_fails_on_a_type_error_and_passes_the_fixed_file(tmp_path):
    bad = _mypy(tmp_path, TYPE_ERROR)
    assert bad.returncode != 0 and "Incompatible return value type" in bad.stdout, bad.stdout
    shutil.rmtree(tmp_path / "build")
    good = _mypy(tmp_path, GOOD)
    assert good.returncode == 0, good.stdout


def test_mypy_is_strict_on_the_runtime(tmp_path):
    r = _mypy(tmp_path, UNTYPED)
    assert r.returncode != 0 and "missing a type annotation" in r.stdout, r.stdout


def test_ruff_check_fails_on_an_unused_import(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import os\n\n" + GOOD)
    r = _run("ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(f), cwd=tmp_path)
    assert r.returncode != 0 and "F401" in r.stdout, r.stdout


def test_ruff_format_check_fails_on_unformatted_code(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("def scale( x :int )->int :\n    return 2*x\n")
    args = ("format", "--check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(f))
    assert _run("ruff", *args, cwd=tmp_path).returncode != 0
    f.write_text(GOOD)
    assert _run("ruff", *args, cwd=tmp_path).returncode == 0
