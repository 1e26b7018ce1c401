"""ResidualCache: one safetensors shard per schedule entry plus ``index.json`` (sha256 of each).

The index also records the realised schedule and what it was computed from (bundle and photos), so
a cache made for other photos or another bundle is refused instead of silently reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from blockskip.runtime.errors import CacheError
from blockskip.runtime.files import atomic_write_json, ensure_writable_dir, sha256_file
from blockskip.runtime.formats import (
    CACHE_INDEX,
    INDEX_ENTRIES,
    INDEX_SCHEDULE,
    INDEX_SOURCE,
    INDEX_SOURCE_SHA256,
    RECORD_FILE,
    RECORD_SHA256,
    SOURCE_BUNDLE,
    shard_name,
    source_digest,
)
from blockskip.runtime.schedule import PatchSchedule


class ResidualCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index_path = self.root / CACHE_INDEX
        self.index: dict = {}
        if self.index_path.is_file():
            try:
                self.index = json.loads(self.index_path.read_text())
            except json.JSONDecodeError as e:
                raise CacheError(f"{self.index_path} is corrupt ({e}); delete the cache folder and precompute again") from e

    @classmethod
    def create(cls, root, *, source: dict, schedule: PatchSchedule) -> ResidualCache:
        cache = cls(ensure_writable_dir(root, "cache folder"))
        if cache.index and cache.index.get(INDEX_SOURCE) == source:
            return cache  # resume: keep the shards already written
        # the identity is stored, so every reader (the native runner too) takes it as written
        cache.index = {INDEX_SOURCE: source, INDEX_SOURCE_SHA256: source_digest(source),
                       INDEX_SCHEDULE: schedule.to_json(), INDEX_ENTRIES: {}}
        atomic_write_json(cache.index_path, cache.index)
        return cache

    @property
    def schedule(self) -> PatchSchedule:
        if INDEX_SCHEDULE not in self.index:
            raise CacheError(f"no cache index in {str(self.root)!r}: run `device-train precompute` first")
        return PatchSchedule.from_json(self.index[INDEX_SCHEDULE])

    def source_sha256(self) -> str:
        """The cache's identity as recorded when it was written (derived for a cache from before that)."""
        stored = self.index.get(INDEX_SOURCE_SHA256)
        return stored if isinstance(stored, str) else source_digest(self.index.get(INDEX_SOURCE))

    def shard_name(self, k: int) -> str:
        return shard_name(k)

    def has(self, k: int) -> bool:
        rec = self.index.get(INDEX_ENTRIES, {}).get(str(k))
        return rec is not None and (self.root / rec[RECORD_FILE]).is_file()

    def record(self, k: int) -> None:
        """Register shard k (already written atomically) with its sha256."""
        name = self.shard_name(k)
        self.index[INDEX_ENTRIES][str(k)] = {RECORD_FILE: name, RECORD_SHA256: sha256_file(self.root / name)}

    def flush(self) -> None:
        atomic_write_json(self.index_path, self.index)

    def missing(self) -> list[int]:
        return [k for k in range(len(self.schedule)) if not self.has(k)]

    def check_complete(self, source: dict | None = None) -> None:
        if not self.index:
            raise CacheError(f"no cache in {str(self.root)!r}: run `device-train precompute` first")
        if source is not None and self.index.get(INDEX_SOURCE, {}).get(SOURCE_BUNDLE) != source.get(SOURCE_BUNDLE):
            raise CacheError("this cache was computed for another bundle; precompute again into a new folder")
        miss = self.missing()
        if miss:
            raise CacheError(f"cache is incomplete ({len(miss)} of {len(self.schedule)} entries missing); "
                             "run `device-train precompute` again to finish it")

    def path(self, k: int) -> Path:
        """Path of shard k after checking its sha256."""
        rec = self.index[INDEX_ENTRIES].get(str(k))
        if rec is None:
            raise CacheError(f"cache entry {k} is missing; run `device-train precompute` again")
        p = self.root / rec[RECORD_FILE]
        if not p.is_file() or sha256_file(p) != rec[RECORD_SHA256]:
            raise CacheError(f"cache shard {rec[RECORD_FILE]} does not match its recorded sha256 (corrupt); "
                             f"delete it and run `device-train precompute` again to rebuild it")
        return p
