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


def export_and_precompute(root: Path, plan, photos: Path, model=None, prompt: str = "a photo of sks cat") -> Path:
    """Export ``model`` (default: the built-in tiny model) with ``plan`` to root/bundle and precompute
    root/cache for ``photos``; returns root."""
    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.runtime.profiles import load_profile

    export_bundle(model or load_model("tiny-random"), plan, load_profile("desktop-cpu"), prompt, root / "bundle")
    run_precompute(root / "bundle", photos, root / "cache", quiet=True)
    return root
