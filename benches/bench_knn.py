"""knn_interpolate vs faiss-cpu IndexFlatL2.search + the NumPy gather, side by side.

Each contender runs in its own spawned process (benches/_harness.py) on the same
generated data, so each peak RSS is its own. Both use all cores: faiss through
OpenMP (its best of 1 or all threads is reported), ours through the plugin's
thread pool. "GFLOP/s" counts the distance GEMM, 2·n·K·d; the SGEMM peak is
NumPy's own float32 matmul of 4096² matrices on the same cores.

Then: streaming scan_parquet → knn_interpolate → sink_parquet at 1M and 4M
cells (peak RSS must not grow with the cells), and the per-call overhead of a
loaded model.

    make bench-knn            # or: .venv/bin/python benches/bench_knn.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import recorded, run

N_BATCHES = 14  # Tahoe-100M's plates
K_PER_BATCH = 2048
K_NN = 8


def clustered_cells(n: int, d: int, n_batches: int, seed: int):
    """PCA-like cells: 300 cell types (the same for every seed), per-component
    spread 1/√i, each batch shifted by its own offset; returns (x, batch)."""
    scales = (1 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
    law = np.random.default_rng(1)
    means = (law.normal(size=(300, d)) * scales * 4).astype(np.float32)
    shift = (law.normal(size=(n_batches, d)) * scales).astype(np.float32)
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, n_batches, n).astype(np.int32)
    x = means[rng.integers(0, 300, n)] + shift[batch] + rng.normal(size=(n, d)).astype(np.float32) * scales
    return x.astype(np.float32), batch


def kmeans_centroids_file(d: int, n_batches: int, folder: str) -> str:
    """The integration's real centroids: our fit_centroids (defaults, K = 2048
    a batch) of 100k clustered cells a batch, saved once for every child."""
    import polars as pl

    import polars_singlecell as psc

    path = str(Path(folder) / f"kmeans_centroids_{d}.npy")
    if not os.path.exists(path):
        x, batch = clustered_cells(n_batches * 100_000, d, n_batches, seed=123)
        df = pl.DataFrame({"X": pl.Series(x, dtype=pl.Array(pl.Float32, d)), "batch": batch})
        fit = psc.fit_centroids(df, embedding="X", batch_key="batch", n_centroids=K_PER_BATCH).sort("batch", maintain_order=True)
        assert fit.group_by("batch").len()["len"].to_list() == [K_PER_BATCH] * n_batches
        np.save(path, fit["centroid"].to_numpy().astype(np.float32))
    return path


def make(n: int, d: int, n_batches: int, seed: int = 0, centroids: str | None = None):
    """Cells around per-batch centroids (like PCA cells around k-means centroids).

    centroids=None: centroids at random (normal, spread 3/√i) and cells around
    them. Otherwise the `kmeans_centroids_file` and cells of the same law as
    those it was fitted on.
    """
    if centroids is not None:
        x, batch = clustered_cells(n, d, n_batches, seed)
        cents = np.load(centroids)
        disp = (np.random.default_rng(seed).normal(size=cents.shape) * 0.5).astype(np.float32)
        return x, batch, cents, disp
    rng = np.random.default_rng(seed)
    scales = (1 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
    cents = (rng.normal(size=(n_batches * K_PER_BATCH, d)) * scales * 3).astype(np.float32)
    disp = (rng.normal(size=cents.shape) * 0.5).astype(np.float32)
    batch = rng.integers(0, n_batches, n).astype(np.int32)
    pick = batch * K_PER_BATCH + rng.integers(0, K_PER_BATCH, n)
    x = (cents[pick] + rng.normal(size=(n, d)).astype(np.float32) * scales).astype(np.float32)
    return x, batch, cents, disp


def integration_model(cents: np.ndarray, disp: np.ndarray, n_batches: int):
    """Batches 0..n_batches-1 of K_PER_BATCH centroids each, as an IntegrationModel."""
    import polars as pl

    import polars_singlecell as psc

    arr = pl.Array(pl.Float32, cents.shape[1])
    return psc.IntegrationModel(
        pl.DataFrame({
            "batch": np.repeat(np.arange(n_batches), K_PER_BATCH),
            "centroid": pl.Series(cents[: n_batches * K_PER_BATCH], dtype=arr),
            "displacement": pl.Series(disp[: n_batches * K_PER_BATCH], dtype=arr),
        })
    )


def sgemm_peak() -> float:
    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    a @ a
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * 4096**3 / (time.perf_counter() - t) / 1e9)
    return best


def run_faiss(n: int, d: int, n_batches: int, pooled: bool, threads: int, centroids: str | None):
    import faiss

    faiss.omp_set_num_threads(threads)
    x, batch, cents, disp = make(n, d, n_batches, centroids=centroids)
    t = time.perf_counter()
    y = np.empty_like(x)
    if pooled:  # one index over every batch's centroids
        groups = [(np.arange(n), cents, disp)]
    else:  # one index per batch, searched by that batch's cells
        sl = [slice(b * K_PER_BATCH, (b + 1) * K_PER_BATCH) for b in range(n_batches)]
        groups = [(np.flatnonzero(batch == b), cents[sl[b]], disp[sl[b]]) for b in range(n_batches)]
    for rows, c, dsp in groups:
        index = faiss.IndexFlatL2(d)
        index.add(c)
        for s in range(0, len(rows), 65_536):  # chunked, as the reference does
            r = rows[s : s + 65_536]
            dist2, nn = index.search(x[r], K_NN)
            w = 1 / np.maximum(np.sqrt(np.maximum(dist2, 0)), 1e-3)
            w /= w.sum(1, keepdims=True)
            y[r] = x[r] + np.einsum("nk,nkd->nd", w, dsp[nn])
    return time.perf_counter() - t, y[:1000]


def run_ours(n: int, d: int, n_batches: int, mode: str, centroids: str | None):
    import polars as pl

    import polars_singlecell as psc

    x, batch, cents, disp = make(n, d, n_batches, centroids=centroids)
    model = integration_model(cents, disp, n_batches)
    cells = pl.DataFrame({"batch": batch, "X_pca": pl.Series(x, dtype=pl.Array(pl.Float32, d))})
    expr = psc.knn_interpolate("X_pca", "batch", model=model, k=K_NN, mode=mode)
    cells.head(1).select(expr)  # the model is registered once, outside the timing
    t = time.perf_counter()
    y = cells.select(expr)["X_ot"].to_numpy()
    return time.perf_counter() - t, y[:1000]


def compare(quick: bool, folder: str) -> None:
    peak = sgemm_peak()
    print(f"NumPy SGEMM (4096², all cores): {peak:.0f} GFLOP/s\n")
    print(
        "centroids: `random` = scattered at random (spread 3/√i per component), cells around them; "
        "`k-means` = our fit_centroids of 100k clustered cells a batch (300 types, batch offsets), "
        "cells of the same law. GFLOP/s counts the full distance GEMM (2·n·K·d) either way.\n"
    )
    print("| d | centroids searched per cell | centroids | cells | faiss search + NumPy gather (s) | ours (s) | speed-up | ours GFLOP/s | of SGEMM peak | faiss peak RSS (MB) | ours peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [(50, "own_batch", 400_000), (50, "pooled", 60_000), (300, "own_batch", 100_000), (300, "pooled", 15_000)]
    for kind in ("random", "k-means"):
        for d, mode, n in cases:
            n = n // 4 if quick else n
            nb = N_BATCHES
            cents = None if kind == "random" else kmeans_centroids_file(d, nb, folder)
            searched = K_PER_BATCH if mode == "own_batch" else nb * K_PER_BATCH
            best = None
            for threads in (1, os.cpu_count()):
                (secs, yf), mem = run(run_faiss, n, d, nb, mode == "pooled", threads, cents)
                if best is None or secs < best[0]:
                    best = (secs, yf, mem)
            (ours, yo), mem_o = run(run_ours, n, d, nb, mode, cents)
            err = float(np.abs(yo - best[1]).max())
            gflops = 2 * n * searched * d / ours / 1e9
            print(
                f"| {d} | {searched:,} ({mode}) | {kind} | {n:,} | {best[0]:.2f} | {ours:.2f} | {best[0] / ours:.1f}x | "
                f"{gflops:.0f} | {gflops / peak:.0%} | {best[2]:.0f} | {mem_o:.0f} |  (max |Δ| vs faiss {err:.1e})",
                flush=True,
            )


def stream(n: int, folder: str, how: str):
    """One streaming query over cells_{n}.parquet; returns seconds (peak RSS via the harness).

    how = "ours"      scan_parquet → knn_interpolate → sink_parquet (the real use)
          "ours_only" the same expression, reduced to one number by the streaming
                      engine, so no sink is involved: the memory of our expression
          "control"   scan_parquet → X_pca * 2 → sink_parquet: plain Polars, for the
                      memory the scan and the sink take by themselves
    """
    import polars as pl

    import polars_singlecell as psc

    model = Path(folder) / "model.parquet"
    lf = pl.scan_parquet(Path(folder) / f"cells_{n}.parquet")
    expr = psc.knn_interpolate("X_pca", "batch", model=model)
    t = time.perf_counter()
    if how == "ours_only":
        lf.select(expr.arr.first().sum()).collect(engine="streaming")
    else:
        lf = lf.with_columns(expr if how == "ours" else (pl.col("X_pca") * 2).alias("X_ot"))
        psc.sink_parquet(lf, Path(folder) / f"out_{n}.parquet")
    return time.perf_counter() - t


def write_cells_streaming(n: int, folder: str, d: int = 50) -> None:
    """Write n cells in 500k-row pieces (100k-row groups) without holding them all."""
    import polars as pl

    _, _, cents, disp = make(1000, d, 4)
    integration_model(cents, disp, 4).write_parquet(Path(folder) / "model.parquet")
    parts = []
    for i, s in enumerate(range(0, n, 500_000)):
        x, batch, _, _ = make(min(500_000, n - s), d, 4, seed=100 + i)
        part = Path(folder) / f"part_{n}_{i}.parquet"
        pl.DataFrame({"batch": batch, "X_pca": pl.Series(x, dtype=pl.Array(pl.Float32, d))}).write_parquet(part, row_group_size=100_000)
        parts.append(part)
    pl.scan_parquet(parts).sink_parquet(Path(folder) / f"cells_{n}.parquet", row_group_size=100_000)
    for p in parts:
        p.unlink()


def overhead(d: int = 300):
    """Per-call cost with a loaded 28,672 × 300 model vs the one-time load."""
    import polars as pl

    import polars_singlecell as psc

    _, _, cents, disp = make(10, d, N_BATCHES)
    model = integration_model(cents, disp, N_BATCHES)
    one = pl.DataFrame({"batch": [0], "X_pca": pl.Series(cents[:1], dtype=pl.Array(pl.Float32, d))})
    t = time.perf_counter()
    expr = psc.knn_interpolate("X_pca", "batch", model=model, k=1)
    first = time.perf_counter() - t
    times = []
    for _ in range(50):
        t = time.perf_counter()
        one.select(expr)
        times.append(time.perf_counter() - t)
    return first, float(np.median(times))


def main() -> None:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        compare(quick, folder)
    print(
        "\n| streaming query over Parquet (d = 50, 4 × 2048 own-batch centroids, 100k-row groups) | cells | seconds | cells/s | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|")
    queries = {
        "ours_only": "knn_interpolate alone (streaming collect, no sink)",
        "ours": "scan_parquet → knn_interpolate → sink_parquet",
        "control": "control, plain Polars: scan_parquet → X_pca * 2 → sink_parquet",
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        sizes = (250_000, 1_000_000) if quick else (1_000_000, 4_000_000)
        for n in sizes:
            run(write_cells_streaming, n, folder)
            for how, label in queries.items():
                secs, peak = run(stream, n, folder, how)
                print(f"| {label} | {n:,} | {secs:.1f} | {n / secs:,.0f} | {peak:.0f} |", flush=True)
            os.unlink(Path(folder) / f"cells_{n}.parquet")
            os.unlink(Path(folder) / f"out_{n}.parquet")
    (first, per_call), _ = run(overhead)
    print(f"\nModel 28,672 × 300: first use (digest + build) {first * 1e3:.0f} ms; each later call on one cell {per_call * 1e3:.2f} ms (median of 50).")


if __name__ == "__main__":
    with recorded("knn.md"):  # also benches/results/knn.md, for make docs
        main()
