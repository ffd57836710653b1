"""The fits on a Dask cluster: :class:`DaskEngine`.

Workers get code and a query plan, not pickled plugin calls: each task is a
module-level function that takes the fit's query (``LazyFrame.serialize``:
a Parquet scan and the expressions on it, rebuilt on the worker, where
``normalize`` and ``select_genes`` run on its own copy of the extension), a
partition of its rows and how to make a fresh fit state
(``_internal.*Fit``); it streams the partition's rows into the state and
returns the state's bytes. The driver merges the states in partition order
and finishes the fit. Partitions are fixed by the data (whole Parquet row
groups, up to ``partition_rows`` rows, from the footers), never by the
number of workers, and the local path folds the same partitions
(``_frames.fold``), so the result does not depend on how many workers there
are, in which order their tasks finish, or whether there is a cluster at
all.

``highly_variable_genes``, ``fit_pca``, ``fit_centroids`` and ``integrate``
(its three fits) take ``engine=``; projection and interpolation run on the
driver.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import polars as pl

from polars_singlecell import _internal, _progress
from polars_singlecell._checks import positive_int
from polars_singlecell._frames import (
    PARTITION_ROWS,
    FitSpec,
    Partition,
    check_no_rows_after,
    fit_query,
    fold_partition,
    scan_paths,
)

__all__ = ["DaskEngine", "Partition"]


@functools.cache
def _build() -> str:
    """A digest of the compiled extension: two builds of one version differ."""
    return hashlib.sha256(Path(_internal.__file__).read_bytes()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """What must match between the driver and every worker."""
    return {"polars_singlecell": _internal.__version__, "polars": pl.__version__, "build": _build()}


def _extension_path() -> str:
    return str(Path(_internal.__file__).resolve())


def fold_task(part: Partition, plan: bytes, columns: list[str | None], spec: FitSpec) -> tuple[bytes, int]:
    """One partition's fit state (a worker's task): its bytes and the rows it read."""
    fit, rows = fold_partition(pl.LazyFrame.deserialize(io.BytesIO(plan)), part, columns, spec)
    return fit.to_bytes(), rows


class DaskEngine:
    """Run the fits on a ``dask.distributed.Client``'s cluster.

    ``partition_rows``: rows per task at most (whole row groups); the
    default is the local path's partition, so results equal the local ones
    bit for bit (another value gives the same up to float64 rounding of the
    HVG and PCA sums; the centroids are the same for any value). Needs
    ``pip install 'polars-singlecell[dask]'``. At start every worker must run
    the same polars-singlecell build and polars version as this process;
    otherwise a ``RuntimeError`` names the worker and both versions. The fits
    take the data as Parquet path(s) or as a LazyFrame over them
    (``pl.scan_parquet(...)`` with ``normalize``, ``select_genes`` and other
    row-by-row columns): each worker rebuilds the query and reads its rows
    itself.

    Examples
    --------
    >>> from dask.distributed import Client, LocalCluster          # doctest: +SKIP
    >>> engine = psc.distributed.DaskEngine(Client(LocalCluster(n_workers=4)))  # doctest: +SKIP
    >>> psc.fit_centroids("cells_pca/*.parquet", engine=engine)    # doctest: +SKIP
    >>> counts = pl.scan_parquet("cells/*.parquet")                  # doctest: +SKIP
    >>> norm = counts.with_columns(psc.normalize("gene_idx", "values"))  # doctest: +SKIP
    >>> var = psc.highly_variable_genes(norm, n_genes=n_genes, engine=engine)  # doctest: +SKIP
    """

    def __init__(self, client: Any, *, partition_rows: int = PARTITION_ROWS) -> None:
        try:
            import distributed  # noqa: F401  (the engine's one requirement)
        except ImportError as e:
            raise ImportError("DaskEngine needs dask.distributed: pip install 'polars-singlecell[dask]'") from e
        self.client = client
        self.partition_rows = positive_int("partition_rows", partition_rows)
        here = versions()
        self._elsewhere = []  # workers whose extension is at another path
        for address, there in client.run(versions).items():
            if there != here:
                raise RuntimeError(f"worker {address} runs {there}, this process {here}: install the same "
                                   "polars-singlecell build and polars version on every worker")
        for address, path in client.run(_extension_path).items():
            if path != _extension_path():
                self._elsewhere.append(f"{address} ({path})")

    def __repr__(self) -> str:
        return f"DaskEngine({self.client!r}, partition_rows={self.partition_rows})"

    def fold(self, lf: pl.LazyFrame, columns: list[str | None], spec: FitSpec) -> Any:
        """The fit of ``spec`` over ``columns`` of ``lf``, one task per
        partition, merged here in partition order: the local ``fold``'s
        state, bit for bit."""
        q, _, parts = fit_query(lf, columns, self.partition_rows)
        if parts is None:
            raise ValueError("engine= needs data its workers can read: local Parquet file(s) (a path, a folder, a "
                             "glob) or a LazyFrame of pl.scan_parquet(...) over them with columns computed row by row "
                             "(with_columns, select); not a remote URL, an in-memory frame, or a filter, join or sort "
                             "before the fit")
        plan = q.serialize()
        if self._elsewhere and "polars_singlecell" in q.explain(optimized=False):
            # A plugin expression in a plan names the extension's file: a
            # worker that has it elsewhere cannot run the plan.
            raise RuntimeError(f"the fit's query uses polars-singlecell expressions, which name this process's "
                               f"extension ({_extension_path()}), and workers {self._elsewhere} have it at another "
                               "path: install it at the same path on every worker (one environment), or write the "
                               "prepared columns to Parquet and pass the files")
        relative = [p for p in scan_paths(q) or [] if not os.path.isabs(p)]
        if relative:
            raise ValueError(f"engine=: the query reads {relative[:3]} by relative path, which a worker started in "
                             "another folder would not find: scan absolute paths (Path(...).resolve())")
        futures = self.client.map(fold_task, parts, plan=plan, columns=columns, spec=spec, pure=False)
        total, short, count = spec.new(), None, _progress.counter()
        # In partition order, whatever order the tasks finished in, one state
        # at a time: the others wait on their workers, not here. As the local
        # fold: up to the first partition with fewer rows than its footers
        # (the plan ends there: a head()); rows after it mean the files changed.
        for part, future in zip(parts, futures):
            state, rows = future.result()
            future.release()
            if short is not None:
                if rows:
                    raise RuntimeError(f"rows from {part.first_row} were read after rows {short.first_row}.."
                                       f"{short.first_row + short.n_rows} ended early: was a file changed while the "
                                       "fit ran? run it again")
                continue
            later = type(total).from_bytes(state)
            del state
            total.merge(later)
            del later
            if count is not None:
                count(rows)
            if rows < part.n_rows:
                short = part
        check_no_rows_after(q, parts)
        return total
