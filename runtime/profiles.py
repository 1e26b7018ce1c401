"""Device profiles: TOML files in ``blockskip/profiles`` (or a path to one)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from blockskip.runtime.errors import ProfileError

REQUIRED = {"name": str, "description": str, "ram_gib": (int, float), "budget_gib": (int, float),
            "dtype": str, "backends": list}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    ram_gib: float
    budget_gib: float
    dtype: str
    backends: tuple[str, ...]
    raw: dict


def available_profiles() -> list[str]:
    root = resources.files("blockskip.profiles")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        text, where = p.read_text(), str(p)
    else:
        res = resources.files("blockskip.profiles") / f"{name_or_path}.toml"
        if not res.is_file():
            raise ProfileError(
                f"unknown profile {name_or_path!r}; available: {', '.join(available_profiles())} "
                "(or give a path to a .toml file)"
            )
        text, where = res.read_text(), f"profiles/{name_or_path}.toml"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{where}: {e}") from e
    for key, typ in REQUIRED.items():
        if key not in raw:
            raise ProfileError(f"{where}: missing field {key!r}")
        if not isinstance(raw[key], typ):
            raise ProfileError(f"{where}: field {key!r} has the wrong type ({type(raw[key]).__name__})")
    if not 0 < raw["budget_gib"] <= raw["ram_gib"]:
        raise ProfileError(f"{where}: budget_gib must be in (0, ram_gib]")
    return Profile(raw["name"], raw["description"], float(raw["ram_gib"]), float(raw["budget_gib"]),
                   raw["dtype"], tuple(raw["backends"]), raw)
