"""The lean runtime imports (and fails cleanly) without torch, diffusers, peft or transformers."""

import json
import subprocess
import sys
import textwrap

import pytest

from blockskip.runtime.backends import BACKENDS, get_backend
from blockskip.runtime.errors import BlockSkipError

HEAVY = ("torch", "diffusers", "peft", "transformers")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys
    HEAVY = {HEAVY!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for m in [m for m in sys.modules if m.split(".")[0] in HEAVY]:
        del sys.modules[m]
    """
)

LEAN_MODULES = [
    "blockskip.runtime",
    "blockskip.runtime.errors",
    "blockskip.runtime.schedule",
    "blockskip.runtime.bundle",
    "blockskip.runtime.cache",
    "blockskip.runtime.formats",
    "blockskip.runtime.checkpoint",
    "blockskip.runtime.stream",
    "blockskip.runtime.profiles",
    "blockskip.runtime.images",
    "blockskip.runtime.plan",
    "blockskip.runtime.files",
    "blockskip.runtime.memory",
    "blockskip.runtime.progress",
    "blockskip.runtime.cli_util",
    "blockskip.runtime.backends",
    "blockskip.device_train.cli",
    "blockskip.device_train.app",
]


def run_blocked(body: str, *args: str) -> subprocess.CompletedProcess:
    code = BLOCKER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_the_blocker_really_blocks():
    r = run_blocked(
        """
        try:
            import torch
        except ImportError as e:
            print("blocked:", e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "blocked: torch is blocked" in r.stdout


def test_lean_modules_import_without_heavy_packages():
    r = run_blocked(
        """
        import importlib, json, sys
        for name in sys.argv[1:]:
            importlib.import_module(name)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
        """,
        *LEAN_MODULES,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_lean_runtime_works_without_torch(tmp_path):
    """Schedule, plan, profiles, images, files and cache index all run on numpy + stdlib (+ PIL)."""
    import numpy as np
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype("uint8")).save(
        tmp_path / "photos" / "a.png"
    )
    r = run_blocked(
        """
        import sys
        from pathlib import Path
        from blockskip.runtime import PatchSchedule, Plan
        from blockskip.runtime.cache import ResidualCache
        from blockskip.runtime.images import load_images
        from blockskip.runtime.profiles import load_profile

        root = Path(sys.argv[1])
        plan = Plan(front_skip=1, back_skip=2, s_min=32, s_max=64)
        assert plan.validate(6, 16) == [1, 2, 3]
        s = PatchSchedule.build(num_images=1, num_samples=3, s_min=32, s_max=64, granularity=16, seed=0)
        assert load_profile("desktop-cpu").name == "desktop-cpu"
        files, images = load_images(root / "photos", 64)
        assert images.shape == (1, 3, 64, 64) and images.dtype.name == "float32"
        c = ResidualCache.create(root / "cache", source={"bundle": "x"}, schedule=s)
        assert c.missing() == [0, 1, 2]
        assert "torch" not in sys.modules
        print("ok")
        """,
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_device_train_help_and_errors_without_torch(tmp_path):
    """`device-train --help` and a user error before any backend is needed work without torch."""
    r = run_blocked(
        """
        import sys
        from blockskip.device_train.cli import main
        rc = main(["run", sys.argv[1], "--images", sys.argv[1], "-o", sys.argv[1] + "/out", "--quiet"])
        assert "torch" not in sys.modules
        sys.exit(rc)
        """,
        str(tmp_path / "no-bundle"),
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "not a bundle" in r.stderr and "manifest.json" in r.stderr

    r = run_blocked(
        """
        from blockskip.device_train.cli import main
        main(["--help"])
        """
    )
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout


def test_torch_backend_without_torch_is_a_clear_error():
    r = run_blocked(
        """
        from blockskip.runtime.backends import get_backend
        from blockskip.runtime.errors import BlockSkipError
        try:
            get_backend("torch")
        except BlockSkipError as e:
            print("error:", e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "error:" in r.stdout and "pip install" in r.stdout and "torch" in r.stdout


def test_unknown_backend_lists_available_ones():
    with pytest.raises(BlockSkipError) as ei:
        get_backend("nope")
    msg = str(ei.value)
    assert "'nope'" in msg and "available" in msg
    for name in BACKENDS:
        assert name in msg
