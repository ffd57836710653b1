"""AnnData as an entry and an exit: integrate_anndata in place (as scanpy's
harmony_integrate), from_anndata against h5ad_to_parquet, to_anndata with
var/varm/uns as scanpy writes them, write_obsm back into the plates."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc

anndata = pytest.importorskip("anndata")
sp = pytest.importorskip("scipy.sparse")
pd = pytest.importorskip("pandas")
h5py = pytest.importorskip("h5py")


def harmony_adata(harmony) -> anndata.AnnData:
    obs = pd.DataFrame({"batch": pd.Categorical(harmony["batch"].to_list()), "label": harmony["label"].to_list()},
                       index=harmony["cell_id"].to_list())
    return anndata.AnnData(obs=obs, obsm={"X_pca": harmony["embedding"].to_numpy().copy()})


def test_integrate_anndata_is_the_pipeline_steps_in_place(harmony):
    """On Harmony's cell lines: adata.obsm['X_pca_ot'] is, bit for bit, what
    the Polars steps integrate runs give for the same embedding, and the
    batches mix more than before while the cell lines stay apart."""
    a = harmony_adata(harmony)
    before = a.obsm["X_pca"].copy()
    assert psc.integrate_anndata(a, "batch") is None
    np.testing.assert_array_equal(a.obsm["X_pca"], before)  # the input is left as it was
    cells = harmony.select(pl.col("embedding").alias("X_pca"), "batch")
    cents = psc.fit_centroids(cells, batch_key="batch", min_cells_per_centroid=16)
    model = psc.fit_integration(cents, batch_key="batch")
    want = cells.select(psc.knn_interpolate("X_pca", "batch", model=model)).to_series().to_numpy()
    assert a.obsm["X_pca_ot"].dtype == np.float32
    np.testing.assert_array_equal(a.obsm["X_pca_ot"], want)
    frame = harmony.select("batch", "label", pl.col("embedding").alias("X_pca")).with_columns(
        X_ot=pl.Series(a.obsm["X_pca_ot"]))
    table = psc.metrics.evaluate(frame, ["X_pca", "X_ot"], batch_key="batch", label_key="label")
    rows = {e: dict(zip(t["metric"], t["value"])) for (e,), t in table.group_by("embedding")}
    assert rows["X_ot"]["batch_entropy"] > rows["X_pca"]["batch_entropy"] + 0.2
    assert rows["X_ot"]["label_purity"] >= rows["X_pca"]["label_purity"] - 0.005


def test_integrate_anndata_options_and_bad_input(harmony):
    a = harmony_adata(harmony)
    psc.integrate_anndata(a, "batch", adjusted_basis="X_eps", epsilon=0.1, k=4)
    b = harmony_adata(harmony)
    psc.integrate_anndata(b, "batch", adjusted_basis="X_eps")
    assert not np.array_equal(a.obsm["X_eps"], b.obsm["X_eps"])  # the options reach the fit
    with pytest.raises(ValueError, match=r"adata.obsm has no 'X_harmony' \(keys: \['X_pca'"):
        psc.integrate_anndata(a, "batch", basis="X_harmony")
    with pytest.raises(ValueError, match=r"adata.obs has no column 'plate' \(columns: \['batch', 'label'\]\)"):
        psc.integrate_anndata(a, "plate")
    a.obs["batch"] = a.obs["batch"].cat.add_categories("x")
    a.obs.iloc[7, 0] = np.nan
    with pytest.raises(ValueError, match=f"missing for cell '{a.obs_names[7]}' \\(row 7\\)"):
        psc.integrate_anndata(a, "batch", adjusted_basis="X_new")
    assert "X_new" not in a.obsm
    a.obs["batch"] = harmony["batch"].to_list()
    a.obsm["X_pca"][3, 1] = np.nan
    with pytest.raises(ValueError, match=f"non-finite value for cell '{a.obs_names[3]}' \\(row 3\\)"):
        psc.integrate_anndata(a, "batch", adjusted_basis="X_new")
    assert "X_new" not in a.obsm


def mixed_adata(n=900, g=60, seed=0) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    x = sp.random(n, g, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    x.data = np.ceil(x.data * 9).astype(np.float32)
    obs = pd.DataFrame(
        {
            "plate": pd.Categorical(np.where(rng.random(n) < 0.05, None, rng.choice(["p1", "p2"], n))),
            "dose": pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(0, 5, n)), dtype="Int64"),
            "n_counts": np.asarray(x.sum(1)).ravel(),
            "donor": rng.choice(["d1", "d2"], n).astype(object),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))


@pytest.mark.parametrize("dense", [False, True])
def test_from_anndata_writes_what_h5ad_to_parquet_writes(tmp_path, dense, monkeypatch):
    """The same AnnData, from memory and from its .h5ad file: the same cells,
    obs columns (missing values included), genes and files."""
    a = mixed_adata()
    a.write_h5ad(tmp_path / "a.h5ad")
    want = psc.io.h5ad_to_parquet(tmp_path / "a.h5ad", tmp_path / "from_file", rows_per_file=400)
    if dense:
        a.X = a.X.toarray()
    monkeypatch.setattr(psc.io, "ROW_GROUP_ENTRIES", 1_000)  # many row groups a file
    got = psc.io.from_anndata(a, tmp_path / "from_memory", rows_per_file=400)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in ("part-*.parquet", "genes.parquet"):
        assert pl.read_parquet(got / name).equals(pl.read_parquet(want / name)), name
    groups = psc._internal.parquet_row_groups([str(got / "part-00000.parquet")], ["values"])
    assert len(groups) > 1 and sum(r for r, _ in groups) == 400  # bounded: written a row group at a time


def test_from_anndata_takes_csc_and_coo_and_refuses_a_backed_anndata(tmp_path):
    a = mixed_adata()
    a.write_h5ad(tmp_path / "a.h5ad")
    want = pl.read_parquet(psc.io.from_anndata(a, tmp_path / "csr", rows_per_file=400) / "part-*.parquet")
    b = a.copy()
    b.X = a.X.tocsc()
    got = psc.io.from_anndata(b, tmp_path / "csc", rows_per_file=400)
    assert pl.read_parquet(got / "part-*.parquet").equals(want)
    # A bare COO matrix (AnnData keeps only CSR/CSC) with its obs and names.
    got = psc.io.from_anndata(a.X.tocoo(), tmp_path / "coo", obs=a.obs, var_names=a.var_names, rows_per_file=400)
    assert pl.read_parquet(got / "part-*.parquet").equals(want)
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(ValueError, match="backed by .*a.h5ad: read the file with psc.io.h5ad_to_parquet"):
        psc.io.from_anndata(backed, tmp_path / "backed")


def test_from_anndata_bare_matrix_and_bad_input(tmp_path):
    x = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3]], dtype=np.float32))
    out = psc.io.from_anndata(x, tmp_path / "cells", obs=pd.DataFrame({"plate": ["p1", "p2"]}), var_names=["A", "B", "C"])
    df = pl.read_parquet(out / "part-*.parquet")
    assert df["values"].to_list() == [[2.0], [1.0, 3.0]]
    assert pl.read_parquet(out / "genes.parquet")["gene"].to_list() == ["A", "B", "C"]
    with pytest.raises(FileExistsError):
        psc.io.from_anndata(x, out)
    with pytest.raises(ValueError, match="obs has 3 rows but the matrix has 2 cells"):
        psc.io.from_anndata(x, tmp_path / "bad", obs=pd.DataFrame({"plate": ["p1", "p2", "p3"]}))
    with pytest.raises(ValueError, match="the matrix, rows 0..2: .*non-finite value NaN of gene 1 at row 0"):
        psc.io.from_anndata(sp.csr_matrix(np.array([[0, np.nan, 0], [1, 0, 3]], dtype=np.float32)), tmp_path / "nan")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "nan").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    """Three plates as .h5ad files, integrated from the files by psc.integrate."""
    tmp = tmp_path_factory.mktemp("plates")
    counts = psc.datasets.synthetic_counts(3000, n_genes=300, umis_per_cell=60, random_state=5)
    folder = tmp / "plates"
    folder.mkdir()
    files = []
    for (b,), part in counts.group_by("batch", maintain_order=True):
        lens = part["gene_idx"].list.len().to_numpy()
        x = sp.csr_matrix((part["values"].explode().to_numpy(), part["gene_idx"].explode().to_numpy(),
                           np.concatenate([[0], np.cumsum(lens)])), shape=(part.height, 300))
        obs = pd.DataFrame({"plate": part["batch"].to_list()}, index=part["cell_id"].to_list())
        files.append(folder / f"{b}.h5ad")
        anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(300)])).write_h5ad(files[-1])
    psc.integrate(folder, tmp / "out", batch_key="plate", n_top_genes=100, n_comps=10, n_centroids=16, log=None)
    return sorted(files), tmp / "out"


def test_write_obsm_puts_x_ot_back_into_each_plate(plates, tmp_path):
    import shutil

    files = []
    for f in plates[0]:
        shutil.copy(f, tmp_path / f.name)
        files.append(tmp_path / f.name)
    cells = pl.read_parquet(plates[1] / "cells.parquet")
    with h5py.File(files[0]) as f:
        x_before = f["X"]["data"][:]
    # Files in another order than integrate read them: nothing is written.
    with pytest.raises(ValueError, match="row 0 is cell .* but the cells have"):
        psc.io.write_obsm(files[::-1], cells)
    assert all("X_pca_ot" not in anndata.read_h5ad(f).obsm for f in files)
    assert psc.io.write_obsm(tmp_path, plates[1] / "cells.parquet", rows_per_chunk=333) == files
    offset = 0
    for f in files:
        a = anndata.read_h5ad(f)
        want = cells.slice(offset, a.n_obs)
        assert list(a.obs_names) == want["cell_id"].to_list()
        np.testing.assert_array_equal(a.obsm["X_pca_ot"], want["X_ot"].to_numpy())
        offset += a.n_obs
    with h5py.File(files[0]) as f:
        np.testing.assert_array_equal(f["X"]["data"][:], x_before)  # X untouched
    psc.io.write_obsm(files, cells, key="X_pca_ot")  # again: replaced, not duplicated
    assert np.array_equal(anndata.read_h5ad(files[0]).obsm["X_pca_ot"], cells.head(anndata.read_h5ad(files[0]).n_obs)["X_ot"].to_numpy())
    with pytest.raises(ValueError, match="the files hold 1000 cells .* but the cells have 3000 rows"):
        psc.io.write_obsm(files[:1], cells)
    with pytest.raises(ValueError, match="column 'X_ot' has 1 null rows"):
        psc.io.write_obsm(files, cells.with_columns(X_ot=pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise("X_ot")))
    with pytest.raises(ValueError, match="rows_per_chunk must be a positive integer, got 0"):
        psc.io.write_obsm(files, cells, rows_per_chunk=0)


def test_to_anndata_carries_var_pcs_and_pca_as_scanpy_writes_them(plates):
    sc = pytest.importorskip("scanpy")
    out = plates[1]
    a = psc.io.to_anndata(out / "cells.parquet", max_cells=None, genes=out / "genes.parquet", pca=out / "pca.parquet")
    genes = pl.read_parquet(out / "genes.parquet").sort("gene_idx")
    model = psc.PcaModel.load(out / "pca.parquet")
    assert a.shape == (3000, 300) and list(a.var_names) == genes["gene"].to_list()
    assert a.var["highly_variable"].sum() == 100
    pcs = a.varm["PCs"]
    hv = genes["highly_variable"].to_numpy()
    np.testing.assert_array_equal(pcs[hv], model.components.T)
    assert not pcs[~hv].any()
    np.testing.assert_array_equal(a.uns["pca"]["variance_ratio"], model.explained_variance_ratio)
    # scanpy's own layout for the same call, on cells it can hold
    ref = anndata.AnnData(np.random.default_rng(0).poisson(1, (200, 300)).astype(np.float32), var=a.var[["highly_variable"]].copy())
    sc.pp.pca(ref, n_comps=10, mask_var="highly_variable")
    assert set(a.uns["pca"]) == set(ref.uns["pca"])
    assert a.uns["pca"]["params"] == ref.uns["pca"]["params"]
    assert ref.varm["PCs"].shape == pcs.shape
    sc.pp.neighbors(a, use_rep="X_ot")  # scanpy takes it from here
    with pytest.raises(ValueError, match="the PCA model has 100 genes but the genes table has 5"):
        psc.io.to_anndata(out / "cells.parquet", genes=genes.head(5).drop("highly_variable"), pca=model)


def test_integrate_checks_the_h5ad_keys_before_importing(plates, tmp_path):
    with pytest.raises(ValueError, match=r"has no obs column 'batch' \(columns: \['plate'\]\)"):
        psc.integrate(plates[0][0].parent, tmp_path / "out", log=None)
    assert not (tmp_path / "out" / "source").exists()  # nothing imported


@pytest.mark.parametrize("missing", ["anndata", "pandas"])
def test_anndata_paths_without_the_extra_name_it(missing, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)
    cells = pl.DataFrame({"X_ot": pl.Series([[0.0, 1.0]], dtype=pl.Array(pl.Float32, 2))})
    with pytest.raises(ImportError, match=rf"needs {missing}: pip install 'polars-singlecell\[h5ad\]'"):
        psc.io.to_anndata(cells, obsm=("X_ot",))
