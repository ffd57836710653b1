"""highly_variable_genes, select_genes, fit_pca and pca_project against scanpy and
scikit-learn on real data (CellBench mixology, Tian et al. 2019)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA

import polars_singlecell as psc
from conftest import sparse_frame, to_csr


class _NumpyWithRoundedExpm1:
    """numpy, but float32 sparse ``expm1`` computed in float64 and rounded."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def expm1(x, *args, **kwargs):
        if sp.issparse(x) and x.dtype == np.float32 and not args and not kwargs:
            y = x.copy()
            y.data = np.expm1(x.data.astype(np.float64)).astype(np.float32)
            return y
        return np.expm1(x, *args, **kwargs)


@pytest.fixture(autouse=True)
def correctly_rounded_expm1(monkeypatch):
    """scanpy's seurat HVG starts with numpy's float32 expm1 of the matrix,
    whose rounding depends on the CPU: Intel SVML on AVX-512 hosts (2 ulp from
    correctly rounded, measured), glibc's expm1f elsewhere (1 ulp); the genes'
    means move by ~1e-7 with it. Our kernel rounds expm1 correctly; here
    scanpy's HVG module does too, on every host (numpy itself is left alone:
    numba reads its ufuncs)."""
    from scanpy.preprocessing import _highly_variable_genes as hvg

    monkeypatch.setattr(hvg, "np", _NumpyWithRoundedExpm1())


@pytest.fixture(scope="module")
def lognorm(cellbench):
    df, n_genes = cellbench
    return df.with_columns(psc.normalize("gene_idx", "values", target_sum=1e4)), n_genes


@pytest.fixture(scope="module")
def scanpy_lognorm(lognorm, cellbench):
    """scanpy's AnnData holding *our* normalized values. normalize is checked
    against scanpy's in test_normalize.py (scaling within 1 ulp, log1p within
    1 ulp of correctly rounded); scanpy's own float32 log1p rounds differently
    on AVX-512 CPUs (numpy's SVML path), and HVG statistics, ranks and cutoffs
    move with one ulp of input. The same input makes this a test of HVG alone."""
    df, n_genes = lognorm
    return ad.AnnData(to_csr(df, n_genes), obs=pd.DataFrame({"batch": df["batch"].to_list()}))


def test_hvg_matches_scanpy_single_batch(lognorm, scanpy_lognorm):
    df, n_genes = lognorm
    got = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=2000)
    want = sc.pp.highly_variable_genes(scanpy_lognorm, n_top_genes=2000, flavor="seurat", inplace=False)
    for col in ["means", "dispersions", "dispersions_norm"]:
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col)
    assert got["highly_variable"].sum() == 2000
    assert (got["highly_variable"].to_numpy() == want["highly_variable"].to_numpy()).all()


def test_hvg_cutoffs_match_scanpy(lognorm, scanpy_lognorm):
    df, n_genes = lognorm
    got = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=None, min_mean=0.05, min_disp=0.3)
    want = sc.pp.highly_variable_genes(scanpy_lognorm, min_mean=0.05, min_disp=0.3, flavor="seurat", inplace=False)
    assert 0 < got["highly_variable"].sum() < n_genes
    assert (got["highly_variable"].to_numpy() == want["highly_variable"].to_numpy()).all()


def test_hvg_per_batch_matches_scanpy(lognorm, scanpy_lognorm):
    df, n_genes = lognorm
    got = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=1000, batch_key="batch")
    want = sc.pp.highly_variable_genes(scanpy_lognorm, n_top_genes=1000, batch_key="batch", flavor="seurat", inplace=False)
    np.testing.assert_array_equal(got["highly_variable_nbatches"].to_numpy(), want["highly_variable_nbatches"].to_numpy())
    np.testing.assert_array_equal(got["highly_variable_intersection"].to_numpy(), want["highly_variable_intersection"].to_numpy())
    for col in ["means", "dispersions", "dispersions_norm"]:
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col)
    assert (got["highly_variable"].to_numpy() == want["highly_variable"].to_numpy()).all()
    # The Tahoe-100M consensus: genes variable in more than N batches.
    for n in range(5):
        genes = psc.consensus_genes(got, more_than=n)
        assert genes.to_list() == sorted(np.flatnonzero(want["highly_variable_nbatches"].to_numpy() > n).tolist())


def test_hvg_per_batch_cutoffs_match_scanpy(lognorm, scanpy_lognorm):
    df, n_genes = lognorm
    got = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=None, batch_key="batch")
    want = sc.pp.highly_variable_genes(scanpy_lognorm, batch_key="batch", flavor="seurat", inplace=False)
    want = want.loc[scanpy_lognorm.var_names]  # this scanpy branch returns genes sorted by name
    np.testing.assert_allclose(got["dispersions_norm"].to_numpy(), want["dispersions_norm"].to_numpy(), rtol=1e-9, atol=1e-12)
    assert 0 < got["highly_variable"].sum() < n_genes
    assert (got["highly_variable"].to_numpy() == want["highly_variable"].to_numpy()).all()


def test_hvg_batch_of_one_cell_like_scanpy(cellbench):
    """A one-cell batch: scanpy keeps the uncorrected variance (0) instead of n/(n-1)."""
    df, _n_genes = cellbench
    raw = pl.concat([df.head(60), df.slice(60, 1).with_columns(batch=pl.lit("lonely"))])
    raw = raw.with_columns(psc.select_genes(genes=np.arange(3000)).struct.unnest())
    lognorm = raw.with_columns(psc.normalize())
    a = ad.AnnData(to_csr(lognorm, 3000), obs=pd.DataFrame({"batch": raw["batch"].to_list()}))  # same input: see scanpy_lognorm
    got = psc.highly_variable_genes(lognorm, n_genes=3000, n_top_genes=300, batch_key="batch")
    want = sc.pp.highly_variable_genes(a, n_top_genes=300, batch_key="batch", flavor="seurat", inplace=False)
    assert raw["batch"].n_unique() >= 2
    np.testing.assert_array_equal(got["highly_variable_nbatches"].to_numpy(), want["highly_variable_nbatches"].to_numpy())
    assert (got["highly_variable"].to_numpy() == want["highly_variable"].to_numpy()).all()


def test_select_genes_matches_scipy_column_slice(cellbench):
    df, n_genes = cellbench
    genes = np.random.default_rng(0).choice(n_genes, 500, replace=False)  # unsorted on purpose
    out = df.with_columns(psc.select_genes("gene_idx", "values", genes=genes).struct.unnest())
    assert out.columns == df.columns
    got = to_csr(out, len(genes))
    want = to_csr(df, n_genes)[:, genes]
    assert (got != want).nnz == 0
    assert out["gene_idx"].list.eval(pl.element().diff().drop_nulls().min() > 0).explode().drop_nulls().all()


@pytest.fixture(scope="module")
def hvg_cells(lognorm):
    df, n_genes = lognorm
    var = psc.highly_variable_genes(df, n_genes=n_genes, n_top_genes=2000)
    genes = var.filter("highly_variable")["gene_idx"]
    return df.with_columns(psc.select_genes(genes=genes).struct.unnest()), genes.len()


def sklearn_signed(pca):
    """scikit-learn's components with our fixed convention: the largest |loading| positive."""
    c = pca.components_.copy()
    signs = np.sign(c[np.arange(c.shape[0]), np.abs(c).argmax(axis=1)])
    return c * signs[:, None], signs


def test_fit_pca_matches_sklearn_full_svd(hvg_cells):
    df, n_genes = hvg_cells
    model = psc.fit_pca(df, n_genes=n_genes, n_comps=50)
    x = to_csr(df, n_genes).toarray().astype(np.float64)
    ref = PCA(50, svd_solver="full").fit(x)
    comps, signs = sklearn_signed(ref)
    assert model.n_cells == df.height and model.components.shape == (50, n_genes)
    np.testing.assert_allclose(model.mean, ref.mean_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.explained_variance, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(model.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-4)
    scale = np.abs(comps).max(axis=1, keepdims=True)
    np.testing.assert_allclose(model.components / scale, comps / scale, rtol=0, atol=1e-4)
    got = df.select(psc.pca_project("gene_idx", "values", model=model))["X_pca"].to_numpy()
    want = ref.transform(x) * signs
    assert got.dtype == np.float32 and got.shape == (df.height, 50)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fit_pca_scaled_is_sc_pp_scale_then_pca(hvg_cells, tmp_path):
    """scale=True folds sc.pp.scale (zero-centred, unit variance, no clipping)
    into the fit: the PCA of scanpy's scaled matrix, without writing it."""
    df, n_genes = hvg_cells
    # A gene no cell expresses: std 0, which scanpy takes as 1 (a zero column).
    df = df.with_columns(psc.select_genes(genes=range(n_genes - 1)).struct.unnest())
    model = psc.fit_pca(df, n_genes=n_genes, n_comps=30, scale=True)
    x = to_csr(df, n_genes).toarray().astype(np.float64)
    adata = ad.AnnData(x.copy())
    sc.pp.scale(adata)
    sd = x.std(axis=0, ddof=1)
    assert sd[-1] == 0 and model.std[-1] == 1.0
    np.testing.assert_allclose(model.std[:-1], sd[:-1], rtol=1e-10)
    z = (x - x.mean(axis=0)) / model.std
    np.testing.assert_allclose(z, adata.X, rtol=1e-9, atol=1e-9)  # our scaling is scanpy's
    ref = PCA(30, svd_solver="full").fit(adata.X)
    comps, signs = sklearn_signed(ref)
    np.testing.assert_allclose(model.explained_variance, ref.explained_variance_, rtol=1e-9)
    np.testing.assert_allclose(model.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(model.components, comps, rtol=0, atol=1e-8)
    got = df.select(psc.pca_project(model=model))["X_pca"].to_numpy()
    want = ref.transform(adata.X) * signs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    model.save(tmp_path / "pca.parquet")
    back = psc.PcaModel.load(tmp_path / "pca.parquet")
    np.testing.assert_array_equal(back.std, model.std)
    assert df.select(psc.pca_project(model=back)).equals(df.select(psc.pca_project(model=model)))
    # Without scale, no std travels with the model.
    assert psc.fit_pca(df, n_genes=n_genes, n_comps=5).std is None


@pytest.mark.parametrize("zero_center", [True, False])
def test_fit_pca_clipped_is_sc_pp_scale_max_value_then_pca(hvg_cells, tmp_path, zero_center):
    """scale=True with max_value: sc.pp.scale(max_value=3) clips many entries
    (both signs when zero-centred); the PCA is the one of scanpy's clipped
    matrix, fitted from the sparse counts in two passes."""
    df, n_genes = hvg_cells
    model = psc.fit_pca(df, n_genes=n_genes, n_comps=20, scale=True, max_value=3, zero_center=zero_center)
    x = to_csr(df, n_genes).toarray().astype(np.float64)
    adata = ad.AnnData(x.copy())
    sc.pp.scale(adata, max_value=3, zero_center=zero_center)
    z = adata.X
    assert (z == 3).sum() > 100 and (not zero_center or (z == -3).sum() > 0)
    ref = PCA(20, svd_solver="full").fit(z)
    comps, signs = sklearn_signed(ref)
    np.testing.assert_allclose(model.std, x.std(axis=0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(model.scaled_mean, ref.mean_, rtol=0, atol=1e-6)
    # Our clipped entries are float32 (as scanpy's scaled float32 matrix);
    # the reference here is float64: agreement to float32 rounding.
    np.testing.assert_allclose(model.explained_variance, ref.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(model.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-5)
    np.testing.assert_allclose(model.components, comps, rtol=0, atol=1e-4)
    got = df.select(psc.pca_project(model=model))["X_pca"].to_numpy()
    want = ref.transform(z) * signs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    model.save(tmp_path / "pca.parquet")
    back = psc.PcaModel.load(tmp_path / "pca.parquet")
    assert (back.max_value, back.zero_center) == (3.0, zero_center)
    np.testing.assert_array_equal(back.scaled_mean, model.scaled_mean)
    assert df.select(psc.pca_project(model=back)).equals(df.select(psc.pca_project(model=model)))


def test_fit_pca_scale_options_are_checked(hvg_cells):
    df, n_genes = hvg_cells
    with pytest.raises(ValueError, match="pass scale=True"):
        psc.fit_pca(df, n_genes=n_genes, n_comps=5, max_value=10)
    with pytest.raises(ValueError, match="max_value must be a finite number > 0"):
        psc.fit_pca(df, n_genes=n_genes, n_comps=5, scale=True, max_value=-1)
    with pytest.raises(ValueError, match="scale and zero_center must be True or False"):
        psc.fit_pca(df, n_genes=n_genes, n_comps=5, scale="yes")
    with pytest.raises(ValueError, match="options of the scaling"):
        psc.fit_pca(df, n_genes=n_genes, n_comps=5, zero_center=False)
    # numpy scalars are numbers too
    assert psc.fit_pca(df, n_genes=n_genes, n_comps=5, scale=True, max_value=np.float32(10)).max_value == 10


@pytest.mark.parametrize("max_value", [None, 10.0])
def test_a_constant_gene_is_scaled_by_one(max_value):
    """A gene equal in every cell has variance 0, computed as float noise of
    either sign (0.1 in float32 over 100 cells: -2.6e-17 by sums of squares):
    its std must be 1 (sc.pp.scale's rule for 0), not NaN or 1e-9."""
    rng = np.random.default_rng(0)
    rows = [([0, 1, 2], [0.1, float(rng.integers(1, 9)), float(rng.integers(1, 9))]) for _ in range(100)]
    df = sparse_frame(rows)
    model = psc.fit_pca(df, n_genes=3, n_comps=2, scale=True, max_value=max_value)
    assert model.std[0] == 1.0 and np.isfinite(model.components).all()
    # The constant gene carries no variance: no axis loads on it.
    assert np.abs(model.components[:, 0]).max() < 1e-6
    assert np.isfinite(df.select(psc.pca_project(model=model))["X_pca"].to_numpy()).all()


def test_pca_model_parquet_round_trip(hvg_cells, tmp_path):
    df, n_genes = hvg_cells
    model = psc.fit_pca(df, n_genes=n_genes, n_comps=10)
    path = tmp_path / "pca.parquet"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["pca.parquet"]  # no temporary left behind
    table = pl.read_parquet(path)
    assert table.schema == pl.Schema({"gene_idx": pl.UInt32, "mean": pl.Float64, "loadings": pl.Array(pl.Float64, 10)})
    back = psc.PcaModel.load(path)
    for field in ["mean", "components", "explained_variance", "explained_variance_ratio"]:
        np.testing.assert_array_equal(getattr(back, field), getattr(model, field))
    a = df.select(psc.pca_project(model=model))
    b = df.select(psc.pca_project(model=path))
    assert a.equals(b)


def test_fit_pca_is_bit_identical_across_threads_and_batching(hvg_cells, tmp_path):
    df, n_genes = hvg_cells
    path = tmp_path / "cells.parquet"
    df.write_parquet(path, row_group_size=97)
    one = psc.fit_pca(df, n_genes=n_genes, n_comps=20, n_threads=1)
    two = psc.fit_pca(pl.scan_parquet(path), n_genes=n_genes, n_comps=20, n_threads=2)
    np.testing.assert_array_equal(one.components, two.components)
    np.testing.assert_array_equal(one.explained_variance, two.explained_variance)


def test_sign_convention_largest_loading_positive(hvg_cells):
    df, n_genes = hvg_cells
    c = psc.fit_pca(df, n_genes=n_genes, n_comps=20).components
    assert (c[np.arange(20), np.abs(c).argmax(axis=1)] > 0).all()


def test_pca_project_keeps_null_cells_null():
    df = sparse_frame([([0], [1.0]), ([1], [2.0]), ([0, 1], [3.0, 1.0])])
    model = psc.fit_pca(df, n_genes=2, n_comps=2)
    with_null = pl.concat([df, pl.DataFrame({"gene_idx": [None], "values": [None]}, schema=df.schema)])
    out = with_null.select(psc.pca_project(model=model))["X_pca"]
    assert out.null_count() == 1 and out[3] is None
    assert out.dtype == pl.Array(pl.Float32, 2)


def test_record_batches_read_a_scan_slice_by_slice(cellbench, tmp_path, monkeypatch):
    """The fits read a Parquet scan (with elementwise columns on it) one row
    slice at a time, so a slow fit never lets the reader run ahead (peak RSS
    bounded by a slice, not by the cells); other plans are streamed whole.
    Each slice is whole row groups (from the files' footers) up to
    SLICE_ENTRIES entries; a group over that is split evenly; without
    footers, a probe slice measures the density. Either way: every row
    once, in order."""
    from polars_singlecell import _frames
    from polars_singlecell import preprocessing as P

    df, _ = cellbench
    n_genes = 300  # a small covariance: this test is about reading the rows
    df = df.with_columns(psc.select_genes(genes=np.arange(n_genes)).struct.unnest())
    path = tmp_path / "cells.parquet"
    df.write_parquet(path, row_group_size=100)
    monkeypatch.setattr(_frames, "SLICE_ROWS", 500)
    monkeypatch.setattr(_frames, "PROBE_ROWS", 64)
    monkeypatch.setattr(_frames, "SLICE_ENTRIES", 20_000)
    lf = pl.scan_parquet(path).with_columns(psc.normalize())
    want = lf.select("gene_idx", "values").collect()
    assert P._slice_reaches_scan(lf.select("gene_idx", "values"))

    # Whole row groups of 100 rows, as many as fit 20,000 entries and 500 rows.
    # (As the footers count them: an empty list takes a slot.)
    entries = [int(want["gene_idx"][a:a + 100].list.len().clip(1).sum()) for a in range(0, df.height, 100)]
    assert max(entries) < 20_000 < sum(entries)
    expect, rows, used = [], 0, 0
    for k, e in enumerate(entries):
        n = min(100, df.height - 100 * k)
        if rows and (used + e > 20_000 or rows + n > 500):
            expect.append(rows)
            rows = used = 0
        rows, used = rows + n, used + e
    expect.append(rows)
    assert len(set(expect[:-1])) > 1  # both budgets bind somewhere
    got = list(_frames.record_batches(lf, ["gene_idx", "values"]))
    assert [b.height for b in got] == expect
    assert all(b.height % 100 == 0 for b in got[:-1])  # never inside a row group
    assert pl.concat(got).equals(want)
    # The fits fold partitions (whole row groups, up to PARTITION_ROWS) and
    # read each in the same slices.
    q = lf.select("gene_idx", "values")
    [part] = _frames.scan_partitions(q, ["gene_idx", "values"], 10**6)
    assert [b.height for b in _frames.partition_batches(q, part, ["gene_idx", "values"])] == expect

    # A row group over the budget: split into equal slices.
    monkeypatch.setattr(_frames, "SLICE_ENTRIES", min(entries) // 3)
    got = list(_frames.record_batches(lf, ["gene_idx", "values"]))
    assert pl.concat(got).equals(want)
    assert all(b.height <= 34 for b in got) and len(got) >= 3 * len(entries)

    # Footers out of reach (a plan Polars shows differently, a remote
    # source): a probe slice of 64 rows, then slices of ~SLICE_ENTRIES
    # entries by the probe's density, at most SLICE_ROWS rows.
    monkeypatch.setattr(_frames, "SLICE_ENTRIES", 20_000)
    monkeypatch.setattr(_frames, "scan_paths", lambda q: None)
    got = list(_frames.record_batches(lf, ["gene_idx", "values"]))
    size = int(min(500, max(64, 20_000 // want["gene_idx"].head(64).list.len().mean())))
    assert 64 < size < 500
    rest = df.height - 64
    assert [b.height for b in got] == [64] + [size] * (rest // size) + ([rest % size] if rest % size else [])
    assert pl.concat(got).equals(want)
    kept = lf.filter(pl.col("batch") != df["batch"][0])
    assert not P._slice_reaches_scan(kept.select("gene_idx", "values"))
    assert pl.concat(list(_frames.record_batches(kept, ["gene_idx", "values"]))).equals(kept.select("gene_idx", "values").collect())
    # And the fit over slices is the fit over the whole frame.
    whole = psc.fit_pca(df.with_columns(psc.normalize()), n_genes=n_genes, n_comps=5)
    sliced = psc.fit_pca(lf, n_genes=n_genes, n_comps=5)
    np.testing.assert_array_equal(sliced.components, whole.components)


def test_row_group_footers_found_for_files_and_globs(tmp_path):
    """record_batches finds a scan's files (a list or a glob) and their row
    groups; a frame that is not one Parquet scan, or an unreadable file,
    gives no plan (then it slices by density) rather than an error."""
    from polars_singlecell import _frames, _internal

    df = pl.DataFrame({"gene_idx": [[0, 1], [2], [], [0, 1, 2]] * 5, "values": [[1.0, 2.0], [3.0], [], [1.0, 1.0, 1.0]] * 5},
                      schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)})
    for k in range(2):
        df.write_parquet(tmp_path / f"part-{k}.parquet", row_group_size=8)
    files = [str(tmp_path / f"part-{k}.parquet") for k in range(2)]
    groups = _internal.parquet_row_groups(files, ["gene_idx"])
    assert [n for n, _ in groups] == [8, 8, 4] * 2
    # Parquet's leaf count: the entries, plus a slot for each empty list.
    assert [e for _, e in groups] == [int(df["gene_idx"][a:a + 8].list.len().clip(1).sum()) for a in (0, 8, 16)] * 2
    for source in (files, str(tmp_path / "part-*.parquet")):
        q = pl.scan_parquet(source).with_columns(psc.normalize()).select("gene_idx", "values")
        assert _frames.scan_paths(q) == files
        assert sum(_frames._aligned_slices(q, ["gene_idx", "values"])) == 2 * df.height
    assert _frames.scan_paths(df.lazy().select("gene_idx")) is None
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        _internal.parquet_row_groups([str(tmp_path / "bad.parquet")], ["gene_idx"])
    assert _frames._aligned_slices(pl.LazyFrame({"gene_idx": [[1]]}), ["gene_idx"]) == []


def test_a_failed_statistics_update_adds_nothing():
    """A record batch with a bad row is an error and leaves the statistics as
    they were: no half-added batch labels."""
    from polars_singlecell import _internal

    acc = _internal.GeneStatsFit(3)
    good = pl.DataFrame({"gene_idx": [[0, 2]], "values": [[1.0, 2.0]], "b": ["x"]},
                        schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32), "b": pl.String})
    acc.update(good["gene_idx"], good["values"], good["b"])
    bad = good.with_columns(gene_idx=pl.Series([[0, 7]], dtype=pl.List(pl.UInt32)), b=pl.lit("y"))
    with pytest.raises(ValueError, match="7"):
        acc.update(bad["gene_idx"], bad["values"], bad["b"])
    assert acc.finish()["batch"].unique().to_list() == ["x"]
