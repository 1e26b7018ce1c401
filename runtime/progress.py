"""Progress reporting: tqdm bars (step, loss, peak memory, ETA) or silence."""

from __future__ import annotations

import sys


class _NullBar:
    def update(self, n=1, **postfix):
        pass

    def close(self):
        pass


class _Bar:
    def __init__(self, total, desc, initial=0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, dynamic_ncols=True)

    def update(self, n=1, **postfix):
        postfix = {k: v for k, v in postfix.items() if not k.startswith("_")}  # "_": for event logs only
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


class Progress:
    """Bars and messages for people; with ``events`` (a ``runtime.events.EventLog``), event lines too."""

    def __init__(self, quiet: bool = False, events=None):
        self.quiet = quiet
        self.events = events

    def bar(self, total: int, desc: str, initial: int = 0):
        bar = _NullBar() if self.quiet else _Bar(total, desc, initial)
        if self.events is not None:
            from blockskip.runtime.events import EventBar

            bar = EventBar(bar, self.events, desc, total, initial)
        return bar

    def event(self, event: str, **fields) -> None:
        if self.events is not None:
            self.events.emit(event, **fields)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)
