"""Files written whole or not at all, and which files a source names: shared
by ``io``, ``pipeline``, ``plot`` and ``metrics``. Parquet output goes to a
temporary file in the same folder, then is renamed (atomic on POSIX); on any
error the temporary file is removed and nothing appears at the destination."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from polars_singlecell import _progress

# Entries (non-zeros) per row group of the files we write: a reader's and a
# writer's memory follows a row group, and at Tahoe's ~1,400 genes a cell a
# fixed 50k-row group would hold 70M entries (0.6 GB before compression).
ROW_GROUP_ENTRIES = 4_000_000


def rows_per_group(n_rows: int, n_entries: int, budget: int | None = None) -> int:
    """Rows per Parquet row group for ``n_rows`` cells holding ``n_entries``
    list entries: about ``budget`` (default ``ROW_GROUP_ENTRIES``) entries a
    group, 256 to 50,000 rows."""
    budget = ROW_GROUP_ENTRIES if budget is None else budget
    return int(min(50_000, max(256, budget * n_rows // max(n_entries, 1)), max(n_rows, 1)))


# Errors that only a write gives: Polars reports them as a ComputeError that
# names neither the file nor the cause ("File out of specification: underlying
# IO error: No space left on device (os error 28)").
WRITE_ERRNOS = {errno.ENOSPC: "free space", errno.EDQUOT: "your disk quota", errno.EFBIG: "the file-size limit (ulimit -f)",
                 errno.EROFS: "that the file system is writable"}
PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}
OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_failed(final: Path, e: BaseException) -> OSError | None:
    """A failed write of ``final`` (disk full, quota, file-size limit, read-only
    or forbidden folder) as an ``OSError`` naming the file, the cause and the
    fix; ``None`` for anything else (bad input is raised as it is)."""
    if isinstance(e, OSError) and e.errno is not None:
        code = e.errno
        if code not in WRITE_ERRNOS and code not in PERMISSION_ERRNOS:
            return None
    else:
        m = OS_ERROR.search(str(e))
        # A Polars error may come from reading the source too: only the errnos a read never gives.
        if m is None or int(m.group(1)) not in WRITE_ERRNOS:
            return None
        code = int(m.group(1))
    check = WRITE_ERRNOS.get(code, "the permissions")
    return OSError(code, f"cannot write {final}: {os.strerror(code)}. Nothing was left under that name; "
                         f"check {check} of {final.parent} and run again")


def seeded_sample(lf: pl.LazyFrame, max_cells: int, seed: int) -> pl.LazyFrame:
    """The ``max_cells`` rows whose seeded hash of their row number is
    smallest, in row order: one definition for ``metrics.evaluate``,
    ``to_anndata`` and ``plot.embedding``, so all three see the same cells."""
    return (lf.with_row_index("_row").with_columns(pl.col("_row").hash(seed).alias("_h"))
            .bottom_k(max_cells, by=["_h", "_row"]).sort("_row").drop("_h", "_row"))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    final = Path(path)
    if final.is_dir():
        raise IsADirectoryError(f"{final} is a folder; give a file path")
    tmp = hidden_sibling(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # Fail here, with an errno, when the folder is not writable (Polars'
        # own error for that carries none).
        tmp.touch()
        yield tmp
        os.replace(tmp, final)
    except (OSError, pl.exceptions.PolarsError) as e:
        failed = write_failed(final, e)
        if failed is None:
            raise
        raise failed from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def hidden_sibling(final: Path) -> Path:
    """A hidden temporary name beside ``final`` (``.<name>.<hex>.tmp``): never
    read as data, and removed by the next ``integrate`` in that folder if a
    killed process leaves it."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")


def remove(path: Path) -> None:
    """Delete a file or a folder (a dataset folder, a killed run's temporary one)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_replacing(final: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a new ``final`` (a file or a dataset folder) under a
    hidden name beside it, then swap it in over whatever ``final`` is.

    Until the swap the old output keeps its name, so a failed or killed
    write leaves it as it was. ``os.replace`` cannot put a folder over a file
    or a file over a folder (a distributed run writes folders, a local one
    files), so for the swap alone the old one is moved aside, put back if
    the rename fails, and deleted after it."""
    tmp = hidden_sibling(final)
    try:
        write(tmp)
        if not final.exists():
            os.replace(tmp, final)
            return
        aside = hidden_sibling(final)
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)
            raise
        remove(aside)
    finally:
        if tmp.exists():
            remove(tmp)


def expand(source: str | os.PathLike, suffix: str) -> list[Path]:
    """The files ``source`` names: itself, a folder's ``*<suffix>`` files, or a glob's matches."""
    p = Path(source)
    if any(ch in str(p) for ch in "*?[") and not p.exists():
        return sorted(Path(f) for f in glob.glob(str(p)) if f.endswith(suffix))
    if p.is_dir():
        return sorted(p.glob(f"*{suffix}"))
    return [p]


def sink_parquet(lf: pl.LazyFrame, path: str | os.PathLike, **kwargs: Any) -> None:
    """``lf.sink_parquet(path)`` (streaming engine), but atomic.

    If the query fails midway (bad input, a killed process), ``path`` is
    left untouched: the file is written under a temporary name in the same
    folder, then renamed.

    Parameters
    ----------
    lf : polars.LazyFrame
        The query to run.
    path : str or os.PathLike
        The file (replaced if it exists).
    **kwargs
        Options of ``polars.LazyFrame.sink_parquet`` (``row_group_size``, ...).

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> psc.sink_parquet(pl.LazyFrame({"a": [1, 2]}), os.path.join(d, "a.parquet"))
    >>> pl.read_parquet(os.path.join(d, "a.parquet")).height
    2
    """
    count = _progress.counter()
    if count is not None:
        # Inside psc.integrate(progress=True): count rows as they pass, on the
        # last column (there, the one the stage computes), so rows count once done.
        last, dtype = list(lf.collect_schema().items())[-1]
        lf = lf.with_columns(pl.col(last).map_batches(lambda s: (count(s.len()), s)[1], return_dtype=dtype, is_elementwise=True))
    with atomic_path(path) as tmp:
        lf.sink_parquet(tmp, **kwargs)


# The streaming Parquet source's read-ahead, in row groups. Polars reads it
# from the environment when a query starts; its default (enough row groups to
# keep every thread busy) lets the source decode far ahead of a slow
# expression (pola-rs/polars#28569).
PREFETCH = "POLARS_ROW_GROUP_PREFETCH_SIZE"


def sink_bounded(lf: pl.LazyFrame, path: str | os.PathLike, **kwargs: Any) -> None:
    """:func:`sink_parquet` with the Parquet source reading one row group
    ahead, for a slow query over a scan (``pca_project``, ``knn_interpolate``).

    A plain sink lets the source decode ahead of the slow expression: the
    pipeline's interpolate write peaked at 1.48 GB for 10M cells, against
    0.51 GB with one row group of read-ahead, in the same time (28.3 vs
    28.1 s; ``benches/bench_sink_bounded.py``). The earlier fix, sinking
    262,144-row slices into part files and copying them into one, took
    48.9 s (the copy) for 0.52 GB (``bench_sink_slices.py``, commit 0639330).

    The variable is set for this call only, between queries (nothing else of
    Polars runs then); a value the user set is left as it is."""
    if PREFETCH in os.environ:
        sink_parquet(lf, path, **kwargs)
        return
    os.environ[PREFETCH] = "1"
    try:
        sink_parquet(lf, path, **kwargs)
    finally:
        os.environ.pop(PREFETCH, None)
