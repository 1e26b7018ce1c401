"""Process memory readings (no torch): peak RSS of this process."""

from __future__ import annotations

import resource
import sys


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
