"""Per-batch k-means centroids with mass: the first stage of centroid-level OT integration.

``kmeans_centroids`` is an aggregation expression for groups that fit in memory;
``fit_centroids`` streams a LazyFrame or Parquet source of any size, sampling at
most ``max_samples_per_batch`` cells per batch.

>>> import numpy as np, polars as pl, polars_singlecell as psc
>>> rng = np.random.default_rng(0)
>>> x = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))]).astype(np.float32)
>>> df = pl.DataFrame({"plate": ["a"] * 100, "X_pca": x}, schema={"plate": pl.String, "X_pca": pl.Array(pl.Float32, 2)})
>>> out = df.group_by("plate").agg(psc.kmeans_centroids("X_pca", n_centroids=2)).unnest("centroids")
>>> long = out.explode("centroid", "mass")
>>> sorted(long["mass"].to_list())
[50.0, 50.0]
>>> fit = psc.fit_centroids(df.lazy(), embedding="X_pca", batch_key="plate", n_centroids=2)
>>> fit.columns, fit["mass"].sum()
(['plate', 'centroid_id', 'centroid', 'mass'], 100.0)
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import polars as pl

from polars_singlecell import _internal, _progress
from polars_singlecell._checks import positive_int as _positive_int
from polars_singlecell._checks import seed as _seed
from polars_singlecell._checks import tol as _tol
from polars_singlecell._device import check_device
from polars_singlecell._frames import FitSpec, Frame, IntoExpr
from polars_singlecell._frames import col as _col
from polars_singlecell._frames import lazy as _lazy
from polars_singlecell._frames import n_threads as _n_threads
from polars_singlecell._frames import record_batches as _record_batches
from polars_singlecell._plugin import call

__all__ = ["fit_centroids", "kmeans_centroids"]


def kmeans_centroids(
    embedding: IntoExpr = "X_pca",
    *,
    n_centroids: int = 2048,
    max_iter: int = 300,
    tol: float = 1e-4,
    random_state: int = 0,
    weights: IntoExpr | None = None,
    init_size: int | None = None,
    device: str = "cpu",
) -> pl.Expr:
    """k-means centroids of an ``Array(Float32, d)`` column and the mass of each.

    An aggregation: use it in ``group_by(batch_key).agg(...)`` (one row per
    batch) or ``select`` (the whole column); inside ``.over`` every row gets
    its group's result.

    Greedy k-means++ seeding then Lloyd iterations, scikit-learn's ``KMeans``
    semantics: ``max_iter`` Lloyd passes over all rows at most, stopping once
    the summed squared centre shift is below ``tol`` × the mean per-feature
    variance. Inputs larger than ``init_size`` (default ``max(3·n_centroids,
    10_000)``) are seeded on a random ``init_size`` subset and warmed up with
    3 Lloyd passes on nested random subsets growing ×4 (up to half the rows)
    before the passes over all rows. ``mass`` is the number of rows (or summed
    ``weights``) assigned to each centroid; with fewer distinct rows than
    ``n_centroids`` every distinct row becomes a centroid (no rows: no
    centroids, as for an empty frame's groups). Same input and
    ``random_state`` give the same bits at any thread count.

    ``device="cuda"`` runs each assignment step's GEMM and arg-min on the GPU
    (the exact float64 checks stay on the CPU). Its float32 GEMM rounds
    differently, so a row within rounding of two centres may take the other,
    and the fit can differ slightly from the CPU's.

    Parameters
    ----------
    embedding : str or polars.Expr, default "X_pca"
        The ``Array(Float32, d)`` column of the rows to cluster.
    n_centroids : int, default 2048
        k, the centroids per group (fewer where the group has fewer distinct rows).
    max_iter : int, default 300
        Lloyd passes over all rows at most.
    tol : float, default 1e-4
        Stop once the summed squared centre shift is below ``tol`` × the mean
        per-feature variance.
    random_state : int, default 0
        Seed of the seeding and the subsets, in [0, 2**64).
    weights : str, polars.Expr or None, default None
        A numeric column of row weights (read as float64); ``None``: 1 each.
    init_size : int or None, default None
        Rows the seeding runs on; ``None``: ``max(3·n_centroids, 10_000)``.
    device : {"cpu", "cuda"}, default "cpu"
        Where the assignment steps run (above).

    Returns
    -------
    polars.Expr
        ``Struct{centroid: List(Array(Float32, d)), mass: List(Float64)}``
        named ``centroids``, one per group; ``.struct.unnest()`` then
        ``.explode("centroid", "mass")`` makes it one row per centroid.
    """
    kwargs = {
        "n_centroids": _positive_int("n_centroids", n_centroids),
        "max_iter": _positive_int("max_iter", max_iter),
        "tol": _tol(tol),
        "random_state": _seed(random_state),
        "init_size": None if init_size is None else _positive_int("init_size", init_size),
        "device": check_device(device),
    }
    # Weights of any numeric dtype are read as float64 by the plugin; other
    # dtypes (strings, booleans) are refused when the query is planned.
    args = [_col(embedding)] if weights is None else [_col(embedding), _col(weights)]
    # Inside group_by(...).agg the plugin sees unnamed Series: pass the names for its messages.
    kwargs["names"] = [a.meta.output_name(raise_if_undetermined=False) or "" for a in args]
    return call("kmeans_centroids", args, kwargs, is_elementwise=False, returns_scalar=True).alias("centroids")


def fit_centroids(
    data: Frame | str | os.PathLike,
    *,
    embedding: str = "X_pca",
    batch_key: str = "batch",
    n_centroids: int = 2048,
    min_cells_per_centroid: int = 1,
    max_samples_per_batch: int = 500_000,
    max_iter: int = 3,
    tol: float = 1e-4,
    random_state: int = 0,
    init_size: int | None = None,
    n_threads: int | None = None,
    summary: bool = False,
    device: str = "cpu",
    low_memory: bool = False,
    temp_dir: str | os.PathLike | None = None,
    engine: Any = None,
) -> pl.DataFrame | tuple[pl.DataFrame, pl.DataFrame]:
    """Per-batch centroids (k-means, with mass) of a cell embedding of any size, streaming.

    Reads ``embedding`` and ``batch_key`` once, in record batches, keeping for
    each batch the ``max_samples_per_batch`` cells whose seeded hash of their
    row number is smallest (a uniform sample without replacement; never the
    whole batch in memory: about ``batches × min(cells, cap) × d × 4`` bytes).
    Then k-means per batch as :func:`kmeans_centroids` with ``max_iter`` Lloyd
    passes over each sample (default 3: below MiniBatchKMeans' inertia at a
    fraction of its time, see ``benches/bench_kmeans.py``), masses scaled so
    each batch's sum to its number of cells.

    ``low_memory=True`` holds one batch's sample in memory instead of all of
    them, for a second read: a first pass over the batch column alone fixes
    each batch's sample (keys only: ``batches × min(cells, cap) × 16`` bytes),
    a second writes the sampled rows to one temporary file per batch (in
    ``temp_dir``, default the system's; 64 KiB–1 MiB of write buffer a batch),
    and k-means then loads them one batch at a time (``min(cells, cap) × d × 4``
    bytes). Same sample, same centroids, bit for bit; the data must give the
    same rows in the same order on both reads.
    A batch gets at most one centroid per ``min_cells_per_centroid`` sampled
    cells, but not fewer than 64 (or ``n_centroids`` if that is fewer), and
    one per distinct cell where it has fewer distinct cells. The default 1
    gives ``n_centroids``; :func:`integrate` asks for 16, so a small study's
    batch is summarised rather than copied cell by cell. An ``Enum`` batch
    column's categories with no cells are skipped with a warning and listed
    in the summary with ``n_cells == 0``.

    Parameters
    ----------
    data : polars.LazyFrame, polars.DataFrame, str or os.PathLike
        The cells, one row per cell (a Parquet path, folder or glob is scanned).
    embedding : str, default "X_pca"
        The ``Array(Float32, d)`` column to cluster.
    batch_key : str, default "batch"
        The batch column (any dtype; the output keeps it and its order).
    n_centroids : int, default 2048
        Centroids per batch at most.
    min_cells_per_centroid : int, default 1
        At most one centroid per this many sampled cells of a batch (above).
    max_samples_per_batch : int, default 500_000
        Cells sampled per batch (the cap).
    max_iter : int, default 3
        Lloyd passes over each sample.
    tol : float, default 1e-4
        k-means' tolerance, as in :func:`kmeans_centroids`.
    random_state : int, default 0
        Seed of the samples and the k-means, in [0, 2**64).
    init_size : int or None, default None
        Rows each k-means seeding runs on, as in :func:`kmeans_centroids`.
    n_threads : int or None, default None
        Threads of the k-means; ``None``: ``POLARS_MAX_THREADS`` (or Polars'
        pool size).
    summary : bool, default False
        Also return the per-batch summary.
    device : {"cpu", "cuda"}, default "cpu"
        ``"cuda"``: the k-means assignment steps on the GPU, as in
        :func:`kmeans_centroids`.
    low_memory : bool, default False
        One batch's sample in memory at a time, two reads (above).
    temp_dir : str, os.PathLike or None, default None
        Where ``low_memory=True`` keeps its sample files; ``None``: the
        system's temporary folder.
    engine : polars_singlecell.distributed.DaskEngine or None, default None
        Samples ``data`` (Parquet files, or a LazyFrame over them) on its
        cluster, one task per partition of whole row groups, and merges the
        samples here in row order: the same sample and centroids, bit for
        bit, as the local path (then k-means runs here; ``low_memory`` does
        not apply).

    Returns
    -------
    centroids : polars.DataFrame
        One row per centroid: ``batch_key``, ``centroid_id`` (UInt32, from 0
        per batch), ``centroid`` (``Array(Float32, d)``), ``mass`` (Float64).
    summary : polars.DataFrame
        With ``summary=True`` only (then a tuple of the two): one row per
        batch, ``batch_key``, ``n_cells``, ``n_sampled`` (UInt64),
        ``n_centroids`` (UInt32), ``inertia`` (Float64, on the sample),
        ``n_iter`` (UInt32), ``converged`` (Boolean).

    Raises
    ------
    ValueError
        A missing column, an embedding that is not ``Array(Float32, d)``, a
        parameter out of range, or no cells.
    """
    lf = _lazy(data)
    schema = lf.collect_schema()
    for name in (embedding, batch_key):
        if name not in schema:
            msg = f"column {name!r} not found; the data has {list(schema.names())}"
            raise ValueError(msg)
    dtype = schema[embedding]
    if not (isinstance(dtype, pl.Array) and dtype.inner == pl.Float32):
        width = dtype.size if isinstance(dtype, pl.Array) else "d"
        msg = (
            f"column {embedding!r} has dtype {dtype}, expected Array(Float32, d): cast it with "
            f"pl.col({embedding!r}).cast(pl.Array(pl.Float32, {width}))"
        )
        raise ValueError(msg)
    min_cells = _positive_int("min_cells_per_centroid", min_cells_per_centroid)
    params = (
        _positive_int("n_centroids", n_centroids),
        _positive_int("max_iter", max_iter),
        _tol(tol),
        None if init_size is None else _positive_int("init_size", init_size),
    )
    device = check_device(device)
    args = (dtype.size, _positive_int("max_samples_per_batch", max_samples_per_batch), _seed(random_state),
            _n_threads(n_threads))
    if engine is not None:
        sampler = engine.fold(lf, [embedding, batch_key], FitSpec(_internal.CentroidSampleFit, args, numbers_rows=True))
        if sampler.n_rows == 0:
            raise ValueError(f"no cells: column {embedding!r} has no rows, so there is nothing to fit centroids to")
        long, summ = sampler.finish(*params, device, min_cells)
    elif low_memory:
        long, summ = _fit_spilled(lf, embedding, batch_key, args, params, device, temp_dir, min_cells)
    else:
        sampler = _internal.CentroidSampleFit(*args)
        for batch in _record_batches(lf, [embedding, batch_key]):
            sampler.update(batch[embedding], batch[batch_key])
        if sampler.n_rows == 0:
            raise ValueError(f"no cells: column {embedding!r} has no rows, so there is nothing to fit centroids to")
        long, summ = sampler.finish(*params, device, min_cells)
    key_dtype = schema[batch_key]
    # Back to the key's own dtype and order (the sampler keys batches by their text).
    long = long.rename({"batch": batch_key}).with_columns(pl.col(batch_key).cast(key_dtype))
    long = long.sort(batch_key, maintain_order=True)
    summ = summ.rename({"batch": batch_key}).with_columns(pl.col(batch_key).cast(key_dtype)).sort(batch_key)
    if isinstance(key_dtype, pl.Enum):
        seen = set(summ[batch_key].to_list())
        empty = [c for c in key_dtype.categories.to_list() if c not in seen]
        if empty:
            warnings.warn(
                f"batches {empty} of {batch_key!r} have no cells and were skipped", UserWarning, stacklevel=2
            )
            filler = pl.DataFrame({batch_key: empty}, schema={batch_key: key_dtype}).with_columns(
                n_cells=pl.lit(0, pl.UInt64),
                n_sampled=pl.lit(0, pl.UInt64),
                n_centroids=pl.lit(0, pl.UInt32),
                inertia=pl.lit(None, pl.Float64),
                n_iter=pl.lit(0, pl.UInt32),
                converged=pl.lit(None, pl.Boolean),
            )
            summ = pl.concat([summ, filler]).sort(batch_key)
    return (long, summ) if summary else long


def _fit_spilled(
    lf: pl.LazyFrame,
    embedding: str,
    batch_key: str,
    args: tuple,
    params: tuple,
    device: str,
    temp_dir: str | os.PathLike | None,
    min_cells: int = 1,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``fit_centroids(low_memory=True)``: two reads, one batch's sample in memory."""
    sampler = _internal.SpillSampleFit(*args)
    with _progress.paused():  # the bar counts the cells of the full read only
        for batch in _record_batches(lf, [batch_key]):
            sampler.update(None, batch[batch_key])
    if sampler.n_rows == 0:
        raise ValueError(f"no cells: column {embedding!r} has no rows, so there is nothing to fit centroids to")
    # Hidden and ending in ".tmp": the pipeline clears what a killed run left.
    with tempfile.TemporaryDirectory(prefix=".centroid-sample.", suffix=".tmp", dir=temp_dir) as spill:
        sampler.next_pass(spill)
        for batch in _record_batches(lf, [embedding, batch_key]):
            sampler.update(batch[embedding], batch[batch_key])
        return sampler.finish(*params, device, min_cells)
