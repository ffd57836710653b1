"""Shared fixtures: the real datasets in ../shared/data (see DATA.md for origins)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

import polars_singlecell as psc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SPARSE = {"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)}


def to_csr(df: pl.DataFrame, n_genes: int, gene_idx: str = "gene_idx", values: str = "values") -> sp.csr_matrix:
    """The project's layout → SciPy CSR (DATA.md: indptr = list offsets)."""
    lens = df[gene_idx].list.len().to_numpy()
    indptr = np.concatenate([[0], np.cumsum(lens)])
    idx = df[gene_idx].explode().drop_nulls().to_numpy()
    val = df[values].explode().drop_nulls().to_numpy()
    return sp.csr_matrix((val.astype(np.float32), idx, indptr), shape=(df.height, n_genes))


def sparse_frame(rows: list[tuple[list[int], list[float]]], **extra) -> pl.DataFrame:
    return pl.DataFrame(
        {"gene_idx": [r[0] for r in rows], "values": [r[1] for r in rows], **extra},
        schema_overrides=SPARSE,
    )


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """Each test that takes it runs once per device; the CUDA run is skipped
    (with the reason) where ``device="cuda"`` cannot run."""
    if request.param == "cuda" and not psc.cuda_available():
        try:
            psc._internal.cuda_device()
        except ValueError as e:
            pytest.skip(str(e))
    return request.param


@pytest.fixture(scope="session")
def cellbench() -> tuple[pl.DataFrame, int]:
    """CellBench mixology (Tian et al. 2019, MIT): 1,408 cells of raw UMI counts, 5 batches."""
    df = pl.read_parquet(DATA / "cellbench_mixology" / "cells.parquet")
    n_genes = pl.read_parquet(DATA / "cellbench_mixology" / "genes.parquet").height
    return df, n_genes


@pytest.fixture(scope="session")
def pancreas() -> tuple[pl.DataFrame, int]:
    """Cepo pancreas (PYangLab/Cepo, MIT): 528 cells, non-integer values."""
    df = pl.read_parquet(DATA / "cepo_sce_pancreas" / "cells.parquet")
    n_genes = pl.read_parquet(DATA / "cepo_sce_pancreas" / "genes.parquet").height
    return df, n_genes


@pytest.fixture(scope="session")
def harmony() -> pl.DataFrame:
    """Harmony's cell-line data (Zheng et al. 2017): 2,370 cells × 20 PCs, 3 batches."""
    return pl.read_parquet(DATA / "harmony_cell_lines" / "embedding.parquet")


@pytest.fixture(scope="session")
def cellbench_pca(cellbench) -> pl.DataFrame:
    """CellBench mixology → normalize, 2000 HVGs, 30 PCs (our pipeline, tested against scanpy/sklearn)."""
    df, n_genes = cellbench
    df = df.with_columns(psc.normalize(target_sum=1e4))
    var = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=2000)
    genes = var.filter("highly_variable")["gene_idx"]
    df = df.with_columns(psc.select_genes(genes=genes).struct.unnest())
    model = psc.fit_pca(df, n_genes=genes.len(), n_comps=30)
    return df.with_columns(psc.pca_project(model=model)).select("batch", "label", "X_pca")
