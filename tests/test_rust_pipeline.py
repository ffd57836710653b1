"""The Rust pipeline (``examples/rust_pipeline.rs``: the crate's lazy
``prelude``) against ``psc.integrate`` on the same files: the same models,
``X_pca`` and ``X_ot`` bit for bit, and each language's model files read by
the other.

``make test`` builds the example (``cargo test --features cuda,lazy``)
before pytest and sets ``PSC_REQUIRE_RUST_EXAMPLE``, so there a missing
binary is a failure; a bare ``pytest`` without the build skips."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc
from polars_singlecell import _frames

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "target" / "debug" / "examples" / "rust_pipeline"


# The HVG and PCA fits fold partitions of this many rows (whole row groups)
# on both sides: small, so that the files' 6,000 cells are several.
PARTITION_ROWS = 2000


@pytest.fixture(scope="module", autouse=True)
def partitions():
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_frames, "PARTITION_ROWS", PARTITION_ROWS)
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not BINARY.is_file():
        msg = f"{BINARY} is not built: cargo build --features lazy --example rust_pipeline"
        if os.environ.get("PSC_REQUIRE_RUST_EXAMPLE"):
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("rust")
    raw = psc.datasets.write_synthetic_counts(d / "raw", 6000, n_genes=400, umis_per_cell=300, random_state=7,
                                              rows_per_file=2500)
    # psc.integrate's defaults: the example hard-codes the same settings.
    psc.integrate(raw, d / "psc", log=None, progress=False)
    parts = _frames.scan_partitions(pl.scan_parquet(raw / "*.parquet"), [], PARTITION_ROWS)
    assert len(parts) >= 3
    done = subprocess.run([str(BINARY), str(raw), str(d / "psc"), str(d / "rust"), str(PARTITION_ROWS)], check=False,
                          capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return d / "psc", d / "rust"


def test_rust_ranks_the_same_genes(runs):
    py, rs = runs
    a, b = pl.read_parquet(py / "genes.parquet"), pl.read_parquet(rs / "genes.parquet")
    assert b["highly_variable"].sum() > 0
    assert a.select(b.columns).equals(b)


def test_rust_ranks_seurat_v3_as_python(runs):
    py, rs = runs
    want = psc.highly_variable_genes(py.parent / "raw", n_genes=400, n_top_genes=100, batch_key="batch", flavor="seurat_v3")
    got = pl.read_parquet(rs / "genes_v3.parquet")
    assert got["highly_variable"].sum() == 100
    assert got.equals(want)


def test_rust_fits_the_same_pca_model(runs):
    py, rs = runs
    a, b = psc.PcaModel.load(py / "pca.parquet"), psc.PcaModel.load(rs / "pca.parquet")
    assert a.n_cells == b.n_cells == 6000
    for name in ("mean", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_rust_clipped_pca_equals_pythons(runs):
    py, rs = runs
    raw = py.parent / "raw"
    hv = pl.read_parquet(py / "genes.parquet").filter("highly_variable")["gene_idx"]
    lf = pl.scan_parquet(raw / "*.parquet").with_columns(psc.normalize()).with_columns(
        psc.select_genes(genes=hv).struct.unnest())
    a = psc.fit_pca(lf, n_genes=hv.len(), n_comps=50, scale=True, max_value=10)
    b = psc.PcaModel.load(rs / "pca_clipped.parquet")
    assert (b.max_value, b.zero_center) == (10, True)
    for name in ("mean", "std", "scaled_mean", "components", "explained_variance"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_rust_centroids_and_integration_equal_pythons(runs):
    py, rs = runs
    a, b = pl.read_parquet(py / "centroids.parquet"), pl.read_parquet(rs / "centroids.parquet")
    assert a.select(b.columns).equals(b)
    ma, mb = psc.IntegrationModel.read_parquet(py / "integration.parquet"), psc.IntegrationModel.read_parquet(rs / "integration.parquet")
    assert mb.batch_key == "batch"
    assert ma.table.select(mb.table.columns).equals(mb.table)
    assert ma.metrics["params"]["passes"] == mb.metrics["params"]["passes"]


def test_rust_cells_equal_pythons(runs):
    py, rs = runs
    want = pl.read_parquet(py / "cells.parquet", columns=["batch", "X_pca", "X_ot"])
    for name in ("cells.parquet", "cells_psc_models.parquet"):
        got = pl.read_parquet(rs / name)
        assert got.columns == ["batch", "X_pca", "X_ot"], name
        assert got.equals(want), name


def test_python_reads_what_rust_writes_and_the_reverse(runs, tmp_path):
    _, rs = runs
    # Python re-saves Rust's models; the files read back to the same models.
    b = psc.PcaModel.load(rs / "pca.parquet")
    b.save(tmp_path / "pca.parquet")
    again = psc.PcaModel.load(tmp_path / "pca.parquet")
    np.testing.assert_array_equal(again.components, b.components)
    cells = pl.read_parquet(rs / "cells_pca.parquet")
    model = psc.IntegrationModel.read_parquet(rs / "integration.parquet")
    moved = cells.with_columns(psc.knn_interpolate("X_pca", "batch", model=model))
    assert moved["X_ot"].equals(pl.read_parquet(rs / "cells.parquet")["X_ot"])
