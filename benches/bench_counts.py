"""Counts throughput against the machine (issue 21 item 1): the three passes
of ``psc.integrate`` over the counts (genes: normalize + HVG statistics;
pca: normalize + select_genes + the covariance; project: the same + the
projection, sunk to Parquet) beside

- Parquet decode alone: the streaming engine reading ``gene_idx``/``values``
  of the same files and summing them, the floor any counts stage pays;
- each stage's compute alone: its kernels on the first cells, held in
  memory (no decode), as a rate;
- the machine: memory bandwidth (NumPy copy of 1 GiB) and GEMM peak
  (NumPy float32 / float64 4096³).

at Tahoe density (62,710 genes, ~1,400 detected a cell) and at the
generator's default (2,000 genes, 300 UMIs a cell). Each step runs in a
fresh child process (its own peak RSS). A stage whose reads and kernels run
one after the other is bounded by 1 / (1/decode + 1/compute): the table
shows that bound beside the measured rate.

    .venv/bin/python benches/bench_counts.py [--tahoe-cells 200000] [--default-cells 1000000] [--keep DIR]

Writes ``benches/results/counts.md`` and ``counts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _harness import commit, run

RESULTS = Path(__file__).parent / "results"
DENSITIES = {"tahoe": dict(n_genes=62_710, umis_per_cell=1_460), "default": {}}
BYTES_PER_ENTRY = 8  # a UInt32 gene index and a Float32 value, decoded
COMPUTE_CELLS = 50_000


def generate(n: int, out: str, kw: dict) -> dict:
    import polars_singlecell as psc

    t = time.perf_counter()
    psc.datasets.tahoe_like(n, out, **kw)
    return {"seconds": time.perf_counter() - t}


def machine() -> dict:
    """Memory bandwidth (bytes read + written by a copy) and GEMM rates."""
    import numpy as np

    a = np.ones(2**27)  # 1 GiB of float64
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    out = {"copy_gb_s": 2 * a.nbytes / best / 1e9}
    for dt in ("float32", "float64"):
        x = np.random.default_rng(0).random((4096, 4096)).astype(dt)
        x @ x
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t)
        out[f"gemm_{dt}_gflops"] = 2 * 4096**3 / best / 1e9
    return out


def decode(cells: str) -> dict:
    import polars as pl

    t = time.perf_counter()
    df = pl.scan_parquet(f"{cells}/part-*.parquet").select(
        pl.col("gene_idx").list.len().sum().alias("entries"), pl.col("values").list.sum().sum().alias("total")
    ).collect(engine="streaming")
    return {"seconds": time.perf_counter() - t, "entries": int(df["entries"][0]), "total": float(df["total"][0])}


def integrate(cells: str, out: str) -> dict:
    """The pipeline as users run it; the counts stages' times from report.json."""
    import polars_singlecell as psc

    t = time.perf_counter()
    report = psc.integrate(cells, out, batch_key="plate", n_centroids=64, log=None)
    return {"seconds": time.perf_counter() - t, "stages": report["stages"]}


def compute(cells: str, out: str) -> dict:
    """Each stage's kernels on the first COMPUTE_CELLS cells, already in
    memory: what the stage would cost with a free decode."""
    import polars as pl

    import polars_singlecell as psc
    from polars_singlecell import _frames, _internal

    df = pl.scan_parquet(f"{cells}/part-*.parquet").select("plate", "gene_idx", "values").head(COMPUTE_CELLS).collect()
    df = df.rechunk()
    entries = int(df["gene_idx"].list.len().sum())
    n_genes = pl.read_parquet(f"{cells}/genes.parquet").height
    hv = pl.read_parquet(f"{out}/genes.parquet").filter("highly_variable")["gene_idx"]
    model = psc.PcaModel.load(f"{out}/pca.parquet")
    res = {"cells": df.height, "entries": entries}

    def best(fn, repeats=3):
        b = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            b = min(b, time.perf_counter() - t)
        return b

    def genes():
        norm = df.with_columns(psc.normalize())
        acc = _internal.GeneStatsFit(n_genes)
        acc.update(norm["gene_idx"], norm["values"], norm["plate"])

    def pca():
        sel = df.with_columns(psc.normalize()).select(psc.select_genes(genes=hv).struct.unnest())
        acc = _internal.CovarianceFit(hv.len(), _frames.n_threads(None), "cpu")
        acc.update(sel["gene_idx"], sel["values"])

    def project():
        df.lazy().with_columns(psc.normalize()).select(psc.select_genes(genes=hv).struct.unnest()).select(
            psc.pca_project(model=model)).collect()

    for name, fn in (("genes", genes), ("pca", pca), ("project", project)):
        res[name] = best(fn)
    # The exact Gram's work: each cell's k selected entries give k(k+1)/2
    # scattered multiply-adds (the lower triangle), timed alone.
    sel = df.with_columns(psc.normalize()).select(psc.select_genes(genes=hv).struct.unnest())
    k = sel["gene_idx"].list.len().cast(pl.Float64)
    res["gram_updates"] = float((k * (k + 1) / 2).sum())
    res["gram"] = best(lambda: _internal.CovarianceFit(hv.len(), _frames.n_threads(None), "cpu").update(sel["gene_idx"], sel["values"]))
    res["normalize"] = best(lambda: df.select(psc.normalize()))
    norm = df.with_columns(psc.normalize())
    res["hvg_statistics"] = best(lambda: _internal.GeneStatsFit(n_genes).update(norm["gene_idx"], norm["values"], norm["plate"]))
    res["select_genes"] = best(lambda: norm.select(psc.select_genes(genes=hv).struct.unnest()))
    res["hv_genes"] = int(hv.len())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tahoe-cells", type=int, default=200_000)
    ap.add_argument("--default-cells", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="keep the generated data here (reused when present)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-counts-"))
    rows: dict = {"cores": os.cpu_count(), "commit": commit(), "machine": platform.processor() or platform.machine(),
                  "compute_cells": COMPUTE_CELLS}

    def step(key, fn, *a):
        out, peak = run(fn, *a)
        out["peak_rss_gb"] = round(peak / 1024, 3)
        print(f"{key}: {json.dumps(out, default=str)[:300]}", flush=True)
        return out

    rows["machine_rates"] = step("machine", machine)
    for name, n in (("tahoe", args.tahoe_cells), ("default", args.default_cells)):
        where = base / f"{name}-{n}"
        cells = where / "cells"
        r = rows[name] = {"cells": n, **DENSITIES[name]}
        if not (cells / "genes.parquet").is_file():
            r["generate"] = step(f"{name} generate", generate, n, str(cells), DENSITIES[name])
        r["decode"] = step(f"{name} decode", decode, str(cells))
        shutil.rmtree(where / "out", ignore_errors=True)
        r["integrate"] = step(f"{name} integrate", integrate, str(cells), str(where / "out"))
        r["compute"] = step(f"{name} compute", compute, str(cells), str(where / "out"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "counts.json").write_text(json.dumps(rows, indent=2, default=str))
    (RESULTS / "counts.md").write_text(render(rows, " ".join(sys.argv[1:])))
    print((RESULTS / "counts.md").read_text())
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)


def render(r: dict, argv: str) -> str:
    m = r["machine_rates"]
    lines = [
        "# Counts throughput against the machine",
        "",
        f"`benches/bench_counts.py {argv}` at commit {r['commit']}, {r['cores']} cores ({r['machine']}).",
        "",
        f"Machine: memory copy {m['copy_gb_s']:.1f} GB/s (read + write); GEMM float32 {m['gemm_float32_gflops']:.0f} "
        f"GFLOP/s, float64 {m['gemm_float64_gflops']:.0f} GFLOP/s (NumPy's BLAS, 4096³).",
    ]
    for name in ("tahoe", "default"):
        d = r[name]
        n, entries = d["cells"], d["decode"]["entries"]
        dec = entries / d["decode"]["seconds"]
        c = d["compute"]
        lines += ["", f"## {name} density: {n:,} cells, {entries / n:,.0f} non-zeros a cell, "
                      f"{d.get('n_genes', 2000):,} genes ({c['hv_genes']:,} highly variable)", "",
                  "| step | seconds | M non-zeros/s | MB/s decoded | vs decode alone | compute alone (M nz/s) | "
                  "serial bound (M nz/s) | of the bound | peak RSS (GB) |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| Parquet decode alone | {d['decode']['seconds']:.1f} | {dec / 1e6:.1f} | "
                  f"{dec * BYTES_PER_ENTRY / 1e6:.0f} | 100% | | | | {d['decode']['peak_rss_gb']:.2f} |"]
        for stage in ("genes", "pca", "project"):
            s = d["integrate"]["stages"][stage]["seconds"]
            rate = entries / s
            comp = c["entries"] / c[stage]
            bound = 1 / (1 / dec + 1 / comp)
            lines.append(f"| {stage} | {s:.1f} | {rate / 1e6:.1f} | {rate * BYTES_PER_ENTRY / 1e6:.0f} | "
                         f"{rate / dec:.0%} | {comp / 1e6:.1f} | {bound / 1e6:.1f} | {rate / bound:.0%} | "
                         f"{d['integrate']['stages'][stage].get('peak_rss_gb', 0):.2f} |")
        for part, label in (("normalize", "normalize"), ("hvg_statistics", "HVG statistics (of normalized values)"),
                            ("select_genes", "select_genes (of normalized values)")):
            if part in c:
                lines.append(f"| ({label} alone, in memory) | | | | | {c['entries'] / c[part] / 1e6:.1f} | | | |")
        lines += ["", f"pca's exact Gram: {c['gram_updates'] / c['cells']:,.0f} multiply-adds a cell "
                      f"({c['gram_updates'] / c['entries']:.0f} per non-zero read), scattered into a "
                      f"{c['hv_genes']:,}² float64 matrix at {c['gram_updates'] / c['gram'] / 1e9:.2f} G/s in memory "
                      f"({c['entries'] / c['gram'] / 1e6:.0f} M non-zeros/s)."]
    lines += ["", "Rates are non-zeros (list entries) per second; MB/s counts them decoded (4-byte index + 4-byte value). "
                  f"Compute alone: the stage's kernels on the first {r['compute_cells']:,} cells held in memory, best of 3. "
                  "Serial bound: decode then compute, one after the other (1 / (1/decode + 1/compute)); "
                  "a stage above 100% of it overlaps the two."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
