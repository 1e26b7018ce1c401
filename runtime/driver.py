"""The training driver every backend runs under: one place for what a run does around its steps.

It owns the cache checks, the refusal of checkpoints from other runs or other backends, resume, the
entry order and prefetch (``train_loop.run_steps``), the numerics checks, the memory check before the
phase, the log and the LoRA file. What computes a step is a ``runtime.contract.Trainer``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.checkpoint import write_lora
from blockskip.runtime.contract import Arrays, Trainer
from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.files import atomic_write, cache_lock, ensure_writable_dir, output_lock
from blockskip.runtime.formats import LOG_LOSS_WITHOUT_LORA as LOSS_WITHOUT_LORA
from blockskip.runtime.formats import LOG_PREDICTED_STEP_SECONDS, LOG_STEP_SECONDS
from blockskip.runtime.memory import check_budget, peak_rss_mib, rss_bytes
from blockskip.runtime.progress import Progress
from blockskip.runtime.train_loop import run_steps

# checkpoint file -> the backends that write (and resume) it
CHECKPOINT_OWNERS = {"checkpoint.safetensors": ("torch", "executorch", "native"), "ort_checkpoint": ("ort",)}


class NumericsError(BlockSkipError):
    """A step produced NaN/Inf, or the LoRA does not change the model."""


def refuse_foreign_checkpoint(out_dir: Path, own_file: str) -> None:
    """A checkpoint of another backend family in OUT: say which backend resumes it."""
    ckpt_dir = Path(out_dir) / "checkpoint"
    for name, owners in CHECKPOINT_OWNERS.items():
        if name != own_file and (ckpt_dir / name).is_file():
            first, *also = owners
            shared = f" (or the {' or '.join(also)} backend, which shares its checkpoint)" if also else ""
            raise BlockSkipError(
                f"{ckpt_dir / name} was written by the {first} backend{shared}; resume with "
                f"{' or '.join(f'--backend {x}' for x in owners if x != 'native')}, or use a new output folder (-o)"
            )


def refuse_other_run(path: Path, saved: dict[str, Any], cache_source: str) -> None:
    if saved.get("cache_source") != cache_source:
        raise BlockSkipError(
            f"{path} belongs to a training run on other photos or another bundle; use a new output "
            f"folder (-o), or delete {path.parent} to start over"
        )


def train(
    bundle: Bundle,
    cache_dir: str | Path,
    out_dir: str | Path,
    make_trainer: Callable[[Path], Trainer],
    *,
    progress: Progress | None = None,
    stop_after: int | None = None,
    extra_log: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the LoRA with the trainer ``make_trainer(out_dir)`` builds; resume from ``OUT/checkpoint``.
    Returns the log (also written to ``OUT/train_log.json``). Holds the output and cache folders' run
    locks (``files.folder_lock``) throughout."""
    ResidualCache(cache_dir).check_complete(bundle)  # before OUT is made
    out = ensure_writable_dir(out_dir)
    with output_lock(out), cache_lock(cache_dir):  # one run per folder
        return _train(
            bundle,
            cache_dir,
            out,
            make_trainer,
            progress=progress,
            stop_after=stop_after,
            extra_log=extra_log,
        )


def checkpoint_log(log: dict[str, Any]) -> dict[str, Any]:
    """The log a checkpoint carries: no timings, so two identical runs write identical checkpoints."""
    return {k: v for k, v in log.items() if k != LOG_STEP_SECONDS}


def _train(
    bundle: Bundle,
    cache_dir: str | Path,
    out: Path,
    make_trainer: Callable[[Path], Trainer],
    *,
    progress: Progress | None,
    stop_after: int | None,
    extra_log: dict[str, Any] | None,
) -> dict[str, Any]:
    plan = bundle.plan
    progress = progress or Progress(quiet=True)
    cache = ResidualCache(cache_dir)  # again, now that no other run can change it
    cache.check_complete(bundle)
    cache.verify()  # every shard, before any work (a damaged one would otherwise stop the run midway)
    check_budget(bundle, "train")
    start_rss = rss_bytes()  # the runtime before training (the dry run's runtime overhead, measured)
    trainer = make_trainer(out)
    refuse_foreign_checkpoint(out, trainer.checkpoint_file)
    ckpt = out / "checkpoint" / trainer.checkpoint_file
    log: dict[str, Any] = {
        "plan": plan.to_dict(),
        "backend": trainer.backend,
        "losses": [],
        "step_seconds": [],
        "resumed_from": 0,
        "cache_source": cache.source_sha256(),
    }
    start = 0
    if ckpt.exists():
        start, saved = trainer.load_checkpoint(ckpt)
        refuse_other_run(ckpt, saved, log["cache_source"])
        log.update({k: v for k, v in saved.items() if k not in ("backend", "resumed_from", LOG_STEP_SECONDS)})
        log["losses"] = log["losses"][:start]  # step_seconds: this process's steps only
    log["resumed_from"] = start
    log.update(extra_log or {})
    if start:
        progress.log(f"resuming from step {start} ({ckpt.parent})")
    predicted = (bundle.manifest.get("memory") or {}).get("seconds", {}).get("train_per_step")
    if predicted:  # what the export promised for the profile's device: the ETA until steps are measured
        left = plan.steps - start
        progress.log(
            f"predicted for {bundle.manifest.get('profile', {}).get('name', 'the profile')}: "
            f"{predicted:.3g} s a step, {left * predicted / 60:.1f} min for {left} steps "
            f"(the bar's ETA follows the measured steps)"
        )
    bar = progress.bar(plan.steps, "train", initial=start)
    end = plan.steps if stop_after is None else max(start, min(plan.steps, stop_after))
    first: dict[str, Any] = {}

    def micro_step(entry: dict[str, Any]) -> float:
        loss = trainer.loss_and_grad(entry, 1.0 / plan.grad_accum)
        if not math.isfinite(loss):
            raise NumericsError(
                f"step {len(log['losses']) + 1} produced a non-finite loss ({loss}); nothing was written over "
                f"the last checkpoint. Check the photos and the cache (device-train precompute again), or "
                f"lower --lr when exporting"
            )
        return loss

    ev = getattr(trainer, "eval_loss", None)

    def checked_micro_step(entry: dict[str, Any]) -> float:
        if start == 0 and "entry" not in first:  # the loss of the first entry before any update
            first["entry"] = entry
            first["before"] = ev(entry) if ev is not None else None
            if first["before"] is not None:  # kept in the checkpoint's log: a resumed run checks against it
                log[LOSS_WITHOUT_LORA] = first["before"]
        return micro_step(entry)

    def update() -> None:
        trainer.update()
        lora = trainer.lora()
        bad = [n for n, a in lora.items() if not np.isfinite(a).all()]
        if bad:
            raise NumericsError(
                f"step {len(log['losses']) + 1} made the LoRA non-finite ({bad[0]}, ...); nothing was written "
                f"over the last checkpoint. Lower --lr when exporting, or check the cache"
            )
        if "entry" in first and "checked" not in first:
            first["checked"] = True
            check_lora_moves(trainer, lora, first["entry"], first["before"])

    def save(step: int) -> None:
        trainer.save_checkpoint(ckpt, step, checkpoint_log(log))
        progress.event("checkpoint", step=step, path=str(ckpt))

    run_steps(
        cache,
        plan,
        log,
        bar,
        start=start,
        end=end,
        load_entry=lambda c, k: trainer.load_entry(c.path(k)),
        micro_step=checked_micro_step,
        update=update,
        save_checkpoint=save,
    )
    bar.close()
    log["peak_rss_mib"] = peak_rss_mib()
    log["start_rss_mib"] = start_rss / 2**20
    if predicted and log[LOG_STEP_SECONDS]:
        measured = float(np.median(log[LOG_STEP_SECONDS]))
        log[LOG_PREDICTED_STEP_SECONDS] = predicted
        progress.log(
            f"step time: measured {measured:.3g} s (median), predicted {predicted:.3g} s "
            f"({measured / predicted - 1:+.0%})"
        )
    info = getattr(trainer, "info", None)
    if info is not None:
        log.update(info())
    if end == plan.steps:
        lora = trainer.lora()
        if not any(np.any(a != 0) for n, a in lora.items() if ".lora_B." in n):
            raise NumericsError(
                "training finished with an all-zero LoRA (it would change nothing); "
                "not writing it. Check --lr and the cache"
            )
        if ev is not None and log.get(LOSS_WITHOUT_LORA) is not None:
            # the trained LoRA against none, on the first entry: equal losses mean the span's output did
            # not change (a LoRA too small to matter, or one that does not reach the output)
            after = ev(first["entry"] if "entry" in first else trainer.load_entry(cache.path(0)))
            if after == log[LOSS_WITHOUT_LORA]:
                raise NumericsError(
                    f"the trained LoRA does not change the model's output on cache entry 0 (loss {after} with "
                    f"and without it); not writing it. Raise --lr when exporting, or export the bundle again"
                )
        write_lora(out / "lora.safetensors", lora, bundle.manifest["lora"])
        log["lora"] = str(out / "lora.safetensors")
    close = getattr(trainer, "close", None)
    if close is not None:
        close()
    atomic_write(out / "train_log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))
    return log


def check_lora_moves(
    trainer: Trainer, lora: Arrays, entry: dict[str, Any], loss_before: float | None
) -> None:
    """After the first update: the LoRA must have left zero and must change the model's output (the
    first entry's loss, computed the same way before and after the update)."""
    if not any(np.any(a != 0) for n, a in lora.items() if ".lora_B." in n):
        raise NumericsError(
            "the first step left every LoRA B at zero: the LoRA gets no gradient. "
            "Check the bundle's LoRA targets and --lr"
        )
    ev = getattr(trainer, "eval_loss", None)
    if ev is not None and loss_before is not None and ev(entry) == loss_before:
        raise NumericsError(
            "the first step changed the LoRA but not the loss: the LoRA does not reach the "
            "output; export the bundle again"
        )
