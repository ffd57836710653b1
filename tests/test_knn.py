"""knn and knn_interpolate: neighbours against faiss-cpu IndexFlatL2 and exact float64
brute force, the interpolation against a NumPy reference of the formula, engines,
threads, the model cache, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc
from polars_singlecell import _internal


def arr(x: np.ndarray) -> pl.Series:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pl.Series(x, dtype=pl.Array(pl.Float32, x.shape[1]))


def model_from(batch: list | np.ndarray, centroid: np.ndarray, displacement: np.ndarray, key: str = "batch") -> psc.IntegrationModel:
    return psc.IntegrationModel(pl.DataFrame({key: batch, "centroid": arr(centroid), "displacement": arr(displacement)}))


def exact_sq(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """All squared distances in float64 (the exact ranking)."""
    x, c = x.astype(np.float64), c.astype(np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def reference_interpolate(x: np.ndarray, c: np.ndarray, disp: np.ndarray, k: int) -> np.ndarray:
    """The formula in NumPy, float64: x + Σ w_j D_j, w_j ∝ 1/max(dist_j, 1e-3), exact kNN."""
    d2 = exact_sq(x, c)
    nn = np.argsort(d2, axis=1, kind="stable")[:, :k]
    w = 1 / np.maximum(np.sqrt(np.take_along_axis(d2, nn, 1)), 1e-3)
    w /= w.sum(1, keepdims=True)
    return x.astype(np.float64) + (w[:, :, None] * disp.astype(np.float64)[nn]).sum(1)


def assert_same_neighbours_as_faiss(x: np.ndarray, c: np.ndarray, k: int) -> None:
    """Ours equal faiss IndexFlatL2 up to exact-distance ties: wherever the index sets
    differ, the exact distances are tied (within float32 rounding of the expansion
    faiss uses); and ours are the exact float64 top-k."""
    out = pl.DataFrame({"X": arr(x)}).select(psc.knn("X", model=c, k=k)).unnest("knn")
    idx, dist = out["indices"].to_numpy().astype(np.int64), out["distances"].to_numpy()
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(np.ascontiguousarray(c, dtype=np.float32))
    fd, fi = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    d2 = exact_sq(x, c)
    ours_exact = np.take_along_axis(d2, idx, 1)
    theirs_exact = np.take_along_axis(d2, fi, 1)
    # Our distances are the exact ones (sqrt of float64, rounded to float32).
    np.testing.assert_allclose(dist, np.sqrt(ours_exact), rtol=1e-6, atol=1e-6)
    # Ours are the true k nearest: the k-th exact distance is the true k-th.
    kth = np.sort(d2, axis=1)[:, k - 1]
    assert (ours_exact[:, -1] <= kth).all()
    # Against faiss: same sets, except where faiss's float32 expansion broke a near-tie.
    scale = (x.astype(np.float64) ** 2).sum(1)[:, None] + (c.astype(np.float64) ** 2).sum(1).max()
    differ = np.array([set(a) != set(b) for a, b in zip(idx, fi)])
    tie_tol = 1e-5 * scale[:, 0]
    assert (np.abs(np.sort(theirs_exact, 1) - ours_exact)[differ].max(initial=0) <= tie_tol[differ].max(initial=0))
    assert differ.mean() < 0.01, f"{differ.sum()} of {len(differ)} rows differ from faiss"
    np.testing.assert_allclose(np.sqrt(np.maximum(fd, 0)), dist, rtol=1e-3, atol=1e-3 * np.sqrt(scale.max()))


def test_knn_matches_faiss_on_cellbench_pca(cellbench_pca):
    x = cellbench_pca["X_pca"].to_numpy()
    cents = psc.fit_centroids(cellbench_pca.lazy(), embedding="X_pca", n_centroids=64)
    assert_same_neighbours_as_faiss(x, cents["centroid"].to_numpy(), 8)


def test_knn_matches_faiss_on_harmony_cells_as_their_own_index(harmony):
    # Cells as the index: each cell's nearest point is itself, at distance 0.
    x = harmony["embedding"].to_numpy()
    assert_same_neighbours_as_faiss(x, x, 30)
    first = pl.DataFrame({"X": arr(x)}).select(psc.knn("X", model=x, k=1)).unnest("knn")
    assert (first["distances"].to_numpy()[:, 0] == 0).all()


@pytest.mark.parametrize("d,n_centres", [(50, 2048), (300, 300), (7, 5000)])
def test_knn_matches_faiss_on_generated_data(d, n_centres):
    rng = np.random.default_rng(d)
    c = (rng.normal(size=(n_centres, d)) * 3).astype(np.float32)
    x = (c[rng.integers(0, n_centres, 1500)] + rng.normal(size=(1500, d))).astype(np.float32)
    assert_same_neighbours_as_faiss(x, c, 8)


def test_knn_ties_go_to_the_lower_row():
    c = np.array([[1, 0], [0, 3], [1, 0], [0, 3]], dtype=np.float32)
    out = pl.DataFrame({"X": arr(np.array([[0.9, 0.1]]))}).select(psc.knn("X", model=c, k=3)).unnest("knn")
    assert out["indices"].to_list() == [[0, 2, 1]]


@pytest.mark.parametrize("mode", ["own_batch", "pooled"])
def test_interpolation_is_the_formula_on_cellbench(cellbench_pca, mode):
    cents = psc.fit_centroids(cellbench_pca.lazy(), embedding="X_pca", n_centroids=32)
    rng = np.random.default_rng(0)
    disp = rng.normal(size=(cents.height, 30)).astype(np.float32)
    model = model_from(cents["batch"], cents["centroid"].to_numpy(), disp)
    got = cellbench_pca.select(psc.knn_interpolate("X_pca", "batch", model=model, k=8, mode=mode))["X_ot"].to_numpy()
    x, c = cellbench_pca["X_pca"].to_numpy(), cents["centroid"].to_numpy()
    if mode == "pooled":
        want = reference_interpolate(x, c, disp, 8)
    else:
        want = np.empty_like(x, dtype=np.float64)
        for b in cents["batch"].unique():
            rows = (cellbench_pca["batch"] == b).to_numpy()
            own = (cents["batch"] == b).to_numpy()
            want[rows] = reference_interpolate(x[rows], c[own], disp[own], 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_own_batch_never_takes_another_batchs_displacement():
    # Batch b's centroids sit right on batch a's cells; own-batch mode ignores them.
    c = np.array([[0, 0], [10, 10], [0.1, 0], [10, 10.1]], dtype=np.float32)
    disp = np.array([[1, 0], [1, 0], [-5, 0], [-5, 0]], dtype=np.float32)
    model = model_from(["a", "a", "b", "b"], c, disp)
    cells = pl.DataFrame({"batch": ["a", "a"], "X": arr(np.array([[0.1, 0], [10, 10.1]]))})
    own = cells.select(psc.knn_interpolate("X", "batch", model=model, k=2))["X_ot"].to_numpy()
    np.testing.assert_allclose(own - cells["X"].to_numpy(), [[1, 0], [1, 0]], atol=1e-6)
    pooled = cells.select(psc.knn_interpolate("X", model=model, k=2, mode="pooled"))["X_ot"].to_numpy()
    assert (pooled[:, 0] - cells["X"].to_numpy()[:, 0] < 0).all()


def test_batch_dtypes_are_matched_as_text(harmony):
    cents = psc.fit_centroids(harmony.lazy(), embedding="embedding", n_centroids=16)
    disp = np.random.default_rng(1).normal(size=(cents.height, 20)).astype(np.float32)
    model = model_from(cents["batch"], cents["centroid"].to_numpy(), disp)
    base = harmony.select(psc.knn_interpolate("embedding", "batch", model=model))["X_ot"]
    for dtype in (pl.Categorical, pl.Enum(sorted(harmony["batch"].unique()))):
        cast = harmony.with_columns(pl.col("batch").cast(dtype))
        assert cast.select(psc.knn_interpolate("embedding", "batch", model=model))["X_ot"].equals(base)
    # Integer batch keys in both the model and the cells.
    codes = {b: i for i, b in enumerate(sorted(harmony["batch"].unique()))}
    model_int = model_from(cents["batch"].replace_strict(codes, return_dtype=pl.Int64), cents["centroid"].to_numpy(), disp)
    ints = harmony.with_columns(pl.col("batch").replace_strict(codes, return_dtype=pl.Int16))
    assert ints.select(psc.knn_interpolate("embedding", "batch", model=model_int))["X_ot"].equals(base)


@pytest.fixture(scope="module")
def stream_case(tmp_path_factory):
    """30k cells in 3 batches written with 1,000-row groups, and a model."""
    rng = np.random.default_rng(7)
    n, d = 30_000, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    batch = np.array(["p1", "p2", "p3"])[rng.integers(0, 3, n)]
    cells = pl.DataFrame({"plate": batch, "X_pca": arr(x)})
    c = rng.normal(size=(3 * 100, d)).astype(np.float32)
    disp = rng.normal(size=(300, d)).astype(np.float32)
    model = model_from(np.repeat(["p1", "p2", "p3"], 100), c, disp, key="plate")
    folder = tmp_path_factory.mktemp("knn")
    cells.write_parquet(folder / "cells.parquet", row_group_size=1_000)
    model.write_parquet(folder / "model.parquet")
    return folder, cells, model


def test_same_bits_in_every_engine(stream_case):
    folder, cells, model = stream_case
    expr = psc.knn_interpolate("X_pca", "plate", model=model, k=8)
    eager = cells.with_columns(expr)
    lazy = cells.lazy().with_columns(expr).collect()
    streaming = pl.scan_parquet(folder / "cells.parquet").with_columns(expr).collect(engine="streaming")
    psc.sink_parquet(pl.scan_parquet(folder / "cells.parquet").with_columns(expr), folder / "out.parquet")
    sunk = pl.read_parquet(folder / "out.parquet")
    for other in (lazy, streaming, sunk):
        assert eager.equals(other)
    # knn too.
    k_eager = cells.select(psc.knn("X_pca", model=model, k=5))
    k_stream = pl.scan_parquet(folder / "cells.parquet").select(psc.knn("X_pca", model=model, k=5)).collect(engine="streaming")
    assert k_eager.equals(k_stream)


def test_same_bits_at_one_and_two_threads(tmp_path):
    # 300k rows: above the size where one eager call splits across the pool.
    script = textwrap.dedent(
        """
        import sys, numpy as np, polars as pl, polars_singlecell as psc
        rng = np.random.default_rng(3)
        x = rng.normal(size=(300_000, 8)).astype(np.float32)
        arr = lambda a: pl.Series(a, dtype=pl.Array(pl.Float32, a.shape[1]))
        model = psc.IntegrationModel(pl.DataFrame({"batch": ["a"] * 64, "centroid": arr(rng.normal(size=(64, 8)).astype(np.float32)),
                                                   "displacement": arr(rng.normal(size=(64, 8)).astype(np.float32))}))
        out = pl.DataFrame({"batch": ["a"] * len(x), "X": arr(x)}).select(psc.knn_interpolate("X", "batch", model=model))
        out.write_parquet(sys.argv[1])
        """
    )
    outs = []
    for threads in ("1", "2"):
        path = tmp_path / f"t{threads}.parquet"
        env = {**os.environ, "POLARS_MAX_THREADS": threads, "RAYON_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        outs.append(pl.read_parquet(path))
    assert outs[0].equals(outs[1])


def test_the_model_is_built_once_per_process(stream_case):
    folder, cells, model = stream_case
    path = folder / "model.parquet"
    psc.clear_models()
    before = _internal.model_builds()
    for _ in range(3):  # three expressions from the same file: one read, one build
        lf = pl.scan_parquet(folder / "cells.parquet").with_columns(psc.knn_interpolate("X_pca", "plate", model=path))
        out = lf.collect(engine="streaming")  # 30 row groups of 1,000 rows: many calls
    assert _internal.model_builds() - before == 1
    assert out.equals(cells.with_columns(psc.knn_interpolate("X_pca", "plate", model=model)))
    # A rewritten file is read again.
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    psc.knn_interpolate("X_pca", "plate", model=path)
    assert psc.integration._FILE_CACHE and next(iter(psc.integration._FILE_CACHE))[1] == os.stat(path).st_mtime_ns


def test_model_parquet_round_trip(stream_case, tmp_path):
    _, _, model = stream_case
    model.metrics = {"mix": 1.5}
    model.write_parquet(tmp_path / "m.parquet")
    back = psc.IntegrationModel.read_parquet(tmp_path / "m.parquet")
    assert back.table.equals(model.table) and back.batch_key == "plate" and back.metrics == {"mix": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary file left
    # Any tool can read it: plain Parquet.
    assert pl.read_parquet(tmp_path / "m.parquet").columns == ["plate", "centroid", "displacement"]


def test_unknown_batches(stream_case):
    _, cells, model = stream_case
    odd = cells.head(5).with_columns(plate=pl.Series(["p1", "p9", "p2", "p9", "p3"]))
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'plate' holds 'p9' at row 1, which is not a batch of the model.*unknown_batch='pooled'"):
        odd.select(psc.knn_interpolate("X_pca", "plate", model=model))
    out = odd.select(psc.knn_interpolate("X_pca", "plate", model=model, unknown_batch="pooled"))["X_ot"]
    # Rows 1 and 3 (unknown) search all centroids; the others their own batch's.
    pooled = odd.select(psc.knn_interpolate("X_pca", model=model, mode="pooled"))["X_ot"]
    assert out.gather([1, 3]).equals(pooled.gather([1, 3]))
    known = odd.filter(pl.col("plate") != "p9").select(psc.knn_interpolate("X_pca", "plate", model=model))["X_ot"]
    assert out.gather([0, 2, 4]).equals(known)
    assert not out.gather([1, 3]).equals(odd["X_pca"].gather([1, 3]))


def _bad(cells: pl.DataFrame, model, **kw):
    return cells.select(psc.knn_interpolate("X_pca", "plate", model=model, **kw))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda df: df.with_columns(pl.col("X_pca").cast(pl.Array(pl.Float64, 16))), r"cast it with pl.col\('X_pca'\).cast\(pl.Array\(pl.Float32, 16\)\)"),
        (lambda df: df.with_columns(X_pca=arr(np.zeros((df.height, 5)))), r"'X_pca' has width 5 but the model's centroids have 16"),
        (lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("X_pca")).alias("X_pca")), r"'X_pca' is null at row 3"),
        (lambda df: df.with_columns(X_pca=arr(np.where(np.arange(df.height)[:, None] == 2, np.nan, df["X_pca"].to_numpy()))), r"row 2 holds the non-finite value NaN"),
        (lambda df: df.with_columns(X_pca=arr(np.where(np.arange(df.height)[:, None] == 4, -np.inf, df["X_pca"].to_numpy()))), r"row 4 holds the non-finite value -inf"),
        (lambda df: df.with_columns(plate=pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.col("plate"))), r"batch column 'plate' is null at row 1"),
        (lambda df: df.with_columns(plate=pl.col("plate").map_elements(lambda v: [v], return_dtype=pl.List(pl.String))), r"batch column 'plate' has dtype list\[str\]"),
    ],
)
def test_bad_cells_are_clear_errors(stream_case, change, match):
    _, cells, model = stream_case
    with pytest.raises(pl.exceptions.PolarsError, match=match):
        _bad(change(cells.head(10)), model)


def test_bad_options_and_models(stream_case, tmp_path):
    _, cells, model = stream_case
    small = cells.head(10)
    for k, match in [(0, "k must be a positive integer"), (301, "k=301 exceeds its maximum 300"), (1.5, "k must be")]:
        with pytest.raises(ValueError, match=match):
            psc.knn_interpolate("X_pca", "plate", model=model, k=k)
    # k above one batch's centroids: named at run time.
    few = model_from(["p1"] * 100 + ["p2"] * 3 + ["p3"] * 100, np.zeros((203, 16)), np.zeros((203, 16)), key="plate")
    with pytest.raises(pl.exceptions.ComputeError, match=r"k = 8 is more than the 3 centroids of batch 'p2'; lower k"):
        small.with_columns(plate=pl.lit("p2")).select(psc.knn_interpolate("X_pca", "plate", model=few))
    with pytest.raises(ValueError, match="mode must be"):
        psc.knn_interpolate(model=model, mode="nearest")
    with pytest.raises(ValueError, match="unknown_batch must be"):
        psc.knn_interpolate(model=model, unknown_batch="drop")
    if not psc.cuda_available():  # a build without CUDA, or no GPU here
        with pytest.raises(ValueError, match="device='cuda'.*(no CUDA backend|not available)"):
            psc.knn_interpolate(model=model, device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        psc.knn_interpolate(model=model, device="gpu")
    with pytest.raises(ValueError, match="needs the cells' batch column"):
        psc.knn_interpolate(model=model, batch=None)
    with pytest.raises(FileNotFoundError, match="no-such.parquet"):
        psc.knn_interpolate(model=tmp_path / "no-such.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read the model file"):
        psc.knn_interpolate(model=tmp_path / "junk.parquet")
    with pytest.raises(TypeError, match="model must be an IntegrationModel"):
        psc.knn_interpolate(model=42)
    # Bad model tables.
    good = model.table
    with pytest.raises(ValueError, match=r"'centroid' has dtype.*cast it"):
        psc.IntegrationModel(good.with_columns(pl.col("centroid").cast(pl.Array(pl.Float64, 16))))
    with pytest.raises(ValueError, match="'displacement' has 1 null rows"):
        psc.IntegrationModel(good.with_columns(displacement=pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise("displacement")))
    with pytest.raises(ValueError, match="non-finite value nan at row 2"):
        psc.IntegrationModel(good.with_columns(centroid=arr(np.where(np.arange(300)[:, None] == 2, np.nan, good["centroid"].to_numpy()))))
    with pytest.raises(ValueError, match="'displacement' has width 3"):
        psc.IntegrationModel(good.with_columns(displacement=arr(np.zeros((300, 3)))))
    with pytest.raises(ValueError, match="batch column 'plate' has nulls"):
        psc.IntegrationModel(good.with_columns(plate=pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise("plate")))
    with pytest.raises(ValueError, match="no centroids"):
        psc.IntegrationModel(good.head(0))
    # A query built before clear_models() fails clearly instead of using stale memory.
    expr = psc.knn_interpolate("X_pca", "plate", model=model)
    psc.clear_models()
    with pytest.raises(pl.exceptions.ComputeError, match="is not loaded in this process"):
        small.select(expr)


def test_knn_bad_index():
    x = pl.DataFrame({"X": arr(np.zeros((2, 3)))})
    with pytest.raises(ValueError, match="non-empty 2-D array"):
        psc.knn("X", model=np.zeros(3))
    with pytest.raises(ValueError, match="cast it"):
        psc.knn("X", model=pl.Series([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="k=4 exceeds its maximum 3"):
        psc.knn("X", model=np.zeros((3, 3)), k=4)
    with pytest.raises(pl.exceptions.PolarsError, match="width 3 but the model's centroids have 2"):
        x.select(psc.knn("X", model=np.zeros((3, 2)), k=1))
