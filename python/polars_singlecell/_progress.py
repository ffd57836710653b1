"""Progress of the long stages of :func:`polars_singlecell.integrate`: cells
processed / total and the rate, one bar per stage on stderr.

A stage's bar is found through a context variable, so the functions that read
cells (``_record_batches``: the HVG, PCA and centroid fits) and
:func:`polars_singlecell.sink_parquet` count rows without a parameter
threaded through every public signature; with no bar set they do nothing.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

_current: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("polars_singlecell_progress", default=None)


def counter() -> Callable[[int], None] | None:
    """The row counter of the stage running in this context, or None."""
    return _current.get()


class Bar:
    """``name ████████······ 1,200,000/3,000,000 cells  40.0%  512,000 cells/s  2.3s``,
    redrawn in place at most every ``every`` seconds on a terminal; elsewhere
    (a log file, CI) only the final line is written."""

    def __init__(self, name: str, total: int, stream: IO[str], every: float = 0.25) -> None:
        self.name, self.total, self.stream, self.every = name, total, stream, every
        self.done = 0
        self.finished = False
        self.t0 = self.last = time.perf_counter()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        # Polars' streaming threads call it (holding the GIL only inside the call).
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = time.perf_counter()
            if self.done >= self.total and not self.finished:
                # The pass over the cells is over; the stage may still write or evaluate.
                self.finished = True
                self.draw(end="\n")
            elif self.tty and not self.finished and now - self.last >= self.every:
                self.last = now
                self.draw(end="")

    def line(self) -> str:
        secs = time.perf_counter() - self.t0
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = round(24 * frac)
        rate = self.done / secs if secs > 0 else 0.0
        return (f"{self.name:<12}{'█' * filled}{'·' * (24 - filled)} {self.done:,}/{self.total:,} cells "
                f"{100 * frac:5.1f}%  {rate:,.0f} cells/s  {secs:.1f}s")

    def draw(self, end: str) -> None:
        self.stream.write("\r" + self.line() + end if self.tty else self.line() + end)
        self.stream.flush()


@contextmanager
def track(name: str, total: int | None, stream: IO[str] | None = None) -> Iterator[Bar | None]:
    """Count the rows read or written while the block runs; ``total=None``: no bar."""
    if total is None:
        yield None
        return
    bar = Bar(name, total, stream or sys.stderr)
    token = _current.set(bar)
    try:
        yield bar
    finally:
        _current.reset(token)
        if bar.done and not bar.finished:
            bar.draw(end="\n")


@contextmanager
def paused() -> Iterator[None]:
    """Rows read inside the block are not counted (a pre-pass over a column)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)
