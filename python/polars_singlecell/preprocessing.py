"""normalize → highly_variable_genes → select_genes → fit_pca / pca_project.

Apply steps are Polars expressions (elementwise: they stream). Fit steps take a
LazyFrame, stream it once in record batches and return a small result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from polars_singlecell import _internal
from polars_singlecell._checks import check_scale as _check_scale
from polars_singlecell._checks import positive_int as _positive_int
from polars_singlecell._device import check_device
from polars_singlecell._frames import FitSpec, Frame, IntoExpr
from polars_singlecell._frames import col as _col
from polars_singlecell._frames import fold_data as _fold
from polars_singlecell._frames import lazy as _lazy
from polars_singlecell._frames import n_threads as _n_threads
from polars_singlecell._frames import slice_reaches_scan as _slice_reaches_scan  # noqa: F401 (tests reach it here)
from polars_singlecell._plugin import call
from polars_singlecell.io import parquet_schema, write_parquet

__all__ = [
    "PcaModel",
    "consensus_genes",
    "fit_pca",
    "highly_variable_genes",
    "median_total_counts",
    "normalize",
    "pca_project",
    "select_genes",
    "total_counts",
]


# --------------------------------------------------------------------------- normalize


def normalize(
    gene_idx: IntoExpr = "gene_idx",
    values: IntoExpr = "values",
    *,
    target_sum: float | None = 1e4,
    log1p: bool = True,
) -> pl.Expr:
    """Normalise each cell to ``target_sum`` total counts, then ``ln(1 + x)``.

    The same numbers as ``scanpy.pp.normalize_total(adata, target_sum=...)``
    followed by ``scanpy.pp.log1p(adata)`` on a CSR matrix (float32).

    Parameters
    ----------
    gene_idx, values : str or polars.Expr
        ``List(UInt32)`` gene indices and ``List(Float32)`` counts of each cell
        (column names or expressions), aligned entry by entry.
    target_sum : float or None, default 1e4
        Total counts of each cell after normalisation. ``None``: the median of
        the non-zero cell totals of the column, like scanpy; that needs the whole
        column at once (not streamed), so for data larger than memory pass
        ``target_sum=psc.median_total_counts(lf)`` instead.
    log1p : bool, default True
        Apply ``ln(1 + x)`` after scaling.

    Returns
    -------
    polars.Expr
        ``List(Float32)`` named like ``values`` and aligned with ``gene_idx``
        (one entry per non-zero), so ``with_columns`` replaces the counts.
        Elementwise (it streams) unless ``target_sum=None``. Cells with zero
        total counts keep their zeros (scanpy does the same, with a warning).
        Null cells stay null.

    Raises
    ------
    ValueError
        ``target_sum`` is not a positive finite number or ``None``, or
        ``log1p`` is not a bool.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc
    >>> df = pl.DataFrame({"gene_idx": [[0, 1]], "values": [[1.0, 3.0]]},
    ...                   schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)})
    >>> df.select(psc.normalize(target_sum=4, log1p=False))["values"].to_list()
    [[1.0, 3.0]]
    """
    if target_sum is not None:
        if isinstance(target_sum, bool) or not isinstance(target_sum, (int, float, np.number)):
            raise ValueError(f"target_sum must be a number or None, got {target_sum!r}")
        if not (math.isfinite(target_sum) and target_sum > 0):
            raise ValueError(f"target_sum must be positive and finite, got {target_sum!r}")
        target_sum = float(target_sum)
    if not isinstance(log1p, bool):
        raise ValueError(f"log1p must be True or False, got {log1p!r}")
    # values first: the plugin's output takes the first input's name.
    return call(
        "normalize",
        [_col(values), _col(gene_idx)],
        {"target_sum": target_sum, "log1p": log1p},
        is_elementwise=target_sum is not None,
    )


def total_counts(gene_idx: IntoExpr = "gene_idx", values: IntoExpr = "values") -> pl.Expr:
    """Total counts of each cell, summed like scanpy.

    Parameters
    ----------
    gene_idx, values : str or polars.Expr
        ``List(UInt32)`` gene indices and ``List(Float32)`` counts of each cell
        (column names or expressions).

    Returns
    -------
    polars.Expr
        ``Float32`` named ``total_counts``, one value per cell (summed in
        float64, as scanpy). Elementwise: it streams.
    """
    return call("total_counts", [_col(gene_idx), _col(values)]).alias("total_counts")


def median_total_counts(data: Frame, *, gene_idx: str = "gene_idx", values: str = "values") -> float:
    """Median of the non-zero cell totals: scanpy's default ``target_sum``.

    One streaming pass; memory grows with the number of *distinct* totals
    (a few thousand for integer counts), not with the number of cells.

    Parameters
    ----------
    data : polars.LazyFrame, polars.DataFrame, str or os.PathLike
        The cells, one row per cell (a Parquet path, folder or glob is scanned).
    gene_idx, values : str, default "gene_idx", "values"
        The ``List(UInt32)`` gene-index and ``List(Float32)`` count columns.

    Returns
    -------
    float
        The median of the cells' total counts, cells with zero counts left out,
        computed as ``numpy.median`` of the float32 totals (the mean of the
        middle pair, in float32). Pass it as ``normalize(target_sum=...)``.

    Raises
    ------
    ValueError
        Every cell has zero total counts (there is no median).
    """
    counts = (
        _lazy(data)
        .select(total_counts(gene_idx, values).alias("t"))
        .filter(pl.col("t") > 0)
        .group_by("t")
        .len()
        .collect(engine="streaming")
        .sort("t")
    )
    if counts.height == 0:
        raise ValueError("every cell has zero total counts; pass target_sum explicitly")
    t = counts["t"].to_numpy()
    cum = np.cumsum(counts["len"].to_numpy())
    n = int(cum[-1])
    lo = t[np.searchsorted(cum, (n - 1) // 2 + 1)]
    hi = t[np.searchsorted(cum, n // 2 + 1)]
    # numpy.median of float32 totals: the mean of the middle pair, in float32.
    return float((np.float32(lo) + np.float32(hi)) / np.float32(2))


# --------------------------------------------------------------------------- select_genes


def select_genes(
    gene_idx: IntoExpr = "gene_idx",
    values: IntoExpr = "values",
    *,
    genes: Iterable[int] | pl.Series | np.ndarray,
) -> pl.Expr:
    """Keep only ``genes`` and renumber them ``0..len(genes)-1``; rows stay sparse and sorted.

    Parameters
    ----------
    gene_idx, values : str or polars.Expr
        ``List(UInt32)`` gene indices and ``List(Float32)`` values of each cell.
    genes : iterable of int, polars.Series or numpy.ndarray
        The gene indices to keep, ``(n_selected,)``: non-negative, each once
        (e.g. the ``gene_idx`` of :func:`highly_variable_genes` where
        ``highly_variable``, or :func:`consensus_genes`).

    Returns
    -------
    polars.Expr
        ``Struct{gene_idx: List(UInt32), values: List(Float32)}``, the fields
        named like the inputs, gene indices in ``[0, n_selected)``;
        ``.struct.unnest()`` inside ``with_columns`` replaces both columns.
        Elementwise: it streams.

    Raises
    ------
    ValueError
        ``genes`` is empty, not 1-D, not non-negative integers below 2**32,
        or lists a gene twice.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc
    >>> df = pl.DataFrame({"gene_idx": [[0, 2, 5]], "values": [[1.0, 2.0, 5.0]]},
    ...                   schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)})
    >>> out = df.with_columns(psc.select_genes(genes=[2, 5]).struct.unnest())
    >>> out.rows()
    [([0, 1], [2.0, 5.0])]
    """
    g = np.asarray(genes.to_numpy() if isinstance(genes, pl.Series) else list(genes))
    if g.ndim != 1 or g.size == 0:
        raise ValueError("genes must be a non-empty 1-D sequence of gene indices")
    if not np.issubdtype(g.dtype, np.integer) or g.min() < 0 or g.max() >= 2**32:
        raise ValueError(f"genes must be non-negative integer gene indices, got dtype {g.dtype}")
    if np.unique(g).size != g.size:
        raise ValueError("genes lists a gene more than once; pass each gene once")
    return call("select_genes", [_col(gene_idx), _col(values)], {"genes": [int(x) for x in g]})


# --------------------------------------------------------------------------- HVG


def highly_variable_genes(
    data: Frame,
    *,
    n_genes: int,
    n_top_genes: int | None = 2000,
    batch_key: str | None = None,
    flavor: str = "seurat",
    min_mean: float = 0.0125,
    max_mean: float = 3,
    min_disp: float = 0.5,
    max_disp: float = float("inf"),
    n_bins: int = 20,
    span: float = 0.3,
    gene_idx: str = "gene_idx",
    values: str = "values",
    engine: Any = None,
) -> pl.DataFrame:
    """Highly variable genes, as ``scanpy.pp.highly_variable_genes``.

    ``flavor="seurat"`` (the default) expects log-normalised values (after
    :func:`normalize`) and streams the data once. ``flavor="seurat_v3"``
    expects raw counts and streams them twice: per-gene means and variances,
    a loess of log variance on log mean (``span``; scikit-misc's fit, done in
    Rust, so scikit-misc is not needed), then the variance of counts clipped
    at ``mean + sqrt(n_cells)·σ̂`` — scanpy's and Seurat v3's
    ``FindVariableFeatures(selection.method = "vst")``. Ties in a batch's
    normalised variance are ranked by gene index (scanpy's order for them
    depends on numpy's sort and the CPU). Where scikit-misc refuses a local
    fit (a singular one, in a batch of few cells), scanpy raises and we use
    the pseudo-inverse's fit, as dloess does when it only warns.

    Parameters
    ----------
    data : polars.LazyFrame, polars.DataFrame, str or os.PathLike
        The cells, one row per cell (a Parquet path, folder or glob is
        scanned): log-normalised values for ``"seurat"``, raw counts for
        ``"seurat_v3"``.
    n_genes : int
        Number of genes in the dataset (``genes.parquet`` rows); every gene
        index is below it.
    n_top_genes : int or None, default 2000
        Keep this many genes, ranked by normalised dispersion; ``None`` uses the
        ``min_mean``/``max_mean``/``min_disp``/``max_disp`` cut-offs instead
        (``"seurat_v3"`` has no cut-offs: ``None`` keeps 2000, as scanpy).
    batch_key : str or None, default None
        Column of batch labels: genes are ranked within each batch (genes not
        expressed in a batch are left out of its ranking), then by the number of
        batches in which they are variable and their mean normalised dispersion.
    flavor : {"seurat", "seurat_v3"}, default "seurat"
        scanpy's flavour: ``"seurat"`` on log-normalised values (one pass),
        ``"seurat_v3"`` on raw counts (two passes).
    min_mean, max_mean, min_disp, max_disp : float, default 0.0125, 3, 0.5, inf
        scanpy's cut-offs on the mean and the normalised dispersion, used
        where ``n_top_genes=None`` (``flavor="seurat"`` only).
    n_bins : int, default 20
        Bins of equal width on the mean in which dispersions are normalised
        (``flavor="seurat"``).
    span : float, default 0.3
        The loess span, in (0, 1] (``flavor="seurat_v3"``).
    gene_idx, values : str, default "gene_idx", "values"
        The ``List(UInt32)`` gene-index and ``List(Float32)`` value columns.
    engine : polars_singlecell.distributed.DaskEngine or None, default None
        Computes the statistics on its cluster, one task per partition of the
        data (as :func:`fit_pca`), with the same result bit for bit as
        without it. ``None``: in this process.

    Returns
    -------
    polars.DataFrame
        ``n_genes`` rows, one per gene, like scanpy's ``adata.var``:
        ``gene_idx`` (UInt32), ``means``, ``dispersions``, ``dispersions_norm``
        (Float64), ``highly_variable`` (Boolean) and, with a ``batch_key``,
        ``highly_variable_nbatches`` (Int64) and ``highly_variable_intersection``
        (Boolean). With ``flavor="seurat_v3"``: ``gene_idx``, ``means``,
        ``variances``, ``variances_norm`` (Float64), ``highly_variable_rank``
        (Float32, NaN where no batch ranks the gene among its top genes),
        ``highly_variable`` and, with a ``batch_key``,
        ``highly_variable_nbatches``.

    Raises
    ------
    ValueError
        An unknown ``flavor``, a non-positive ``n_genes``, ``n_top_genes`` or
        ``n_bins``, or ``span`` outside (0, 1].

    Warns
    -----
    UserWarning
        ``flavor="seurat_v3"`` on values that are not whole numbers ≥ 0 (not
        raw counts).
    """
    if flavor == "seurat_v3":
        return _seurat_v3(data, n_genes=n_genes, n_top_genes=n_top_genes, batch_key=batch_key, span=span,
                          gene_idx=gene_idx, values=values, engine=engine)
    if flavor != "seurat":
        raise ValueError(f"flavor={flavor!r} is not supported; use flavor='seurat' (log-normalised values) "
                         "or flavor='seurat_v3' (raw counts)")
    n_genes = _positive_int("n_genes", n_genes)
    if n_top_genes is not None:
        n_top_genes = _positive_int("n_top_genes", n_top_genes)
    n_bins = _positive_int("n_bins", n_bins)
    cutoffs = {"min_mean": min_mean, "max_mean": max_mean, "min_disp": min_disp, "max_disp": max_disp}

    acc = _fold(data, [gene_idx, values, batch_key], FitSpec(_internal.GeneStatsFit, (n_genes,)), engine)
    # The ranking runs in Rust (kernels::seurat), as Rust pipelines' does:
    # numpy's and pandas' arithmetic in their order, so a bin of identical
    # dispersions gives NaN as in scanpy.
    return acc.seurat(batch_key is not None, n_bins, n_top_genes, **cutoffs)


def _seurat_v3(data: Frame, *, n_genes: int, n_top_genes: int | None, batch_key: str | None, span: float,
               gene_idx: str, values: str, engine: Any) -> pl.DataFrame:
    """scanpy's ``_highly_variable_genes_seurat_v3`` on streamed statistics."""
    n_genes = _positive_int("n_genes", n_genes)
    # scanpy ranks seurat_v3 genes only; without n_top_genes it takes 2000.
    n_top_genes = _positive_int("n_top_genes", 2000 if n_top_genes is None else n_top_genes)
    if not (isinstance(span, (int, float)) and 0 < span <= 1):
        raise ValueError(f"span must be in (0, 1], got {span!r}")
    cols = [gene_idx, values, batch_key]
    acc = _fold(data, cols, FitSpec(_internal.GeneStatsFit, (n_genes, "counts")), engine)
    if acc.non_integer:
        warnings.warn(f"`flavor='seurat_v3'` expects raw count data, but non-integers were found ({acc.non_integer} "
                      f"values in '{values}' are not whole numbers ≥ 0: log-normalised values? pass the counts)",
                      UserWarning, stacklevel=3)
    # The loess, the clip and the ranking run in Rust (kernels::seurat), as
    # Rust pipelines' do.
    batched = batch_key is not None
    reg_std = acc.seurat_v3_loess(span, batched)
    clipped = _fold(data, cols, FitSpec(_internal.ClippedSumsFit, (acc.seurat_v3_clips(reg_std),)), engine)
    return acc.seurat_v3(clipped, reg_std, n_top_genes, batched)


def consensus_genes(var: pl.DataFrame, *, more_than: int) -> pl.Series:
    """Genes variable in more than ``more_than`` batches (the Tahoe-100M consensus).

    Parameters
    ----------
    var : polars.DataFrame
        The result of :func:`highly_variable_genes` with a ``batch_key`` (it
        has ``highly_variable_nbatches``).
    more_than : int
        Keep the genes variable in more than this many batches (≥ 0).

    Returns
    -------
    polars.Series
        The kept genes' ``gene_idx`` (UInt32), sorted: ``genes=`` of
        :func:`select_genes`.

    Raises
    ------
    ValueError
        ``var`` has no ``highly_variable_nbatches`` column, or ``more_than``
        is not a non-negative integer.
    """
    if "highly_variable_nbatches" not in var.columns:
        raise ValueError("var has no highly_variable_nbatches column: run highly_variable_genes with batch_key=...")
    if isinstance(more_than, bool) or not isinstance(more_than, (int, np.integer)) or more_than < 0:
        raise ValueError(f"more_than must be a non-negative integer, got {more_than!r}")
    return var.filter(pl.col("highly_variable_nbatches") > more_than)["gene_idx"].sort()


# --------------------------------------------------------------------------- PCA

_PCA_KIND = "polars-singlecell/pca/1"


@dataclass(frozen=True)
class PcaModel:
    """A fitted PCA in scikit-learn's conventions (``components`` rows are axes).

    Each axis is signed so that its largest-magnitude loading is positive.
    A model fitted with ``scale=True`` holds ``std``: its axes are those of
    the genes scaled to unit variance, and :func:`pca_project` scales cells
    the same way. With ``max_value`` too, ``mean`` is the genes' mean before
    scaling and ``scaled_mean`` the centre of the PCA among the scaled,
    clipped genes (scikit-learn's ``mean_`` there). Made by :func:`fit_pca`
    or :meth:`load`; the fields are also its attributes.

    Parameters
    ----------
    mean : numpy.ndarray
        ``(n_genes,)`` float64: each gene's mean over the cells.
    components : numpy.ndarray
        ``(n_comps, n_genes)`` float64: the axes, one per row, unit length.
    explained_variance : numpy.ndarray
        ``(n_comps,)`` float64: the variance along each axis (ddof=1).
    explained_variance_ratio : numpy.ndarray
        ``(n_comps,)`` float64: that variance over the total variance.
    n_cells : int
        The number of cells fitted.
    std : numpy.ndarray or None, default None
        ``(n_genes,)`` float64: each gene's standard deviation (ddof=1; 1 for
        a constant gene), with ``scale=True``; else ``None``.
    max_value : float or None, default None
        The clip of the scaled values, with ``scale=True`` and ``max_value``.
    zero_center : bool, default True
        Whether the scaling centred the genes (``sc.pp.scale``'s option).
    scaled_mean : numpy.ndarray or None, default None
        ``(n_genes,)`` float64: the PCA's centre among the scaled, clipped
        genes, with ``max_value``; else ``None``.
    """

    mean: np.ndarray  # (n_genes,) float64
    components: np.ndarray  # (n_comps, n_genes) float64
    explained_variance: np.ndarray  # (n_comps,)
    explained_variance_ratio: np.ndarray  # (n_comps,)
    n_cells: int
    std: np.ndarray | None = None  # (n_genes,) float64, with scale=True
    max_value: float | None = None  # with scale=True and clipping
    zero_center: bool = True
    scaled_mean: np.ndarray | None = None  # (n_genes,) the PCA's centre among the clipped scaled genes

    @property
    def n_genes(self) -> int:
        """The number of genes the model projects (``mean.shape[0]``)."""
        return self.mean.shape[0]

    @property
    def n_comps(self) -> int:
        """The number of principal axes (``components.shape[0]``)."""
        return self.components.shape[0]

    def _register(self) -> str:
        """Hand the arrays to the plugin's model registry once per process;
        return their key, a digest of the contents (equal models share one
        copy, and a changed array is a new model)."""
        arrays = {"mean": self.mean, "components": self.components, "std": self.std}
        if self.max_value is not None:
            # The PCA's centre is the scaled genes' mean; the raw means clip.
            arrays.update(mean=self.scaled_mean, clip_mean=self.mean)
        arrays = {k: None if v is None else np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.n_comps}\0{self.max_value}\0{self.zero_center}\0".encode())
        for name, a in arrays.items():
            h.update(name.encode() + (b"-" if a is None else a.tobytes()))
        key = "pca:" + h.hexdigest()
        series = {k: None if v is None else pl.Series(k, v.ravel()) for k, v in arrays.items()}
        _internal.register_pca_model(
            key, self.n_comps, series["mean"], series["components"], series["std"], series.get("clip_mean"),
            None if self.max_value is None else float(self.max_value), bool(self.zero_center),
        )
        return key

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as Parquet, atomically (a temporary file, then a rename).

        One row per gene (``n_genes`` rows): ``gene_idx`` (UInt32), ``mean``
        (Float64), ``loadings`` (``Array(Float64, n_comps)``), and ``std``
        (and ``scaled_mean``) for a scaled fit; the per-axis numbers and
        ``n_cells`` go in the file's key-value metadata. :meth:`load` reads it.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write (replaced if it exists).
        """
        df = pl.DataFrame(
            {
                "gene_idx": np.arange(self.n_genes, dtype=np.uint32),
                "mean": self.mean,
                "loadings": np.ascontiguousarray(self.components.T),
                **({} if self.std is None else {"std": self.std}),
                **({} if self.scaled_mean is None else {"scaled_mean": self.scaled_mean}),
            }
        )
        meta = {
            "kind": _PCA_KIND,
            "n_cells": self.n_cells,
            **({} if self.max_value is None else {"max_value": self.max_value, "zero_center": self.zero_center}),
            "explained_variance": self.explained_variance.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
        }
        write_parquet(df, path, metadata={"polars_singlecell": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PcaModel:
        """Read a model written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
            The Parquet file.

        Returns
        -------
        PcaModel
            The model, its arrays float64 as fitted.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            The file is not Parquet, was cut short, or is not a PCA model
            written by :meth:`save`.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PCA model file not found: {path}")
        parquet_schema(path)  # a corrupt or cut-short file is named
        meta = json.loads(pl.read_parquet_metadata(path).get("polars_singlecell", "{}"))
        if meta.get("kind") != _PCA_KIND:
            raise ValueError(f"{path} is not a polars-singlecell PCA model (written by PcaModel.save)")
        df = pl.read_parquet(path)
        return cls(
            mean=df["mean"].to_numpy(),
            components=np.ascontiguousarray(df["loadings"].to_numpy().T),
            explained_variance=np.asarray(meta["explained_variance"], dtype=np.float64),
            explained_variance_ratio=np.asarray(meta["explained_variance_ratio"], dtype=np.float64),
            n_cells=int(meta["n_cells"]),
            std=df["std"].to_numpy() if "std" in df.columns else None,
            max_value=meta.get("max_value"),
            zero_center=meta.get("zero_center", True),
            scaled_mean=df["scaled_mean"].to_numpy() if "scaled_mean" in df.columns else None,
        )


def fit_pca(
    data: Frame,
    *,
    n_genes: int,
    n_comps: int = 50,
    gene_idx: str = "gene_idx",
    values: str = "values",
    n_threads: int | None = None,
    device: str = "cpu",
    scale: bool = False,
    max_value: float | None = None,
    zero_center: bool = True,
    engine: Any = None,
) -> PcaModel:
    """Fit PCA out of core: the exact float64 covariance, then its eigendecomposition.

    One streaming pass accumulates the covariance (O(n_genes²) memory, never
    O(cells)). ``scale=True`` is ``sc.pp.scale(adata)`` (zero-centred, unit variance)
    then PCA, without writing the dense scaled matrix: the covariance is
    rescaled to the correlation before the eigendecomposition and the model
    keeps each gene's ``std`` (ddof=1; 1 for a constant gene, as scanpy, and
    for one whose variance is float rounding of a constant's, within
    1e-10·mean² of 0) for :func:`pca_project`. With ``max_value`` (and
    ``zero_center``, as ``sc.pp.scale``): the scaled values clipped to
    ``±max_value`` (``zero_center=False``: non-zeros scaled, not centred,
    clipped above). A cell's scaled row is then a constant (its genes at
    zero) plus a sparse part with the cell's non-zeros, and the constant
    drops out of the covariance: a first pass takes the genes' means and
    deviations, a second the exact covariance of the sparse part (float32
    entries, as scanpy's scaled matrix), still without the dense matrix.
    ``zero_center`` is an option of the scaling only (``scale=True``).

    Matches ``sklearn.decomposition.PCA(n_comps, svd_solver="full")`` fitted on
    the dense float64 matrix, with each axis signed so that its largest loading
    is positive. The result is bit-identical for any thread count.

    The sums are folded per partition of the data (whole Parquet row groups,
    up to 100,000 rows) and the partitions merged in row order, so
    ``engine=``, which folds the same partitions on its workers, gives the
    same model bit for bit.

    Parameters
    ----------
    data : polars.LazyFrame, polars.DataFrame, str or os.PathLike
        The cells, one row per cell, their genes already selected (gene
        indices in ``[0, n_genes)``, e.g. after :func:`select_genes`); a
        Parquet path, folder or glob is scanned.
    n_genes : int
        The number of genes (columns of the covariance); at most what a
        16 GiB covariance holds (select highly variable genes first).
    n_comps : int, default 50
        Principal axes to keep, 1 ≤ ``n_comps`` ≤ ``n_genes``.
    gene_idx, values : str, default "gene_idx", "values"
        The ``List(UInt32)`` gene-index and ``List(Float32)`` value columns.
    n_threads : int or None, default None
        Threads of the accumulation; ``None``: ``POLARS_MAX_THREADS`` (or
        Polars' pool size).
    device : {"cpu", "cuda"}, default "cpu"
        ``"cuda"`` accumulates XᵀX on the GPU (float64 GEMM of each record
        batch, densified there): the same products summed in another order,
        so the axes agree with the CPU's to float64 rounding, not bit for bit.
    scale : bool, default False
        Scale each gene to unit variance first (``sc.pp.scale``), see above.
    max_value : float or None, default None
        Clip the scaled values at ``±max_value`` (needs ``scale=True``).
    zero_center : bool, default True
        Centre the genes in the scaling (``sc.pp.scale``'s option);
        ``False`` needs ``scale=True``.
    engine : polars_singlecell.distributed.DaskEngine or None, default None
        Folds the partitions on its cluster; the workers build the query from
        ``data`` (a LazyFrame over Parquet files, e.g. with :func:`normalize`
        and :func:`select_genes` on it, or the files' path). ``None``: in this
        process.

    Returns
    -------
    PcaModel
        ``mean`` ``(n_genes,)``, ``components`` ``(n_comps, n_genes)``,
        ``explained_variance`` and ``explained_variance_ratio`` ``(n_comps,)``,
        all float64, and ``std`` ``(n_genes,)`` with ``scale=True``.

    Raises
    ------
    ValueError
        ``n_genes`` or ``n_comps`` out of range, a covariance over 16 GiB,
        inconsistent scaling options, or an unavailable ``device``.
    """
    n_genes = _positive_int("n_genes", n_genes)
    n_comps = _positive_int("n_comps", n_comps, upper=n_genes)
    if n_genes * n_genes * 8 > 16 * 2**30:
        raise ValueError(
            f"n_genes={n_genes} needs a {n_genes * n_genes * 8 / 2**30:.0f} GiB covariance; "
            "select highly variable genes first (psc.select_genes)"
        )
    _check_scale(scale, max_value, zero_center)
    if max_value is not None:
        return _fit_pca_clipped(data, n_genes, n_comps, [gene_idx, values], _n_threads(n_threads),
                                check_device(device), max_value, zero_center, engine)
    spec = FitSpec(_internal.CovarianceFit, (n_genes, _n_threads(n_threads), check_device(device)))
    acc = _fold(data, [gene_idx, values], spec, engine)
    n_cells, mean, comps, ev, evr, std = acc.finish(n_comps, scale)
    return PcaModel(
        mean=mean.to_numpy(),
        components=comps.to_numpy().reshape(n_comps, n_genes),
        explained_variance=ev.to_numpy(),
        explained_variance_ratio=evr.to_numpy(),
        n_cells=int(n_cells),
        std=None if std is None else std.to_numpy(),
    )


def _fit_pca_clipped(data: Frame, n_genes: int, n_comps: int, cols: list[str], n_threads: int, device: str,
                     max_value: float, zero_center: bool, engine: Any) -> PcaModel:
    """fit_pca(scale=True, max_value=...): the genes' moments, then the PCA
    of the clipped scaled cells (see fit_pca)."""
    # Exact moments, as the unclipped scaled fit's (scanpy squares float32
    # values in float32: its std differs from these by ~1e-8, relative).
    stats = _fold(data, cols, FitSpec(_internal.GeneStatsFit, (n_genes, "exact")), engine).finish()
    if stats.height == 0:
        raise ValueError("no cells: fit_pca needs at least 2")
    mean, std = stats["mean"].to_numpy(), stats["std"].to_numpy()  # sc.pp.scale's: ddof=1, a constant gene's 1
    clip = (mean.tolist(), std.tolist(), float(max_value), zero_center)
    acc = _fold(data, cols, FitSpec(_internal.CovarianceFit, (n_genes, n_threads, device, clip)), engine)
    n_cells, scaled_mean, comps, ev, evr, _ = acc.finish(n_comps)
    return PcaModel(
        mean=mean,
        components=comps.to_numpy().reshape(n_comps, n_genes),
        explained_variance=ev.to_numpy(),
        explained_variance_ratio=evr.to_numpy(),
        n_cells=int(n_cells),
        std=std,
        max_value=float(max_value),
        zero_center=zero_center,
        scaled_mean=scaled_mean.to_numpy(),
    )


def pca_project(
    gene_idx: IntoExpr = "gene_idx",
    values: IntoExpr = "values",
    *,
    model: PcaModel | str | os.PathLike,
    device: str = "cpu",
) -> pl.Expr:
    """Project each cell onto the fitted axes: ``(x - mean) @ components.T``.

    ``((x - mean) / std) @ components.T`` for a model fitted with
    ``scale=True`` (clipped at ``max_value`` as the fit was). Elementwise and
    streaming.

    Parameters
    ----------
    gene_idx, values : str or polars.Expr
        ``List(UInt32)`` gene indices (in ``[0, model.n_genes)``: select the
        model's genes first) and ``List(Float32)`` values of each cell.
    model : PcaModel, str or os.PathLike
        The fitted model, or the Parquet file :meth:`PcaModel.save` wrote.
        Registered once per process (see :func:`clear_models`).
    device : {"cpu", "cuda"}, default "cpu"
        ``"cuda"`` runs the sparse product on the GPU with the CPU's order of
        sums and rounding: the same bits.

    Returns
    -------
    polars.Expr
        ``Array(Float32, n_comps)`` named ``X_pca``, null where the input row
        is null. A gene index outside the model's genes is an error when the
        query runs.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc
    >>> df = pl.DataFrame({"gene_idx": [[0], [1], [0, 1]], "values": [[1.0], [2.0], [1.0, 2.0]]},
    ...                   schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)})
    >>> model = psc.fit_pca(df, n_genes=2, n_comps=1)
    >>> df.select(psc.pca_project(model=model)).shape
    (3, 1)
    """
    if not isinstance(model, PcaModel):
        model = PcaModel.load(model)
    kwargs = {"model": model._register(), "n_comps": model.n_comps, "device": check_device(device)}
    return call("pca_project", [_col(gene_idx), _col(values)], kwargs).alias("X_pca")
