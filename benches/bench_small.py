"""Small data, as a user's first try (issue 26 item 5): `psc.integrate` from
raw counts against scanpy's normalize_total → log1p → highly_variable_genes
→ pca → harmonypy on the same cells, same machine, same run. Both start from
the same Parquet file and end with an integrated embedding; neither
evaluates. Each contender runs in its own spawned process (its own peak RSS;
imports not timed). Quality: psc.metrics.evaluate on each's result (labels:
cell line).

Data: psc.datasets.tahoe_like at 3k, 8k and 15k cells, 20,000 genes and
~2,500 UMIs a cell (10x-like depth), 14 plates → the first 3 plates'
cells, so each batch has ~1-5k cells as a small study's samples do.

    make bench-small      # or: .venv/bin/python benches/bench_small.py 3000 8000 15000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cpu, hwm_mb, run

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["batch_entropy_norm", "ilisi", "label_purity", "clisi", "overall"]


def make(n: int, where: Path) -> Path:
    import polars_singlecell as psc

    # 14 plates in the generator; keep the first three (n cells in all).
    total = int(n * 14 / 3 * 1.2)
    src = psc.datasets.tahoe_like(total, where / "all", n_genes=20_000, umis_per_cell=2_500, random_state=0)
    cells = pl.scan_parquet(src / "part-*.parquet").filter(pl.col("plate").is_in(["plate1", "plate2", "plate3"])).head(n).collect()
    (where / "cells").mkdir()
    cells.write_parquet(where / "cells" / "cells.parquet")
    shutil.copy(src / "genes.parquet", where / "cells" / "genes.parquet")
    shutil.rmtree(where / "all")
    return where / "cells"


def ours(src: str, out: str, min_cells_per_centroid: int) -> dict:
    import polars_singlecell as psc

    t = time.perf_counter()
    report = psc.integrate(src, out, batch_key="plate", min_cells_per_centroid=min_cells_per_centroid, log=None)
    secs = time.perf_counter() - t
    return {"seconds": secs, "stages": {k: round(v["seconds"], 2) for k, v in report["stages"].items()}, "peak_mb": hwm_mb()}


def scanpy_harmony(src: str, out: str) -> dict:
    import anndata as ad
    import harmonypy
    import numpy as np
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    t = time.perf_counter()
    cells = pl.read_parquet(Path(src) / "cells.parquet")
    n_genes = pl.read_parquet(Path(src) / "genes.parquet").height
    lengths = cells["gene_idx"].list.len().to_numpy()
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    x = sp.csr_matrix((cells["values"].explode().to_numpy(), cells["gene_idx"].explode().to_numpy(), indptr), shape=(cells.height, n_genes))
    adata = ad.AnnData(x, obs=pd.DataFrame({"plate": cells["plate"].to_numpy()}))
    stages = {"read": time.perf_counter() - t}
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, batch_key="plate")
    stages["normalize+hvg"] = time.perf_counter() - t - sum(stages.values())
    sc.pp.pca(adata, n_comps=50, mask_var="highly_variable")
    stages["pca"] = time.perf_counter() - t - sum(stages.values())
    ho = harmonypy.run_harmony(adata.obsm["X_pca"], adata.obs, ["plate"], verbose=False, random_state=0)
    z = np.asarray(ho.Z_corr, dtype=np.float32)
    stages["harmony"] = time.perf_counter() - t - sum(stages.values())
    secs = time.perf_counter() - t
    pl.DataFrame({"X_pca": adata.obsm["X_pca"].astype(np.float32), "X_harmony": z}).write_parquet(Path(out) / "emb.parquet")
    return {"seconds": secs, "stages": {k: round(v, 2) for k, v in stages.items()}, "peak_mb": hwm_mb()}


def quality(src: Path, ours_out: Path, ref_out: Path) -> dict:
    import polars_singlecell as psc

    cells = pl.read_parquet(src / "cells.parquet", columns=["plate", "cell_line"])
    o = pl.read_parquet(ours_out / "cells.parquet", columns=["X_pca", "X_ot"])
    r = pl.read_parquet(ref_out / "emb.parquet")
    df = pl.concat([cells, o, r.rename({"X_pca": "X_pca_scanpy"})], how="horizontal")
    res = {}
    for name, cols in (("ours", ["X_pca", "X_ot"]), ("scanpy+harmony", ["X_pca_scanpy", "X_harmony"])):
        t = psc.metrics.evaluate(df, cols, batch_key="plate", label_key="cell_line")
        m = {(e, k): v for e, k, v in t.iter_rows()}
        res[name] = {"before": {k: m[cols[0], k] for k in METRICS}, "after": {k: m[cols[1], k] for k in METRICS}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", type=int, default=[3000, 8000, 15000])
    ap.add_argument("--min-cells-per-centroid", type=int, default=16,
                    help="integrate's option (its default 16; 1: every cell of a small batch its own centroid, as before issue 26)")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "small.md")
    args = ap.parse_args()
    import polars_singlecell as psc

    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            src = make(n, tmp)
            (tmp / "ref").mkdir()
            a, _ = run(ours, str(src), str(tmp / "ours"), args.min_cells_per_centroid)
            b, _ = run(scanpy_harmony, str(src), str(tmp / "ref"))
            q = quality(src, tmp / "ours", tmp / "ref")
            rows.append({"n_cells": n, "ours": a, "scanpy": b, "quality": q})
            print(json.dumps(rows[-1]), flush=True)
    opt = "" if args.min_cells_per_centroid == 16 else f" --min-cells-per-centroid {args.min_cells_per_centroid}"
    lines = [f"# benches/bench_small.py {' '.join(map(str, args.sizes))}{opt}", "",
             f"{time.strftime('%Y-%m-%d')}, polars-singlecell {psc.__version__}, {cpu()}, {os.cpu_count()} cores", "",
             "| cells | ours (s) | scanpy + harmonypy (s) | ratio (target ≤ 3) | ours: stages (s) | scanpy: stages (s) | peak MB ours / scanpy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_cells']:,} | {r['ours']['seconds']:.1f} | {r['scanpy']['seconds']:.1f} | {r['ours']['seconds'] / r['scanpy']['seconds']:.2f} | "
                     f"{r['ours']['stages']} | {r['scanpy']['stages']} | {r['ours']['peak_mb']:.0f} / {r['scanpy']['peak_mb']:.0f} |")
    lines += ["", "Quality (psc.metrics.evaluate, labels: cell line; overall = scIB's aggregate):", "",
              "| cells | method | " + " | ".join(f"{m} before → after" for m in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        for name, q in r["quality"].items():
            lines.append(f"| {r['n_cells']:,} | {name} | " + " | ".join(f"{q['before'][m]:.3f} → {q['after'][m]:.3f}" for m in METRICS) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
