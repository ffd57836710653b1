"""The Rust pipeline (``examples/rust_pipeline.rs``, the crate's lazy
``prelude``) beside ``psc.integrate`` on the same generated cells: wall time,
peak RSS of each (its own process, ``/usr/bin/time``), and whether the
outputs agree bit for bit.

The Rust side is the binary ``make test`` builds (``target/debug``: the dev
profile, opt-level 1 for every crate), so its time is not a speed
comparison with the release-built Python extension; its peak memory is the
point: both stream the counts in record batches.

    .venv/bin/python benches/bench_rust_pipeline.py [N_CELLS ...] [--keep DIR]

Writes ``benches/results/rust_pipeline.md``.
"""

from __future__ import annotations

import argparse
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
from _harness import ROOT, commit

RESULTS = Path(__file__).parent / "results"
BINARY = ROOT / "target" / "debug" / "examples" / "rust_pipeline"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a command in its own process."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    wall, kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n_cells", nargs="*", type=int, default=[50_000, 200_000])
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    if not BINARY.is_file():
        sys.exit(f"{BINARY} is missing: cargo build --features lazy --example rust_pipeline")
    table, agree = [], []
    for n in args.n_cells:
        d = Path(tempfile.mkdtemp(prefix="psc-rust-bench-")) if args.keep is None else args.keep / str(n)
        d.mkdir(parents=True, exist_ok=True)
        raw = d / "raw"
        if not raw.exists():
            psc.datasets.write_synthetic_counts(raw, n, n_genes=2000, random_state=0, rows_per_file=100_000)
        for old in ("psc", "rust"):
            shutil.rmtree(d / old, ignore_errors=True)
        py_cmd = [sys.executable, "-c",
                  f"import polars_singlecell as psc; psc.integrate({str(raw)!r}, {str(d / 'psc')!r}, log=None, progress=False)"]
        py_s, py_mb = timed(py_cmd)
        rs_s, rs_mb = timed([str(BINARY), str(raw), str(d / "psc"), str(d / "rust")])
        want = pl.read_parquet(d / "psc" / "cells.parquet", columns=["batch", "X_pca", "X_ot"])
        same = [pl.read_parquet(d / "rust" / f).equals(want) for f in ("cells.parquet", "cells_psc_models.parquet")]
        table.append(f"| {n:,} | {py_s:.1f} | {py_mb:.0f} | {rs_s:.1f} | {rs_mb:.0f} | {same[0]} | {same[1]} |")
        agree.append(all(same))
        if args.keep is None:
            shutil.rmtree(d)
    lines = [
        "# The Rust pipeline beside psc.integrate",
        "",
        f"`.venv/bin/python benches/bench_rust_pipeline.py {' '.join(map(str, args.n_cells))}` at commit {commit()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs. Generated cells "
        "(`write_synthetic_counts`, 2,000 genes, 300 UMIs a cell, 100k rows a file), `psc.integrate`'s defaults on both "
        "sides, each in its own process (`/usr/bin/time`). The Rust run also ranks seurat_v3 genes and fits a clipped "
        "PCA on the side (their passes are in its time), and projects and moves the cells a second time with Python's "
        "model files.",
        "",
        "| cells | Python s | Python peak MB | Rust s | Rust peak MB | Rust X_pca/X_ot = Python's | with Python's models |",
        "|---:|---:|---:|---:|---:|---|---|",
        *table,
        "",
        "The Rust binary is the dev-profile build `make test` makes (opt-level 1, every crate), so its seconds are "
        "not a speed comparison. Both stream the counts a record batch at a time with the Parquet source one row "
        "group ahead; the peaks grow with the number of centroids (at most 2,048 a batch, one per 16 cells), which "
        "the integration's solves hold; both keep one batch's centroid sample in memory and spill the others "
        "(`low_memory`).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rust_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(agree):
        sys.exit("the Rust pipeline's cells differ from psc.integrate's")


if __name__ == "__main__":
    main()
