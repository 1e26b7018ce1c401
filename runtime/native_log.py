"""Native libraries (ONNX Runtime, ExecuTorch) log straight to file descriptor 2, past Python's logging."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def fd2_filtered(keep: Callable[[str, bool], bool]) -> Iterator[None]:
    """Capture fd 2 for the duration; afterwards write back the captured lines for which
    ``keep(line, failed)`` is true (``failed``: the block raised)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            kept = [ln for ln in lines if keep(ln, failed)]
            if kept:
                os.write(2, "".join(kept).encode())
