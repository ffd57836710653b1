"""polars-singlecell: atlas-scale single-cell preprocessing and integration as Polars expressions.

>>> import polars as pl, polars_singlecell as psc
>>> df = pl.DataFrame(
...     {"gene_idx": [[0, 2], [1]], "values": [[1.0, 3.0], [5.0]]},
...     schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)},
... )
>>> df.with_columns(psc.normalize("gene_idx", "values", target_sum=4, log1p=False))["values"].to_list()
[[1.0, 3.0], [4.0]]
"""

from __future__ import annotations

import polars as _pl

from polars_singlecell import _internal
from polars_singlecell._plugin import check_polars_version as _check_polars_version

_check_polars_version(_pl.__version__, _internal.POLARS_CRATE_VERSION)

from polars_singlecell import datasets, distributed, io, layout, metrics, pipeline, plot
from polars_singlecell._device import cuda_available
from polars_singlecell.centroids import fit_centroids, kmeans_centroids
from polars_singlecell.integration import (
    IntegrationModel,
    clear_models,
    knn,
    knn_interpolate,
)
from polars_singlecell.io import sink_parquet
from polars_singlecell.layout import scan_cells, to_cells
from polars_singlecell.ot import fit_integration, ot_integrate
from polars_singlecell.pipeline import integrate
from polars_singlecell.preprocessing import (
    PcaModel,
    consensus_genes,
    fit_pca,
    highly_variable_genes,
    median_total_counts,
    normalize,
    pca_project,
    select_genes,
    total_counts,
)
from polars_singlecell.scanpy_api import integrate_anndata

__version__: str = _internal.__version__

__all__ = [
    "IntegrationModel",
    "PcaModel",
    "clear_models",
    "consensus_genes",
    "cuda_available",
    "datasets",
    "distributed",
    "fit_centroids",
    "fit_integration",
    "fit_pca",
    "highly_variable_genes",
    "integrate",
    "integrate_anndata",
    "io",
    "kmeans_centroids",
    "knn",
    "knn_interpolate",
    "layout",
    "median_total_counts",
    "metrics",
    "normalize",
    "ot_integrate",
    "pca_project",
    "pipeline",
    "plot",
    "scan_cells",
    "select_genes",
    "sink_parquet",
    "to_cells",
    "total_counts",
]
