"""highly_variable_genes(flavor="seurat_v3") against scanpy (which fits its
loess with scikit-misc) on the real raw-count sets, and our loess against
scikit-misc's directly."""

from __future__ import annotations

import warnings
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scanpy as sc

import polars_singlecell as psc
from conftest import to_csr
from polars_singlecell import _internal

skmisc_loess = pytest.importorskip("skmisc.loess")


_argsort = np.argsort


def _stable_argsort(a, axis=-1, kind=None, order=None, **kw):
    return _argsort(a, axis=axis, kind=kind or "stable", order=order, **kw)


def scanpy_v3(df: pl.DataFrame, n_genes: int, n_top: int, batch_key: str | None) -> pd.DataFrame:
    """scanpy's seurat_v3, with numpy's argsort stable where scanpy leaves
    the kind to numpy: scanpy ranks genes by ``np.argsort(-norm_vars)``,
    whose order among equal values (identical genes: cellbench has groups of
    them) depends on numpy's quicksort and the CPU. Ours ranks ties by gene
    index, which is what a stable argsort gives; nothing else changes."""
    adata = ad.AnnData(to_csr(df, n_genes), obs=pd.DataFrame({"batch": df["batch"].to_list()}))
    with warnings.catch_warnings(), mock.patch.object(np, "argsort", _stable_argsort):
        warnings.simplefilter("ignore", UserWarning)  # pancreas: "expects raw count data"
        return sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top, batch_key=batch_key, inplace=False)


@pytest.mark.parametrize("dataset", ["cellbench", "pancreas"])
@pytest.mark.parametrize("batch_key", [None, "batch"])
@pytest.mark.parametrize("n_top", [200, 500])
def test_seurat_v3_matches_scanpy(dataset, batch_key, n_top, request):
    df, n_genes = request.getfixturevalue(dataset)
    ref = scanpy_v3(df, n_genes, n_top, batch_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=n_top, batch_key=batch_key, flavor="seurat_v3")
    assert ours["gene_idx"].to_list() == list(range(n_genes))
    np.testing.assert_allclose(ours["means"].to_numpy(), ref["means"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours["variances"].to_numpy(), ref["variances"].to_numpy(), rtol=1e-10)
    # The loess agrees to ~1e-13; normalised variances inherit it.
    np.testing.assert_allclose(ours["variances_norm"].to_numpy(), ref["variances_norm"].to_numpy(), rtol=1e-9)
    np.testing.assert_array_equal(ours["highly_variable_rank"].to_numpy(), ref["highly_variable_rank"].to_numpy())
    assert ours["highly_variable"].to_list() == ref["highly_variable"].tolist()
    assert int(ours["highly_variable"].sum()) == n_top
    if batch_key:
        assert ours["highly_variable_nbatches"].to_list() == ref["highly_variable_nbatches"].tolist()
    else:
        assert "highly_variable_nbatches" not in ours.columns


def test_seurat_v3_streams_a_scan_like_a_frame(cellbench, tmp_path):
    df, n_genes = cellbench
    df.write_parquet(tmp_path / "c.parquet", row_group_size=100)
    a = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=300, batch_key="batch", flavor="seurat_v3")
    b = psc.highly_variable_genes(pl.scan_parquet(tmp_path / "c.parquet"), n_genes=n_genes, n_top_genes=300,
                                  batch_key="batch", flavor="seurat_v3")
    assert a.equals(b)


def test_seurat_v3_warns_on_log_values_and_needs_n_top(cellbench):
    df, n_genes = cellbench
    lognorm = df.with_columns(psc.normalize("gene_idx", "values", target_sum=1e4))
    with pytest.warns(UserWarning, match="expects raw count data, but non-integers were found"):
        psc.highly_variable_genes(lognorm, n_genes=n_genes, n_top_genes=100, flavor="seurat_v3")
    # As scanpy: no n_top_genes means 2000.
    none = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=None, flavor="seurat_v3")
    assert none.equals(psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=2000, flavor="seurat_v3"))
    with pytest.raises(ValueError, match="flavor='cell_ranger' is not supported.*seurat_v3"):
        psc.highly_variable_genes(df, n_genes=n_genes, flavor="cell_ranger")
    # A batch of one cell has no gene with variance: nothing to fit the loess to.
    one = df.head(1).with_columns(batch=pl.lit("lonely"))
    with pytest.raises(ValueError, match="loess failed on batch 'lonely' \\(1 cells\\)"):
        psc.highly_variable_genes(pl.concat([df, one]), n_genes=n_genes, n_top_genes=100, batch_key="batch",
                                  flavor="seurat_v3")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loess_matches_scikit_misc(seed):
    rng = np.random.default_rng(seed)
    n = [300, 1403, 5000][seed]
    # log10 mean / log10 variance of counts: skewed x with many ties at the low end.
    x = np.log10(np.round(rng.gamma(0.3, 2.0, n) * 200) / 200 + 1e-3)
    y = 1.2 * x + 0.1 * x**2 + rng.normal(0, 0.2, n)
    ref = skmisc_loess.loess(x, y, span=0.3, degree=2)
    ref.fit()
    ours = np.asarray(_internal.loess(x.tolist(), y.tolist(), 0.3))
    np.testing.assert_allclose(ours, ref.outputs.fitted_values, rtol=0, atol=1e-10)


def test_integrate_with_seurat_v3_keeps_scanpys_genes(cellbench, tmp_path):
    df, n_genes = cellbench
    df.write_parquet(tmp_path / "cells.parquet")
    report = psc.integrate(tmp_path / "cells.parquet", tmp_path / "out", n_genes=n_genes, n_top_genes=300,
                           hvg_flavor="seurat_v3", scale=True, max_value=10, n_comps=10, n_centroids=16, log=None)
    assert report["parameters"]["genes"]["hvg_flavor"] == "seurat_v3"
    assert report["parameters"]["pca"]["max_value"] == 10
    ref = scanpy_v3(df, n_genes, 300, "batch")
    genes = pl.read_parquet(tmp_path / "out" / "genes.parquet")
    assert genes["highly_variable"].to_list() == ref["highly_variable"].tolist()
    model = psc.PcaModel.load(tmp_path / "out" / "pca.parquet")
    assert model.n_genes == 300 and model.max_value == 10 and model.std is not None
    # The stored X_pca is the scaled, clipped model's projection of the selected, normalised genes.
    hv = genes.filter("highly_variable")["gene_idx"]
    norm = df.with_columns(psc.normalize("gene_idx", "values", target_sum=1e4))
    want = norm.with_columns(psc.select_genes(genes=hv).struct.unnest()).select(psc.pca_project(model=model))
    got = pl.read_parquet(tmp_path / "out" / "cells.parquet")
    np.testing.assert_array_equal(got["X_pca"].to_numpy(), want["X_pca"].to_numpy())
    with pytest.raises(ValueError, match="pass scale=True"):
        psc.integrate(tmp_path / "cells.parquet", tmp_path / "out3", max_value=10, log=None)
    with pytest.raises(ValueError, match="hvg_flavor='seurat_v4' is not supported"):
        psc.integrate(tmp_path / "cells.parquet", tmp_path / "out2", hvg_flavor="seurat_v4", log=None)
