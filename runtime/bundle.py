"""A bundle: a folder with ``manifest.json`` and the artifacts it lists (each with sha256 and size).

Paths in a manifest are relative and may not leave the bundle. Files are verified when they are
opened, so a phase only reads (and checks) what it uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from blockskip.runtime.errors import BundleError
from blockskip.runtime.files import sha256_file
from blockskip.runtime.formats import MANIFEST, RECORD_SHA256, RECORD_SIZE, SCHEMA_VERSION
from blockskip.runtime.plan import Plan
from blockskip.runtime.schedule import PatchSchedule

__all__ = ["SCHEMA_VERSION", "Bundle", "file_record", "safe_relpath"]


def safe_relpath(root: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"manifest path {rel!r} leaves the bundle; the bundle is malformed, export it again")
    return root / p


class Bundle:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{str(self.root)!r} is not a bundle (no manifest.json); make one with blockskip-export")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); export the bundle again") from e
        v = self.manifest.get("schema_version")
        if v != SCHEMA_VERSION:
            raise BundleError(f"bundle schema version {v!r} is not supported (expected {SCHEMA_VERSION})")
        for key in ("family", "plan", "schedule", "files", "model"):
            if key not in self.manifest:
                raise BundleError(f"manifest.json has no {key!r}; export the bundle again")
        self._verified: set[str] = set()

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.root / MANIFEST)

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def plan(self) -> Plan:
        return Plan.from_dict(self.manifest["plan"])

    def schedule(self, num_images: int) -> PatchSchedule:
        """The seeded schedule for this many photos (the number is only known on the device)."""
        return PatchSchedule.build(num_images=num_images, **self.manifest["schedule"])

    @property
    def trained(self) -> list[int]:
        return list(self.manifest["model"]["trained"])

    def path(self, rel: str, verify: bool = True) -> Path:
        """Absolute path of a listed file, checked against its sha256 the first time it is used."""
        files = self.manifest["files"]
        if rel not in files:
            raise BundleError(f"{rel!r} is not listed in the bundle manifest")
        p = safe_relpath(self.root, rel)
        if not p.is_file():
            raise BundleError(f"bundle file {rel!r} is missing from {self.root}; export the bundle again")
        if verify and rel not in self._verified:
            rec = files[rel]
            if p.stat().st_size != rec[RECORD_SIZE] or sha256_file(p) != rec[RECORD_SHA256]:
                raise BundleError(f"bundle file {rel!r} does not match its recorded sha256: it is corrupt; export again")
            self._verified.add(rel)
        return p

    def verify_all(self) -> None:
        for rel in self.manifest["files"]:
            self.path(rel)


def file_record(root: Path, rel: str) -> dict:
    p = safe_relpath(root, rel)
    return {RECORD_SHA256: sha256_file(p), RECORD_SIZE: p.stat().st_size}
