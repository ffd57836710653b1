"""psc.metrics against the reference implementations, on the real data in
../shared/data (Harmony's cell lines, CellBench mixology) and generated data:
harmonypy's compute_lisi, scikit-learn (NearestNeighbors, KNeighborsClassifier,
trustworthiness, silhouette_samples/silhouette_score, KMeans,
normalized_mutual_info_score, adjusted_rand_score), scanpy's neighbour graph +
SciPy connected components (scib's graph connectivity), and NumPy for the
reference method's and scib-metrics' definitions (silhouette_batch,
isolated_labels, the aggregate score)."""

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

    x_i, _b_i, l_i = islands()
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
    assert M.trustworthiness(x, y, 30, n_cells=1000, random_state=0) == pytest.approx(trustworthiness(x[rows], y[rows], n_neighbors=30), abs=1e-7)


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
    expect = {
        "n_cells", "batch_entropy", "batch_entropy_norm", "ilisi", "clisi", "label_purity", "label_transfer",
        "graph_connectivity", "silhouette_label", "silhouette_batch", "isolated_labels", "nmi", "ari",
        "bio_conservation", "batch_correction", "overall",
    }
    assert {m for e, m in got if e == "X_pca"} == expect
    assert {m for e, m in got if e == "X_ot"} == expect | {"overlap0", "strain", "tw"}
    # the numbers are the functions' own
    idx, _ = M.neighbors(x, 30)
    assert got["X_pca", "label_purity"] == M.label_purity(idx, harmony["label"])
    assert got["X_pca", "n_cells"] == len(x)
    # 2,370 cells < silhouette_cells: the silhouettes see every cell
    lab, bat = harmony["label"], harmony["batch"]
    assert got["X_pca", "silhouette_label"] == pytest.approx(M.silhouette_label(x, lab), rel=1e-12)
    assert got["X_pca", "silhouette_batch"] == pytest.approx(M.silhouette_batch(x, lab, bat), rel=1e-12)
    assert got["X_pca", "isolated_labels"] == pytest.approx(M.isolated_labels(x, lab, bat), rel=1e-12)
    clusters = M.nmi_ari_cluster_labels_kmeans(x, lab, random_state=0)
    assert (got["X_pca", "nmi"], got["X_pca", "ari"]) == (clusters["nmi"], clusters["ari"])
    for e in ("X_pca", "X_ot"):
        agg = M.aggregate({m: v for (e2, m), v in got.items() if e2 == e})
        assert [got[e, k] for k in agg] == list(agg.values())
    # eager = lazy over Parquet
    path = tmp_path / "cells.parquet"
    cells.write_parquet(path, row_group_size=500)
    lazy = psc.metrics.evaluate(pl.scan_parquet(path), ["X_pca", "X_ot"], batch_key="batch", label_key="label")
    assert lazy.equals(table)


def test_evaluate_samples_the_same_cells_deterministically(harmony):
    cells = harmony.select("batch", pl.col("embedding").alias("X_pca"))
    a = psc.metrics.evaluate(cells, ["X_pca"], max_cells=1000, random_state=5)
    b = psc.metrics.evaluate(cells, ["X_pca"], max_cells=1000, random_state=5)
    c = psc.metrics.evaluate(cells, ["X_pca"], max_cells=1000, random_state=6)
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
        assert psc.metrics.evaluate(cells, ["X_pca"], label_key="label").height == 16
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


# ------------------------------------------- scIB's silhouettes, NMI/ARI


def scib_silhouette_batch(x: np.ndarray, lab: np.ndarray, bat: np.ndarray) -> float:
    """scib-metrics' silhouette_batch, written out with scikit-learn's silhouette_samples."""
    from sklearn.metrics import silhouette_samples

    per_label = []
    for c in np.unique(lab):
        m = lab == c
        n_b = len(np.unique(bat[m]))
        if n_b == 1 or n_b == m.sum():
            continue
        per_label.append(np.mean(1 - np.abs(silhouette_samples(x[m].astype(np.float64), bat[m]))))
    return float(np.mean(per_label))


def scib_isolated_labels(x: np.ndarray, lab: np.ndarray, bat: np.ndarray) -> float:
    """scib-metrics' isolated_labels (ASW, rescaled, iso_threshold=None), written out."""
    from sklearn.metrics import silhouette_samples

    pairs = pd.DataFrame({"label": lab, "batch": bat}).drop_duplicates()
    per_label = pairs.groupby("label")["batch"].count()
    isolated = per_label[per_label <= per_label.min()].index
    s = (silhouette_samples(x.astype(np.float64), lab) + 1) / 2
    return float(np.mean([s[lab == c].mean() for c in isolated]))


def test_silhouette_label_equals_scikit_learn(real, monkeypatch):
    from sklearn.metrics import silhouette_samples, silhouette_score

    for name, x, _, label in real:
        lab = label.to_numpy()
        ref = (silhouette_score(x.astype(np.float64), lab) + 1) / 2
        assert M.silhouette_label(x, label) == pytest.approx(ref, rel=1e-12), name
        per_cell = silhouette_samples(x.astype(np.float64), lab)
        np.testing.assert_allclose(M._silhouette_samples(x, M._codes(label, "l")[0]), per_cell, rtol=0, atol=1e-12, err_msg=name)
    # blocks of 7 rows (339 of them) give the same per-cell values as one block of all
    x, lab = real[0][1], real[0][3]
    whole = M._silhouette_samples(x, M._codes(lab, "l")[0])
    monkeypatch.setattr(M, "_BLOCK_BYTES", 8 * len(x) * 7)
    np.testing.assert_allclose(M._silhouette_samples(x, M._codes(lab, "l")[0]), whole, rtol=0, atol=1e-13)


def test_silhouette_label_singletons_score_zero():
    """A label with one cell: scikit-learn's (and scib-metrics') 0 for that cell."""
    from sklearn.metrics import silhouette_samples

    x = np.array([[0.0, 0], [1, 0], [0, 1], [9, 9], [9, 8], [20, 20]])
    lab = ["a", "a", "a", "b", "b", "c"]
    assert M.silhouette_label(x, lab) == pytest.approx((silhouette_samples(x, lab).mean() + 1) / 2, rel=1e-12)
    assert M._silhouette_samples(x.astype(np.float32), M._codes(lab, "l")[0])[5] == 0.0


def test_silhouette_batch_equals_scib_definition(real):
    for name, x, batch, label in real:
        ours = M.silhouette_batch(x, label, batch)
        assert ours == pytest.approx(scib_silhouette_batch(x, label.to_numpy(), batch.to_numpy()), rel=1e-12), name
    # Labels scib-metrics skips: "c" (one batch) and "d" (every cell its own batch).
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    lab = np.array(["a"] * 80 + ["b"] * 80 + ["c"] * 37 + ["d"] * 3)
    bat = np.concatenate([rng.choice(["p", "q"], 160), ["p"] * 37, ["p", "q", "r"]])
    bat[:40] = "p"  # label a: batch p on one side of the embedding, so batches are not mixed there
    x[:40] += 3
    ours = M.silhouette_batch(x, lab, bat)
    assert ours == pytest.approx(scib_silhouette_batch(x, lab, bat), rel=1e-12)
    keep = np.isin(lab, ["a", "b"])
    assert ours == pytest.approx(scib_silhouette_batch(x[keep], lab[keep], bat[keep]), rel=1e-12)
    assert ours < 0.95  # the separated batches in label a count


def test_isolated_labels_equal_scib_definition(real):
    from sklearn.metrics import silhouette_samples

    # CellBench: A549 and H838 are in 3 batches, the other three lines in 5
    _, x, batch, label = real[1]
    ours = M.isolated_labels(x, label, batch)
    lab = label.to_numpy()
    assert ours == pytest.approx(scib_isolated_labels(x, lab, batch.to_numpy()), rel=1e-12)
    s = (silhouette_samples(x.astype(np.float64), lab) + 1) / 2
    assert ours == pytest.approx((s[lab == "A549"].mean() + s[lab == "H838"].mean()) / 2, rel=1e-12)
    # generated: "iso" is only in batch p, and sits between the others (a poor score)
    rng = np.random.default_rng(11)
    lab = np.repeat(["a", "b", "iso"], [150, 150, 60])
    centres = {"a": [0.0, 0], "b": [6.0, 0], "iso": [3.0, 0.5]}
    x = (np.array([centres[c] for c in lab]) + rng.normal(size=(360, 2))).astype(np.float32)
    bat = np.where(lab == "iso", "p", rng.choice(["p", "q", "r"], 360))
    ours = M.isolated_labels(x, lab, bat)
    assert ours == pytest.approx(scib_isolated_labels(x, lab, bat), rel=1e-12)
    s = (silhouette_samples(x.astype(np.float64), lab) + 1) / 2
    assert ours == pytest.approx(s[lab == "iso"].mean(), rel=1e-12)
    assert ours < M.silhouette_label(x, lab) - 0.05  # it is the isolated label's score, not the ASW
    # two labels tied for fewest batches: the mean of both labels' scores
    bat2 = np.where(lab == "b", "q", bat)
    assert M.isolated_labels(x, lab, bat2) == pytest.approx((s[lab == "iso"].mean() + s[lab == "b"].mean()) / 2, rel=1e-12)


def test_nmi_ari_equal_scikit_learn(real):
    """Harmony's cell lines are well separated: our k-means (kmeans_centroids)
    and scikit-learn's KMeans(n_init=1) find the same two clusters, so NMI
    and ARI agree to rounding whatever the seeds."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    _, x, _, label = real[0]
    lab = label.to_numpy()
    for seed in (0, 1):
        ref = KMeans(n_clusters=2, n_init=1, random_state=seed).fit(x.astype(np.float64)).labels_
        assert adjusted_rand_score(ref, M._kmeans_labels(x, 2, seed)) == 1.0  # the same partition
        ours = M.nmi_ari_cluster_labels_kmeans(x, label, random_state=seed)
        assert ours["nmi"] == pytest.approx(normalized_mutual_info_score(lab, ref, average_method="arithmetic"), abs=1e-12)
        assert ours["ari"] == pytest.approx(adjusted_rand_score(lab, ref), abs=1e-12)
        assert 0.99 < ours["nmi"] < 1 and 0.99 < ours["ari"] < 1  # a few cells sit with the other line
    # The scores themselves are scikit-learn's, on any pair of labellings (real ones included).
    rng = np.random.default_rng(5)
    _, xc, _, lc = real[1]
    pairs = [
        (lc.to_numpy(), KMeans(n_clusters=5, n_init=1, random_state=0).fit(xc.astype(np.float64)).labels_),
        (rng.integers(0, 4, 500), rng.integers(0, 7, 500)),
        (rng.integers(0, 3, 300), rng.integers(0, 3, 300)),
        (np.zeros(10, int), np.zeros(10, int)),  # no split on either side: 1
        (np.zeros(10, int), np.arange(10) % 2),  # one side unsplit: NMI 0, ARI 0
        (np.arange(6), np.arange(6)[::-1]),  # identical partitions, renamed
        (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])),  # ARI −0.5
    ]
    for t, p in pairs:
        assert M._nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p), rel=1e-12, abs=1e-15)
        assert M._ari(t, p) == pytest.approx(adjusted_rand_score(t, p), rel=1e-12, abs=1e-15)
    assert M._ari(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == -0.5


def test_aggregate_is_scib_weighting():
    values = {
        "isolated_labels": 0.5, "nmi": 0.9, "ari": 0.8, "silhouette_label": 0.6, "clisi": 1.0,
        "silhouette_batch": 0.7, "ilisi": 0.2, "graph_connectivity": 0.9,
        "label_purity": 0.0, "batch_entropy_norm": 0.0, "label_transfer": 0.0,  # reported, not scIB: ignored
    }
    got = M.aggregate(values)
    assert got["bio_conservation"] == pytest.approx((0.5 + 0.9 + 0.8 + 0.6 + 1.0) / 5, rel=1e-15)
    assert got["batch_correction"] == pytest.approx((0.7 + 0.2 + 0.9) / 3, rel=1e-15)
    assert got["overall"] == pytest.approx(0.6 * 0.76 + 0.4 * 0.6, rel=1e-15)
    # NaN (e.g. iLISI with one batch) is left out of its group, as pandas' mean
    got = M.aggregate({**values, "ilisi": float("nan")})
    assert got["batch_correction"] == pytest.approx(0.8, rel=1e-15)
    assert np.isnan(M.aggregate({"nmi": 0.5})["overall"])  # no batch-correction metric at all


def test_evaluate_silhouettes_on_a_sub_sample(harmony):
    cells = harmony.select("batch", "label", pl.col("embedding").alias("X_pca"))
    table = psc.metrics.evaluate(cells, ["X_pca"], label_key="label", silhouette_cells=800, random_state=3)
    got = dict(zip(table["metric"], table["value"]))
    rows = M._sample(harmony.height, 800, 3)
    x = harmony["embedding"].to_numpy().astype(np.float32)
    lab, bat = harmony["label"].gather(rows), harmony["batch"].gather(rows)
    assert got["silhouette_label"] == pytest.approx(M.silhouette_label(x[rows], lab), rel=1e-12)
    assert got["silhouette_batch"] == pytest.approx(M.silhouette_batch(x[rows], lab, bat), rel=1e-12)
    assert got["isolated_labels"] == pytest.approx(M.isolated_labels(x[rows], lab, bat), rel=1e-12)
    assert got["silhouette_label"] != pytest.approx(M.silhouette_label(x, harmony["label"]), rel=1e-9)
    # k-means clusters every sampled cell, not the sub-sample
    assert got["nmi"] == M.nmi_ari_cluster_labels_kmeans(x, harmony["label"], random_state=3)["nmi"]
    with pytest.raises(ValueError, match="silhouette_cells must be an integer ≥ 2, got 1"):
        psc.metrics.evaluate(cells, ["X_pca"], label_key="label", silhouette_cells=1)


def test_evaluate_one_label_gives_nan_not_an_error(harmony):
    cells = harmony.filter(label="jurkat").select("batch", "label", pl.col("embedding").alias("X_pca"))
    got = dict(zip(*psc.metrics.evaluate(cells, ["X_pca"], label_key="label").select("metric", "value")))
    for m in ("clisi", "silhouette_label", "isolated_labels", "nmi", "ari", "bio_conservation", "overall"):
        assert np.isnan(got[m]), m
    assert 0 < got["silhouette_batch"] <= 1 and 0 < got["batch_correction"] <= 1


def test_new_metrics_bad_input():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    lab, bat = ["a", "b"] * 10, ["p"] * 10 + ["q"] * 10
    for f, args in [
        (M.silhouette_label, (lab[:19],)),
        (M.silhouette_batch, (lab[:19], bat)),
        (M.isolated_labels, (lab[:19], bat)),
        (M.nmi_ari_cluster_labels_kmeans, (lab[:19],)),
    ]:
        with pytest.raises(ValueError, match="labels has 19 values but the embedding has 20 cells"):
            f(x, *args)
    with pytest.raises(ValueError, match="batch has 21 values but the embedding has 20 cells"):
        M.silhouette_batch(x, lab, bat + ["q"])
    y = x.copy()
    y[3, 2] = np.nan
    for f, args in [(M.silhouette_label, (lab,)), (M.silhouette_batch, (lab, bat)), (M.isolated_labels, (lab, bat)), (M.nmi_ari_cluster_labels_kmeans, (lab,))]:
        with pytest.raises(ValueError, match="embedding holds nan at row 3"):
            f(y, *args)
    for f, args in [(M.silhouette_label, ()), (M.isolated_labels, (bat,)), (M.nmi_ari_cluster_labels_kmeans, ())]:
        with pytest.raises(ValueError, match=r"needs at least 2 labels to tell apart, got 1 \('a'\)"):
            f(x, ["a"] * 20, *args)
    with pytest.raises(ValueError, match="silhouette_batch needs a label whose cells come from 2 or more batches"):
        M.silhouette_batch(x, ["a"] * 10 + ["b"] * 10, bat)  # each label in one batch
    with pytest.raises(ValueError, match="column 'labels' is null at row 2"):
        M.silhouette_label(x, ["a", "b", None] + ["a"] * 17)
    with pytest.raises(ValueError, match=r"random_state must be an integer in \[0, 2\*\*64\), got -1"):
        M.nmi_ari_cluster_labels_kmeans(x, lab, random_state=-1)
