"""Progress that reads well in a terminal and in a CI log.

In a terminal: a tqdm bar (total, rate, ETA). When stderr is not a terminal (a CI log, a pipe): no
carriage returns, one line per ~10 % of the work, and a closing line, e.g.

    fine-tune: 10% (29/285 step) 4.1 s, about 37 s left, loss=0.0521
"""
from __future__ import annotations

import sys
import time


class LineProgress:
    """tqdm's `update`, `set_postfix` and `close`, printing a line every ~10 % instead of redrawing."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.postfix = ""
        self.next_tenth = (initial * 10 // total + 1) if total else 1
        self.closed = False

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n * 10 >= self.next_tenth * self.total and self.n < self.total:
            self.next_tenth = self.n * 10 // self.total + 1
            self._line()

    def _line(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        if self.total:
            done = f"{100 * self.n // self.total}% ({self.n}/{self.total} {self.unit})"
            left = elapsed / max(self.n, 1) * (self.total - self.n)
            eta = "" if final or not self.n else f", about {left:.0f} s left"
        else:
            done, eta = f"{self.n} {self.unit}", ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {elapsed:.1f} s{eta}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(final=True)


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = False, **values) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A progress reporter: tqdm on a terminal, LineProgress otherwise, nothing when not `enabled`."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)
    return LineProgress(total, desc, unit, initial)


def iterate(items, total: int | None, desc: str, unit: str, enabled: bool = True):
    """Iterate `items` with a progress reporter."""
    reporter = bar(total, desc, unit, enabled)
    try:
        for item in items:
            yield item
            reporter.update(1)
    finally:
        reporter.close()
