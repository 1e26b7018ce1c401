"""blockskip.runtime: the lean on-device side of dit-blockskip.

Importing this package needs only numpy and the standard library; a backend (torch, ...) is
imported lazily when it is asked for.
"""

from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.plan import Plan
from blockskip.runtime.schedule import PatchSchedule, ScheduleEntry

__all__ = ["BlockSkipError", "PatchSchedule", "Plan", "ScheduleEntry"]
