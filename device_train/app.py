"""The phases, as functions the CLI (and tests) call."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockskip.runtime.backends import get_backend
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.checkpoint import CHECKPOINT
from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.files import (
    atomic_write_json,
    cache_lock,
    ensure_writable_dir,
    output_lock,
    sha256_file,
)
from blockskip.runtime.formats import TRAIN_LOG
from blockskip.runtime.images import list_images, load_images
from blockskip.runtime.memory import check_budget
from blockskip.runtime.progress import Progress

if TYPE_CHECKING:
    from blockskip.runtime.cache import ResidualCache
    from blockskip.runtime.events import EventLog
    from blockskip.runtime.files import StrPath


def image_source(bundle: Bundle, images_dir: str | Path) -> dict[str, Any]:
    files = list_images(images_dir)
    return {"bundle": bundle.manifest_sha256, "images": {p.name: sha256_file(p) for p in files}}


def checkpoint_file(bundle: Bundle, backend: str) -> str:
    """The checkpoint a run of this bundle on this backend writes: ORT's own for its resident training
    artifacts, the shared one otherwise."""
    return "ort_checkpoint" if backend == "ort" and bundle.plan.span == "resident" else CHECKPOINT


def check_checkpoint_matches(
    out_dir: StrPath, source: dict[str, Any], bundle: Bundle, backend: str = "torch"
) -> None:
    """Refuse before any work when OUT holds a checkpoint of a run on other photos or another bundle,
    or one written by another backend."""
    from blockskip.runtime.driver import refuse_foreign_checkpoint, refuse_other_run
    from blockskip.runtime.formats import source_digest

    own = checkpoint_file(bundle, backend)
    refuse_foreign_checkpoint(Path(out_dir), own)
    ckpt = Path(out_dir) / "checkpoint" / own
    if not ckpt.is_file():
        return
    if own == CHECKPOINT:
        from blockskip.runtime.checkpoint import read_checkpoint

        try:
            saved = read_checkpoint(ckpt)[2]
        except BlockSkipError:
            return  # unreadable: train reports it
    else:
        saved = {"cache_source": get_backend("ort").checkpoint_source(ckpt)}
    refuse_other_run(ckpt, saved, source_digest(source))


def run_precompute(
    bundle_dir: str | Path,
    images_dir: str | Path,
    cache_dir: StrPath,
    backend: str = "torch",
    quiet: bool = False,
    out_dir: StrPath | None = None,
    events: EventLog | None = None,
) -> ResidualCache:
    """Encode the photos and precompute the cache; ``events``: a ``runtime.events.EventLog``."""
    progress = Progress(quiet, events)
    t0 = time.perf_counter()
    progress.event("phase_start", phase="precompute")
    out = _precompute(bundle_dir, images_dir, cache_dir, backend, progress, out_dir)
    progress.event("phase_end", phase="precompute", seconds=time.perf_counter() - t0)
    return out


def _precompute(
    bundle_dir: str | Path,
    images_dir: str | Path,
    cache_dir: StrPath,
    backend: str,
    progress: Progress,
    out_dir: StrPath | None,
) -> ResidualCache:
    bundle = Bundle(bundle_dir)
    source = image_source(bundle, images_dir)
    _, images = load_images(images_dir, bundle.plan.s_max)
    be = get_backend(backend)
    if out_dir is not None:
        check_checkpoint_matches(out_dir, source, bundle, backend)
    check_budget(bundle, "precompute")
    with contextlib.ExitStack() as held:  # one run per folder: the cache, and OUT when training follows
        held.enter_context(cache_lock(ensure_writable_dir(cache_dir, "cache folder")))
        if out_dir is not None:
            held.enter_context(output_lock(ensure_writable_dir(out_dir)))
        cache: ResidualCache = be.precompute(bundle, images, cache_dir, source=source, progress=progress)
        return cache


def run_train(
    bundle_dir: str | Path,
    cache_dir: StrPath,
    out_dir: StrPath,
    backend: str = "torch",
    quiet: bool = False,
    stop_after: int | None = None,
    lora_format: str = "diffusers",
    events: EventLog | None = None,
) -> dict[str, Any]:
    """Train; then write the LoRA layouts ``lora_format`` asks for beside ``OUT/lora.safetensors``
    (``runtime.lora_layouts``; their paths in the log's ``lora_files``)."""
    from blockskip.runtime.lora_layouts import formats_of, write_layouts

    formats_of(lora_format)  # an unknown layout is refused before any work
    bundle = Bundle(bundle_dir)
    be = get_backend(backend)
    progress = Progress(quiet, events)
    t0 = time.perf_counter()
    progress.event("phase_start", phase="train")
    log: dict[str, Any] = be.train(bundle, cache_dir, out_dir, progress=progress, stop_after=stop_after)
    if log.get("lora"):
        log["lora_files"] = write_layouts(log["lora"], bundle.family, lora_format)
        atomic_write_json(Path(out_dir) / TRAIN_LOG, log)
    progress.event("phase_end", phase="train", seconds=time.perf_counter() - t0)
    return log


def default_cache(out_dir: StrPath) -> Path:
    return Path(out_dir) / "cache"
