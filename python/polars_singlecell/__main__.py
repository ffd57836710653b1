"""Command line:

    polars-singlecell demo [--out DIR] [--n-cells N] [--umap]
    polars-singlecell integrate SOURCE OUT [--batch-key KEY] [--label-key KEY] [--n-comps N] ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The demo's plate effect: strong enough to see before integration (the
# generator's default, 0.3, barely separates the plates on PC1-PC2).
DEMO_BATCH_EFFECT = 1.0


def demo(out: Path, n_cells: int, umap: bool = False) -> None:
    from polars_singlecell import datasets, plot
    from polars_singlecell.pipeline import integrate

    t0 = time.perf_counter()
    raw = datasets.write_synthetic_counts(out / "raw", n_cells, rows_per_file=50_000, batch_effect=DEMO_BATCH_EFFECT)
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
    # UMAPs take ~50 s more (umap-learn, numba's compilation included): asked for, not by default.
    basis, what, n = ("umap", "UMAPs of X_pca (before) and X_ot (after)", 4_000) if umap else (
        ("X_pca", "X_ot"), "PCA (before) and OT (after)", 20_000)
    try:
        plot.embedding(out / "cells.parquet", basis=basis, color=("batch", "label"), max_cells=n, path=png)
        print(f"wrote {png}: {what}, coloured by plate and by cell type  [{time.perf_counter() - t:.1f}s]")
    except ImportError as e:
        print(f"no {png}: {e}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def _integration_defaults() -> dict:
    """fit_integration's keyword defaults: the CLI shows and passes these, so
    they live in one place."""
    import inspect

    from polars_singlecell.ot import fit_integration

    skip = {"centroids", "batch_key", "centroid", "mass", "random_state"}
    return {n: p.default for n, p in inspect.signature(fit_integration).parameters.items() if n not in skip}


# fit_integration's options on the command line, with what each does.
INTEGRATION_HELP = {
    "reference": "what batches move toward: 'barycenter' (a common reference of all batches) or one batch's name (it stays put)",
    "epsilon": "entropic blur, in units of the typical cross-batch cost (smaller: sharper, more iterations)",
    "reg_m": "price of creating or destroying mass (smaller: populations without counterpart stay put; inf: balanced OT)",
    "n_rounds": "barycentre updates of the reference per pass",
    "min_passes": "passes at least (each on the centroids the last one moved)",
    "max_passes": "passes at most",
    "max_iter": "Sinkhorn iterations per solve at most",
    "tol": "Sinkhorn stops when no potential moves by more than tol times the largest",
    "n_neighbors": "neighbours in each batch's centroid graph that smooths the displacements",
    "smooth_steps": "smoothing steps over that graph (0: unsmoothed)",
    "n_reference": "cap on the barycentre's support size",
}


def _parser() -> argparse.ArgumentParser:
    from polars_singlecell import _internal

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="polars-singlecell", formatter_class=fmt,
                                     description="Atlas-scale single-cell integration as Polars expressions.")
    cuda = "with CUDA" if _internal.CUDA_BUILD else "CPU only"
    parser.add_argument("--version", action="version", version=f"%(prog)s {_internal.__version__} ({cuda}; "
                        f"built against the polars crate {_internal.POLARS_CRATE_VERSION})")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="generate counts with plate effects, integrate them, report", formatter_class=fmt)
    d.add_argument("--out", type=Path, default=Path("psc-demo"), help="folder for the data, models and picture")
    d.add_argument("--n-cells", type=int, default=200_000, help="cells to generate")
    d.add_argument("--umap", action="store_true",
                   help="draw UMAPs before and after (needs umap-learn; ~50 s more) instead of two PCA components")
    i = sub.add_parser("integrate", help="raw counts (Parquet or .h5ad) -> integrated embedding X_ot, resumable",
                       formatter_class=fmt)
    i.add_argument("source", help="Parquet (a file, a folder, a glob, an hf:// or s3:// URL: gene_idx, values, a batch column; "
                                  "or any sparse list layout with --counts) or .h5ad file(s) (CSR X, batch in obs)")
    i.add_argument("out", type=Path, help="output folder (re-running resumes from finished stages)")
    i.add_argument("--batch-key", default="batch", help="the column (or obs column) naming each cell's batch")
    i.add_argument("--label-key", default=None, help="if given, report.json holds psc.metrics.evaluate by this label")
    i.add_argument("--counts", nargs=2, metavar=("GENES", "VALUES"), default=["gene_idx", "values"],
                   help="the cells' gene-id and value list columns (Tahoe-100M's Parquet release: genes expressions)")
    i.add_argument("--vocabulary", default=None, metavar="PATH",
                   help="Parquet table of token_id (and gene names): a cell's gene index is its token's row there; "
                        "tokens absent from it (a marker token) are dropped")
    i.add_argument("--n-genes", type=int, default=None, help="genes in the counts (default: a genes.parquet beside them, "
                                                             "else the largest gene index + 1)")
    i.add_argument("--target-sum", type=float, default=1e4, help="normalize_total's total per cell")
    i.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes to keep")
    i.add_argument("--hvg-flavor", choices=["seurat", "seurat_v3"], default="seurat",
                   help="seurat: on normalised values; seurat_v3: on raw counts, as scanpy")
    i.add_argument("--scale", action="store_true",
                   help="PCA of the genes scaled to unit variance (sc.pp.scale before sc.pp.pca)")
    i.add_argument("--max-value", type=float, default=None,
                   help="with --scale: clip the scaled values at this (sc.pp.scale's max_value)")
    i.add_argument("--n-comps", type=int, default=50, help="principal components")
    i.add_argument("--n-centroids", type=int, default=2048, help="k-means centroids per batch at most")
    i.add_argument("--min-cells-per-centroid", type=int, default=16, help="sampled cells per centroid at least "
                                                                          "(a batch keeps 64 centroids regardless)")
    i.add_argument("--max-samples-per-batch", type=int, default=500_000, help="cells per batch sampled for k-means")
    i.add_argument("-k", type=int, default=8, help="nearest centroids that move each cell")
    i.add_argument("--mode", choices=["own_batch", "pooled"], default="own_batch",
                   help="a cell moves by its own batch's centroids, or by all")
    i.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the heavy kernels run")
    i.add_argument("--random-state", type=int, default=0, help="seed of every sample and k-means")
    i.add_argument("--evaluate-cells", type=int, default=100_000, help="cells sampled for the metrics (with --label-key)")
    i.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
    cluster = i.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS", default=None,
                         help="run every stage that reads the cells on a running Dask scheduler (tcp://host:8786; needs polars-singlecell[dask] "
                              "and the same files at the same paths on every worker); same results as without it")
    cluster.add_argument("--workers", type=int, default=None, metavar="N",
                         help="run every stage that reads the cells on a local Dask cluster of N worker processes (needs polars-singlecell[dask])")
    g = i.add_argument_group("integration", "options of psc.fit_integration")
    for name, default in _integration_defaults().items():
        kind = str if isinstance(default, str) else type(default)
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=INTEGRATION_HELP.get(name, name))
    return parser


def _engine(scheduler: str | None, workers: int | None):
    """A DaskEngine on the scheduler at ``scheduler`` or on a local cluster
    of ``workers`` processes; None for neither."""
    if scheduler is None and workers is None:
        return None
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise ImportError("--scheduler and --workers need dask.distributed: pip install 'polars-singlecell[dask]'") from e
    from polars_singlecell.distributed import DaskEngine

    if scheduler is not None:
        return DaskEngine(Client(scheduler))
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    return DaskEngine(Client(LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.n_cells, args.umap)
    elif args.command == "integrate":
        import logging

        import polars as pl

        # integrate's stage lines go to the package's logger: on the console, as printed lines.
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
        logging.getLogger("polars_singlecell").setLevel(logging.INFO)

        from polars_singlecell.pipeline import integrate

        defaults = _integration_defaults()
        options = {n: getattr(args, n) for n in defaults}
        t0 = time.perf_counter()
        try:
            engine = _engine(args.scheduler, args.workers)
            integrate(args.source, args.out, batch_key=args.batch_key, label_key=args.label_key, n_genes=args.n_genes,
                      target_sum=args.target_sum, n_top_genes=args.n_top_genes, hvg_flavor=args.hvg_flavor,
                      scale=args.scale, max_value=args.max_value, n_comps=args.n_comps, n_centroids=args.n_centroids,
                      min_cells_per_centroid=args.min_cells_per_centroid, max_samples_per_batch=args.max_samples_per_batch,
                      k=args.k, mode=args.mode, device=args.device, random_state=args.random_state,
                      evaluate_cells=args.evaluate_cells, progress=not args.no_progress, counts=tuple(args.counts),
                      vocabulary=args.vocabulary, engine=engine,
                      # Only what differs from fit_integration's defaults: the fingerprint of earlier runs holds.
                      integration={n: v for n, v in options.items() if v != defaults[n]} or None)
        except (ValueError, OSError, ImportError, pl.exceptions.PolarsError) as e:
            # Bad input, an unreadable source or a full disk: the message says
            # which and the fix; finished stages are kept for the next run.
            print(f"polars-singlecell integrate: {e}", file=sys.stderr)
            return 2
        print(f"done in {time.perf_counter() - t0:.1f}s: {args.out / 'cells.parquet'}, report {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
