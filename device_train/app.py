"""The phases, as functions the CLI (and tests) call."""

from __future__ import annotations

from pathlib import Path

from blockskip.runtime.backends import get_backend
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.files import sha256_file
from blockskip.runtime.images import list_images, load_images
from blockskip.runtime.progress import Progress


def image_source(bundle: Bundle, images_dir) -> dict:
    files = list_images(images_dir)
    return {"bundle": bundle.manifest_sha256, "images": {p.name: sha256_file(p) for p in files}}


def check_checkpoint_matches(out_dir, source: dict) -> None:
    """Refuse before any work when OUT holds a checkpoint of a run on other photos or another bundle."""
    import json

    from safetensors import safe_open

    from blockskip.runtime.cache import source_digest
    from blockskip.runtime.errors import BlockSkipError

    ckpt = Path(out_dir) / "checkpoint" / "checkpoint.safetensors"
    if not ckpt.is_file():
        return
    try:
        with safe_open(ckpt, "numpy") as f:
            saved = json.loads(f.metadata()["log"]).get("cache_source")
    except Exception:
        return  # unreadable: train reports it
    if saved != source_digest(source):
        raise BlockSkipError(
            f"{ckpt} belongs to a training run on other photos or another bundle; use a new output "
            f"folder (-o), or delete {ckpt.parent} to start over"
        )


def run_precompute(bundle_dir, images_dir, cache_dir, backend="torch", quiet=False, out_dir=None):
    bundle = Bundle(bundle_dir)
    source = image_source(bundle, images_dir)
    _, images = load_images(images_dir, bundle.plan.s_max)
    if out_dir is not None:
        check_checkpoint_matches(out_dir, source)
    be = get_backend(backend)
    return be.precompute(bundle, images, cache_dir, source=source, progress=Progress(quiet))


def run_train(bundle_dir, cache_dir, out_dir, backend="torch", quiet=False, stop_after=None):
    bundle = Bundle(bundle_dir)
    be = get_backend(backend)
    return be.train(bundle, cache_dir, out_dir, progress=Progress(quiet), stop_after=stop_after)


def default_cache(out_dir) -> Path:
    return Path(out_dir) / "cache"
