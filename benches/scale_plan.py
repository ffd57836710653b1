"""Tahoe-100M's size on N Dask workers, on paper, from rates measured on this machine.

For 86.8M cells (62,710 genes, ~1,400 detected a cell, 14 plates, 2,000 highly variable genes, 50
components, 2,048 centroids a plate) and N workers, each like this machine, it prints per stage of
``psc.integrate`` with ``engine=DaskEngine``: the partitions (tasks), the bytes read and written,
the bytes moved between machines (the fit states sent to the driver; the apply stages write their
parts to the shared file system and send back a row count), the serial parts on the driver, and the
expected wall time.

Where each figure comes from:

- **Per-cell seconds of every stage** at Tahoe density: ``benches/results/tahoe-1M.json``
  (``make bench-tahoe N=1000000``), measured on a 2-core machine of this kind with both its cores
  (at the commit it names; its host was slower than some: compare its decode rate), so one worker
  means one such machine. Its interpolate stage includes the 100k-cell metrics (``evaluate``),
  which run once on the driver: they are taken out of the per-cell time and counted as serial.
- **The engine's overhead** on the stages that run as tasks: ``benches/results/distributed.json``
  (``make bench-distributed``), the Dask run's seconds over the local run's on the same machine;
  a measured gain is not counted (factor at least 1).
- **Fit states** (bytes on the wire, seconds to merge one into the driver's total): measured here,
  now, with the fits' own classes at Tahoe's sizes, one 100,000-row partition each.
- **The driver's serial work**: the integration's seconds from ``tahoe-1M.json`` (it runs on the
  28,672 centroids, whatever the number of cells); k-means on the samples, scaled linearly from the
  same run's centroids stage by the samples per plate (500,000 at the atlas' size against the
  1M run's ~71,000); the PCA's eigendecomposition, measured here.

Assumptions, named in the output: a 10 Gb/s network between workers and driver (1.25 GB/s), and the
tasks spread evenly (ceil(tasks / N) rounds). The shared file system must deliver the read rate of
the busiest stage (last column, decoded bytes); beyond it the stages are bound by the storage, not the
workers.

    .venv/bin/python benches/scale_plan.py [--workers 1 2 4 ...] [--network-gbps 10]

Writes ``benches/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))

import polars_singlecell as psc
from _harness import commit
from polars_singlecell import _internal
from polars_singlecell._frames import PARTITION_ROWS

RESULTS = Path(__file__).parent / "results"
ATLAS_CELLS = 86_800_000
N_GENES = 62_710
N_HVG = 2_000
N_COMPS = 50
N_PLATES = 14
SAMPLES_PER_PLATE = 500_000  # fit_centroids' max_samples_per_batch
# Bytes a cell decodes where a stage reads the counts: Tahoe's layout, an int64 token and a float32 value an entry.
BYTES_PER_ENTRY = 12
# Columns carried beside the embeddings (cell id, plate, line, drug, ...): an assumption, named in the output.
META_BYTES = 100


def _merge_cost(make, update, repeat: int = 3) -> tuple[int, float]:
    """A partition's state: its bytes on the wire and the best seconds to
    merge it into a total (as the driver does, after reading it back).
    ``make(first_row)``: a fresh state whose rows start there (the centroid
    sample merges only the partition that follows it)."""
    part = make(PARTITION_ROWS)
    update(part)
    wire = part.to_bytes()
    best = math.inf
    for _ in range(repeat):
        total = make(0)
        update(total)
        t = time.perf_counter()
        total.merge(type(part).from_bytes(wire))
        best = min(best, time.perf_counter() - t)
    return len(wire), best


def measure_states(rng: np.random.Generator) -> dict[str, tuple[int, float]]:
    """Wire bytes and merge seconds of each fit's state for one 100,000-row
    partition at Tahoe's sizes (14 plates)."""
    rows = PARTITION_ROWS
    batch = pl.Series("batch", rng.integers(0, N_PLATES, rows).astype(str))
    # 1,400 genes a cell would be 140M entries here; the HVG state's size does not
    # depend on them (per gene and plate), so 20 a cell fills it as well.
    per_cell = 20
    genes = np.sort(rng.choice(N_GENES, (rows, per_cell)), axis=1).astype(np.uint32)
    gene_idx = pl.Series("gene_idx", [np.unique(g) for g in genes], dtype=pl.List(pl.UInt32))
    values = pl.Series("values", [np.ones(len(g), np.float32) for g in gene_idx.to_list()], dtype=pl.List(pl.Float32))
    hv_idx = pl.Series("gene_idx", [np.unique(g % N_HVG) for g in genes], dtype=pl.List(pl.UInt32))
    hv_val = pl.Series("values", [np.ones(len(g), np.float32) for g in hv_idx.to_list()], dtype=pl.List(pl.Float32))
    emb = pl.Series("X_pca", rng.standard_normal((rows, N_COMPS), dtype=np.float32), dtype=pl.Array(pl.Float32, N_COMPS))
    threads = int(os.environ.get("POLARS_MAX_THREADS", "0")) or pl.thread_pool_size()
    return {
        "genes": _merge_cost(lambda _row: _internal.GeneStatsFit(N_GENES), lambda f: f.update(gene_idx, values, batch)),
        "pca": _merge_cost(lambda _row: _internal.CovarianceFit(N_HVG, threads), lambda f: f.update(hv_idx, hv_val)),
        "centroids": _merge_cost(lambda row: _internal.CentroidSampleFit(N_COMPS, SAMPLES_PER_PLATE, 0, threads, first_row=row),
                                 lambda f: f.update(emb, batch)),
    }


def eigen_seconds(rng: np.random.Generator) -> float:
    """fit_pca on a few cells of 2,000 genes: its time is the 2,000 x 2,000
    eigendecomposition, the PCA's serial part at any size."""
    n = 2_000
    idx = [np.sort(rng.choice(N_HVG, 50, replace=False)).astype(np.uint32).tolist() for _ in range(n)]
    df = pl.DataFrame({"gene_idx": pl.Series(idx, dtype=pl.List(pl.UInt32)),
                       "values": pl.Series([[1.0] * 50 for _ in range(n)], dtype=pl.List(pl.Float32))})
    t = time.perf_counter()
    psc.fit_pca(df, n_genes=N_HVG, n_comps=N_COMPS)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--network-gbps", type=float, default=10.0)
    args = ap.parse_args()
    tahoe = json.loads((RESULTS / "tahoe-1M.json").read_text())
    stages_1m = tahoe["integrate"]["stages"]
    stage_s = {k: v["seconds"] for k, v in stages_1m.items()}
    # The interpolate stage's seconds include evaluate (the metrics of a 100k-cell
    # sample, run on the driver): not per-cell work, so it is a serial part here.
    evaluate_s = stages_1m["interpolate"].get("evaluate_seconds", 0.0)
    stage_s["interpolate"] -= evaluate_s
    measured_cells = tahoe["cells"]
    entries = tahoe["entries_per_cell"]
    dist_path = RESULTS / "distributed.json"
    overhead, overhead_note = 1.0, "no distributed.json: overhead taken as 0%"
    if dist_path.exists():
        run = max(json.loads(dist_path.read_text()), key=lambda r: r["cells"])  # the largest run
        on = [s for s in ("genes", "pca", "project", "centroids", "interpolate") if s in run["dask"]]
        ratio = sum(run["dask"][s] for s in on) / sum(run["local"][s] for s in on)
        overhead = max(1.0, ratio)
        overhead_note = (f"measured Dask/local {ratio:.2f} on {run['cells']:,} cells, {run['workers']} workers "
                         f"(commit {run['commit']}); used: {overhead:.2f}")
    rng = np.random.default_rng(0)
    states = measure_states(rng)
    eig = eigen_seconds(rng)
    net = args.network_gbps * 1e9 / 8

    tasks = math.ceil(ATLAS_CELLS / PARTITION_ROWS)
    per_task = {s: stage_s[s] / measured_cells * PARTITION_ROWS * overhead
                for s in ("genes", "pca", "project", "centroids", "interpolate")}
    # The centroids stage of the 1M run = its read + k-means on every cell (~71k a plate, under the cap);
    # at the atlas' size the read is the tasks and k-means runs on 500k a plate, on the driver.
    kmeans_1m = stage_s["centroids"]
    kmeans_atlas = kmeans_1m * (SAMPLES_PER_PLATE * N_PLATES) / measured_cells
    counts_bytes = entries * BYTES_PER_ENTRY
    emb_bytes = N_COMPS * 4
    stages = {
        # stage: (tasks, bytes read a cell, bytes written a cell, state bytes a task, merge s a task, serial s)
        "genes": (tasks, counts_bytes, 0, *states["genes"], 0.0),
        "pca": (tasks, counts_bytes, 0, *states["pca"], eig),
        "project": (tasks, counts_bytes, emb_bytes + META_BYTES, 8, 0.0, 0.0),
        "centroids": (tasks, emb_bytes + 8, 0, *states["centroids"], kmeans_atlas),
        "integration": (0, 0, 0, 0, 0.0, stage_s["integration"]),
        "interpolate": (tasks, emb_bytes + META_BYTES, 2 * emb_bytes + META_BYTES, 8, 0.0, 0.0),
        "evaluate": (0, 0, 0, 0, 0.0, evaluate_s),
    }
    sample_gb = SAMPLES_PER_PLATE * N_PLATES * (emb_bytes + 16) / 1e9

    lines = [
        "# Tahoe-100M on N workers, on paper",
        "",
        f"`.venv/bin/python benches/scale_plan.py` at commit {commit()}, {platform.machine()}, {os.cpu_count()} CPUs. "
        f"{ATLAS_CELLS:,} cells, {N_GENES:,} genes ({entries:,.0f} detected a cell), {N_PLATES} plates, "
        f"{N_HVG:,} HVGs, {N_COMPS} components; partitions of {PARTITION_ROWS:,} rows: {tasks:,} tasks a stage. "
        "A worker is a machine like this one (its per-cell seconds are `benches/results/tahoe-1M.json`'s, "
        f"{measured_cells:,} cells at Tahoe density, both cores). Engine overhead: {overhead_note}.",
        "",
        "## Per stage",
        "",
        "| stage | tasks | one task (s) | read (TB) | written (GB) | moved to the driver (GB) | state a task (MB) | "
        "merge a task (ms) | serial on the driver (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, (n, rd, wr, state, merge, serial) in stages.items():
        lines.append(f"| {s} | {n:,} | {per_task.get(s, 0):.1f} | {ATLAS_CELLS * rd / 1e12:.2f} | "
                     f"{ATLAS_CELLS * wr / 1e9:.1f} | {n * state / 1e9:.2f} | {state / 1e6:.2f} | {merge * 1e3:.1f} | "
                     f"{serial + n * merge:.1f} |")
    lines += [
        "",
        f"Serial on the driver: the merges (one task's state at a time, in row order), the PCA's eigendecomposition "
        f"({eig:.2f} s, measured here), k-means on {SAMPLES_PER_PLATE:,} samples a plate ({kmeans_atlas:.0f} s: the "
        f"1M run's centroids stage, {kmeans_1m:.1f} s, scaled by the samples), the integration "
        f"({stage_s['integration']:.1f} s in the 1M run, on the same 28,672 centroids), evaluate ({evaluate_s:.1f} s "
        "in the 1M run: the metrics of a 100k-cell sample, and the pass over every cell that draws it, which here is "
        "not scaled with the cells, so at least that). The driver holds the merged "
        f"centroid sample: {sample_gb:.2f} GB at most ({N_PLATES} × {SAMPLES_PER_PLATE:,} cells). Read: decoded bytes "
        f"({BYTES_PER_ENTRY} a count entry; {META_BYTES} bytes a cell of other columns, assumed).",
        "",
        f"## Wall time ({args.network_gbps:g} Gb/s to the driver, assumed)",
        "",
        "| workers | genes | pca | project | centroids | integration | interpolate | evaluate | **total** | "
        "read rate of the busiest stage (decoded GB/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in args.workers:
        row, total, peak_read = [], 0.0, 0.0
        for s, (n, rd, _wr, state, merge, serial) in stages.items():
            rounds = math.ceil(n / w) if n else 0
            # The driver merges while later tasks run; what is left after the last round is at most all of it.
            secs = rounds * per_task.get(s, 0.0) + serial + n * merge + n * state / net
            row.append(secs)
            total += secs
            if n:
                peak_read = max(peak_read, ATLAS_CELLS * rd / secs)
        read_rate = peak_read / 1e9
        lines.append(f"| {w} | " + " | ".join(f"{x / 60:.1f} min" for x in row) + f" | **{total / 3600:.2f} h** | "
                     f"{read_rate:.1f} |")
    lines += [
        "",
        "A stage's wall time: ceil(tasks / workers) rounds of one task, plus its serial part, plus every merge and "
        "every state's transfer as if none overlapped the tasks (an upper bound). A centroids task takes the 1M "
        "run's whole per-cell time of that stage, k-means included, which the driver's serial part counts again "
        "(an upper bound too: the read and the sampling alone are less). The genes state is sized with all 14 plates "
        "in every partition (an upper bound: a plate-sorted file holds one or two). The read rate is of decoded "
        "bytes; the storage delivers the compressed Parquet, a few times less. Not measured at this size: each "
        "task's reading of the footers of the files before its rows, the "
        "file system's rate under many readers, the scheduler with thousands of tasks, and machines unlike this one.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
