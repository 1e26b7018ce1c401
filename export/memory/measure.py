"""Measure a real training step's memory on CPU, to check the dry run against.

Two independent readings of step 2 (AdamW state exists): the CPU allocator's own events from
``torch.profiler`` (peak of the running sum of allocations, on top of the tensors already live), and
the process RSS high-water mark (``VmHWM``), reset with ``/proc/self/clear_refs`` before the step.
"""

from __future__ import annotations

import gc
import time

import torch

from blockskip.runtime.backends.torch import TrainedSpan, make_optimizer
from blockskip.runtime.backends.torch_io import BlockStore
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache


def _leaves(t):
    """Real memory of a tensor: a wrapper subclass (quanto's quantised weights) holds it in inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in (leaf for x in tensors for leaf in _leaves(x)):
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_train_step(bundle_dir, cache_dir, rss: bool = False) -> dict:
    """Run two training steps for real; return live bytes before step 2 and the step's extra peak."""
    from safetensors.torch import load_file

    bundle = Bundle(bundle_dir)
    plan = bundle.plan
    cache = ResidualCache(cache_dir)
    store = BlockStore(bundle)
    span = TrainedSpan(store, bundle.trained, bundle.manifest["lora"], plan.seed)
    opt = make_optimizer(span.params, plan)
    entries = [load_file(cache.path(k % len(cache.schedule))) for k in range(2)]  # current + prefetched

    def step():
        for _ in range(plan.grad_accum):
            (span.loss(entries[0]) / plan.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    gc.collect()
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    live0 = _storage_bytes(
        [p for p in span.model.parameters() if p.device.type != "meta"]
        + [b for b in span.model.buffers() if b.device.type != "meta"]
        + state
        + [t for e in entries for t in e.values()]
    )
    out: dict[str, float] = {"live0": live0}
    if rss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        step()
        out["step_seconds"] = time.perf_counter() - t0
        out["rss_delta"] = (_rss_kib("VmHWM") - base) * 1024
        return out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    out["alloc_delta"] = peak
    return out
