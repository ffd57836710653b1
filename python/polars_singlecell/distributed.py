"""The fits on a Dask cluster: :class:`DaskEngine`.

Workers get code, not pickled plugin calls: each task is a module-level
function that takes a file, a row range and small parameters, builds its
query on the worker, streams the rows into a fit state
(``_internal.*Fit``) and returns the state's bytes. The driver merges the
states in partition order and finishes the fit. Partitions are fixed by the
data (whole Parquet row groups of one file, at most ``partition_rows`` rows,
with global row numbers from the footers), never by the number of workers,
so the result does not depend on how many workers there are or in which
order their tasks finish.

So far ``fit_centroids(engine=...)`` runs here; its sample is exactly the
local one for any partitioning (a bottom-k of a union is the bottom-k of the
parts'), so its centroids are the local run's, bit for bit.
``highly_variable_genes``, ``fit_pca`` and ``integrate`` do not take an
engine yet (their float sums need the local path to merge the same
partitions; see issue 22).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from polars_singlecell import _internal
from polars_singlecell._checks import positive_int

__all__ = ["DaskEngine", "Partition", "partitions"]


@dataclass(frozen=True)
class Partition:
    """Rows ``offset .. offset + n_rows`` of ``path`` (whole row groups),
    which are rows ``first_row ..`` of the whole data."""

    path: str
    offset: int
    n_rows: int
    first_row: int
    groups: tuple[int, ...]  # the row groups' sizes, in order


def partitions(paths: list[str], columns: list[str], partition_rows: int) -> list[Partition]:
    """The data's partitions: consecutive row groups of one file, up to
    ``partition_rows`` rows (a larger row group is a partition of its own),
    in file and row order. Read from the footers only."""
    out, first_row = [], 0
    for path in paths:
        groups = [rows for rows, _ in _internal.parquet_row_groups([path], columns)]
        offset, current = 0, []
        for rows in [*groups, None]:
            if current and (rows is None or sum(current) + rows > partition_rows):
                n = sum(current)
                out.append(Partition(path, offset, n, first_row, tuple(current)))
                offset, first_row, current = offset + n, first_row + n, []
            if rows:
                current.append(rows)
    return out


@functools.cache
def _build() -> str:
    """A digest of the compiled extension: two builds of one version differ."""
    return hashlib.sha256(Path(_internal.__file__).read_bytes()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """What must match between the driver and every worker."""
    return {"polars_singlecell": _internal.__version__, "polars": pl.__version__, "build": _build()}


def _rows(part: Partition, columns: list[str]):
    """The partition's rows, one row group at a time (a group is decoded
    whole however it is sliced, so slices follow the groups)."""
    start = part.offset
    for rows in part.groups:
        yield pl.scan_parquet(part.path).slice(start, rows).select(columns).collect()
        start += rows


def centroid_sample_task(part: Partition, embedding: str, batch_key: str, args: tuple) -> bytes:
    """One partition's centroid sample (a worker's task): its state's bytes."""
    d, cap, seed = args[:3]
    fit = _internal.CentroidSampleFit(d, cap, seed, 1, first_row=part.first_row)
    for batch in _rows(part, [embedding, batch_key]):
        fit.update(batch[embedding], batch[batch_key])
    return fit.to_bytes()


class DaskEngine:
    """Run the fits on a ``dask.distributed.Client``'s cluster.

    ``partition_rows``: rows per task at most (whole row groups). Needs
    ``pip install 'polars-singlecell[dask]'``. At start every worker must run
    the same polars-singlecell build and polars version as this process;
    otherwise a ``RuntimeError`` names the worker and both versions.

    Examples
    --------
    >>> from dask.distributed import Client, LocalCluster          # doctest: +SKIP
    >>> engine = psc.distributed.DaskEngine(Client(LocalCluster(n_workers=4)))  # doctest: +SKIP
    >>> psc.fit_centroids("cells_pca/*.parquet", engine=engine)    # doctest: +SKIP
    """

    def __init__(self, client: Any, *, partition_rows: int = 1_000_000) -> None:
        try:
            import distributed  # noqa: F401  (the engine's one requirement)
        except ImportError as e:
            raise ImportError("DaskEngine needs dask.distributed: pip install 'polars-singlecell[dask]'") from e
        self.client = client
        self.partition_rows = positive_int("partition_rows", partition_rows)
        here = versions()
        for address, there in client.run(versions).items():
            if there != here:
                raise RuntimeError(f"worker {address} runs {there}, this process {here}: install the same "
                                   "polars-singlecell build and polars version on every worker")

    def __repr__(self) -> str:
        return f"DaskEngine({self.client!r}, partition_rows={self.partition_rows})"

    def fit_centroid_sample(self, paths: list[str], embedding: str, batch_key: str, args: tuple) -> Any:
        """The merged ``CentroidSampleFit`` of the data, one task per partition."""
        parts = partitions(paths, [embedding, batch_key], self.partition_rows)
        futures = self.client.map(centroid_sample_task, parts, embedding=embedding, batch_key=batch_key, args=args,
                                  pure=False)
        n_threads = args[3]
        merged = _internal.CentroidSampleFit(*args)
        # In partition order, whatever order the tasks finished in, one state
        # at a time: the others wait on their workers, not here.
        for part, future in zip(parts, futures):
            later = _internal.CentroidSampleFit.from_bytes(future.result(), n_threads)
            future.release()
            if later.n_rows != part.n_rows:
                raise RuntimeError(f"{part.path}: rows {part.offset}..{part.offset + part.n_rows} gave {later.n_rows} rows; "
                                   "was the file changed while the fit ran?")
            merged.merge(later)
        return merged


def source_paths(data: Any) -> list[str]:
    """The Parquet files an engine's workers read (a file, a folder, a glob),
    the files the local path would scan."""
    from polars_singlecell.io import parquet_files

    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"with engine=, pass the data as Parquet path(s) (a file, a folder, a glob), not a "
                        f"{type(data).__name__}: the workers read the files themselves")
    return [str(f) for f in parquet_files(data)]
