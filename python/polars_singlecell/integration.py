"""Fitted integration models and the last stage of centroid-level OT
integration: moving every cell by the displacement of its nearest centroids.

An :class:`IntegrationModel` is a table with one row per centroid: its batch,
its position (``centroid``), its ``mass`` and its ``displacement``. It is saved
and loaded as Parquet, so any tool can read it. :func:`knn_interpolate` is an
elementwise expression over cells that streams in bounded memory; :func:`knn`
is the exact neighbour search behind it.

>>> import numpy as np, polars as pl, polars_singlecell as psc
>>> arr = lambda rows: pl.Series(np.array(rows, dtype=np.float32), dtype=pl.Array(pl.Float32, 2))
>>> model = psc.IntegrationModel(pl.DataFrame({
...     "plate": ["a", "a", "b"],
...     "centroid": arr([[0, 0], [10, 0], [0, 0]]),
...     "displacement": arr([[1, 0], [1, 0], [-1, 0]]),
... }))
>>> cells = pl.DataFrame({"plate": ["a", "b"], "X_pca": arr([[2, 0], [0, 1]])})
>>> cells.with_columns(psc.knn_interpolate("X_pca", "plate", model=model, k=1))["X_ot"].to_list()
[[3.0, 0.0], [-1.0, 1.0]]
>>> cells.select(psc.knn("X_pca", model=model, k=2)).unnest("knn")["indices"].to_list()
[[0, 2], [0, 2]]
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from polars_singlecell import _internal
from polars_singlecell._checks import positive_int as _positive_int
from polars_singlecell._device import check_device
from polars_singlecell._frames import IntoExpr
from polars_singlecell._frames import col as _col
from polars_singlecell._plugin import call
from polars_singlecell.io import write_parquet

__all__ = ["IntegrationModel", "clear_models", "knn", "knn_interpolate"]

_META_KEY = "polars_singlecell.integration_model"
_FORMAT = 1


def _embedding_width(table: pl.DataFrame, column: str, what: str) -> int:
    if column not in table.columns:
        raise ValueError(f"{what} has no column '{column}' (columns: {table.columns})")
    dtype = table.schema[column]
    if not (isinstance(dtype, pl.Array) and dtype.inner == pl.Float32 and dtype.size > 0):
        width = dtype.size if isinstance(dtype, pl.Array) else "d"
        raise ValueError(
            f"{what} column '{column}' has dtype {dtype}, expected Array(Float32, d): "
            f"cast it with pl.col('{column}').cast(pl.Array(pl.Float32, {width}))"
        )
    nulls = table[column].null_count()
    if nulls:
        raise ValueError(f"{what} column '{column}' has {nulls} null rows; every centroid needs a value")
    values = table[column].to_numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{what} column '{column}' holds the non-finite value {values[bad][0]} at row {row}")
    return dtype.size


class IntegrationModel:
    """A fitted centroid-level integration, one row per centroid.

    The table is what :meth:`write_parquet` writes, so the file is readable by
    any Parquet tool; the batch key and metrics go in the file's key-value
    metadata. Attributes: ``table``, ``batch_key``, ``metrics`` and ``d``
    (the embedding's width).

    Parameters
    ----------
    table : polars.DataFrame
        ``n_centroids`` rows. Columns: the batch key (any scalar dtype; by
        default the first column), ``centroid`` and ``displacement`` (both
        ``Array(Float32, d)``, no nulls, finite), and optionally
        ``centroid_id`` and ``mass``. Row order is kept: :func:`knn` returns
        row numbers of this table.
    batch_key : str or None, default None
        Name of the batch column; ``None`` takes the first column.
    metrics : dict or None, default None
        Free-form dictionary of fit information, saved with the model.

    Raises
    ------
    TypeError
        ``table`` is not a polars DataFrame.
    ValueError
        No rows, a missing or nested batch column or one with nulls, or
        ``centroid``/``displacement`` not finite ``Array(Float32, d)`` of one width.
    """

    def __init__(
        self,
        table: pl.DataFrame,
        *,
        batch_key: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(table, pl.DataFrame):
            raise TypeError(f"IntegrationModel takes a polars DataFrame, got {type(table).__name__}")
        if table.height == 0:
            raise ValueError("IntegrationModel: the table has no centroids")
        batch_key = table.columns[0] if batch_key is None else batch_key
        if batch_key not in table.columns:
            raise ValueError(f"IntegrationModel: batch_key '{batch_key}' is not a column (columns: {table.columns})")
        if table.schema[batch_key].is_nested():
            raise ValueError(f"IntegrationModel: batch column '{batch_key}' has dtype {table.schema[batch_key]}, expected one label per centroid")
        if table[batch_key].null_count():
            raise ValueError(f"IntegrationModel: batch column '{batch_key}' has nulls; every centroid needs a batch")
        d = _embedding_width(table, "centroid", "IntegrationModel")
        d_disp = _embedding_width(table, "displacement", "IntegrationModel")
        if d_disp != d:
            raise ValueError(f"IntegrationModel: 'displacement' has width {d_disp} but 'centroid' has {d}")
        self.table = table
        self.batch_key = batch_key
        self.metrics = dict(metrics or {})
        self.d = d
        self._key: str | None = None

    @property
    def n_centroids(self) -> int:
        """The number of centroids (the table's rows)."""
        return self.table.height

    @property
    def batches(self) -> pl.Series:
        """The batches, in order of first appearance."""
        return self.table[self.batch_key].unique(maintain_order=True)

    def __repr__(self) -> str:
        return (
            f"IntegrationModel(batch_key={self.batch_key!r}, batches={self.batches.len()}, "
            f"n_centroids={self.n_centroids}, d={self.d})"
        )

    def write_parquet(self, path: str | os.PathLike) -> None:
        """Write the table to ``path`` atomically (a temporary file, then a rename).

        Parameters
        ----------
        path : str or os.PathLike
            The Parquet file (replaced if it exists).
        """
        meta = {"format": _FORMAT, "batch_key": self.batch_key, "metrics": self.metrics}
        write_parquet(self.table, path, metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def read_parquet(cls, path: str | os.PathLike) -> IntegrationModel:
        """Load a model written by :meth:`write_parquet`.

        Or any Parquet file with the same columns; then the first column is
        the batch key.

        Parameters
        ----------
        path : str or os.PathLike
            The Parquet file.

        Returns
        -------
        IntegrationModel
            The model, with the batch key and metrics saved with it.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            The file cannot be read, was written by a newer version, or its
            table is not a model's.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        try:
            meta_text = pl.read_parquet_metadata(path).get(_META_KEY)
            table = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise ValueError(f"cannot read the model file {path}: {e}") from e
        meta = json.loads(meta_text) if meta_text else {}
        if meta.get("format", _FORMAT) > _FORMAT:
            raise ValueError(f"{path} was written by a newer polars-singlecell (model format {meta['format']}); upgrade")
        return cls(table, batch_key=meta.get("batch_key"), metrics=meta.get("metrics"))

    def _register(self) -> str:
        """Hand the arrays to the plugin once per process; return their key.
        The key is a digest of the contents, so equal models share one copy."""
        labels = self.table[self.batch_key].cast(pl.String).to_list()
        if self._key is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.d}\0{self.batch_key}\0".encode())
            h.update("\0".join(labels).encode())
            for c in ("centroid", "displacement"):
                h.update(np.ascontiguousarray(self.table[c].to_numpy()).tobytes())
            self._key = "model:" + h.hexdigest()
        _internal.register_model(self._key, labels, self.table["centroid"], self.table["displacement"])
        return self._key


# Models read from Parquet, by (real path, mtime, size): a path passed to many
# expressions is read once, and a rewritten file is read again.
_FILE_CACHE: dict[tuple[str, int, int], IntegrationModel] = {}


def _as_model(model: object) -> IntegrationModel:
    if isinstance(model, IntegrationModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            st = path.stat()
        except OSError as e:
            raise FileNotFoundError(f"model: cannot read {path}: {e.strerror}") from e
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in _FILE_CACHE:
            _FILE_CACHE.clear()  # keep at most one file's model alive
            _FILE_CACHE[key] = IntegrationModel.read_parquet(path)
        return _FILE_CACHE[key]
    raise TypeError(f"model must be an IntegrationModel or the path of one saved as Parquet, got {type(model).__name__}")


def knn_interpolate(
    embedding: IntoExpr = "X_pca",
    batch: IntoExpr | None = "batch",
    *,
    model: IntegrationModel | str | os.PathLike,
    k: int = 8,
    mode: Literal["own_batch", "pooled"] = "own_batch",
    unknown_batch: Literal["error", "pooled"] = "error",
    device: Literal["cpu", "cuda"] = "cpu",
) -> pl.Expr:
    """Move each cell by the weighted displacement of its ``k`` nearest centroids.

    For a cell x with nearest centroids j (exact Euclidean distance d_j):
    ``x + Σ_j w_j · displacement_j`` with ``w_j ∝ 1 / max(d_j, 1e-3)``,
    normalised to sum to 1. Elementwise: it streams in
    ``scan_parquet(...).with_columns(...).sink_parquet(...)`` in bounded
    memory.

    Parameters
    ----------
    embedding : str or polars.Expr, default "X_pca"
        The cells' ``Array(Float32, d)`` column, in the space the centroids
        were fitted in (usually ``X_pca``); ``d`` must be the model's.
    batch : str, polars.Expr or None, default "batch"
        The cells' batch column (compared to the model's batch key as text).
        Not used with ``mode="pooled"`` (may be ``None`` then).
    model : IntegrationModel, str or os.PathLike
        An :class:`IntegrationModel` or the path of one saved with
        :meth:`IntegrationModel.write_parquet`. It is loaded once per process.
    k : int, default 8
        Neighbours per cell, 1 ≤ k ≤ the centroids searched.
    mode : {"own_batch", "pooled"}, default "own_batch"
        ``"own_batch"`` (default): search the cell's own batch's centroids, so
        a cell never takes another batch's displacement. ``"pooled"``: search
        all centroids (the reference method's behaviour).
    unknown_batch : {"error", "pooled"}, default "error"
        A cell whose batch is not in the model: ``"error"`` (default) or
        ``"pooled"`` (search all centroids for that cell).
    device : {"cpu", "cuda"}, default "cpu"
        ``"cpu"`` (default) or ``"cuda"``: the distance GEMM, top-k, exact
        re-rank and gather run on the GPU, rounding as the CPU does, so both
        give the same bits unless more than four centroids tie within
        float32 rounding of a cell's k-th nearest (see
        :func:`polars_singlecell.cuda_available`). k ≤ 60 on
        the GPU.

    Returns
    -------
    polars.Expr
        ``Array(Float32, d)`` named ``X_ot``: each cell moved, one row per cell.

    Examples
    --------
    >>> import numpy as np, polars as pl, polars_singlecell as psc
    >>> arr = lambda rows: pl.Series(np.array(rows, dtype=np.float32), dtype=pl.Array(pl.Float32, 1))
    >>> model = psc.IntegrationModel(pl.DataFrame({"batch": ["a", "a"], "centroid": arr([[0], [4]]),
    ...                                            "displacement": arr([[1], [3]])}))
    >>> pl.DataFrame({"batch": ["a"], "X_pca": arr([[1]])}).select(
    ...     psc.knn_interpolate(model=model, k=2))["X_ot"].to_list()  # weights 1/1 and 1/3
    [[2.5]]
    """
    m = _as_model(model)
    k = _positive_int("k", k, upper=m.n_centroids)
    if mode not in ("own_batch", "pooled"):
        raise ValueError(f"mode must be 'own_batch' or 'pooled', got {mode!r}")
    if unknown_batch not in ("error", "pooled"):
        raise ValueError(f"unknown_batch must be 'error' or 'pooled', got {unknown_batch!r}")
    device = check_device(device)
    args = [_col(embedding)]
    if mode == "own_batch":
        if batch is None:
            raise ValueError("mode='own_batch' needs the cells' batch column (batch=...); or use mode='pooled'")
        args.append(_col(batch))
    kwargs = {"model": m._register(), "d": m.d, "k": k, "unknown_pooled": unknown_batch == "pooled", "device": device}
    return call("knn_interpolate", args, kwargs).alias("X_ot")


def _as_index(index: object) -> IntegrationModel:
    """A model whose centroids are the points to search."""
    if isinstance(index, (IntegrationModel, str, os.PathLike)):
        return _as_model(index)
    if isinstance(index, np.ndarray):
        if index.ndim != 2 or index.shape[0] == 0 or index.shape[1] == 0:
            raise ValueError(f"index: expected a non-empty 2-D array (points × d), got shape {index.shape}")
        index = pl.Series("centroid", np.ascontiguousarray(index, dtype=np.float32), dtype=pl.Array(pl.Float32, index.shape[1]))
    if isinstance(index, pl.Series):
        table = pl.DataFrame({"batch": pl.repeat("", index.len(), eager=True), "centroid": index})
        if not isinstance(index.dtype, pl.Array):
            _embedding_width(table, "centroid", "index")  # raises with the cast hint
        return IntegrationModel(table.with_columns(displacement=pl.col("centroid")))
    raise TypeError(f"index must be an IntegrationModel, a model path, a 2-D numpy array or an Array(Float32, d) Series, got {type(index).__name__}")


def knn(
    embedding: IntoExpr = "X_pca",
    *,
    model: object = None,
    k: int = 8,
    device: Literal["cpu", "cuda"] = "cpu",
    index: object = None,
) -> pl.Expr:
    """Exact k nearest neighbours of each cell among the points of ``model``.

    Elementwise and streaming, like :func:`knn_interpolate`, and like it on
    ``device="cuda"``.

    Parameters
    ----------
    embedding : str or polars.Expr, default "X_pca"
        The cells' ``Array(Float32, d)`` column.
    model : IntegrationModel, str, os.PathLike, numpy.ndarray or polars.Series
        The points to search: an :class:`IntegrationModel` (or its Parquet
        path: its centroids, in table order), a 2-D ``(n_points, d)`` numpy
        array, or an ``Array(Float32, d)`` Series: the same keyword as
        :func:`knn_interpolate` and :func:`pca_project`.
    k : int, default 8
        Neighbours per cell, 1 ≤ k ≤ the points.
    device : {"cpu", "cuda"}, default "cpu"
        Where the search runs, as in :func:`knn_interpolate`.
    index : object, default None
        ``model``'s old name, still accepted with a ``DeprecationWarning``.

    Returns
    -------
    polars.Expr
        ``Struct{indices: Array(UInt32, k), distances: Array(Float32, k)}``
        named ``knn``: row numbers of the points and Euclidean (not squared)
        distances, ascending; equal distances go to the lower row.

    Examples
    --------
    >>> import numpy as np, polars as pl, polars_singlecell as psc
    >>> cells = pl.DataFrame({"X_pca": np.array([[0.1, 0.0]], dtype=np.float32)},
    ...                      schema={"X_pca": pl.Array(pl.Float32, 2)})
    >>> out = cells.select(psc.knn(model=np.array([[5, 5], [0, 0], [1, 0]]), k=2)).unnest("knn")
    >>> out["indices"].to_list(), [round(v, 3) for v in out["distances"][0]]
    ([[1, 2]], [0.1, 0.9])
    """
    if index is not None:
        if model is not None:
            raise TypeError("knn() takes model= (index= is its old name), not both")
        warnings.warn("knn(index=...) is now knn(model=...)", DeprecationWarning, stacklevel=2)
        model = index
    if model is None:
        raise TypeError("knn() needs model=: an IntegrationModel, its Parquet path, or an array of points")
    m = _as_index(model)
    k = _positive_int("k", k, upper=m.n_centroids)
    kwargs = {"model": m._register(), "d": m.d, "k": k, "device": check_device(device)}
    return call("knn", [_col(embedding)], kwargs).alias("knn")


def clear_models() -> None:
    """Free the models this process has loaded for :func:`knn_interpolate` and
    :func:`knn`. Queries built before must be built again."""
    _FILE_CACHE.clear()
    _internal.clear_models()
