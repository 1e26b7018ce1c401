import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def write_photos(folder: Path, n: int = 3, size: tuple[int, int] = (150, 170)) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        a = (rng.random((*size, 3)) * 255).astype("uint8")
        Image.fromarray(a).save(folder / f"photo_{i}.png")
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def export_and_precompute(
    root: Path, plan, photos: Path, model=None, prompt: str = "a photo of sks cat"
) -> Path:
    """Export ``model`` (default: the built-in tiny model) with ``plan`` to root/bundle and precompute
    root/cache for ``photos``; returns root."""
    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.runtime.profiles import load_profile

    export_bundle(
        model or load_model("tiny-random"), plan, load_profile("desktop-cpu"), prompt, root / "bundle"
    )
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    return root


ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "native"
BINARY = BUILD / "device_train" / "native" / "blockskip-train-native"


def _cmake() -> str | None:
    venv = Path(sys.executable).parent / "cmake"  # `make native` puts CMake >= 3.28 into the venv
    return str(venv) if venv.is_file() else shutil.which("cmake")


def _compiler() -> str | None:
    return next(
        (
            c
            for c in (
                os.environ.get("CXX"),
                shutil.which("c++"),
                shutil.which("g++"),
                shutil.which("clang++"),
            )
            if c
        ),
        None,
    )


@pytest.fixture(scope="session")
def runner() -> Path:
    """The runner binary, built (or brought up to date) in build/native as `make native` does."""
    import importlib.util

    if importlib.util.find_spec("executorch") is None and not BINARY.is_file():
        pytest.skip(
            "the native runner links the ExecuTorch runtime of the executorch wheel, which is not installed"
        )
    cmake, cxx = _cmake(), _compiler()
    if cmake is None or cxx is None:
        if BINARY.is_file():
            return BINARY
        missing = " and ".join(n for n, v in (("cmake", cmake), ("a C++ compiler", cxx)) if v is None)
        pytest.skip(
            f"building the native runner needs CMake and a C++17 compiler; {missing} not found "
            "(install them, or build it elsewhere with `make native`)"
        )
    if not (BUILD / "CMakeCache.txt").is_file():
        subprocess.run(
            [
                cmake,
                "-S",
                str(ROOT),
                "-B",
                str(BUILD),
                "-DBLOCKSKIP_BUILD_NATIVE=ON",
                f"-DPython3_EXECUTABLE={sys.executable}",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    r = subprocess.run([cmake, "--build", str(BUILD), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, f"building the native runner failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert BINARY.is_file()
    return BINARY
