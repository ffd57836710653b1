"""polars-singlecell vs scanpy / scikit-learn, side by side on the same generated
sparse counts (~10% dense, 2000 genes). Each contender runs in its own fresh
child process (so peak RSS is its own); one run of this script produces the
whole table. Usage:

    make bench                                   # 1M cells, the README table
    .venv/bin/python benches/bench_preprocessing.py --n-cells 200000   # quicker

Prints a Markdown table: seconds, speed-up, peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _harness import commit, run

RESULTS = Path(__file__).parent / "results"


def _load(folder: str, log: bool = False):
    import polars as pl

    import polars_singlecell as psc

    df = pl.read_parquet(Path(folder) / "*.parquet", columns=["gene_idx", "values"])
    return df.with_columns(psc.normalize()) if log else df


def _csr(df, n_genes=2000):
    import numpy as np
    import scipy.sparse as sp

    indptr = np.concatenate([[0], np.cumsum(df["gene_idx"].list.len().to_numpy())])
    return sp.csr_matrix(
        (df["values"].explode().to_numpy(), df["gene_idx"].explode().to_numpy(), indptr), shape=(df.height, n_genes)
    )


REPEATS = 3  # normalize is short: best of 3 for both contenders


def ours_normalize(folder):
    import polars_singlecell as psc

    df = _load(folder)
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        df.select(psc.normalize("gene_idx", "values", target_sum=1e4))
        best = min(best, time.perf_counter() - t)
    return best


def scanpy_normalize(folder):
    import anndata as ad
    import scanpy as sc

    raw = ad.AnnData(_csr(_load(folder)))
    warm = raw[:100].copy()
    sc.pp.normalize_total(warm, target_sum=1e4)
    sc.pp.log1p(warm)  # numba compiles here, not in the timing
    best = float("inf")
    for _ in range(REPEATS):
        a = raw.copy()  # scanpy works in place: a fresh copy each time, untimed
        t = time.perf_counter()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        best = min(best, time.perf_counter() - t)
        del a
    return best


def ours_pca(folder):
    import polars_singlecell as psc

    df = _load(folder, log=True)
    t = time.perf_counter()
    model = psc.fit_pca(df, n_genes=2000, n_comps=50)
    df.select(psc.pca_project(model=model))
    return time.perf_counter() - t


def scanpy_pca(folder):
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(_csr(_load(folder, log=True)))
    t = time.perf_counter()
    sc.pp.pca(a, n_comps=50)  # sparse input: scikit-learn PCA(svd_solver="arpack"), implicit centring
    return time.perf_counter() - t


def ours_stream(folder, model_path, repeat):
    """scan_parquet → normalize → pca_project → sink_parquet over `repeat` copies of the files."""
    import polars as pl

    import polars_singlecell as psc

    files = sorted(str(p) for p in Path(folder).glob("*.parquet")) * repeat
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        q = pl.scan_parquet(files).select(psc.pca_project(model=model_path, values=psc.normalize()))
        psc.sink_parquet(q, Path(d) / "out.parquet")
        dt = time.perf_counter() - t
        n = pl.scan_parquet(Path(d) / "out.parquet").select(pl.len()).collect().item()
    return dt, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-cells", type=int, default=1_000_000)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    import polars as pl

    import polars_singlecell as psc

    folder = Path(args.data) / f"counts_{args.n_cells}"
    if not folder.exists():
        t = time.perf_counter()
        psc.datasets.write_synthetic_counts(folder, args.n_cells, rows_per_file=100_000)
        print(f"generated {args.n_cells:,} cells in {time.perf_counter() - t:.0f}s -> {folder}")
    nnz = pl.scan_parquet(folder / "*.parquet").select(pl.col("gene_idx").list.len().sum()).collect().item()
    lines: list[str] = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    out("# Preprocessing against scanpy")
    out()
    out(f"`benches/bench_preprocessing.py {' '.join(sys.argv[1:])}` at commit {commit()}, "
        f"{platform.processor() or platform.machine()}.")
    out()
    out(f"{args.n_cells:,} cells x 2000 genes, {nnz / args.n_cells / 2000:.1%} non-zero, "
          f"POLARS_MAX_THREADS={os.environ.get('POLARS_MAX_THREADS', 'unset')}, {os.cpu_count()} CPUs")

    rows = []
    t_ours, m_ours = run(ours_normalize, str(folder))
    ref = (None, None) if args.skip_reference else run(scanpy_normalize, str(folder))
    rows.append(("normalize_total + log1p (best of 3)", "scanpy", t_ours, m_ours, *ref))
    t_ours, m_ours = run(ours_pca, str(folder))
    ref = (None, None) if args.skip_reference else run(scanpy_pca, str(folder))
    rows.append(("PCA fit + project, 50 comps", "scanpy.pp.pca (arpack)", t_ours, m_ours, *ref))

    out()
    out("| step | reference | ours (s) | reference (s) | speed-up | ours peak RSS (MB) | reference peak RSS (MB) |")
    out("|---|---|---:|---:|---:|---:|---:|")
    for step, refname, t, m, rt, rm in rows:
        sp = f"{rt / t:.1f}x" if rt else "-"
        out(f"| {step} | {refname} | {t:.2f} | {rt or 0:.2f} | {sp} | {m:.0f} | {rm or 0:.0f} |")

    # Streaming: scan -> normalize -> pca_project -> sink, at N and 4N cells.
    model = psc.fit_pca(
        pl.scan_parquet(folder / "*.parquet").head(200_000).with_columns(psc.normalize()), n_genes=2000, n_comps=50
    )
    with tempfile.TemporaryDirectory() as d:
        mp_path = Path(d) / "pca.parquet"
        model.save(mp_path)
        out()
        out("| streaming scan_parquet → normalize → pca_project → sink_parquet | cells | seconds | cells/s | peak RSS (MB) |")
        out("|---|---:|---:|---:|---:|")
        peaks = []
        for repeat in (1, 4):
            (dt, n), peak = run(ours_stream, str(folder), str(mp_path), repeat)
            peaks.append(peak)
            out(f"| {repeat}x the files | {n:,} | {dt:.1f} | {n / dt:,.0f} | {peak:.0f} |")
        out()
        out(f"peak RSS ratio 4x / 1x cells: {peaks[1] / peaks[0]:.2f}")
    if not args.skip_reference and args.n_cells == 1_000_000:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "preprocessing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
