"""psc.metrics against the reference implementations, on the real data in
../shared/data (Harmony's cell lines, CellBench mixology) and generated data:
harmonypy's compute_lisi, scikit-learn (NearestNeighbors, KNeighborsClassifier,
trustworthiness), scanpy's neighbour graph + SciPy connected components (scib's
graph connectivity), and NumPy for the reference method's definitions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import polars_singlecell as psc
from polars_singlecell import metrics as M


@pytest.fixture(scope="module")
def real(harmony, cellbench_pca):
    """(name, embedding, batch, label) of both labelled real sets."""
    return [
        ("harmony", harmony["embedding"].to_numpy().astype(np.float32), harmony["batch"], harmony["label"]),
        ("cellbench", cellbench_pca["X_pca"].to_numpy(), cellbench_pca["batch"], cellbench_pca["label"]),
    ]


def sk_neighbors(x: np.ndarray, k: int):
    """Exact float64 neighbours from scikit-learn, self dropped."""
    d, i = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x.astype(np.float64)).kneighbors(x.astype(np.float64))
    return i[:, 1:], d[:, 1:]


def islands(seed: int = 0):
    """Two labels; label 1 sits in two far-apart islands, so its graph
    connectivity is below 1; three batches spread over everything."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [40, 0], [0, 40]], dtype=np.float32)
    which = rng.integers(0, 3, 900)
    x = (centres[which] + rng.normal(size=(900, 2))).astype(np.float32)
    label = np.where(which == 0, "a", "b")
    batch = rng.choice(["p", "q", "r"], 900)
    return x, batch, label


def test_neighbors_equal_scikit_learn(real):
    for name, x, *_ in real:
        idx, dist = M.neighbors(x, 30)
        ref_i, ref_d = sk_neighbors(x, 30)
        assert np.array_equal(np.sort(idx, 1), np.sort(ref_i, 1)), name
        np.testing.assert_allclose(dist, ref_d, rtol=1e-6, atol=1e-6, err_msg=name)


def test_neighbors_exclude_self_even_with_duplicates():
    # Five copies, k = 2: the k + 1 = 3 nearest of copy 4 are copies 0, 1, 2
    # (ties to the lower row), so itself is not among them and the last goes.
    x = np.array([[0.0, 0]] * 5 + [[5, 5]], dtype=np.float32)
    idx, dist = M.neighbors(x, 2)
    assert all(i not in row for i, row in enumerate(idx))
    assert idx[4].tolist() == [0, 1] and dist[:5].max() == 0.0 and idx.shape == (6, 2)


def test_neighbors_same_bits_at_one_and_two_threads(tmp_path):
    """Large enough (6000 × 6000) that the search splits into small tasks."""
    script = textwrap.dedent(
        """
        import sys, numpy as np, polars_singlecell as psc
        x = np.random.default_rng(4).normal(size=(6000, 10)).astype(np.float32)
        idx, dist = psc.metrics.neighbors(x, 30)
        np.save(sys.argv[1], np.concatenate([idx.astype(np.float64), dist.astype(np.float64)], axis=1))
        """
    )
    outs = []
    for threads in ("1", "2"):
        path = tmp_path / f"n{threads}.npy"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=dict(os.environ, POLARS_MAX_THREADS=threads))
        outs.append(np.load(path))
    assert np.array_equal(outs[0], outs[1])


def test_lisi_equals_harmonypy(real):
    """harmonypy's search stops when the entropy is within 1e-5 nats of
    ln(perplexity); float32 vs float64 distances may stop it one bisection step
    apart, which moves LISI by ~1e-5 relative. Hence rtol 1e-4, not 1e-7."""
    from harmonypy import compute_lisi

    for name, x, batch, label in real:
        meta = pd.DataFrame({"batch": batch.to_numpy(), "label": label.to_numpy()})  # no pyarrow needed
        ref = compute_lisi(x, meta, ["batch", "label"], perplexity=30)
        idx, dist = M.neighbors(x, 90)
        for j, lab in enumerate([batch, label]):
            ours = M.lisi(idx, dist, lab, 30)
            np.testing.assert_allclose(ours, ref[:, j], rtol=1e-4, err_msg=f"{name} {lab.name}")
        n_b, n_c = batch.n_unique(), label.n_unique()
        # scib-metrics' scaling of the medians
        assert M.ilisi(M.lisi(idx, dist, batch), n_b) == pytest.approx((np.median(ref[:, 0]) - 1) / (n_b - 1), rel=1e-4)
        assert M.clisi(M.lisi(idx, dist, label), n_c) == pytest.approx((n_c - np.median(ref[:, 1])) / (n_c - 1), rel=1e-4)


def test_batch_entropy_and_purity_equal_numpy(real):
    for name, x, batch, label in real:
        ref_i, _ = sk_neighbors(x, 30)
        b = batch.to_numpy()
        ents = []
        for row in ref_i:
            _, counts = np.unique(b[row], return_counts=True)
            p = counts / counts.sum()
            ents.append(-(p * np.log(p)).sum())
        idx, _ = M.neighbors(x, 30)
        mix, norm = M.batch_entropy(idx, batch)
        assert mix == pytest.approx(np.mean(ents), rel=1e-12), name
        assert norm == pytest.approx(np.mean(ents) / np.log(len(np.unique(b))), rel=1e-12), name
        lab = label.to_numpy()
        assert M.label_purity(idx, label) == pytest.approx((lab[ref_i] == lab[:, None]).mean(), rel=1e-12), name


def test_label_transfer_equals_scikit_learn(real):
    for name, x, batch, label in real:
        b, lab = batch.to_numpy(), label.to_numpy()
        correct = 0
        for g in np.unique(b):
            clf = KNeighborsClassifier(n_neighbors=30, algorithm="brute").fit(x[b != g], lab[b != g])
            correct += int((clf.predict(x[b == g]) == lab[b == g]).sum())
        assert M.label_transfer(x, batch, label) == pytest.approx(correct / len(b), abs=0), name


def test_graph_connectivity_equals_scib_definition(real):
    """scib: scanpy's neighbour graph (n_neighbors=15), per label the largest
    connected component of the label's subgraph, averaged."""
    import anndata as ad
    import scanpy as sc
    from scipy.sparse.csgraph import connected_components

    x_i, b_i, l_i = islands()
    cases = [(n, x, lab.to_numpy()) for n, x, _, lab in real] + [("islands", x_i, l_i)]
    for name, x, lab in cases:
        a = ad.AnnData(X=np.zeros((len(x), 1), dtype=np.float32))
        a.obsm["X"] = x
        sc.pp.neighbors(a, use_rep="X", n_neighbors=15)
        ref = []
        for c in np.unique(lab):
            _, comp = connected_components(a.obsp["connectivities"][lab == c][:, lab == c], connection="strong")
            ref.append(np.bincount(comp).max() / (lab == c).sum())
        idx, _ = M.neighbors(x, 14)
        assert M.graph_connectivity(idx, lab) == pytest.approx(np.mean(ref), rel=1e-12), name
    assert M.graph_connectivity(M.neighbors(x_i, 14)[0], l_i) < 0.9  # the islands case can fail


def test_trustworthiness_equals_scikit_learn(harmony):
    from sklearn.manifold import trustworthiness

    x = harmony["embedding"].to_numpy().astype(np.float32)
    rng = np.random.default_rng(1)
    for noise in (0.1, 1.0):
        y = (x + rng.normal(size=x.shape) * noise).astype(np.float32)
        ours = M.trustworthiness(x, y, 30, n_cells=5000)
        assert ours == pytest.approx(trustworthiness(x, y, n_neighbors=30), abs=1e-7)
    # the sample: 1000 of the 2370 cells, the same as scikit-learn on those rows
    rows = np.sort(np.random.default_rng(0).choice(len(x), 1000, replace=False))
    assert M.trustworthiness(x, y, 30, n_cells=1000, seed=0) == pytest.approx(trustworthiness(x[rows], y[rows], n_neighbors=30), abs=1e-7)


def test_overlap0_and_strain_equal_numpy(harmony):
    x = harmony["embedding"].to_numpy().astype(np.float32)
    y = (x * np.linspace(0.5, 2, x.shape[1]) + np.random.default_rng(2).normal(size=x.shape) * 0.3).astype(np.float32)
    ia, _ = sk_neighbors(x, 30)
    ib, _ = sk_neighbors(y, 30)
    ref = np.mean([len(set(a) & set(b)) / 30 for a, b in zip(ia, ib)])
    assert M.overlap0(x, y, 30, n_cells=5000) == pytest.approx(ref, rel=1e-12)
    assert M.overlap0(x, x, 30) == 1.0
    i20, d0 = sk_neighbors(x, 20)
    d1 = np.linalg.norm(y[:, None, :].astype(np.float64) - y[i20].astype(np.float64), axis=2)
    ref = np.mean(np.clip(d1 / d0 - 1, -1, 1) ** 2)
    assert M.strain(x, y, 20) == pytest.approx(ref, rel=1e-5)
    assert M.strain(x, x, 20) == 0.0


def test_evaluate_tidy_and_engine_independent(tmp_path, harmony):
    rng = np.random.default_rng(3)
    x = harmony["embedding"].to_numpy().astype(np.float32)
    cells = harmony.select("batch", "label", pl.col("embedding").alias("X_pca")).with_columns(
        X_ot=pl.Series((x + rng.normal(size=x.shape) * 0.2).astype(np.float32), dtype=pl.Array(pl.Float32, 20))
    )
    table = psc.metrics.evaluate(cells, ["X_pca", "X_ot"], batch_key="batch", label_key="label")
    assert table.schema == pl.Schema({"embedding": pl.String, "metric": pl.String, "value": pl.Float64})
    got = {(e, m): v for e, m, v in table.iter_rows()}
    expect = {"n_cells", "batch_entropy", "batch_entropy_norm", "ilisi", "clisi", "label_purity", "label_transfer", "graph_connectivity"}
    assert {m for e, m in got if e == "X_pca"} == expect
    assert {m for e, m in got if e == "X_ot"} == expect | {"overlap0", "strain", "tw"}
    # the numbers are the functions' own
    idx, _ = M.neighbors(x, 30)
    assert got["X_pca", "label_purity"] == M.label_purity(idx, harmony["label"])
    assert got["X_pca", "n_cells"] == len(x)
    # eager = lazy over Parquet
    path = tmp_path / "cells.parquet"
    cells.write_parquet(path, row_group_size=500)
    lazy = psc.metrics.evaluate(pl.scan_parquet(path), ["X_pca", "X_ot"], batch_key="batch", label_key="label")
    assert lazy.equals(table)


def test_evaluate_samples_the_same_cells_deterministically(harmony):
    cells = harmony.select("batch", pl.col("embedding").alias("X_pca"))
    a = psc.metrics.evaluate(cells, ["X_pca"], max_cells=1000, seed=5)
    b = psc.metrics.evaluate(cells, ["X_pca"], max_cells=1000, seed=5)
    c = psc.metrics.evaluate(cells, ["X_pca"], max_cells=1000, seed=6)
    assert a.equals(b) and not a.equals(c)
    assert a.filter(metric="n_cells")["value"].item() == 1000


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.with_columns(batch=pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise("batch")), "column 'batch' is null at row 7"),
        (lambda c: c.with_columns(X_pca=pl.col("X_pca").cast(pl.Array(pl.Float64, 20))), None),
        (lambda c: c.drop("label"), "column 'label' is not in the cells"),
        (lambda c: c.head(50), "n_neighbors=90 needs more than 90 cells, got 50"),
    ],
)
def test_evaluate_bad_input(harmony, change, match):
    cells = change(harmony.select("batch", "label", pl.col("embedding").alias("X_pca")))
    if match is None:  # a Float64 embedding is cast, not refused: metrics only read it
        assert psc.metrics.evaluate(cells, ["X_pca"], label_key="label").height == 8
        return
    with pytest.raises((ValueError, pl.exceptions.ColumnNotFoundError), match=match):
        psc.metrics.evaluate(cells, ["X_pca"], label_key="label")


def test_bad_arrays():
    x = np.ones((10, 3), dtype=np.float32)
    x[4, 1] = np.nan
    with pytest.raises(ValueError, match="holds nan at row 4"):
        M.neighbors(x, 3)
    with pytest.raises(ValueError, match="n_neighbors must be a positive integer"):
        M.neighbors(np.ones((10, 3)), 0)
    with pytest.raises(ValueError, match="start has 10 cells but result has 9"):
        M.strain(np.ones((10, 3)), np.ones((9, 3)))
    with pytest.raises(ValueError, match="needs at least 2 batches"):
        M.label_transfer(np.ones((40, 3)), ["a"] * 40, ["x"] * 40)
