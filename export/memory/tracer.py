"""Count live tensor storages while code runs on fake tensors (or real ones).

A ``TorchDispatchMode`` sees every op's outputs; each new storage adds its (rounded) bytes under the
current category, and a ``weakref.finalize`` on the storage subtracts them when it dies. Run under
``FakeTensorMode`` on device ``cpu`` (not ``meta``: meta forces the math attention path), nothing is
allocated, yet the live-bytes curve is the one the allocator would see.
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

CATEGORIES = ("frozen_weights", "trained_base", "lora", "gradients", "optimizer", "activations", "cache")


class MemoryTracer(TorchDispatchMode):
    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = max(1, int(round_to))
        self.live: dict[int, list] = {}  # storage key -> [bytes, category]
        self.by_cat: dict[str, int] = defaultdict(int)
        self.current = 0
        self.peak = 0
        self.peak_by_cat: dict[str, int] = {}
        self.cat = "activations"
        self._marks: dict[str, int] = {}
        self.deferred: dict[int, str] = {}  # storage key -> category: counted from its first use by an op
        # the peak of each segment of the run (``segment``), with its bytes per category; off unless used
        self.segment = None
        self.segment_peaks: dict = {}
        # the cost of each op run while it is a Counter (``cost.op_cost``: the time prediction); off if None
        self.cost: Counter | None = None

    def set_segment(self, key) -> None:
        """From now on the live bytes count towards segment ``key`` (its peak starts at the current bytes)."""
        self.segment = key
        self._note_segment()

    def _note_segment(self) -> None:
        rec = self.segment_peaks.get(self.segment)
        if rec is None or self.current > rec[0]:
            self.segment_peaks[self.segment] = (self.current, dict(self.by_cat))

    # --- accounting ----------------------------------------------------------------------
    def _round(self, n: int) -> int:
        r = self.round_to
        return (n + r - 1) // r * r

    def track(self, t: torch.Tensor, cat: str | None = None) -> None:
        if t.device.type == "meta":  # skeleton structure, never allocated
            return
        if is_traceable_wrapper_subclass(t):
            # e.g. quanto's quantised weights: the wrapper's own storage is a placeholder of the logical
            # (float) size; the memory is in the tensors inside it (int8 / packed data, scales, shifts)
            for name in t.__tensor_flatten__()[0]:
                self.track(getattr(t, name), cat)
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = self._round(st.nbytes())
        c = cat or self.cat
        self.live[key] = [n, c]
        self.by_cat[c] += n
        self.current += n
        weakref.finalize(st, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_cat = dict(self.by_cat)
        if self.segment is not None:
            self._note_segment()

    def defer(self, t: torch.Tensor, cat: str) -> None:
        """A tensor read from a memory-mapped file (safetensors' ``load_file`` maps the file privately): its
        pages become resident when an op first reads it, so it counts from then on, not from the load."""
        st = t.untyped_storage()
        key = st._cdata
        rec = self.live.pop(key, None)
        if rec is not None:
            self.current -= rec[0]
            self.by_cat[rec[1]] -= rec[0]
        else:
            weakref.finalize(st, self._free, key)
        self.deferred[key] = cat

    def _free(self, key: int) -> None:
        self.deferred.pop(key, None)
        rec = self.live.pop(key, None)
        if rec is not None:
            self.current -= rec[0]
            self.by_cat[rec[1]] -= rec[0]

    def retag(self, t: torch.Tensor, cat: str) -> None:
        """Move a tensor's storage to another category (e.g. a .grad once it is accumulated)."""
        rec = self.live.get(t.untyped_storage()._cdata)
        if rec is None:
            self.track(t, cat)
        elif rec[1] != cat:
            self.by_cat[rec[1]] -= rec[0]
            self.by_cat[cat] += rec[0]
            rec[1] = cat

    @contextmanager
    def category(self, cat: str):
        old, self.cat = self.cat, cat
        try:
            yield
        finally:
            self.cat = old

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_by_cat = dict(self.by_cat)

    # --- dispatch --------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.deferred:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    cat = self.deferred.pop(t.untyped_storage()._cdata, None)
                    if cat is not None:
                        self.track(t, cat)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.cost is not None:
            from blockskip.export.memory.cost import counted, op_cost

            if counted(func):
                self.cost[op_cost(func, args, kwargs, out)] += 1
        return out
