"""A run's events as JSON lines (``device-train --events FILE``; ``-`` is stdout): phases, precompute
progress, steps, checkpoints, errors and the outputs, one object a line, flushed as it happens. Each
line is a ``runtime.formats`` ``event`` record (``docs/schemas/event.schema.json``)."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

from blockskip.runtime.memory import peak_rss_mib

if TYPE_CHECKING:
    from blockskip.runtime.progress import Bar


class EventLog:
    """Writes event lines to ``path`` (appending: a resumed run adds to its log) or stdout (``-``)."""

    def __init__(self, path: str):
        self._own = path != "-"
        self._f = open(path, "a", encoding="utf-8") if self._own else sys.stdout  # noqa: SIM115 (closed in close)

    def emit(self, event: str, **fields: object) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}, allow_nan=False)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._own:
            self._f.close()


class EventBar:
    """A progress bar that also writes events: ``step`` for the training bar, ``precompute_progress``
    for the others. The training loop passes ``_loss`` and ``_seconds`` (kept out of the terminal bar)."""

    def __init__(self, inner: Bar, events: EventLog, desc: str, total: int, initial: int):
        self.inner, self.events, self.desc, self.total = inner, events, desc, total
        self.done = initial
        self.seconds: list[float] = []

    def update(self, n: int = 1, **postfix: float | str) -> None:
        self.done += n
        loss, seconds = postfix.get("_loss"), postfix.get("_seconds")
        if self.desc == "train" and loss is not None:
            self.seconds.append(float(seconds or 0.0))
            eta = (self.total - self.done) * sum(self.seconds) / len(self.seconds)
            self.events.emit(
                "step",
                step=self.done,
                steps=self.total,
                loss=float(loss),
                step_seconds=float(seconds or 0.0),
                peak_rss_mib=peak_rss_mib(),
                eta_seconds=max(eta, 0.0),
            )
        elif self.desc != "train":
            self.events.emit("precompute_progress", done=self.done, total=self.total)
        self.inner.update(n, **postfix)

    def close(self) -> None:
        self.inner.close()
