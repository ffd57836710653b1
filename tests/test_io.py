"""h5ad import (against files written by the anndata package) and AnnData export."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc

anndata = pytest.importorskip("anndata")
sp = pytest.importorskip("scipy.sparse")
pd = pytest.importorskip("pandas")


def make_adata(n=2500, g=300, seed=0):
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=0.08, format="csr", random_state=seed, dtype=np.float32)
    x.data = np.ceil(x.data * 10).astype(np.float32)
    keep = np.ones(n, dtype=np.float32)
    keep[5] = 0  # an all-zero cell
    x = (sp.diags(keep) @ x).tocsr()
    x.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["p1", "p2", "p3"], n)),
            "n_counts": np.asarray(x.sum(1)).ravel(),
            "donor": rng.choice(["d1", "d2"], n).astype(object),
        },
        index=[f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(g)])
    return anndata.AnnData(x, obs=obs, var=var)


def test_h5ad_matches_anndata(tmp_path):
    a = make_adata()
    a.write_h5ad(tmp_path / "a.h5ad")
    out = psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "cells", rows_per_file=700)
    assert len(list(out.glob("part-*.parquet"))) == 4
    df = pl.read_parquet(out / "part-*.parquet")
    assert df.columns == ["cell_id", "batch", "n_counts", "donor", "gene_idx", "values"]
    assert df.schema["gene_idx"] == pl.List(pl.UInt32) and df.schema["values"] == pl.List(pl.Float32)
    assert df["cell_id"].to_list() == list(a.obs_names)
    assert df["batch"].to_list() == list(a.obs["batch"].astype(str))
    np.testing.assert_array_equal(df["n_counts"].to_numpy(), a.obs["n_counts"].to_numpy())
    x = a.X.tocsr()
    x.sort_indices()
    for i in (0, 5, 699, 700, 2499):
        row = x[i]
        assert df["gene_idx"][i].to_list() == row.indices.tolist()
        np.testing.assert_array_equal(df["values"][i].to_numpy(), row.data)
    assert df["gene_idx"][5].to_list() == []  # an empty cell is an empty list, not null
    genes = pl.read_parquet(out / "genes.parquet")
    assert genes["gene"].to_list() == list(a.var_names)
    # the imported counts go straight into the pipeline's first step
    totals = df.select(psc.total_counts()).to_series()
    np.testing.assert_allclose(totals.to_numpy(), np.asarray(x.sum(1)).ravel())


def test_h5ad_unsorted_and_duplicate_entries_are_sorted_and_summed(tmp_path):
    x = sp.csr_matrix((np.array([1.0, 2.0, 5.0, 3.0], dtype=np.float32), np.array([4, 1, 4, 0]), np.array([0, 3, 4])), shape=(2, 6))
    assert not x.has_sorted_indices
    anndata.AnnData(x).write_h5ad(tmp_path / "u.h5ad")
    df = pl.read_parquet(psc.io.h5ad_to_parquet(tmp_path / "u.h5ad", tmp_path / "o") / "part-*.parquet")
    assert df["gene_idx"].to_list() == [[1, 4], [0]]
    assert df["values"].to_list() == [[2.0, 6.0], [3.0]]


def test_h5ad_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        psc.io.h5ad_to_parquet(tmp_path / "none.h5ad", tmp_path / "o")
    anndata.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(tmp_path / "dense.h5ad")
    with pytest.raises(ValueError, match="CSR"):
        psc.io.h5ad_to_parquet(tmp_path / "dense.h5ad", tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # nothing left behind
    make_adata(50).write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="no column 'cell_type'"):
        psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "o", obs_columns=["cell_type"])
    psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "o")
    with pytest.raises(FileExistsError):
        psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "o")


def test_to_anndata_for_scanpy(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5000, 8)).astype(np.float32)
    cells = pl.DataFrame({
        "cell_id": [f"c{i}" for i in range(5000)], "batch": rng.choice(["a", "b"], 5000),
        "X_pca": pl.Series(emb, dtype=pl.Array(pl.Float32, 8)),
        "X_ot": pl.Series(emb + 1, dtype=pl.Array(pl.Float32, 8)),
    })
    cells.write_parquet(tmp_path / "cells.parquet")
    a = psc.io.to_anndata(tmp_path / "cells.parquet", max_cells=1000)
    assert a.n_obs == 1000 and list(a.obs.columns) == ["cell_id", "batch"]
    rows = np.array([int(c[1:]) for c in a.obs_names])
    assert (np.diff(rows) > 0).all()  # file order kept
    np.testing.assert_array_equal(a.obsm["X_ot"], emb[rows] + 1)
    # the same seeded sample as psc.metrics.evaluate, from a LazyFrame too
    b = psc.io.to_anndata(cells.lazy(), max_cells=1000)
    assert list(b.obs_names) == list(a.obs_names)
    import scanpy as sc

    sc.pp.neighbors(a, use_rep="X_ot", n_neighbors=10)
    assert a.obsp["connectivities"].shape == (1000, 1000)
    with pytest.raises(ValueError, match="no column 'X_umap'"):
        psc.io.to_anndata(cells, obsm=("X_umap",))


def test_integrate_reads_h5ad_plates_directly_and_resumes(tmp_path):
    """One .h5ad per plate (as Tahoe-100M ships) → integrate: the same cells as
    integrating the Parquet it converts them to; a re-run converts nothing again."""
    import scipy.sparse as sp

    counts = psc.datasets.synthetic_counts(3000, n_genes=300, umis_per_cell=60, random_state=5)
    genes = pd.DataFrame(index=[f"g{i}" for i in range(300)])
    folder = tmp_path / "plates"
    folder.mkdir()
    for (b,), part in counts.group_by("batch", maintain_order=True):
        lens = part["gene_idx"].list.len().to_numpy()
        x = sp.csr_matrix((part["values"].explode().to_numpy(), part["gene_idx"].explode().to_numpy(),
                           np.concatenate([[0], np.cumsum(lens)])), shape=(part.height, 300))
        obs = pd.DataFrame({"plate": part["batch"].to_list(), "label": part["label"].to_list()}, index=part["cell_id"].to_list())
        anndata.AnnData(x, obs=obs, var=genes).write_h5ad(folder / f"{b}.h5ad")
    small = dict(batch_key="plate", n_top_genes=100, n_comps=10, n_centroids=16, log=None)
    psc.integrate(folder, tmp_path / "out", **small)
    cells = pl.read_parquet(tmp_path / "out" / "cells.parquet")
    assert cells.height == 3000 and sorted(cells["cell_id"].to_list()) == sorted(counts["cell_id"].to_list())
    parquet = pl.read_parquet(tmp_path / "out" / "source" / "*" / "part-*.parquet")
    parquet.write_parquet(tmp_path / "same.parquet")
    psc.integrate(tmp_path / "same.parquet", tmp_path / "ref", **small)
    assert cells.equals(pl.read_parquet(tmp_path / "ref" / "cells.parquet"))
    stamp = [(p, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out" / "source").rglob("*.parquet"))]
    report = psc.integrate(folder, tmp_path / "out", **small)
    assert all(s.get("resumed") for s in report["stages"].values())
    assert stamp == [(p, p.stat().st_mtime_ns) for p in sorted((tmp_path / "out" / "source").rglob("*.parquet"))]


def test_h5ad_in_small_row_groups_keeps_cells_and_obs_encodings(tmp_path, monkeypatch):
    """Read and written a few rows at a time (ROW_GROUP_ENTRIES non-zeros,
    here ~156 cells), the cells and obs columns of every encoding anndata
    writes come back whole, missing values included. (The memory this
    bounds is measured in benches/bench_io.py.)"""
    a = make_adata(3000, 400)
    n = a.n_obs
    rng = np.random.default_rng(1)
    a.obs["plate_cat"] = pd.Categorical(np.where(rng.random(n) < 0.1, None, rng.choice(["x", "y"], n)))
    a.obs["dose"] = pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(0, 5, n)), dtype="Int64")
    a.obs["flag"] = pd.array(np.where(rng.random(n) < 0.1, None, rng.random(n) < 0.5), dtype="boolean")
    a.obs["note"] = pd.array(np.where(rng.random(n) < 0.1, None, rng.choice(["u", "v"], n)), dtype="string")
    a.write_h5ad(tmp_path / "a.h5ad")
    monkeypatch.setattr(psc.io, "ROW_GROUP_ENTRIES", 5_000)
    out = psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "cells", rows_per_file=2000)
    assert len(list(out.glob("part-*.parquet"))) == 2
    df = pl.read_parquet(out / "part-*.parquet")
    x = a.X.tocsr()
    x.sort_indices()
    assert df["gene_idx"].to_list() == [x.indices[x.indptr[i]:x.indptr[i + 1]].tolist() for i in range(n)]
    for col in ("plate_cat", "note"):
        want = [None if pd.isna(v) else str(v) for v in a.obs[col]]
        assert df[col].to_list() == want, col
    assert df["dose"].to_list() == [None if pd.isna(v) else int(v) for v in a.obs["dose"]]
    assert df["flag"].to_list() == [None if pd.isna(v) else bool(v) for v in a.obs["flag"]]


def test_h5ad_without_h5py_names_the_extra(tmp_path, monkeypatch):
    import sys

    make_adata(20).write_h5ad(tmp_path / "a.h5ad")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"pip install 'polars-singlecell\[h5ad\]'"):
        psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "o")


def test_h5ad_bad_entry_in_a_later_row_group_is_a_value_error(tmp_path, monkeypatch):
    """Damage past the first row group surfaces inside Polars' sink; it must
    still be the ValueError naming the file and rows, and leave no output."""
    import h5py

    make_adata(400).write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(tmp_path / "a.h5ad", "r+") as f:
        f["X/indices"][-1] = 10**6  # a gene index beyond the 300 genes, in the last row
    monkeypatch.setattr(psc.io, "ROW_GROUP_ENTRIES", 500)
    with pytest.raises(ValueError, match=r"X in .*a\.h5ad, rows \d+\.\.400: .*1000000"):
        psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "o")
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]


def test_scan_cells_reads_an_imported_folder(tmp_path):
    """An imported folder holds genes.parquet beside the cells: scan_cells
    (like integrate) reads the cells' files only."""
    make_adata(300).write_h5ad(tmp_path / "a.h5ad")
    out = psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "cells")
    lf = psc.scan_cells(out)
    assert lf.select(pl.len()).collect().item() == 300
    assert lf.collect_schema()["gene_idx"] == pl.List(pl.UInt32)
