"""CLI glue shared by the commands: typed errors become one line and an exit code."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from blockskip.runtime.errors import BlockSkipError


class Terminated(KeyboardInterrupt):
    """SIGTERM (how Android and service managers stop a process), raised where SIGINT would be: the run
    stops as on Ctrl-C (every file is written atomically, so the last checkpoint is whole)."""


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


def run_cli(fn: Callable[[], int | None], debug: bool, prog: str) -> int:
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: the caller handles signals
        pass
    try:
        return int(fn() or 0)
    except BlockSkipError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        how, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"{prog}: {how}; completed work is kept, run the same command to resume", file=sys.stderr)
        return code
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        print(
            f"{prog}: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
