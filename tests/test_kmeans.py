"""kmeans_centroids and fit_centroids against scikit-learn's KMeans on real embeddings
(CellBench mixology PCA, Harmony's cell-line PCs) and generated blobs; masses,
determinism across threads and engines, sampling, and bad input."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin_min

import polars_singlecell as psc

SEEDS = range(5)


def blobs(n: int, d: int, n_blobs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 1 / np.sqrt(np.arange(1, d + 1))
    centres = rng.normal(size=(n_blobs, d)) * scales * 4
    return (centres[rng.integers(0, n_blobs, n)] + rng.normal(size=(n, d)) * scales).astype(np.float32)


def frame(x: np.ndarray, **extra) -> pl.DataFrame:
    return pl.DataFrame({"X": x, **extra}, schema_overrides={"X": pl.Array(pl.Float32, x.shape[1])})


def inertia(x: np.ndarray, centres: np.ndarray) -> float:
    _, dist = pairwise_distances_argmin_min(x.astype(np.float64), centres.astype(np.float64))
    return float((dist**2).sum())


def ours(x: np.ndarray, k: int, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    out = frame(x).select(psc.kmeans_centroids("X", n_centroids=k, random_state=seed, **kw)).unnest("centroids")
    return out["centroid"][0].to_numpy(), out["mass"][0].to_numpy()


def compare_with_sklearn(x: np.ndarray, k: int) -> tuple[float, float]:
    """Mean inertia over the same seeds, ours vs KMeans(n_init=1, init="k-means++"), both
    with scikit-learn's defaults max_iter=300, tol=1e-4. k-means lands in a local optimum
    that depends on the seed, so one run each would compare luck, not algorithms."""
    mine = [inertia(x, ours(x, k, s)[0]) for s in SEEDS]
    ref = [KMeans(k, n_init=1, init="k-means++", random_state=s).fit(x).inertia_ for s in SEEDS]
    return float(np.mean(mine)), float(np.mean(ref))


@pytest.mark.parametrize("k", [16, 64])
def test_inertia_matches_sklearn_on_cellbench_pca(cellbench_pca, k):
    x = cellbench_pca["X_pca"].to_numpy()
    mine, ref = compare_with_sklearn(x, k)
    assert mine <= 1.01 * ref, (mine, ref)


@pytest.mark.parametrize("k", [8, 100])
def test_inertia_matches_sklearn_on_harmony_cell_lines(harmony, k):
    x = harmony["embedding"].to_numpy()
    mine, ref = compare_with_sklearn(x, k)
    assert mine <= 1.01 * ref, (mine, ref)


def test_inertia_matches_sklearn_on_generated_blobs():
    x = blobs(20_000, 10, 50, seed=3)
    mine, ref = compare_with_sklearn(x, 100)
    assert mine <= 1.01 * ref, (mine, ref)


def test_masses_count_the_nearest_cells_and_sum_to_the_batch(harmony):
    out = harmony.group_by("batch").agg(psc.kmeans_centroids("embedding", n_centroids=50), n=pl.len())
    out = out.unnest("centroids")
    for row in out.iter_rows(named=True):
        x = harmony.filter(pl.col("batch") == row["batch"])["embedding"].to_numpy()
        centres = np.array(row["centroid"], dtype=np.float32)
        labels, _ = pairwise_distances_argmin_min(x.astype(np.float64), centres.astype(np.float64))
        np.testing.assert_array_equal(np.bincount(labels, minlength=len(centres)), row["mass"])
        assert sum(row["mass"]) == row["n"]


def test_weights_are_masses_and_pull_centroids():
    x = np.array([[0, 0], [1, 0], [10, 10], [11, 10]], dtype=np.float32)
    df = frame(x, w=[3.0, 1.0, 1.0, 1.0])
    out = df.select(psc.kmeans_centroids("X", n_centroids=2, weights="w")).unnest("centroids")
    got = sorted(zip(out["centroid"][0].to_list(), out["mass"][0].to_list()))
    assert got[0][0] == pytest.approx([0.25, 0.0]) and got[0][1] == 4.0
    assert got[1][0] == pytest.approx([10.5, 10.0]) and got[1][1] == 2.0


def test_more_centroids_than_distinct_cells_gives_each_distinct_cell():
    x = np.array([[1, 2], [1, 2], [3, 4], [5, 6], [3, 4]], dtype=np.float32)
    centres, mass = ours(x, 10, 0)
    np.testing.assert_array_equal(centres, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(mass, [2, 2, 1])


def test_same_result_in_every_engine_and_with_over(harmony):
    q = harmony.lazy().group_by("batch").agg(psc.kmeans_centroids("embedding", n_centroids=20, random_state=4))
    eager = harmony.group_by("batch").agg(
        psc.kmeans_centroids("embedding", n_centroids=20, random_state=4)
    ).sort("batch")
    for engine in ["in-memory", "streaming"]:
        assert q.collect(engine=engine).sort("batch").equals(eager), engine
    over = harmony.with_columns(
        psc.kmeans_centroids("embedding", n_centroids=20, random_state=4).over("batch")
    ).unique("batch").select("batch", "centroids").sort("batch")
    assert over.equals(eager.select("batch", "centroids"))
    other_seed = harmony.group_by("batch").agg(psc.kmeans_centroids("embedding", n_centroids=20, random_state=5))
    assert not other_seed.sort("batch").equals(eager)


def test_fit_centroids_equals_the_expression_when_nothing_is_sampled_away(harmony):
    fit = psc.fit_centroids(harmony, embedding="embedding", batch_key="batch", n_centroids=30, max_iter=300)
    expr = (
        harmony.group_by("batch", maintain_order=True)
        .agg(psc.kmeans_centroids("embedding", n_centroids=30))
        .unnest("centroids")
        .explode("centroid", "mass")
        .sort("batch", maintain_order=True)
    )
    assert fit["batch"].to_list() == expr["batch"].to_list()
    np.testing.assert_array_equal(fit["centroid"].to_numpy(), expr["centroid"].to_numpy())
    np.testing.assert_array_equal(fit["mass"].to_numpy(), expr["mass"].to_numpy())
    assert fit["centroid_id"].to_list() == [i for b in ["half", "jurkat", "t293"] for i in range(30)]


def test_fit_centroids_samples_deterministically_whatever_the_batching(tmp_path):
    x = blobs(30_000, 6, 20, seed=1)
    plate = np.where(np.arange(30_000) % 3 == 0, "p1", "p2")
    df = frame(x, plate=plate)
    a, sa = psc.fit_centroids(
        df, embedding="X", batch_key="plate", n_centroids=40, max_samples_per_batch=5000, n_threads=1, summary=True
    )
    df.write_parquet(tmp_path / "cells.parquet", row_group_size=777)
    b = psc.fit_centroids(
        pl.scan_parquet(tmp_path / "cells.parquet"),
        embedding="X",
        batch_key="plate",
        n_centroids=40,
        max_samples_per_batch=5000,
        n_threads=2,
    )
    assert a.equals(b)
    assert sa["n_cells"].to_list() == [10_000, 20_000]
    assert sa["n_sampled"].to_list() == [5000, 5000]
    for p, n in [("p1", 10_000), ("p2", 20_000)]:
        assert a.filter(pl.col("plate") == p)["mass"].sum() == pytest.approx(n, rel=1e-12)
    c = psc.fit_centroids(
        df, embedding="X", batch_key="plate", n_centroids=40, max_samples_per_batch=5000, random_state=1
    )
    assert not np.array_equal(a["centroid"].to_numpy(), c["centroid"].to_numpy())


def test_low_memory_gives_the_same_centroids_bit_for_bit(tmp_path):
    # Three plates interleaved: one under the cap (every cell kept), two over it.
    x = blobs(24_000, 5, 15, seed=4)
    plate = np.array(["p1", "p2", "p3"], dtype="<U8")[np.arange(24_000) % 7 % 3]
    plate[np.arange(24_000) % 11 == 0] = "small"
    plate[(plate == "small") & (np.arange(24_000) > 3_000)] = "p1"
    df = frame(x, plate=plate)
    df.write_parquet(tmp_path / "cells.parquet", row_group_size=1001)
    kw = dict(embedding="X", batch_key="plate", n_centroids=30, max_samples_per_batch=4000, summary=True)
    a, sa = psc.fit_centroids(df, **kw)
    spill = tmp_path / "spill"
    spill.mkdir()
    for data in (df, pl.scan_parquet(tmp_path / "cells.parquet")):
        b, sb = psc.fit_centroids(data, low_memory=True, temp_dir=spill, **kw)
        assert a.equals(b)
        assert sa.equals(sb)
        assert list(spill.iterdir()) == []  # the sample files are gone
    assert sa["n_sampled"].to_list() == [4000, 4000, 4000, 273]
    assert sa["n_cells"].to_list() == [int((plate == p).sum()) for p in ["p1", "p2", "p3", "small"]]


def test_low_memory_bad_input_and_data_that_changes_between_reads(monkeypatch):
    from polars_singlecell import centroids

    x = blobs(10, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"column 'plate' is null at row 3"):
        psc.fit_centroids(frame(x, plate=[None if i == 3 else "a" for i in range(10)]), embedding="X",
                          batch_key="plate", low_memory=True)
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value NaN at row 7"):
        psc.fit_centroids(frame(x, plate=["a"] * 10), embedding="X", batch_key="plate", low_memory=True)
    with pytest.raises(ValueError, match="no cells"):
        psc.fit_centroids(frame(x[:0], plate=pl.Series([], dtype=pl.String)), embedding="X", batch_key="plate",
                          low_memory=True)
    # A source that gives other rows on its second read (low_memory reads twice).
    real = centroids._record_batches
    reads = []

    second = [lambda lf: lf.head(8),
              # as many rows, but the first moved to the other batch
              lambda lf: lf.with_columns(plate=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("b")).otherwise("plate"))]

    def shifting(lf, columns):
        reads.append(columns)
        return real(lf if len(reads) % 2 == 1 else second[len(reads) // 2 - 1](lf), columns)

    monkeypatch.setattr(centroids, "_record_batches", shifting)
    ok = frame(blobs(10, 2, 2, seed=0), plate=["a", "b"] * 5)
    with pytest.raises(ValueError, match="10 rows on its first read and 8 on its second"):
        psc.fit_centroids(ok, embedding="X", batch_key="plate", n_centroids=2, low_memory=True)
    with pytest.raises(ValueError, match=r"batch 'a' had 5 rows \(3 sampled\) on the data's first read and 4 \(\d sampled\)"):
        psc.fit_centroids(ok, embedding="X", batch_key="plate", n_centroids=2, max_samples_per_batch=3, low_memory=True)


def test_fit_centroids_keeps_the_batch_dtype_and_reports_empty_enum_batches():
    x = blobs(200, 3, 4, seed=2)
    plates = pl.Enum(["a", "b", "c"])
    df = frame(x, plate=pl.Series(["a", "c"] * 100, dtype=plates))
    with pytest.warns(UserWarning, match=r"\['b'\].*no cells"):
        fit, summ = psc.fit_centroids(df, embedding="X", batch_key="plate", n_centroids=5, summary=True)
    assert fit.schema["plate"] == plates
    assert summ.filter(pl.col("plate") == "b")["n_cells"].to_list() == [0]
    ints = frame(x, plate=[10, 9] * 100)
    fit = psc.fit_centroids(ints, embedding="X", batch_key="plate", n_centroids=5)
    assert fit.schema["plate"] == pl.Int64
    assert fit["plate"].unique(maintain_order=True).to_list() == [9, 10]  # numeric order, not text order


@pytest.mark.parametrize(
    ("df", "kw", "match"),
    [
        (frame(np.ones((3, 2), np.float32)).with_columns(pl.when(pl.int_range(3) == 1).then(pl.col("X"))), {}, "null at row 0"),
        (frame(np.array([[1, 2], [np.nan, 0]], np.float32)), {}, "non-finite value NaN"),
        (frame(np.array([[1, 2], [np.inf, 0]], np.float32)), {}, "non-finite value inf"),
        (pl.DataFrame({"X": [[1.0, 2.0]]}, schema={"X": pl.Array(pl.Float64, 2)}), {}, r"cast\(pl.Array\(pl.Float32, 2\)\)"),
        (pl.DataFrame({"X": [[1.0, 2.0], [1.0]]}), {}, "expected Array"),
        (frame(np.ones((3, 2), np.float32), w=[1.0, None, 1.0]), {"weights": "w"}, "weights column 'w' is null at row 1"),
        (frame(np.ones((3, 2), np.float32), w=[1.0, -1.0, 1.0]), {"weights": "w"}, "weights must be finite and ≥ 0"),
        (frame(np.ones((3, 2), np.float32), w=["1", "2", "3"]), {"weights": "w"}, "weights column 'w' has dtype str"),
        (frame(np.array([[1, 2], [3e20, 0]], np.float32)), {}, "beyond ±1e15"),
    ],
)
def test_bad_input_to_the_expression_is_a_clear_error(df, kw, match):
    with pytest.raises(pl.exceptions.PolarsError, match=match):
        df.select(psc.kmeans_centroids("X", n_centroids=2, **kw))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_centroids": 0}, "n_centroids must be a positive integer"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"tol": -1.0}, "tol must be a finite number"),
        ({"random_state": -1}, "random_state must be an integer"),
    ],
)
def test_bad_options_fail_before_running(kw, match):
    with pytest.raises(ValueError, match=match):
        psc.kmeans_centroids("X", **kw)


def test_fit_centroids_bad_input():
    x = blobs(10, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"column 'plate' is null at row 3"):
        psc.fit_centroids(frame(x, plate=[None if i == 3 else "a" for i in range(10)]), embedding="X", batch_key="plate")
    with pytest.raises(ValueError, match=r"cast\(pl.Array\(pl.Float32, 2\)\)"):
        psc.fit_centroids(frame(x, plate=["a"] * 10).with_columns(pl.col("X").cast(pl.Array(pl.Float64, 2))), embedding="X", batch_key="plate")
    with pytest.raises(ValueError, match="column 'nope' not found"):
        psc.fit_centroids(frame(x, plate=["a"] * 10), embedding="X", batch_key="nope")
    with pytest.raises(ValueError, match="max_samples_per_batch must be a positive integer"):
        psc.fit_centroids(frame(x, plate=["a"] * 10), embedding="X", batch_key="plate", max_samples_per_batch=0)
    with pytest.raises(FileNotFoundError):
        psc.fit_centroids("/nonexistent/cells.parquet", embedding="X", batch_key="plate")


@pytest.mark.parametrize("low_memory", [False, True])
def test_min_cells_per_centroid_caps_each_batch(harmony, low_memory, tmp_path):
    """At most one centroid per `min_cells_per_centroid` sampled cells: the
    batches of 846, 824 and 700 cells get 105, 103 and 87 centroids of 8 at
    most, each the k-means of that many (the expression with n_centroids set
    to it gives the same bits), and masses still sum to each batch; with 32,
    the floor of 64 centroids a batch holds."""
    kw = dict(embedding="embedding", batch_key="batch", n_centroids=2048, max_iter=300, summary=True)
    fit, summ = psc.fit_centroids(harmony, min_cells_per_centroid=8, low_memory=low_memory, temp_dir=tmp_path, **kw)
    sizes = {b: int((harmony["batch"] == b).sum()) for b in ["half", "jurkat", "t293"]}
    assert dict(zip(summ["batch"], summ["n_centroids"])) == {b: n // 8 for b, n in sizes.items()}
    for b, n in sizes.items():
        one = fit.filter(pl.col("batch") == b)
        expr = harmony.filter(pl.col("batch") == b).select(psc.kmeans_centroids("embedding", n_centroids=n // 8)).unnest("centroids").explode("centroid", "mass")
        np.testing.assert_array_equal(one["centroid"].to_numpy(), expr["centroid"].to_numpy())
        assert one["mass"].sum() == pytest.approx(n)
    _, floor = psc.fit_centroids(harmony, min_cells_per_centroid=32, **kw)
    assert floor["n_centroids"].to_list() == [64, 64, 64]
    with pytest.raises(ValueError, match="min_cells_per_centroid"):
        psc.fit_centroids(harmony, min_cells_per_centroid=0, **kw)
