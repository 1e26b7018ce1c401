"""ResidualCache: one safetensors shard per schedule entry plus ``index.json`` (sha256 of each).

The index also records the realised schedule and what it was computed from (bundle and photos), so
a cache made for other photos or another bundle is refused instead of silently reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockskip.runtime.errors import BundleError, CacheError
from blockskip.runtime.files import atomic_write_json, ensure_writable_dir, sha256_file
from blockskip.runtime.formats import (
    CACHE_INDEX,
    INDEX_ENTRIES,
    INDEX_SCHEDULE,
    INDEX_SOURCE,
    INDEX_SOURCE_SHA256,
    RECORD_FILE,
    RECORD_SHA256,
    SCHEDULE_META,
    SOURCE_BUNDLE,
    shard_name,
    source_digest,
)
from blockskip.runtime.schedule import PatchSchedule
from blockskip.runtime.schema_check import check, load_json
from blockskip.runtime.tensorfile import first_nonfinite, read_header

if TYPE_CHECKING:
    from blockskip.runtime.bundle import Bundle


class ResidualCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index_path = self.root / CACHE_INDEX
        self.index: dict[str, Any] = {}
        if self.index_path.is_file():
            again = "delete the cache folder and precompute again"
            index = load_json(self.index_path, CacheError, again)
            check("cache_index", index, str(self.index_path), CacheError, again)
            if index[INDEX_SOURCE_SHA256] != source_digest(index[INDEX_SOURCE]):
                raise CacheError(
                    f"{self.index_path}: {INDEX_SOURCE_SHA256} is not the digest of {INDEX_SOURCE} (the "
                    f"index was edited or is corrupt); {again}"
                )
            self.index = index

    @classmethod
    def create(cls, root: str | Path, *, source: dict[str, Any], schedule: PatchSchedule) -> ResidualCache:
        cache = cls(ensure_writable_dir(root, "cache folder"))
        if cache.index and cache.index[INDEX_SOURCE] == source:
            cache.check_schedule(schedule)
            return cache  # resume: keep the shards already written
        # the identity is stored, so every reader (the native runner too) takes it as written
        cache.index = {
            INDEX_SOURCE: source,
            INDEX_SOURCE_SHA256: source_digest(source),
            INDEX_SCHEDULE: schedule.to_json(),
            INDEX_ENTRIES: {},
        }
        atomic_write_json(cache.index_path, cache.index)
        return cache

    @property
    def schedule(self) -> PatchSchedule:
        if INDEX_SCHEDULE not in self.index:
            raise CacheError(f"no cache index in {str(self.root)!r}: run `device-train precompute` first")
        return PatchSchedule.from_json(self.index[INDEX_SCHEDULE])

    def source_sha256(self) -> str:
        """The cache's identity as recorded when it was written."""
        digest: str = self.index[INDEX_SOURCE_SHA256]
        return digest

    def check_schedule(self, schedule: PatchSchedule) -> None:
        """The index's realised schedule must be the one the bundle makes for its photos (an index whose
        schedule was cut or edited would train on part of the cache, or on entries nobody computed)."""
        if self.index[INDEX_SCHEDULE] != schedule.to_json():
            raise CacheError(
                f"{self.index_path}: its schedule is not the one the bundle makes for "
                f"{schedule.meta['num_images']} photos (edited or corrupt); delete the cache folder "
                "and precompute again"
            )

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

    def check_complete(self, bundle: Bundle | None = None) -> None:
        """Every entry is written; with ``bundle``: the cache was computed for it, with its schedule."""
        if not self.index:
            raise CacheError(f"no cache in {str(self.root)!r}: run `device-train precompute` first")
        if bundle is not None:
            if self.index[INDEX_SOURCE][SOURCE_BUNDLE] != bundle.manifest_sha256:
                raise CacheError(
                    "this cache was computed for another bundle; precompute again into a new folder"
                )
            self.check_schedule(bundle.schedule(self.index[INDEX_SCHEDULE][SCHEDULE_META]["num_images"]))
        miss = self.missing()
        if miss:
            raise CacheError(
                f"cache is incomplete ({len(miss)} of {len(self.schedule)} entries missing); "
                "run `device-train precompute` again to finish it"
            )

    def verify(self) -> None:
        """Check every shard (sha256, declared format, finite values) before training reads any."""
        for k in range(len(self.schedule)):
            self.path(k)

    def path(self, k: int) -> Path:
        """Path of shard k after checking its sha256, its header against the declared format and that every
        value is finite."""
        rec = self.index[INDEX_ENTRIES].get(str(k))
        if rec is None:
            raise CacheError(f"cache entry {k} is missing; run `device-train precompute` again")
        p: Path = self.root / rec[RECORD_FILE]
        rebuild = "delete it and run `device-train precompute` again to rebuild it"
        if not p.is_file() or sha256_file(p) != rec[RECORD_SHA256]:
            raise CacheError(
                f"cache shard {rec[RECORD_FILE]} does not match its recorded sha256 (corrupt); {rebuild}"
            )
        try:
            header, _ = read_header(p, metadata=True)
            check("cache_entry", header, f"cache shard {rec[RECORD_FILE]}", CacheError, rebuild)
            bad = first_nonfinite(p)
        except BundleError as e:
            raise CacheError(f"cache shard {rec[RECORD_FILE]}: {e}; {rebuild}") from e
        if bad is not None:
            raise CacheError(
                f"cache shard {rec[RECORD_FILE]} holds NaN or Inf values ({bad}): training on it would "
                f"make a NaN LoRA. Precompute the cache again; if it happens again, the photos or the "
                f"bundle produce them"
            )
        return p
