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
take ``engine=``. In ``integrate`` the projection and the interpolation run
there too (:meth:`DaskEngine.sink`): each partition is a task that reads
the model files, registers the models under the driver's digests, rebuilds
the query and writes its part of a dataset folder; row-wise expressions
give every row the same bits whichever task computes it.
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
from polars_singlecell._files import PREFETCH, sink_parquet, write_replacing
from polars_singlecell._frames import (
    PARTITION_ROWS,
    FitSpec,
    Partition,
    check_no_rows_after,
    fit_query,
    fold,
    fold_partition,
    scan_partitions,
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

    Pass it as ``engine=`` to :func:`polars_singlecell.highly_variable_genes`,
    :func:`polars_singlecell.fit_pca`, :func:`polars_singlecell.fit_centroids`
    or :func:`polars_singlecell.integrate`. Needs
    ``pip install 'polars-singlecell[dask]'``. The fits take the data as
    Parquet path(s) or as a LazyFrame over them (``pl.scan_parquet(...)``
    with ``normalize``, ``select_genes`` and other row-by-row columns): each
    worker rebuilds the query and reads its rows itself.

    Parameters
    ----------
    client : dask.distributed.Client
        The cluster's client. At start every worker must run the same
        polars-singlecell build and polars version as this process.
    partition_rows : int, default 100_000
        Rows per task at most (whole row groups); the default is the local
        path's partition, so results equal the local ones bit for bit
        (another value gives the same up to float64 rounding of the HVG and
        PCA sums; the centroids are the same for any value).

    Raises
    ------
    ImportError
        ``dask.distributed`` is not installed.
    RuntimeError
        A worker runs another polars-singlecell build or polars version (the
        message names the worker and both versions).

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

    def _plan(self, q: pl.LazyFrame, parts: list[Partition] | None) -> bytes:
        """``q`` as the bytes a worker rebuilds it from, once it is known
        that every worker can run it."""
        if parts is None:
            raise ValueError("engine= needs data its workers can read: local Parquet file(s) (a path, a folder, a "
                             "glob) or a LazyFrame of pl.scan_parquet(...) over them with columns computed row by row "
                             "(with_columns, select); not a remote URL, an in-memory frame, or a filter, join or sort "
                             "before the stage")
        if self._elsewhere and "polars_singlecell" in q.explain(optimized=False):
            # A plugin expression in a plan names the extension's file: a
            # worker that has it elsewhere cannot run the plan.
            raise RuntimeError(f"the query uses polars-singlecell expressions, which name this process's "
                               f"extension ({_extension_path()}), and workers {self._elsewhere} have it at another "
                               "path: install it at the same path on every worker (one environment), or write the "
                               "prepared columns to Parquet and pass the files")
        relative = [p for p in scan_paths(q) or [] if not os.path.isabs(p)]
        if relative:
            raise ValueError(f"engine=: the query reads {relative[:3]} by relative path, which a worker started in "
                             "another folder would not find: scan absolute paths (Path(...).resolve())")
        return q.serialize()

    def fold(self, lf: pl.LazyFrame, columns: list[str | None], spec: FitSpec) -> Any:
        """The fit of ``spec`` over ``columns`` of ``lf``, one task per partition.

        The fits call it (``engine.fold``); the states are merged here in
        partition order: the local fold's state, bit for bit.

        Parameters
        ----------
        lf : polars.LazyFrame
            A ``pl.scan_parquet`` of local files (absolute paths), with
            columns computed row by row on it.
        columns : list of str or None
            The fit's input columns in its ``update``'s order; ``None`` for
            an absent optional input (no batch key).
        spec : FitSpec
            How to make a fresh fit state (one of the compiled
            ``*Fit`` classes, its arguments).

        Returns
        -------
        object
            The merged fit state (the class ``spec`` makes), ready to finish.

        Raises
        ------
        ValueError
            Data the workers cannot read (a remote URL, an in-memory frame, a
            filter, join or sort before the fit, a relative path).
        RuntimeError
            Workers have the extension at another path than this process and
            the query uses its expressions, or the files changed during the fit.
        """
        q, _, parts = fit_query(lf, columns, self.partition_rows)
        if parts == []:  # files without rows: nothing to send anywhere
            return fold(lf, columns, spec)
        plan = self._plan(q, parts)
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

    def sink(self, lf: pl.LazyFrame, path: str | os.PathLike,
             models: list[tuple[Any, str | os.PathLike]] = ()) -> int:
        """Write ``lf`` to ``path`` as a dataset folder, one task per partition.

        ``lf`` is a scan with row-by-row columns (``pca_project``,
        ``knn_interpolate``); the folder holds ``part-00000.parquet``,
        ``part-00001.parquet``, ... in row order. The parts are written
        into a hidden folder beside ``path`` and it takes ``path``'s name
        only when every part is in place (an old file or folder there is
        replaced then): a failed or killed stage leaves ``path`` as it was.

        Parameters
        ----------
        lf : polars.LazyFrame
            A ``pl.scan_parquet`` of local files with row-by-row columns.
        path : str or os.PathLike
            The dataset folder to write.
        models : list of (model, path) pairs, default ()
            Each :class:`polars_singlecell.PcaModel` /
            :class:`polars_singlecell.IntegrationModel` the query's
            expressions use, with the file it was read from: a worker reads
            the file and registers the model under the same digest before it
            rebuilds the query (a file whose contents differ is an error).

        Returns
        -------
        int
            The rows written.

        Raises
        ------
        ValueError
            Data the workers cannot read (a remote URL, an in-memory frame, a
            filter, join or sort before the stage, a relative path).
        RuntimeError
            A model file on a worker differs from the model given here, the
            query uses a model not passed in ``models``, workers have the
            extension at another path, or the files changed during the stage.
            ``path`` is then left as it was.
        """
        final = Path(path).absolute()  # the workers write beside it, from their own folders
        parts = scan_partitions(lf, [], self.partition_rows)
        plan = self._plan(lf, parts)
        shipped = [_model_ref(m, f) for m, f in models]
        written = 0

        def write(tmp: Path) -> None:
            nonlocal written
            tmp.mkdir(parents=True)
            if not parts:  # files without rows: one empty part, with the schema
                sink_parquet(lf, tmp / "part-00000.parquet")
                return
            width = max(5, len(str(len(parts) - 1)))  # names sort in row order
            names = [str(tmp / f"part-{i:0{width}d}.parquet") for i in range(len(parts))]
            futures = self.client.map(sink_task, parts, names, plan=plan, models=shipped, pure=False)
            try:
                count, short = _progress.counter(), None
                for part, future in zip(parts, futures):
                    rows = future.result()
                    future.release()
                    if short is not None and rows:
                        raise RuntimeError(f"rows from {part.first_row} were written after rows {short.first_row}.."
                                           f"{short.first_row + short.n_rows} ended early: was a file changed while "
                                           "the stage ran? run it again")
                    if count is not None:
                        count(rows)
                    written += rows
                    if rows < part.n_rows and short is None:
                        short = part
                check_no_rows_after(lf, parts)
            except BaseException:
                # The other tasks stop here, rather than write into a folder about to be removed.
                self.client.cancel(futures)
                raise
            for stale in tmp.glob(".*.tmp"):  # a killed task's unfinished part (its retry wrote the part)
                stale.unlink(missing_ok=True)

        write_replacing(final, write)
        return written


def _model_ref(model: Any, path: str | os.PathLike) -> tuple[str, str, str]:
    """(kind, file, registry key) of a model a query uses, for a worker."""
    from polars_singlecell.integration import IntegrationModel
    from polars_singlecell.preprocessing import PcaModel

    kind = "pca" if isinstance(model, PcaModel) else "integration" if isinstance(model, IntegrationModel) else None
    if kind is None:
        raise TypeError(f"engine=: a query's model is a PcaModel or an IntegrationModel, got {type(model).__name__}")
    return kind, os.path.abspath(path), model._register()


def sink_task(part: Partition, dest: str, plan: bytes, models: list[tuple[str, str, str]]) -> int:
    """One partition of an apply stage (a worker's task): the query's models
    loaded from their files and registered here, the partition's rows of
    the rebuilt query written to ``dest``; returns the rows written."""
    from polars_singlecell.integration import IntegrationModel
    from polars_singlecell.preprocessing import PcaModel

    if not Path(dest).parent.is_dir():  # the stage failed and its folder is gone: write nothing
        raise RuntimeError(f"{Path(dest).parent} is gone: the stage this task belonged to was abandoned")
    for kind, path, key in models:
        model = PcaModel.load(path) if kind == "pca" else IntegrationModel.read_parquet(path)
        if model._register() != key:
            raise RuntimeError(f"the model file {path} on this worker is not the one the driver loaded (its contents "
                               "differ): was it rewritten while the stage ran, or is the shared folder out of date?")
    # One row group of read-ahead, as sink_bounded does on the driver, but set
    # once for the worker's life: a worker runs tasks on several threads, and
    # sink_bounded's set-and-restore would race between them.
    os.environ.setdefault(PREFETCH, "1")
    q = pl.LazyFrame.deserialize(io.BytesIO(plan))
    try:
        sink_parquet(q.slice(part.first_row, part.n_rows), dest)
    except pl.exceptions.ComputeError as e:
        if "not loaded in this process" in str(e):
            raise RuntimeError("the query uses a model that was not passed to DaskEngine.sink: pass "
                               "models=[(model, file it was read from)] for each PcaModel / IntegrationModel "
                               f"in the query ({e})") from e
        raise
    return pl.scan_parquet(dest).select(pl.len()).collect().item()
