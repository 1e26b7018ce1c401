"""Progress reporting: tqdm bars (step, loss, peak memory, ETA) or silence."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from blockskip.runtime.events import EventLog


class Bar(Protocol):
    """What ``Progress.bar`` returns: ``update`` advances it by ``n`` (``postfix``: shown beside it)."""

    def update(self, n: int = 1, **postfix: float | str) -> None: ...

    def close(self) -> None: ...


class _NullBar:
    def update(self, n: int = 1, **postfix: float | str) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int, desc: str, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float | str) -> None:
        postfix = {k: v for k, v in postfix.items() if not k.startswith("_")}  # "_": for event logs only
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Progress:
    """Bars and messages for people; with ``events`` (a ``runtime.events.EventLog``), event lines too."""

    def __init__(self, quiet: bool = False, events: EventLog | None = None):
        self.quiet = quiet
        self.events = events

    def bar(self, total: int, desc: str, initial: int = 0) -> Bar:
        bar: Bar = _NullBar() if self.quiet else _Bar(total, desc, initial)
        if self.events is not None:
            from blockskip.runtime.events import EventBar

            bar = EventBar(bar, self.events, desc, total, initial)
        return bar

    def event(self, event: str, **fields: object) -> None:
        if self.events is not None:
            self.events.emit(event, **fields)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)
