"""Integration quality, side by side, judged on cells with psc.metrics:
no correction, per-batch centring, Harmony (harmonypy) and ours
(fit_integration on k-means centroids → knn_interpolate), on the real labelled
sets in ../shared/data and on generated data with a known batch effect.

scbiot (the reference method, integrate_centroids with its defaults, CPU)
runs too where SCBIOT_PYTHON names a Python that has it: it needs ~8 GB of
torch wheels, so it lives in its own venv (benches/bench_pipeline.py says how
to make one); its time is its own call's, without importing torch.

Ours runs with psc.integrate's defaults from X_pca (fit_centroids: 2048
centroids a batch, at most one per 16 cells; fit_integration's defaults;
knn_interpolate k = 8). The table goes to benches/results/integration.md.

    make bench-integration    # or: .venv/bin/python benches/bench_integration.py
    SCBIOT_PYTHON=/tmp/scbenv/bin/python make bench-integration
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from _harness import commit

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
METRICS = ["batch_entropy_norm", "ilisi", "silhouette_batch", "graph_connectivity", "label_purity", "clisi",
           "silhouette_label", "nmi", "ari", "isolated_labels", "label_transfer", "overall"]
OUT = Path(__file__).resolve().parent / "results" / "integration.md"


def datasets():

    harmony = pl.read_parquet(DATA / "harmony_cell_lines" / "embedding.parquet").select(
        "batch", "label", pl.col("embedding").alias("X_pca")
    )
    cb = pl.read_parquet(DATA / "cellbench_mixology" / "cells.parquet").filter(pl.col("demuxlet_cls") == "SNG")
    pancreas = pl.read_parquet(DATA / "cepo_sce_pancreas" / "cells.parquet")
    gen, truth = generated()
    hard, hard_truth = generated(missing_lines_per_plate=15, line_skew=5.0)
    return [("harmony_cell_lines (3 batches, 2 lines)", harmony, None),
            ("cellbench_mixology SNG (5 batches, 5 lines)", pca(cb, "cellbench_mixology"), None),
            ("cepo_sce_pancreas (3 studies, beta / ductal)", pca(pancreas, "cepo_sce_pancreas"), None),
            ("generated, Tahoe-100M design: 14 plates, 50 lines, 5 missing per plate", gen, truth),
            ("generated, hard: 15 of 50 lines missing per plate, line shares differing 5-fold between plates", hard, hard_truth)]


def pca(cells: pl.DataFrame, name: str) -> pl.DataFrame:
    """Raw counts → psc.normalize → 2000 HVGs → 30 PCs, as integrate does."""
    import polars_singlecell as psc

    n_genes = pl.read_parquet(DATA / name / "genes.parquet").height
    cells = cells.with_columns(psc.normalize(target_sum=1e4))
    var = psc.highly_variable_genes(cells, n_genes=n_genes, n_top_genes=2000)
    genes = var.filter("highly_variable")["gene_idx"]
    cells = cells.with_columns(psc.select_genes(genes=genes).struct.unnest())
    return cells.with_columns(psc.pca_project(model=psc.fit_pca(cells, n_genes=genes.len(), n_comps=30))).select("batch", "label", "X_pca")


def generated(n_cells: int = 50_000, **effect):
    """Tahoe-100M's design (psc.datasets.tahoe_like_embedding: 14 plates, 50
    lines in the real proportions, 5 lines missing per plate) with a known
    affine plate effect; the truth is returned beside it."""
    import polars_singlecell as psc

    df = psc.datasets.tahoe_like_embedding(n_cells, random_state=0, **effect)
    truth = df["X_true"].to_numpy().astype(np.float64)
    return df.select(pl.col("plate").alias("batch"), pl.col("cell_line").alias("label"), "X_pca"), truth


def centring(df: pl.DataFrame) -> np.ndarray:
    x = df["X_pca"].to_numpy().astype(np.float64)
    b = df["batch"].to_numpy()
    out = x.copy()
    for g in np.unique(b):
        out[b == g] -= x[b == g].mean(0) - x.mean(0)
    return out.astype(np.float32)


def harmony(df: pl.DataFrame) -> np.ndarray:
    import harmonypy
    import pandas as pd

    meta = pd.DataFrame({"batch": df["batch"].to_numpy()})  # no pyarrow needed
    ho = harmonypy.run_harmony(df["X_pca"].to_numpy().astype(np.float64), meta, ["batch"], verbose=False, random_state=0)
    return np.asarray(ho.Z_corr, dtype=np.float32)


def ours(df: pl.DataFrame) -> np.ndarray:
    import polars_singlecell as psc

    cents = psc.fit_centroids(df, embedding="X_pca", batch_key="batch", min_cells_per_centroid=16)
    model = psc.fit_integration(cents)
    return df.select(psc.knn_interpolate("X_pca", "batch", model=model, k=8))["X_ot"].to_numpy()


def scbiot(df: pl.DataFrame) -> tuple[np.ndarray, dict]:
    """scbiot's integrate_centroids in its own Python: the embedding and what it reported."""
    import tempfile

    from _harness import run_scbiot

    with tempfile.TemporaryDirectory() as tmp:
        df.select("batch", "X_pca").write_parquet(Path(tmp) / "in.parquet")
        info, _, _ = run_scbiot(os.environ["SCBIOT_PYTHON"], Path(tmp) / "in.parquet", Path(tmp) / "out.parquet", "batch", [])
        return pl.read_parquet(Path(tmp) / "out.parquet")["X_scbiot"].to_numpy(), info


def truth_error(emb: np.ndarray, truth: np.ndarray, batch: np.ndarray) -> float:
    """RMS distance to the true embedding after the best global affine fit
    (an integration may return any common frame, not the truth's)."""
    a = np.hstack([emb, np.ones((len(emb), 1))])
    coef, *_ = np.linalg.lstsq(a, truth, rcond=None)
    return float(np.sqrt(((a @ coef - truth) ** 2).sum(1).mean()))


def main() -> None:
    import polars_singlecell as psc

    lines = ["# benches/bench_integration.py", "", f"{time.strftime('%Y-%m-%d')}, polars-singlecell {psc.__version__}, "
             f"commit {commit()}, {os.cpu_count()} cores. psc.metrics.evaluate on every cell (≤ 100k; silhouettes on a "
             "seeded 10k); overall = scIB's aggregate (0.6 × mean of isolated labels, NMI, ARI, label silhouette, cLISI "
             "+ 0.4 × mean of batch silhouette, iLISI, graph connectivity). label_purity and batch_entropy_norm are the "
             "issue-26 criteria: ours ≥ Harmony's − 0.005 and ≥ 0.95 × Harmony's on the real sets."]

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    for name, df, truth in datasets():
        say()
        say(f"**{name}**, {df.height:,} cells, d = {df.schema['X_pca'].size}")
        say()
        cols = METRICS + (["truth RMSE"] if truth is not None else []) + ["seconds"]
        say("| method | " + " | ".join(cols) + " |")
        say("|---" * (len(cols) + 1) + "|")
        methods = ["none", "per-batch centring", "Harmony (harmonypy 2.1.0)", "ours (fit_integration + knn_interpolate)"]
        if os.environ.get("SCBIOT_PYTHON"):
            methods.insert(3, "scbiot 1.2.1 (integrate_centroids)")
        for method in methods:
            t = time.perf_counter()
            if method.startswith("scbiot"):
                emb, info = scbiot(df)
                t = time.perf_counter() - info["seconds"]  # its own call's time, not the child's start
                method += " (returned its input)" if info["unchanged"] else f" (it={info['metrics'].get('it')})"
            elif method == "none":
                emb = df["X_pca"].to_numpy()
            elif method.startswith("per-batch"):
                emb = centring(df)
            elif method.startswith("Harmony"):
                emb = harmony(df)
            else:
                emb = ours(df)
            secs = time.perf_counter() - t
            cells = df.with_columns(E=pl.Series(emb, dtype=pl.Array(pl.Float32, emb.shape[1])))
            m = {k: v for _, k, v in psc.metrics.evaluate(cells, ["E"], batch_key="batch", label_key="label").iter_rows()}
            vals = [f"{m[k]:.3f}" for k in METRICS]
            if truth is not None:
                vals.append(f"{truth_error(emb.astype(np.float64), truth, df['batch'].to_numpy()):.3f}")
            say(f"| {method} | " + " | ".join(vals) + f" | {secs:.2f} |")
    lines.extend(ablation())
    OUT.write_text("\n".join(lines) + "\n")



def ablation() -> list[str]:
    """Which part of the generated batch effect limits ours."""
    import polars_singlecell as psc

    out = ["", "**generated (Tahoe-100M design), one part of the plate effect at a time** (ours)", "",
           "| plate effect | none: batch_entropy_norm | ours: batch_entropy_norm | ours: label_purity |", "|---|---|---|---|"]
    print("\n".join(out), flush=True)
    for label, kw in [
        ("shift only", dict(missing_lines_per_plate=0, rotation=0, scaling=0)),
        ("shift, 5 lines missing per plate", dict(rotation=0, scaling=0)),
        ("shift, per-axis scaling ±15%, small rotation", dict(missing_lines_per_plate=0)),
        ("all of the above", {}),
    ]:
        df, _ = generated(**kw)
        res = df.with_columns(E=pl.Series(ours(df), dtype=pl.Array(pl.Float32, df.schema["X_pca"].size)))
        m = {(e, k): v for e, k, v in psc.metrics.evaluate(res, ["X_pca", "E"], batch_key="batch", label_key="label").iter_rows()}
        out.append(f"| {label} | {m['X_pca', 'batch_entropy_norm']:.3f} | {m['E', 'batch_entropy_norm']:.3f} | {m['E', 'label_purity']:.3f} |")
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
