"""Tahoe-100M at its real density: 62,710 genes, ~1,400 detected a cell
(``datasets.tahoe_like(n_genes=62_710, umis_per_cell=1_460)``: the
generator spreads UMIs thinly, so 1,460 UMIs give ~1,400 genes detected, the
median well's mean in Tahoe's ``sample_metadata``, ../shared/data), in the
Parquet release's layout (``genes`` token ids led by a marker,
``expressions``, a ``gene_metadata`` vocabulary) and as an h5ad plate.

Each step runs in a fresh child process (its own peak RSS):

1. generate the cells (``layout="tahoe"``);
2. decode alone: the streaming engine reading ``genes``/``expressions`` and
   summing them (the floor any counts stage pays);
3. ``psc.scan_cells`` (``to_cells``: marker dropped, ids mapped, cells
   sorted), the same sums: its rate against decode alone;
4. an h5ad of the same cells (written by anndata) → ``io.h5ad_to_parquet``,
   beside the rate of reading its ``indices``/``data`` alone through h5py;
5. ``psc.integrate`` from the Parquet layout: seconds, cells/s and peak RSS
   per stage (from ``report.json``).

Then the whole atlas (86.8M cells) extrapolated linearly in cells from the
measured rates, on this machine's cores; for 16 cores the counts stages
(decode-bound, one row group per thread) are divided by 16 / this machine's
cores, the fixed stages (integration) are not: stated as an assumption,
not measured.

    .venv/bin/python benches/bench_tahoe.py 1000000 [--keep DIR] [--h5ad-cells 200000]

Writes ``benches/results/tahoe-<cells>.md`` and ``.json`` (e.g. ``tahoe-1M.md``).
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

ATLAS_CELLS = 86_800_000
N_GENES, UMIS = 62_710, 1_460
RESULTS = Path(__file__).parent / "results"


def generate(n: int, out: str) -> dict:
    import polars_singlecell as psc

    t = time.perf_counter()
    psc.datasets.tahoe_like(n, out, n_genes=N_GENES, umis_per_cell=UMIS, layout="tahoe", rows_per_file=10_000)
    return {"seconds": time.perf_counter() - t}


def _sums(lf):
    import polars as pl

    return lf.select(pl.col(lf.collect_schema().names()[-2]).list.len().sum().alias("entries"),
                     pl.col(lf.collect_schema().names()[-1]).list.sum().sum().alias("total")).collect(engine="streaming")


def decode(data: str) -> dict:
    import polars as pl

    t = time.perf_counter()
    df = _sums(pl.scan_parquet(f"{data}/*.parquet").select("genes", "expressions"))
    return {"seconds": time.perf_counter() - t, "entries": int(df["entries"][0]), "total": float(df["total"][0])}


def to_cells(data: str, vocab: str) -> dict:
    import polars_singlecell as psc

    t = time.perf_counter()
    df = _sums(psc.scan_cells(data, counts=("genes", "expressions"), vocabulary=vocab).select("gene_idx", "values"))
    return {"seconds": time.perf_counter() - t, "entries": int(df["entries"][0]), "total": float(df["total"][0])}


def write_h5ad(data: str, vocab: str, path: str, n: int) -> dict:
    """The first ``n`` cells as one plate h5ad (anndata writes the whole
    matrix at once, so this step holds it: ``n`` is capped)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import polars as pl
    import scipy.sparse as sp

    import polars_singlecell as psc

    df = psc.scan_cells(data, counts=("genes", "expressions"), vocabulary=vocab).head(n).collect()
    lens = df["gene_idx"].list.len().to_numpy()
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    x = sp.csr_matrix((df["values"].explode().to_numpy(), df["gene_idx"].explode().to_numpy().astype(np.int32), indptr),
                      shape=(df.height, N_GENES))
    obs = pd.DataFrame({"plate": pd.Categorical(df["plate"].to_numpy()), "cell_line": pd.Categorical(df["cell_line_id"].to_numpy())},
                       index=df["BARCODE_SUB_LIB_ID"].to_numpy())
    var = pd.DataFrame(index=pl.read_parquet(vocab)["gene_symbol"].to_numpy())
    ad.AnnData(x, obs=obs, var=var).write_h5ad(path)
    return {"bytes": os.path.getsize(path), "entries": int(x.nnz)}


def read_h5ad_alone(path: str) -> dict:
    """h5py reading X's indices and data in the importer's slices: its floor."""
    import h5py

    t = time.perf_counter()
    with h5py.File(path, "r") as f:
        x = f["X"]
        n = x["indices"].shape[0]
        step = 4_000_000
        for a in range(0, n, step):
            x["indices"][a:a + step]
            x["data"][a:a + step]
    return {"seconds": time.perf_counter() - t}


def import_h5ad(path: str, out: str) -> dict:
    import polars_singlecell as psc

    t = time.perf_counter()
    psc.io.h5ad_to_parquet(path, out, rows_per_file=50_000)
    return {"seconds": time.perf_counter() - t}


def integrate(data: str, vocab: str, out: str) -> dict:
    import polars_singlecell as psc

    t = time.perf_counter()
    report = psc.integrate(data, out, batch_key="plate", label_key="cell_line_id", counts=("genes", "expressions"),
                           vocabulary=vocab, log=None)
    return {"seconds": time.perf_counter() - t, "stages": report["stages"]}




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n_cells", type=int, nargs="?", default=200_000)
    ap.add_argument("--keep", type=Path, default=None, help="keep the generated data here (reused when present)")
    ap.add_argument("--skip-integrate", action="store_true")
    ap.add_argument("--h5ad-cells", type=int, default=200_000,
                    help="cells in the h5ad plate file (anndata writes it from memory)")
    args = ap.parse_args()
    n = args.n_cells
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-tahoe-"))
    data, vocab = base / "tahoe" / "data", base / "tahoe" / "metadata" / "gene_metadata.parquet"
    rows: dict = {"cells": n, "genes": N_GENES, "umis_per_cell": UMIS, "cores": os.cpu_count(), "commit": commit(),
                  "machine": platform.processor() or platform.machine()}

    def step(name, fn, *a):
        out, peak = run(fn, *a)
        rows[name] = {**out, "peak_rss_gb": round(peak / 1024, 3)}
        print(f"{name}: {json.dumps(rows[name], default=str)[:300]}", flush=True)

    if not vocab.is_file():
        step("generate", generate, n, str(base / "tahoe"))
    step("decode", decode, str(data))
    step("to_cells", to_cells, str(data), str(vocab))
    entries = rows["decode"]["entries"]
    rows["entries_per_cell"] = entries / n
    h5ad = base / "plate.h5ad"
    n_h5ad = min(n, args.h5ad_cells)
    rows["h5ad_cells"] = n_h5ad
    step("write_h5ad", write_h5ad, str(data), str(vocab), str(h5ad), n_h5ad)
    step("read_h5ad_alone", read_h5ad_alone, str(h5ad))
    shutil.rmtree(base / "imported", ignore_errors=True)
    step("h5ad_to_parquet", import_h5ad, str(h5ad), str(base / "imported"))
    if not args.skip_integrate:
        shutil.rmtree(base / "out", ignore_errors=True)
        step("integrate", integrate, str(data), str(vocab), str(base / "out"))
    RESULTS.mkdir(exist_ok=True)
    label = f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"
    (RESULTS / f"tahoe-{label}.json").write_text(json.dumps(rows, indent=2, default=str))
    (RESULTS / f"tahoe-{label}.md").write_text(render(rows, " ".join(sys.argv[1:])))
    print((RESULTS / f"tahoe-{label}.md").read_text())
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)


def render(r: dict, argv: str) -> str:
    n, cores = r["cells"], r["cores"]
    entries = r["decode"]["entries"]
    per_cell = entries / n

    lines = [
        f"# Tahoe-100M at real density ({n:,} cells)",
        "",
        f"`benches/bench_tahoe.py {argv}` at commit {r['commit']}, {cores} cores ({r['machine']}). "
        f"{N_GENES:,} genes, {per_cell:,.0f} genes detected a cell (`tahoe_like(umis_per_cell={UMIS})`).",
        "",
        "| step | seconds | cells/s | M non-zeros/s | time vs decode alone (per cell) | peak RSS (GB) | atlas (86.8M cells) on this machine |",
        "|---|---|---|---|---|---|---|",
    ]
    base_rate = n / r["decode"]["seconds"]
    m = r.get("h5ad_cells", n)
    for name, label, cells in (("decode", "Parquet decode alone (`genes`, `expressions`)", n),
                               ("to_cells", "`scan_cells` → `to_cells` (Tahoe layout → ours)", n),
                               ("read_h5ad_alone", f"h5py read of X's indices + data alone ({m:,} cells)", m),
                               ("h5ad_to_parquet", f"`io.h5ad_to_parquet` (one plate file, {m:,} cells)", m)):
        s = r[name]["seconds"]
        c, e = cells / s, cells * per_cell / s / 1e6
        lines.append(f"| {label} | {s:.1f} | {c:,.0f} | {e:.1f} | {base_rate / c:.2f}× | {r[name]['peak_rss_gb']:.2f} | "
                     f"{ATLAS_CELLS / c / 3600:.2f} h |")
    lines += ["", f"h5ad file: {r['write_h5ad']['bytes'] / 1e9:.2f} GB for {r['write_h5ad']['entries']:,} non-zeros "
                  "(anndata's default: uncompressed), read just after it was written, so from the page cache: "
                  "the disk's own read rate is not measured here."]
    if "integrate" in r:
        st = r["integrate"]["stages"]
        lines += ["", "## `psc.integrate` from the Parquet layout", "",
                  "| stage | seconds | cells/s | peak RSS so far (GB) | atlas on this machine | atlas on 16 cores (assumed) |",
                  "|---|---|---|---|---|---|"]
        total2 = total16 = 0.0
        for name, s in st.items():
            secs = s["seconds"]
            scales = name != "integration"  # the OT between centroids does not grow with cells
            atlas = secs * (ATLAS_CELLS / n if scales else 1)
            atlas16 = atlas * (cores / 16 if scales else 1)
            total2 += atlas
            total16 += atlas16
            lines.append(f"| {name} | {secs:.1f} | {n / secs:,.0f} | {s.get('peak_rss_gb', 0):.2f} | {atlas / 3600:.2f} h | "
                         f"{atlas16 / 3600:.2f} h |")
        lines += [f"| **whole** | {r['integrate']['seconds']:.1f} | | **{r['integrate']['peak_rss_gb']:.2f}** | "
                  f"**{total2 / 3600:.2f} h** | **{total16 / 3600:.2f} h** |", "",
                  "Atlas columns: seconds × 86.8M / cells for every stage but `integration` (centroids only); "
                  "16 cores: those divided by 16 / this machine's cores, an assumption (not measured)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
