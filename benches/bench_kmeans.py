"""k-means for centroid-level integration: polars-singlecell vs scikit-learn, side by side.

500,000 cells of a generated PCA-like embedding (300 cell types, per-component
variance falling as 1/i), K = 2048 centroids, d = 50 and 300: our
``fit_centroids`` (defaults: k-means++ on 10,000 cells, Lloyd warm-up on nested
subsamples, 3 Lloyd passes over all cells) against the reference method's
``MiniBatchKMeans(batch_size=4096, max_iter=25, n_init=1)`` and ``KMeans(n_init=1)``
(capped at 10 Lloyd iterations: to convergence it takes minutes per run here).
Every contender runs in its own child process on the same data and all the
machine's cores; inertia is computed here, the same way for all: Σ‖x − nearest
centre‖² over all 500k cells in float64. Usage:

    make bench-kmeans                               # the README table
    .venv/bin/python benches/bench_kmeans.py --dims 50 --n-cells 100000   # quicker
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _harness import recorded, run

K = 2048



def generate(n: int, d: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    scales = (1.0 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
    means = rng.normal(size=(300, d)).astype(np.float32) * scales * 4
    lab = rng.integers(0, 300, n)
    return (means[lab] + rng.normal(size=(n, d)).astype(np.float32) * scales).astype(np.float32)


def ours(path: str, max_iter: int):
    import numpy as np
    import polars as pl

    import polars_singlecell as psc

    x = np.load(path)
    df = pl.DataFrame({"X": x, "batch": np.zeros(len(x), np.int32)}, schema_overrides={"X": pl.Array(pl.Float32, x.shape[1])})
    t = time.perf_counter()
    fit = psc.fit_centroids(df, embedding="X", batch_key="batch", n_centroids=K, max_iter=max_iter)
    return time.perf_counter() - t, fit["centroid"].to_numpy()


def minibatch(path: str):
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    x = np.load(path)
    t = time.perf_counter()
    km = MiniBatchKMeans(n_clusters=K, batch_size=4096, max_iter=25, n_init=1, random_state=0).fit(x)
    return time.perf_counter() - t, km.cluster_centers_


def kmeans(path: str):
    import numpy as np
    from sklearn.cluster import KMeans

    x = np.load(path)
    t = time.perf_counter()
    km = KMeans(n_clusters=K, n_init=1, max_iter=10, random_state=0).fit(x)
    return time.perf_counter() - t, km.cluster_centers_


def inertia(x, centres) -> float:
    import numpy as np
    from sklearn.metrics import pairwise_distances_argmin

    labels = pairwise_distances_argmin(x, centres.astype(np.float32))
    diff = x.astype(np.float64) - centres.astype(np.float64)[labels]
    return float(np.einsum("ij,ij->", diff, diff))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cells", type=int, default=500_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[50, 300])
    args = ap.parse_args()
    import numpy as np

    print(f"{args.n_cells:,} cells, K = {K}; cores: {len(__import__('os').sched_getaffinity(0))}\n")
    print("| d | method | seconds | inertia | vs MiniBatchKMeans: time | inertia | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.dims:
            x = generate(args.n_cells, d)
            path = str(Path(tmp) / f"x{d}.npy")
            np.save(path, x)
            rows = [("MiniBatchKMeans(4096, 25 epochs)", *run(minibatch, path))]
            rows.append(("ours fit_centroids (max_iter=3)", *run(ours, path, 3)))
            if d <= 50:
                rows.append(("ours fit_centroids (max_iter=10)", *run(ours, path, 10)))
                rows.append(("KMeans(n_init=1, max_iter=10)", *run(kmeans, path)))
            base_t, base_i = rows[0][1][0], inertia(x, rows[0][1][1])
            for name, (secs, centres), peak in rows:
                i = base_i if name.startswith("MiniBatch") else inertia(x, centres)
                print(f"| {d} | {name} | {secs:.2f} | {i:.6g} | {base_t / secs:.1f}x | {i / base_i:.4f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    with recorded("kmeans.md"):  # also benches/results/kmeans.md, for make docs
        main()
