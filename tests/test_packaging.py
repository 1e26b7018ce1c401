"""A built wheel (not the editable install) imports as the `blockskip` namespace, with its profiles."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "whl"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "whl").glob("dit_blockskip-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "blockskip/profiles/snapdragon8.toml" in names
    assert not any(n.startswith(("tests/", "bench/", "tools/")) for n in names)
    # every package of the source tree ships (a subpackage missing from setuptools' list is absent from a
    # wheel while the editable install still finds it)
    for top in ("export", "runtime", "device_train", "profiles"):
        for init in (ROOT / top).rglob("__init__.py"):
            assert f"blockskip/{init.relative_to(ROOT).as_posix()}" in names, init
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import blockskip.runtime, blockskip.export.cli, blockskip.device_train.cli;"
        "from blockskip.runtime.profiles import available_profiles, load_profile;"
        "assert 'snapdragon8' in available_profiles(); print(load_profile('desktop-cpu').name);"
        "print(blockskip.runtime.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0] == "desktop-cpu"
    assert out[1].startswith(str(site))  # imported from the wheel, not the source tree
