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
