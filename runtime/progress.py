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
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


class Progress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def bar(self, total: int, desc: str, initial: int = 0):
        return _NullBar() if self.quiet else _Bar(total, desc, initial)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)
