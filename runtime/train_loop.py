"""The optimizer-step loop every backend shares: entry order, prefetch, gradient accumulation, the log,
progress and checkpoints. Backends supply the micro-step, the update and the checkpoint writer."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.memory import peak_rss_mib
from blockskip.runtime.plan import Plan
from blockskip.runtime.progress import Bar

Entry = TypeVar("Entry")  # what load_entry returns and micro_step takes


def entry_order(num_entries: int, steps: int, grad_accum: int) -> list[int]:
    """Which cache entry each micro-step reads: the schedule in order, wrapping around."""
    return [(s * grad_accum + j) % num_entries for s in range(steps) for j in range(grad_accum)]


def run_steps(
    cache: ResidualCache,
    plan: Plan,
    log: dict[str, Any],
    bar: Bar,
    *,
    start: int,
    end: int,
    load_entry: Callable[[ResidualCache, int], Entry],
    micro_step: Callable[[Entry], float],
    update: Callable[[], object],
    save_checkpoint: Callable[[int], object],
) -> None:
    """Optimizer steps [start, end). ``micro_step(entry)`` runs forward + backward of one entry (the
    backend scales its gradient by 1/grad_accum) and returns the unscaled loss; ``update()`` applies the
    optimizer; ``save_checkpoint(step)`` is called every ``checkpoint_every`` steps and at the last one.
    The next entry is read on a second thread while a micro-step runs."""
    order = entry_order(len(cache.schedule), plan.steps, plan.grad_accum)
    pos = start * plan.grad_accum
    with ThreadPoolExecutor(1) as pool:
        nxt: Future[Entry] | None = pool.submit(load_entry, cache, order[pos]) if pos < len(order) else None
        for step in range(start, end):
            t0 = time.perf_counter()
            total = 0.0
            for _ in range(plan.grad_accum):
                assert nxt is not None, "a step past the plan's last"
                entry = nxt.result()
                pos += 1
                nxt = pool.submit(load_entry, cache, order[pos]) if pos < len(order) else None  # prefetch
                total += micro_step(entry) / plan.grad_accum
            update()
            log["losses"].append(total)
            log["step_seconds"].append(time.perf_counter() - t0)
            bar.update(
                1,
                loss=f"{total:.4f}",
                peak=f"{peak_rss_mib():.0f}MiB",
                _loss=total,
                _seconds=log["step_seconds"][-1],
            )
            if (step + 1) % plan.checkpoint_every == 0 or step + 1 == plan.steps:
                save_checkpoint(step + 1)
        if nxt is not None:
            nxt.cancel()
