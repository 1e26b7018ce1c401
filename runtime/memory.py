"""Process memory readings (no torch): peak RSS of this process."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from blockskip.runtime.bundle import Bundle


def peak_rss_mib() -> float:
    """High-water mark of resident memory (VmHWM) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after the first
    few the tensors of a streamed block come from the heap, and their pages stay with the process after
    they are freed: streaming a model's blocks through one process grows by about a block each time.
    Call it after dropping a block."""
    global _trim
    if _trim is None:
        _trim = False
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            _trim = libc.malloc_trim if hasattr(libc, "malloc_trim") else False
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Callable[[int], object] | Literal[False] | None = None  # glibc's malloc_trim; False: none

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve every C-heap allocation of ``threshold`` bytes or more with its own mapping, returned to the
    system when freed (glibc ``mallopt(M_MMAP_THRESHOLD)``, which also stops the threshold's rise; a
    no-op elsewhere). Without it, which freed multi-MiB tensors stay with the process depends on the
    threads that allocated them and their timing: a real-size export's peak varied by 20% between runs.
    Returns whether it was set."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    """Resident memory of this process now (VmRSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            v = f.read().strip()
    except OSError:
        return None
    return None if not v.isdigit() else int(v)


def cgroup_free_bytes() -> int | None:
    """What this process's memory cgroup still allows (limit minus usage), or None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = f"/sys/fs/cgroup{path.rstrip('/')}"
            limit, used = _read_int(f"{base}/memory.max"), _read_int(f"{base}/memory.current")
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path.rstrip('/')}"
            limit, used = (
                _read_int(f"{base}/memory.limit_in_bytes"),
                _read_int(f"{base}/memory.usage_in_bytes"),
            )
        else:
            continue
        if limit is not None and used is not None and limit < (1 << 60):
            return max(0, limit - used)
    return None


def available_bytes() -> tuple[int, str]:
    """(bytes this process can still take, where the figure comes from): MemAvailable, or the memory
    cgroup's remaining allowance where that is smaller."""
    avail, source = None, "MemAvailable"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    cg = cgroup_free_bytes()
    if cg is not None and (avail is None or cg < avail):
        avail, source = cg, "the memory cgroup limit"
    return (avail if avail is not None else 1 << 62), source


def check_budget(bundle: Bundle, phase: str) -> None:
    """Stop before a phase whose predicted peak (the bundle's dry run) does not fit the memory that is
    available now, naming the plan's peak, what is available and a plan option that would fit."""
    import os

    from blockskip.runtime.errors import BlockSkipError

    mem = bundle.manifest.get("memory") or {}
    peak = (mem.get("phases") or {}).get(phase)
    if not peak or os.environ.get("BLOCKSKIP_IGNORE_MEMORY_CHECK"):
        return
    have, source = available_bytes()
    held = rss_bytes()
    need = max(0, int(peak) - held)
    if need <= have:
        return
    mib = 1 << 20
    fits = [
        a for a in mem.get("alternatives", []) if int(a.get("phases", {}).get(phase, 1 << 62)) - held <= have
    ]
    hint = (
        f"; re-export with {fits[0]['option']} (predicted {int(fits[0]['phases'][phase]) / mib:.0f} MiB)"
        if fits
        else "; free memory, or re-export with a smaller plan (blockskip-plan shows the options)"
    )
    raise BlockSkipError(
        f"not enough memory for {phase}: this plan's predicted peak is {int(peak) / mib:.0f} MiB, this process "
        f"holds {held / mib:.0f} MiB and {have / mib:.0f} MiB more are available ({source}){hint}. "
        f"Set BLOCKSKIP_IGNORE_MEMORY_CHECK=1 to run anyway"
    )
