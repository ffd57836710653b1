"""Command line:

    polars-singlecell demo [--out DIR] [--n-cells N]
    polars-singlecell integrate SOURCE OUT [--batch-key KEY] [--label-key KEY] [--n-comps N] ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(out: Path, n_cells: int) -> None:
    from polars_singlecell import datasets, plot
    from polars_singlecell.pipeline import integrate

    t0 = time.perf_counter()
    raw = datasets.write_synthetic_counts(out / "raw", n_cells, rows_per_file=50_000)
    print(f"generated {n_cells:,} cells x 2000 genes (3 plates, 4 cell types) in {raw}  [{time.perf_counter() - t0:.1f}s]")

    t = time.perf_counter()
    print("psc.integrate: normalize -> HVG per plate -> PCA -> 256 centroids per plate -> OT -> every cell, streaming")
    report = integrate(raw, out, batch_key="batch", label_key="label", n_top_genes=500,
                           n_comps=20, n_centroids=256, evaluate_cells=20_000, log=lambda m: print(f"  {m}"),
                           progress=True)
    ev = {(r["embedding"], r["metric"]): r["value"] for r in report["stages"]["interpolate"]["evaluate"]}
    print(f"wrote {out / 'cells.parquet'} (X_pca, X_ot), models and report.json in {out}")
    print(f"on 20,000 sampled cells: batch entropy (0-1) {ev['X_pca', 'batch_entropy_norm']:.3f} -> "
          f"{ev['X_ot', 'batch_entropy_norm']:.3f}, label purity {ev['X_pca', 'label_purity']:.3f} -> "
          f"{ev['X_ot', 'label_purity']:.3f}  [{time.perf_counter() - t:.1f}s]")
    t = time.perf_counter()
    png = out / "before_after.png"
    try:
        plot.embedding(out / "cells.parquet", basis=("X_pca", "X_ot"), color=("batch", "label"), path=png)
        print(f"wrote {png}: PCA (before) and OT (after), coloured by plate and by cell type  [{time.perf_counter() - t:.1f}s]")
    except ImportError:
        print(f"no {png}: pip install matplotlib for the picture")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polars-singlecell")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate counts with plate effects, integrate them, report")
    d.add_argument("--out", type=Path, default=Path("psc-demo"))
    d.add_argument("--n-cells", type=int, default=200_000)
    i = sub.add_parser("integrate", help="raw counts (Parquet) -> integrated embedding X_ot, resumable")
    i.add_argument("source", help="Parquet (a file, a folder, a glob, an hf:// or s3:// URL: gene_idx, values, a batch column; "
                                  "or any sparse list layout with --counts) or .h5ad file(s) (CSR X, batch in obs)")
    i.add_argument("out", type=Path, help="output folder (re-running resumes from finished stages)")
    i.add_argument("--batch-key", default="batch")
    i.add_argument("--label-key", default=None, help="if given, report.json holds psc.metrics.evaluate")
    i.add_argument("--counts", nargs=2, metavar=("GENES", "VALUES"), default=["gene_idx", "values"],
                   help="the cells' gene-id and value list columns (Tahoe-100M's Parquet release: genes expressions)")
    i.add_argument("--vocabulary", default=None, metavar="PATH",
                   help="Parquet table of token_id (and gene names): a cell's gene index is its token's row there; "
                        "tokens absent from it (a marker token) are dropped")
    i.add_argument("--n-genes", type=int, default=None)
    i.add_argument("--target-sum", type=float, default=1e4)
    i.add_argument("--n-top-genes", type=int, default=2000)
    i.add_argument("--hvg-flavor", choices=["seurat", "seurat_v3"], default="seurat",
                   help="seurat: on normalised values (default); seurat_v3: on raw counts, as scanpy")
    i.add_argument("--scale", action="store_true",
                   help="PCA of the genes scaled to unit variance (sc.pp.scale before sc.pp.pca)")
    i.add_argument("--max-value", type=float, default=None,
                   help="with --scale: clip the scaled values at this (sc.pp.scale's max_value)")
    i.add_argument("--n-comps", type=int, default=50)
    i.add_argument("--n-centroids", type=int, default=2048)
    i.add_argument("--min-cells-per-centroid", type=int, default=16)
    i.add_argument("--max-samples-per-batch", type=int, default=500_000)
    i.add_argument("-k", type=int, default=8)
    i.add_argument("--mode", choices=["own_batch", "pooled"], default="own_batch")
    i.add_argument("--device", default="cpu")
    i.add_argument("--random-state", type=int, default=0)
    i.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.n_cells)
    elif args.command == "integrate":
        import polars as pl

        from polars_singlecell.pipeline import integrate

        t0 = time.perf_counter()
        try:
            integrate(args.source, args.out, batch_key=args.batch_key, label_key=args.label_key, n_genes=args.n_genes,
                          target_sum=args.target_sum, n_top_genes=args.n_top_genes, hvg_flavor=args.hvg_flavor, scale=args.scale, max_value=args.max_value, n_comps=args.n_comps,
                          n_centroids=args.n_centroids, min_cells_per_centroid=args.min_cells_per_centroid, max_samples_per_batch=args.max_samples_per_batch, k=args.k,
                          mode=args.mode, device=args.device, random_state=args.random_state,
                          progress=not args.no_progress, counts=tuple(args.counts), vocabulary=args.vocabulary)
        except (ValueError, OSError, ImportError, pl.exceptions.PolarsError) as e:
            # Bad input, an unreadable source or a full disk: the message says
            # which and the fix; finished stages are kept for the next run.
            print(f"polars-singlecell integrate: {e}", file=sys.stderr)
            return 2
        print(f"done in {time.perf_counter() - t0:.1f}s: {args.out / 'cells.parquet'}, report {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
