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


def run_precompute(bundle_dir, images_dir, cache_dir, backend="torch", quiet=False):
    bundle = Bundle(bundle_dir)
    source = image_source(bundle, images_dir)
    _, images = load_images(images_dir, bundle.plan.s_max)
    be = get_backend(backend)
    return be.precompute(bundle, images, cache_dir, source=source, progress=Progress(quiet))


def run_train(bundle_dir, cache_dir, out_dir, backend="torch", quiet=False, stop_after=None):
    bundle = Bundle(bundle_dir)
    be = get_backend(backend)
    return be.train(bundle, cache_dir, out_dir, progress=Progress(quiet), stop_after=stop_after)


def default_cache(out_dir) -> Path:
    return Path(out_dir) / "cache"
