"""Command line: ``polars-singlecell demo [--out DIR] [--n-cells N]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(out: Path, n_cells: int) -> None:
    import polars as pl

    import polars_singlecell as psc

    t0 = time.perf_counter()
    raw = psc.datasets.write_synthetic_counts(out / "raw", n_cells, rows_per_file=50_000)
    print(f"generated {n_cells:,} cells x 2000 genes (3 plates, 4 cell types) in {raw}  [{time.perf_counter() - t0:.1f}s]")

    t = time.perf_counter()
    norm = pl.scan_parquet(raw / "*.parquet").with_columns(psc.normalize("gene_idx", "values", target_sum=1e4))
    var = psc.highly_variable_genes(norm, n_genes=2000, n_top_genes=500, batch_key="batch")
    genes = psc.consensus_genes(var, more_than=1)
    print(f"highly variable genes: {var['highly_variable'].sum()} ranked, {genes.len()} variable in >1 plate  [{time.perf_counter() - t:.1f}s]")

    t = time.perf_counter()
    selected = norm.with_columns(psc.select_genes("gene_idx", "values", genes=genes).struct.unnest())
    model = psc.fit_pca(selected, n_genes=genes.len(), n_comps=20)
    model.save(out / "pca.parquet")
    print(f"PCA: {model.n_comps} components, explained variance ratio of the first five "
          f"{[round(float(x), 3) for x in model.explained_variance_ratio[:5]]}  [{time.perf_counter() - t:.1f}s]")

    t = time.perf_counter()
    cells = selected.select("cell_id", "batch", "label", psc.pca_project("gene_idx", "values", model=model))
    psc.sink_parquet(cells, out / "cells_pca.parquet")
    print(f"wrote {out / 'cells_pca.parquet'} (cell_id, batch, label, X_pca)  [{time.perf_counter() - t:.1f}s]")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polars-singlecell")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate counts, then normalize -> HVG -> PCA, streaming")
    d.add_argument("--out", type=Path, default=Path("psc-demo"))
    d.add_argument("--n-cells", type=int, default=200_000)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.n_cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
