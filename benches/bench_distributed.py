"""``psc.integrate`` on one machine against the same run on a ``DaskEngine``
(a 2-worker ``LocalCluster`` on this machine: the fits and the apply stages
as tasks): seconds per stage, peak RSS of the driver and of each worker, and
whether every output is the same, bit for bit.

On one machine the engine can only cost: the same cores do the same work,
plus the tasks' scheduling, each worker's own decode of its partitions and
the states' bytes. This measures that overhead (issue 22's bound: under
15%). Each worker runs Polars with one thread and the local run
with two, so both use the machine's two cores.

    .venv/bin/python benches/bench_distributed.py [N_CELLS ...] [--keep DIR]

Writes ``benches/results/distributed.md`` and ``distributed.json`` (read
by ``benches/scale_plan.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))

import polars_singlecell as psc
from _harness import commit, hwm_mb

RESULTS = Path(__file__).parent / "results"
# The stages that read every cell, as tasks on the engine (integration: on the centroids, on the driver).
ON_ENGINE = ("genes", "pca", "project", "centroids", "interpolate")
OUTPUTS = ("genes.parquet", "pca.parquet", "cells_pca.parquet", "centroids.parquet", "integration.parquet",
           "cells.parquet")


def run(kind: str, raw: str, out: str, workers: int) -> None:
    """One contender, in its own process (called through ``--run``)."""
    extra = {}
    if kind == "local":
        psc.integrate(raw, out, log=None, progress=False)
    else:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None,
                               env={"POLARS_MAX_THREADS": "1"})
        client = Client(cluster)
        psc.integrate(raw, out, log=None, progress=False, engine=psc.distributed.DaskEngine(client))
        extra["worker_peak_mb"] = sorted(client.run(hwm_mb).values())
        client.close()
        cluster.close()
    extra["driver_peak_mb"] = hwm_mb()
    (Path(out) / "bench.json").write_text(json.dumps(extra))


def contender(kind: str, raw: Path, out: Path, workers: int) -> tuple[dict, dict]:
    done = subprocess.run([sys.executable, __file__, "--run", kind, str(raw), str(out), str(workers)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return report["stages"], json.loads((out / "bench.json").read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("n_cells", nargs="*", type=int, default=[1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    rows, same_all, runs = [], True, []
    for n in args.n_cells:
        d = Path(tempfile.mkdtemp(prefix="psc-dask-bench-")) if args.keep is None else args.keep / str(n)
        d.mkdir(parents=True, exist_ok=True)
        raw = d / "raw"
        if not raw.exists():
            psc.datasets.write_synthetic_counts(raw, n, n_genes=2000, random_state=0, rows_per_file=100_000)
        for old in ("local", "dask"):
            shutil.rmtree(d / old, ignore_errors=True)
        local, local_mem = contender("local", raw, d / "local", args.workers)
        dask, dask_mem = contender("dask", raw, d / "dask", args.workers)
        same = all(pl.read_parquet(d / "local" / f).equals(pl.read_parquet(d / "dask" / f)) for f in OUTPUTS)
        same_all &= same
        fits_local = sum(local[s]["seconds"] for s in ON_ENGINE)
        fits_dask = sum(dask[s]["seconds"] for s in ON_ENGINE)
        total_local = sum(v["seconds"] for v in local.values())
        total_dask = sum(v["seconds"] for v in dask.values())
        per_stage = ", ".join(f"{s} {local[s]['seconds']:.1f} → {dask[s]['seconds']:.1f}" for s in ON_ENGINE)
        workers_mb = " / ".join(f"{m:.0f}" for m in dask_mem["worker_peak_mb"])
        rows.append(f"| {n:,} | {per_stage} | {fits_local:.1f} | {fits_dask:.1f} | {fits_dask / fits_local - 1:+.0%} | "
                    f"{total_local:.1f} | {total_dask:.1f} | {local_mem['driver_peak_mb']:.0f} | "
                    f"{dask_mem['driver_peak_mb']:.0f} | {workers_mb} | {same} |")
        runs.append({"cells": n, "workers": args.workers, "local": {s: v["seconds"] for s, v in local.items()},
                     "dask": {s: v["seconds"] for s, v in dask.items()}, "local_peak_mb": local_mem["driver_peak_mb"],
                     "driver_peak_mb": dask_mem["driver_peak_mb"], "worker_peak_mb": dask_mem["worker_peak_mb"],
                     "identical": same, "commit": commit()})
        if args.keep is None:
            shutil.rmtree(d)
    lines = [
        "# psc.integrate on a Dask cluster",
        "",
        f"`.venv/bin/python benches/bench_distributed.py {' '.join(map(str, args.n_cells))}` at commit {commit()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs. Generated cells (`write_synthetic_counts`, 2,000 genes, 230 UMIs "
        "a cell, 100k rows a file in row groups of ~4M non-zeros, so ~11 partitions of 100,000 rows at most), `psc.integrate`'s defaults, each run in its own process. "
        f"Dask: `LocalCluster(n_workers={args.workers}, threads_per_worker=1)` on this machine, Polars with one thread "
        "a worker; the local run uses Polars' two. On the workers: the fits (genes: HVG statistics; pca: the "
        "covariance; centroids: the samples, then k-means on the driver) and the apply stages (project, interpolate: "
        "one part file a partition); the integration (on the centroids) runs on the driver in both runs.",
        "",
        "| cells | seconds, local → Dask | on-engine stages local s | on-engine stages Dask s | overhead | all stages local s | "
        "all stages Dask s | local peak MB | Dask driver peak MB | worker peaks MB | outputs identical |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "distributed.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))
    if not same_all:
        sys.exit("the Dask run's outputs differ from the local run's")


if __name__ == "__main__":
    main()
