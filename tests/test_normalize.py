"""normalize / total_counts / median_total_counts against scanpy on real data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import polars as pl
import pytest
import scanpy as sc

import polars_singlecell as psc
from conftest import sparse_frame, to_csr


def scanpy_normalized(x, target_sum, log1p=True):
    a = ad.AnnData(x.copy())
    sc.pp.normalize_total(a, target_sum=target_sum)
    if log1p:
        sc.pp.log1p(a)
    return a.X


@pytest.mark.parametrize("dataset", ["cellbench", "pancreas"])
@pytest.mark.parametrize("target_sum", [1e4, 1e6])
def test_normalize_matches_scanpy(dataset, target_sum, request):
    df, n_genes = request.getfixturevalue(dataset)
    got = df.select(psc.normalize("gene_idx", "values", target_sum=target_sum))
    assert got.columns == ["values"]
    got_flat = got["values"].explode().to_numpy()
    # CSR keeps the same sparsity pattern and order: compare entry by entry.
    assert got_flat.dtype == np.float32
    assert_matches_scanpy(df, to_csr(df, n_genes), target_sum, got_flat)


def assert_matches_scanpy(df, x, target_sum, got):
    """``got`` (our normalize + log1p) against scanpy, step by step: the
    scaling within 1 ulp of ``normalize_total``'s; the log within 1 ulp of the
    correctly rounded log1p of scanpy's scaled values. scanpy's own
    ``pp.log1p`` is numpy's float32 ``log1p`` (asserted below), whose rounding
    depends on the CPU: on AVX-512 hosts numpy takes Intel SVML's vectorised
    log1pf, 2 ulp from correctly rounded on these data; elsewhere within 1.
    So the last step is compared with the correctly rounded value, which
    does not depend on the host."""
    scaled = df.select(psc.normalize("gene_idx", "values", target_sum=target_sum, log1p=False))["values"].explode().to_numpy()
    want_scaled = scanpy_normalized(x, target_sum, log1p=False).data
    np.testing.assert_array_max_ulp(scaled, want_scaled, maxulp=1)
    np.testing.assert_array_equal(scanpy_normalized(x, target_sum).data, np.log1p(want_scaled))
    np.testing.assert_array_max_ulp(got, np.log1p(want_scaled.astype(np.float64)).astype(np.float32), maxulp=1)


def test_default_target_sum_is_scanpys_median(cellbench):
    df, n_genes = cellbench
    totals = df.select(psc.total_counts("gene_idx", "values"))["total_counts"].to_numpy()
    assert (totals > 0).all()  # scanpy's CSR path counts zero cells in its median; ours does not
    assert psc.median_total_counts(df) == np.median(totals)
    got = df.select(psc.normalize(target_sum=None))["values"].explode().to_numpy()
    assert_matches_scanpy(df, to_csr(df, n_genes), None, got)


def test_median_total_counts_streams_a_parquet_file(cellbench, tmp_path):
    df, _ = cellbench
    path = tmp_path / "cells.parquet"
    df.write_parquet(path, row_group_size=100)
    totals = to_csr(df, 28517).sum(axis=1).A1
    assert psc.median_total_counts(path) == np.float32(np.median(totals))
    assert psc.median_total_counts(pl.scan_parquet(path)) == psc.median_total_counts(df)


def test_median_skips_zero_cells_and_even_counts_average():
    df = sparse_frame([([0], [2.0]), ([], []), ([1], [0.0]), ([0, 1], [3.0, 3.0])])
    assert psc.median_total_counts(df) == 4.0


def test_zero_count_cells_keep_zeros_like_scanpy():
    df = sparse_frame([([0, 1], [0.0, 0.0]), ([], []), ([2], [5.0])])
    got = df.select(psc.normalize(target_sum=10))["values"].to_list()
    assert got == [[0.0, 0.0], [], [pytest.approx(np.log1p(10.0))]]
    want = scanpy_normalized(to_csr(df, 3), 10)
    np.testing.assert_array_max_ulp(np.concatenate([np.asarray(r, np.float32) for r in got]), want.data, maxulp=1)


def test_log1p_false_gives_target_sum_totals(pancreas):
    df, _ = pancreas
    out = df.select(psc.normalize(target_sum=1e4, log1p=False))["values"]
    # summed in float64: a float32 sum of ~1000 entries is itself off by ~1e-5
    sums = np.array([np.sum(v, dtype=np.float64) for v in out.to_numpy()])
    np.testing.assert_allclose(sums, 1e4, rtol=1e-6)


def test_null_cells_stay_null():
    df = pl.DataFrame({"gene_idx": [[0], None, [1]], "values": [[1.0], None, [2.0]]}, schema_overrides={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)})
    out = df.with_columns(psc.normalize(target_sum=1, log1p=False), psc.total_counts())
    assert out["values"].to_list() == [[1.0], None, [1.0]]
    assert out["total_counts"].to_list() == [1.0, None, 2.0]
    assert out["gene_idx"].to_list() == [[0], None, [1]]
