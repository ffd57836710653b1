"""device="cuda" against device="cpu" through the public API.

Every test takes the ``device`` fixture (conftest): it runs on the CPU
everywhere and again on the GPU where one is usable, and compares with the
CPU path. What must hold (see ``src/kernels/gpu/cuda.rs``): ``pca_project``,
``knn`` and ``knn_interpolate`` give the CPU's bits; ``fit_pca`` agrees to
float64 rounding; k-means agrees to float32 rounding of its distances.
Only polars, numpy and scipy are needed, so this file also runs on a bare
GPU machine.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc


def _counts(n: int, n_genes: int, seed: int) -> pl.DataFrame:
    raw = psc.datasets.synthetic_counts(n, n_genes=n_genes, umis_per_cell=120, random_state=seed)
    return raw.with_columns(psc.normalize("gene_idx", "values", target_sum=1e4))


def _arr(x: np.ndarray) -> pl.Series:
    return pl.Series(np.ascontiguousarray(x, dtype=np.float32), dtype=pl.Array(pl.Float32, x.shape[1]))


def _np(s: pl.Series) -> np.ndarray:
    return s.to_numpy()


def test_pca_fit_and_projection(device):
    cells = _counts(6000, 400, 1)
    cpu = psc.fit_pca(cells, n_genes=400, n_comps=20)
    got = psc.fit_pca(cells.lazy(), n_genes=400, n_comps=20, device=device)
    np.testing.assert_allclose(got.explained_variance, cpu.explained_variance, rtol=1e-10)
    np.testing.assert_allclose(got.components, cpu.components, atol=1e-8)
    want = cells.select(psc.pca_project(model=cpu))["X_pca"]
    for engine in ("in-memory", "streaming"):
        out = cells.lazy().select(psc.pca_project(model=cpu, device=device)).collect(engine=engine)["X_pca"]
        assert np.array_equal(_np(out), _np(want)), engine


def _model(rng: np.random.Generator, batches: list[str], k: int, d: int) -> psc.IntegrationModel:
    cent = rng.normal(size=(len(batches) * k, d)).astype(np.float32)
    disp = rng.normal(scale=0.3, size=cent.shape).astype(np.float32)
    return psc.IntegrationModel(pl.DataFrame({
        "batch": np.repeat(batches, k), "centroid": _arr(cent), "displacement": _arr(disp)}))


@pytest.mark.parametrize("mode", ["own_batch", "pooled"])
def test_knn_interpolate_same_bits(device, mode):
    rng = np.random.default_rng(2)
    d = 30
    model = _model(rng, ["p1", "p2", "p3"], 512, d)
    x = rng.normal(size=(50_000, d)).astype(np.float32)
    cells = pl.DataFrame({"batch": rng.choice(["p1", "p2", "p3"], size=len(x)), "X_pca": _arr(x)})
    want = cells.select(psc.knn_interpolate(model=model, k=8, mode=mode))["X_ot"]
    for engine in ("in-memory", "streaming"):
        got = cells.lazy().select(psc.knn_interpolate(model=model, k=8, mode=mode, device=device)).collect(engine=engine)
        assert np.array_equal(_np(got["X_ot"]), _np(want)), engine


def test_knn_same_bits(device):
    rng = np.random.default_rng(3)
    index = rng.normal(size=(3000, 50)).astype(np.float32)
    cells = pl.DataFrame({"X_pca": _arr(rng.normal(size=(20_000, 50)))})
    want = cells.select(psc.knn(model=index, k=15)).unnest("knn")
    got = cells.select(psc.knn(model=index, k=15, device=device)).unnest("knn")
    assert np.array_equal(_np(got["indices"]), _np(want["indices"]))
    assert np.array_equal(_np(got["distances"]), _np(want["distances"]))


def _inertia(x: np.ndarray, c: np.ndarray) -> float:
    d2 = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
    return float(np.maximum(d2.min(1), 0).sum())


def test_kmeans_agrees(device):
    rng = np.random.default_rng(4)
    centres = rng.normal(scale=5, size=(40, 20))
    x = (centres[rng.integers(0, 40, 30_000)] + rng.normal(size=(30_000, 20))).astype(np.float32)
    df = pl.DataFrame({"X_pca": _arr(x)})
    fit = lambda dev: df.select(psc.kmeans_centroids(n_centroids=128, random_state=5, device=dev)).unnest("centroids")
    cpu, got = fit("cpu"), fit(device)
    assert got["mass"][0].sum() == 30_000
    c_cpu, c_got = np.stack(cpu["centroid"][0].to_list()), np.stack(got["centroid"][0].to_list())
    ic, ig = _inertia(x.astype(np.float64), c_cpu), _inertia(x.astype(np.float64), c_got)
    assert abs(ig - ic) <= 1e-4 * ic, (ig, ic)


def test_fit_centroids_and_pipeline(device, tmp_path):
    raw = psc.datasets.write_synthetic_counts(tmp_path / "raw", 20_000, n_genes=500, umis_per_cell=100)
    report = psc.integrate(raw, tmp_path / device, n_top_genes=200, n_comps=15, n_centroids=64,
                           label_key="label", log=None, device=device)
    assert report["parameters"]["interpolate"]["device"] == device
    if device == "cuda":
        cpu = psc.integrate(raw, tmp_path / "cpu", n_top_genes=200, n_comps=15, n_centroids=64,
                            label_key="label", log=None)
        a = pl.read_parquet(tmp_path / "cpu" / "cells_pca.parquet")["X_pca"].to_numpy()
        b = pl.read_parquet(tmp_path / "cuda" / "cells_pca.parquet")["X_pca"].to_numpy()
        np.testing.assert_allclose(b, a, atol=1e-4)
        ent = lambda r: {(e["embedding"], e["metric"]): e["value"] for e in r["stages"]["interpolate"]["evaluate"]}
        key = ("X_ot", "batch_entropy_norm")
        assert abs(ent(report)[key] - ent(cpu)[key]) < 0.02


def test_cuda_unavailable_is_a_clear_error():
    if psc.cuda_available():
        pytest.skip("CUDA is available here")
    for make in (lambda: psc.knn_interpolate(model=_model(np.random.default_rng(0), ["a"], 4, 2), k=2, device="cuda"),
                 lambda: psc.pca_project(model=psc.PcaModel(np.zeros(2), np.eye(2), np.ones(2), np.ones(2), 2), device="cuda"),
                 lambda: psc.kmeans_centroids(device="cuda")):
        with pytest.raises(ValueError, match="device='cuda'.*(no CUDA backend|not available)"):
            make()
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'gpu'"):
        psc.knn(model=np.zeros((2, 2)), k=1, device="gpu")
