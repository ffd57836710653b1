"""Parquet output that is never half-written: write to a temporary file in the
same folder, then rename (atomic on POSIX). On any error the temporary file is
removed and nothing appears at the destination."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import polars as pl

__all__ = ["sink_parquet", "write_parquet"]


@contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    final = Path(path)
    if final.is_dir():
        raise IsADirectoryError(f"{final} is a folder; give a file path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def sink_parquet(lf: pl.LazyFrame, path: str | os.PathLike, **kwargs: Any) -> None:
    """``lf.sink_parquet(path)`` (streaming engine), but atomic: if the query
    fails midway (bad input, a killed process), ``path`` is left untouched.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> psc.sink_parquet(pl.LazyFrame({"a": [1, 2]}), os.path.join(d, "a.parquet"))
    >>> pl.read_parquet(os.path.join(d, "a.parquet")).height
    2
    """
    with _atomic_path(path) as tmp:
        lf.sink_parquet(tmp, **kwargs)


def write_parquet(df: pl.DataFrame, path: str | os.PathLike, **kwargs: Any) -> None:
    """``df.write_parquet(path)``, atomic like :func:`sink_parquet`."""
    with _atomic_path(path) as tmp:
        df.write_parquet(tmp, **kwargs)
