"""CLI glue shared by the commands: typed errors become one line and an exit code."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from blockskip.runtime.errors import BlockSkipError


def run_cli(fn: Callable[[], int | None], debug: bool, prog: str) -> int:
    try:
        return int(fn() or 0)
    except BlockSkipError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed work is kept, run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        print(f"{prog}: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
