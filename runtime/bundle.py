"""A bundle: a folder with ``manifest.json`` and the artifacts it lists (each with sha256 and size).

Paths in a manifest are relative and may not leave the bundle. Files are verified when they are
opened, so a phase only reads (and checks) what it uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockskip.runtime.errors import BundleError
from blockskip.runtime.files import atomic_write, sha256_file
from blockskip.runtime.formats import (
    MANIFEST,
    MANIFEST_SHA256,
    RECORD_SHA256,
    RECORD_SIZE,
    SCHEMA_VERSION,
    manifest_digest,
    seal_manifest,
)
from blockskip.runtime.plan import Plan
from blockskip.runtime.schedule import PatchSchedule
from blockskip.runtime.schema_check import check, load_json

__all__ = ["SCHEMA_VERSION", "Bundle", "file_record", "safe_relpath", "write_manifest"]


def safe_relpath(root: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(
            f"manifest path {rel!r} leaves the bundle; the bundle is malformed, export it again"
        )
    return root / p


class Bundle:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise BundleError(
                f"{str(self.root)!r} is not a bundle (no manifest.json); make one with blockskip-export"
            )
        again = "export the bundle again"
        m = load_json(mpath, BundleError, again)
        if not isinstance(m, dict):
            raise BundleError(f"{mpath} is not a manifest (a JSON object); {again}")
        v = m.get("schema_version")
        if v != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {v!r} is not supported (this runtime reads version "
                f"{SCHEMA_VERSION}); export the bundle again with this version"
            )
        if m.get(MANIFEST_SHA256) != manifest_digest(m):
            raise BundleError(
                f"{mpath} does not match its integrity record ({MANIFEST_SHA256}): it is corrupt or "
                f"was edited; {again}"
            )
        check("manifest", m, str(mpath), BundleError, again)
        self.manifest: dict[str, Any] = m
        self._verified: set[str] = set()

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.root / MANIFEST)

    @property
    def family(self) -> str:
        family: str = self.manifest["family"]
        return family

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
                raise BundleError(
                    f"bundle file {rel!r} does not match its recorded sha256: it is corrupt; export again"
                )
            self._verified.add(rel)
        return p

    def verify_all(self) -> None:
        for rel in self.manifest["files"]:
            self.path(rel)


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` (plain JSON values) sealed with its integrity record, as the exporter does; returns
    what was written. A tool that changes a manifest writes it with this, or readers refuse it."""
    sealed = seal_manifest(manifest)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(sealed, indent=1, allow_nan=False)))
    return sealed


def file_record(root: Path, rel: str) -> dict[str, Any]:
    p = safe_relpath(root, rel)
    return {RECORD_SHA256: sha256_file(p), RECORD_SIZE: p.stat().st_size}
