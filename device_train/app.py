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


# executorch writes the torch backend's checkpoint (same tensors, same AdamW): either resumes the other
CHECKPOINT_FILES = {"torch": "checkpoint.safetensors", "executorch": "checkpoint.safetensors", "ort": "ort_checkpoint"}


def check_checkpoint_matches(out_dir, source: dict, backend: str = "torch") -> None:
    """Refuse before any work when OUT holds a checkpoint of a run on other photos or another bundle,
    or one written by another backend."""
    import json

    from blockskip.runtime.cache import source_digest
    from blockskip.runtime.errors import BlockSkipError

    ckpt_dir = Path(out_dir) / "checkpoint"
    check_checkpoint_backend(out_dir, backend)
    if backend in ("torch", "executorch"):
        from safetensors import safe_open

        ckpt = ckpt_dir / CHECKPOINT_FILES[backend]
        if not ckpt.is_file():
            return
        try:
            with safe_open(ckpt, "numpy") as f:
                saved = json.loads(f.metadata()["log"]).get("cache_source")
        except Exception:
            return  # unreadable: train reports it
    elif backend == "ort":
        ckpt = ckpt_dir / CHECKPOINT_FILES["ort"]
        if not ckpt.is_file():
            return
        saved = get_backend("ort").checkpoint_source(out_dir)
    else:
        return
    if saved != source_digest(source):
        raise BlockSkipError(
            f"{ckpt} belongs to a training run on other photos or another bundle; use a new output "
            f"folder (-o), or delete {ckpt.parent} to start over"
        )


def run_precompute(bundle_dir, images_dir, cache_dir, backend="torch", quiet=False, out_dir=None):
    bundle = Bundle(bundle_dir)
    source = image_source(bundle, images_dir)
    _, images = load_images(images_dir, bundle.plan.s_max)
    be = get_backend(backend)
    if out_dir is not None:
        check_checkpoint_matches(out_dir, source, backend)
    return be.precompute(bundle, images, cache_dir, source=source, progress=Progress(quiet))


def run_train(bundle_dir, cache_dir, out_dir, backend="torch", quiet=False, stop_after=None):
    bundle = Bundle(bundle_dir)
    be = get_backend(backend)
    check_checkpoint_backend(out_dir, backend)
    return be.train(bundle, cache_dir, out_dir, progress=Progress(quiet), stop_after=stop_after)


def check_checkpoint_backend(out_dir, backend: str) -> None:
    from blockskip.runtime.errors import BlockSkipError

    ckpt_dir = Path(out_dir) / "checkpoint"
    own = CHECKPOINT_FILES.get(backend)
    for name in dict.fromkeys(CHECKPOINT_FILES.values()):
        if name != own and (ckpt_dir / name).is_file():
            first, *also = [b for b, f in CHECKPOINT_FILES.items() if f == name]
            shared = f" (or the {' or '.join(also)} backend, which shares its checkpoint)" if also else ""
            raise BlockSkipError(
                f"{ckpt_dir / name} was written by the {first} backend{shared}; resume with "
                f"{' or '.join(f'--backend {x}' for x in [first, *also])}, or use a new output folder (-o)"
            )


def default_cache(out_dir) -> Path:
    return Path(out_dir) / "cache"
