"""Progress of the long stages of :func:`polars_singlecell.integrate`: cells
processed / total and the rate, one bar per stage on stderr. In a Jupyter
notebook the bar is ``tqdm.auto``'s (a widget, or text redrawn in place)
where tqdm is installed (scanpy depends on it); elsewhere our own line,
redrawn on a terminal and written once, final, to a log.

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


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where stderr is no terminal but
    redraws in place)."""
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and ip.__class__.__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """Whether someone watches: a terminal on stderr, or a notebook."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or in_notebook()


class NotebookBar:
    """``tqdm.auto`` behind the same counter interface as :class:`Bar`."""

    def __init__(self, name: str, total: int, tqdm) -> None:
        self.bar = tqdm(total=total, desc=name, unit=" cells", unit_scale=False, mininterval=0.25, leave=True)
        self.done = 0
        self.finished = False
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.bar.update(n)

    def draw(self, end: str) -> None:
        self.bar.close()


def _bar(name: str, total: int, stream: IO[str] | None) -> Bar | NotebookBar:
    if stream is None and in_notebook():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return NotebookBar(name, total, tqdm)
    return Bar(name, total, stream or sys.stderr)


@contextmanager
def track(name: str, total: int | None, stream: IO[str] | None = None) -> Iterator[Bar | NotebookBar | None]:
    """Count the rows read or written while the block runs; ``total=None``: no bar."""
    if total is None:
        yield None
        return
    bar = _bar(name, total, stream)
    token = _current.set(bar)
    try:
        yield bar
    finally:
        _current.reset(token)
        if isinstance(bar, NotebookBar):
            bar.draw(end="")
        elif bar.done and not bar.finished:
            bar.draw(end="\n")


@contextmanager
def paused() -> Iterator[None]:
    """Rows read inside the block are not counted (a pre-pass over a column)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)
