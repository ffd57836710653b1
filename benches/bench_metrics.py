"""psc.metrics vs harmonypy's compute_lisi (the same metric, LISI with
perplexity 30), side by side, each in its own spawned process; then the whole
psc.metrics.evaluate at 100k and 1M cells × 50 dims.

harmonypy 2.1.0 grows about as n² (measured between its two sizes below), so it
runs only at the sizes that fit a benchmark; the script prints the measured
exponent. scib-metrics needs JAX and Python ≥ 3.12 and is not run here.

    make bench-metrics        # or: .venv/bin/python benches/bench_metrics.py [--quick]
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

D = 50
N_BATCHES = 14


def make(n: int, seed: int = 0):
    """Cells in 20 clusters (labels), 14 batches each shifted a little."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, D)) * 4
    label = rng.integers(0, 20, n)
    batch = rng.integers(0, N_BATCHES, n)
    shift = rng.normal(size=(N_BATCHES, D)) * 0.5
    x = (centres[label] + shift[batch] + rng.normal(size=(n, D))).astype(np.float32)
    return x, batch.astype(str), label.astype(str)


def lisi_ours(n: int):
    import polars_singlecell as psc

    x, batch, _ = make(n)
    t = time.perf_counter()
    idx, dist = psc.metrics.neighbors(x, 90)
    out = psc.metrics.lisi(idx, dist, batch, 30)
    return time.perf_counter() - t, out


def lisi_harmonypy(n: int):
    import pandas as pd
    from harmonypy import compute_lisi

    x, batch, _ = make(n)
    t = time.perf_counter()
    out = compute_lisi(x, pd.DataFrame({"batch": batch}), ["batch"], perplexity=30)[:, 0]
    return time.perf_counter() - t, out


def write_cells(n: int, path: str) -> None:
    import polars as pl

    parts = []
    for i, s in enumerate(range(0, n, 250_000)):
        x, batch, label = make(min(250_000, n - s), seed=10 + i)
        p = f"{path}.{i}"
        pl.DataFrame({"batch": batch, "label": label, "X_pca": pl.Series(x, dtype=pl.Array(pl.Float32, D))}).write_parquet(p)
        parts.append(p)
    pl.scan_parquet(parts).sink_parquet(path, row_group_size=100_000)
    for p in parts:
        os.unlink(p)


def evaluate(path: str):
    import polars as pl

    import polars_singlecell as psc

    t = time.perf_counter()
    table = psc.metrics.evaluate(pl.scan_parquet(path), ["X_pca"], batch_key="batch", label_key="label")
    return time.perf_counter() - t, table.filter(metric="n_cells")["value"].item()


def main() -> None:
    quick = "--quick" in sys.argv
    print("| cells | harmonypy compute_lisi (s) | ours: exact 90-NN + LISI (s) | speed-up | max |Δ LISI| | harmonypy peak RSS (MB) | ours peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    sizes = (2_500, 5_000) if quick else (10_000, 20_000)
    hp_times = []
    for n in sizes:
        (t_h, ref), mem_h = run(lisi_harmonypy, n)
        (t_o, ours), mem_o = run(lisi_ours, n)
        hp_times.append(t_h)
        print(f"| {n:,} | {t_h:.1f} | {t_o:.2f} | {t_h / t_o:.0f}x | {np.abs(ours - ref).max():.1e} | {mem_h:.0f} | {mem_o:.0f} |", flush=True)
    expo = np.log(hp_times[1] / hp_times[0]) / np.log(sizes[1] / sizes[0])
    # ours alone on all of 100k cells (harmonypy extrapolated from its two runs)
    n = 20_000 if quick else 100_000
    (t_o, _), mem_o = run(lisi_ours, n)
    est = hp_times[1] * (n / sizes[1]) ** expo
    print(f"| {n:,} | not run (~{est / 60:.0f} min at the measured n^{expo:.2f}) | {t_o:.1f} | ~{est / t_o:.0f}x | | | {mem_o:.0f} |", flush=True)
    print("\n| psc.metrics.evaluate over Parquet (one embedding, all metrics, max_cells = 100,000) | cells | seconds | cells used | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        for n in (100_000,) if quick else (100_000, 1_000_000):
            path = str(Path(folder) / f"cells_{n}.parquet")
            run(write_cells, n, path)
            (secs, used), mem = run(evaluate, path)
            print(f"| | {n:,} | {secs:.1f} | {used:,.0f} | {mem:.0f} |", flush=True)


if __name__ == "__main__":
    with recorded("metrics.md"):  # also benches/results/metrics.md, for make docs
        main()
