"""The integration on an in-memory ``AnnData``, as scanpy's external tools
run: :func:`integrate_anndata` reads ``adata.obsm[basis]`` and writes
``adata.obsm[adjusted_basis]`` in place, like
``sc.external.pp.harmony_integrate``."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from polars_singlecell.centroids import fit_centroids
from polars_singlecell.integration import knn_interpolate
from polars_singlecell.ot import fit_integration

__all__ = ["integrate_anndata", "obs_column"]


def obs_column(adata: Any, key: str) -> pl.Series:
    """``adata.obs[key]`` as a Polars Series of text labels, missing values as nulls.

    Reads pandas categoricals and nullable strings without pyarrow.

    Parameters
    ----------
    adata : anndata.AnnData
        The AnnData whose ``obs`` is read.
    key : str
        The ``obs`` column.

    Returns
    -------
    polars.Series
        ``(n_obs,)`` String named ``key``, null where the value is missing.

    Raises
    ------
    ValueError
        ``obs`` has no column ``key`` (the message lists the columns there are).
    """
    if key not in adata.obs.columns:
        raise ValueError(f"adata.obs has no column {key!r} (columns: {list(adata.obs.columns)}); pass batch_key=")
    col = adata.obs[key]
    missing = np.asarray(col.isna(), dtype=bool)
    text = pl.Series(key, col.astype(str).to_numpy(dtype=object), dtype=pl.String)
    return text.set(pl.Series(missing), None) if missing.any() else text


def integrate_anndata(
    adata: Any,
    batch_key: str,
    *,
    basis: str = "X_pca",
    adjusted_basis: str = "X_pca_ot",
    n_centroids: int = 2048,
    min_cells_per_centroid: int = 16,
    max_samples_per_batch: int = 500_000,
    k: int = 8,
    mode: str = "own_batch",
    device: str = "cpu",
    random_state: int = 0,
    **integration_options: Any,
) -> None:
    """Integrate the batches of ``adata.obsm[basis]`` into ``adata.obsm[adjusted_basis]``, in place.

    scanpy's ``harmony_integrate(adata, key, basis="X_pca", adjusted_basis=...)``
    convention: nothing is returned.

    The same three steps as :func:`integrate` from ``X_pca``, with its
    defaults: per-batch centroids (:func:`fit_centroids`), their integration
    (:func:`fit_integration`, which ``integration_options`` such as
    ``epsilon`` or ``reg_m`` go to) and each cell moved by its nearest
    centroids (:func:`knn_interpolate`, ``k`` and ``mode``). The embedding is
    read as float32 and the result is float32, ``(n_obs, n_comps)``. Cells
    whose ``batch_key`` is missing, and non-finite embeddings, are errors
    naming the first such cell; nothing is written then.

    Parameters
    ----------
    adata : anndata.AnnData
        The cells, with ``obsm[basis]`` ``(n_obs, n_comps)`` and
        ``obs[batch_key]``.
    batch_key : str
        The ``obs`` column of batches.
    basis : str, default "X_pca"
        The embedding to integrate.
    adjusted_basis : str, default "X_pca_ot"
        Where the integrated embedding goes (float32 ``(n_obs, n_comps)``).
    n_centroids : int, default 2048
        Centroids per batch at most (:func:`fit_centroids`).
    min_cells_per_centroid : int, default 16
        At most one centroid per this many sampled cells of a batch.
    max_samples_per_batch : int, default 500_000
        Cells sampled per batch for its k-means.
    k : int, default 8
        Centroids each cell's displacement is interpolated from.
    mode : {"own_batch", "pooled"}, default "own_batch"
        :func:`knn_interpolate`'s search.
    device : {"cpu", "cuda"}, default "cpu"
        Where the k-means and the interpolation run.
    random_state : int, default 0
        Seed of the centroid samples, the k-means and the reference reduction.
    **integration_options
        Options of :func:`fit_integration` (``epsilon``, ``reg_m``, ...).

    Raises
    ------
    ValueError
        No ``obsm[basis]``, an embedding that is not 2-D or not finite, or a
        missing batch.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, polars_singlecell as psc
    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (300, 5)), rng.normal(0, 1, (300, 5)) + 4]).astype(np.float32)
    >>> adata = ad.AnnData(obs=pd.DataFrame({"plate": ["a"] * 300 + ["b"] * 300}, index=[str(i) for i in range(600)]),
    ...                    obsm={"X_pca": x})
    >>> psc.integrate_anndata(adata, "plate")
    >>> moved = adata.obsm["X_pca_ot"]
    >>> moved.shape, moved.dtype
    ((600, 5), dtype('float32'))
    >>> gap = lambda m: float(np.linalg.norm(m[300:].mean(0) - m[:300].mean(0)))
    >>> gap(x) > 8 and gap(moved) < 1
    True
    """
    if basis not in adata.obsm:
        raise ValueError(f"adata.obsm has no {basis!r} (keys: {list(adata.obsm.keys())}); run sc.pp.pca(adata) first, or pass basis=")
    x = np.asarray(adata.obsm[basis])
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"adata.obsm[{basis!r}] has shape {x.shape}; expected (n_obs, n_comps)")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        first = int(np.argmin(finite))
        raise ValueError(f"adata.obsm[{basis!r}] holds a non-finite value for cell {adata.obs_names[first]!r} (row {first}); "
                         "drop or repair those cells first")
    batch = obs_column(adata, batch_key)
    if batch.null_count():
        first = int(batch.is_null().arg_true()[0])
        raise ValueError(f"adata.obs[{batch_key!r}] is missing for cell {adata.obs_names[first]!r} (row {first}); "
                         "fill or drop those cells first")
    cells = pl.DataFrame([pl.Series(basis, np.ascontiguousarray(x, dtype=np.float32)), batch])
    centroids = fit_centroids(cells, embedding=basis, batch_key=batch_key, n_centroids=n_centroids,
                              min_cells_per_centroid=min_cells_per_centroid, max_samples_per_batch=max_samples_per_batch,
                              random_state=random_state, device=device)
    model = fit_integration(centroids, batch_key=batch_key, random_state=random_state, **integration_options)
    moved = cells.select(knn_interpolate(basis, batch_key, model=model, k=k, mode=mode, device=device))
    adata.obsm[adjusted_basis] = moved.to_series().to_numpy()
