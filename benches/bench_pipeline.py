"""The whole pipeline at atlas scale (issue 7): `polars-singlecell integrate` on
Tahoe-shaped raw counts (psc.datasets.tahoe_like: 14 plates, 50 lines, 2000
genes, ~300 UMIs a cell) at 1M and 10M cells, with the defaults (2000 HVGs,
50 PCs, 2048 centroids per plate, k = 8). Each step runs in its own process,
so its peak RSS is its own: generation, integrate (seconds per stage from
report.json), and Harmony (harmonypy) on the same PCA input
(out/cells_pca.parquet) where it fits (≤ --harmony-max-cells). Quality:
psc.metrics.evaluate on the same seeded 100k cells for every embedding
(labels: cell line).

scbiot (the reference method, scbiot.ot.integrate_centroids with its
defaults, CPU) runs on the same X_pca where --scbiot-python names a Python that
has it (≤ --scbiot-max-cells). scbiot 1.2.1 declares Python 3.12 only, but its
code runs on 3.11; it pulls ~8 GB of torch wheels, so it lives in its own venv,
never in this project's:

    python3 -m venv /tmp/scbenv
    /tmp/scbenv/bin/pip install polars 'numpy<2.2' 'scipy<1.17' 'pandas<3' anndata scanpy pot pyranges \
        scikit-learn scikit-misc seaborn statsmodels 'torch<2.11' 'wrapt<2' faiss-cpu
    /tmp/scbenv/bin/pip install --no-deps --ignore-requires-python scbiot==1.2.1

    make bench-pipeline                                   # 1M and 10M cells
    .venv/bin/python benches/bench_pipeline.py --keep-scbiot  # scbiot's rows from the last run
    .venv/bin/python benches/bench_pipeline.py 1000000 --scbiot-python /tmp/scbenv/bin/python
    SCBIOT_PYTHON=/tmp/scbenv/bin/python make bench-pipeline
    # scbiot alone at 10M on the last run's X_pca, stopped after 90 min (a lower bound on its time):
    .venv/bin/python benches/bench_pipeline.py 10000000 --scbiot-only --scbiot-python /tmp/scbenv/bin/python \
        --scbiot-max-cells 10000000 --scbiot-timeout 5400
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).parent))
from _harness import commit, cpu, run_scbiot

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["batch_entropy_norm", "ilisi", "label_purity", "clisi", "graph_connectivity"]


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; its wall seconds and peak RSS in GB (the child's own, from wait4)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return secs, usage.ru_maxrss / 1024**2  # KiB → GiB


# Generated regimes (issue 26): Tahoe's design with 5 of 50 lines missing per
# plate, and a harder one: 15 missing, line shares differing 5-fold between plates.
REGIMES = {"tahoe": {}, "hard": {"missing_lines_per_plate": 15, "line_skew": 5.0},
           # The same cells without any plate effect: what a perfect correction could score on each.
           "tahoe-none": {"plate_effect": 0.0}, "hard-none": {"missing_lines_per_plate": 15, "line_skew": 5.0, "plate_effect": 0.0}}


def generate(n: int, where: Path, regime: str = "tahoe") -> dict:
    done = where / "generated.json"
    if done.is_file() and json.loads(done.read_text())["n_cells"] == n and json.loads(done.read_text()).get("regime", "tahoe") == regime:
        return json.loads(done.read_text()) | {"reused": True}
    shutil.rmtree(where, ignore_errors=True)
    kw = "".join(f", {k}={v!r}" for k, v in REGIMES[regime].items())
    code = f"import polars_singlecell as psc; psc.datasets.tahoe_like({n}, {str(where / 'cells')!r}, random_state=0{kw})"
    secs, rss = run([sys.executable, "-c", code])
    info = {"n_cells": n, "regime": regime, "seconds": round(secs, 1), "peak_rss_gb": round(rss, 2),
            "bytes_on_disk": sum(f.stat().st_size for f in (where / "cells").glob("*.parquet"))}
    done.write_text(json.dumps(info))
    return info


HARMONY = """
import sys, time, numpy as np, pandas as pd, polars as pl, harmonypy
cells = pl.read_parquet(sys.argv[1], columns=["plate", "cell_line", "X_pca"])
x = cells["X_pca"].to_numpy().astype(np.float64)
meta = pd.DataFrame({"plate": cells["plate"].to_numpy()})
t = time.perf_counter()
ho = harmonypy.run_harmony(x, meta, ["plate"], verbose=False, random_state=0)
secs = time.perf_counter() - t
z = np.asarray(ho.Z_corr, dtype=np.float32)
z = z if z.shape[0] == x.shape[0] else z.T
cells.select("plate", "cell_line").with_columns(
    pl.Series("X_harmony", z).cast(pl.Array(pl.Float32, z.shape[1]))).write_parquet(sys.argv[2])
print(f"harmony itself: {secs:.1f}s")
"""


def evaluate(path: Path, embeddings: list[str]) -> dict:
    import polars_singlecell as psc

    t = psc.metrics.evaluate(pl.scan_parquet(path), embeddings, batch_key="plate", label_key="cell_line",
                             max_cells=100_000, random_state=0)
    return {(r["embedding"], r["metric"]): r["value"] for r in t.iter_rows(named=True)}


def overall(m: dict) -> float:
    """The issue-7 summary kept for comparison with earlier runs: 0.6 × mean(label
    purity, cLISI) + 0.4 × mean(normalised batch entropy, iLISI)."""
    bio = (m[("after", "label_purity")] + m[("after", "clisi")]) / 2
    batch = (m[("after", "batch_entropy_norm")] + m[("after", "ilisi")]) / 2
    return 0.6 * bio + 0.4 * batch


def scib(m: dict, key: str) -> str:
    """scIB's aggregate from psc.metrics.evaluate ('overall', 'bio_conservation',
    'batch_correction'); rows measured before evaluate reported it show —."""
    v = m.get(("after", key))
    return "—" if v is None else f"{v:.3f}"


def _from_pca(r: dict) -> float:
    """Ours from X_pca: the stages a method given X_pca runs (centroids, OT,
    interpolation), less the 100k-cell evaluation inside the interpolate
    stage: a reference's call is timed without it too (it is judged by the
    same evaluate afterwards)."""
    return sum(r["stages"][k] for k in ["centroids", "integration", "interpolate"]) - (r.get("evaluate_seconds") or 0.0)


def render(meta: dict, gens: dict, rows: list[dict]) -> str:
    """The results table (Markdown) from what main measured."""
    regime = meta.get("regime", "tahoe")
    lines = [f"# benches/bench_pipeline.py {' '.join(map(str, meta['sizes']))}" + (f" --regime {regime}" if regime != "tahoe" else ""), "",
             f"{meta['date']}, {meta['cpu']}, {meta['cores']} cores, polars {meta['polars']}, "
             f"polars-singlecell {meta['version']}, commit {meta['commit']}", ""]
    for n, gen in gens.items():
        lines.append(f"- {int(n):,} cells: generated in {gen['seconds']} s (peak {gen['peak_rss_gb']} GB), "
                     f"{gen['bytes_on_disk'] / 1e9:.2f} GB of Parquet")
    stage_names = ["genes", "pca", "project", "centroids", "integration", "interpolate"]
    lines += ["", "| cells | method | wall (s) | from X_pca (s) | peak RSS (GB) | genes | pca | project | centroids | integration "
              "| interpolate (+ evaluate) | batch entropy (norm) before → after | iLISI after | label purity before → after "
              "| cLISI after | graph conn. after | scIB bio | scIB batch | scIB overall | issue-7 overall |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["stages"], {tuple(k.split("|")): v for k, v in r["metrics"].items()}
        if r.get("detail", {}).get("timed_out"):
            lines.append(f"| {r['n']:,} | {r['method']} | > {r['seconds']:.0f} | > {r['seconds']:.0f} | ≥ {r['rss']:.2f} | "
                         + " | ".join("—" for _ in stage_names) + " | — | — | — | — | — | — | — | — | — |")
            continue
        before = {tuple(k.split("|")): v for k, v in next(x for x in rows if x["n"] == r["n"])["metrics"].items()}
        from_pca = _from_pca(r) if s else r.get("own_seconds", r["seconds"])
        lines.append(
            f"| {r['n']:,} | {r['method']} | {r['seconds']:.0f} | {from_pca:.0f} | {r['rss']:.2f} | "
            + " | ".join(f"{s[k]:.0f}" if k in s else "—" for k in stage_names)
            + f" | {before[('X_pca', 'batch_entropy_norm')]:.3f} → {m[('after', 'batch_entropy_norm')]:.3f}"
            + f" | {m[('after', 'ilisi')]:.3f} | {before[('X_pca', 'label_purity')]:.3f} → {m[('after', 'label_purity')]:.3f}"
            + f" | {m[('after', 'clisi')]:.3f} | {m[('after', 'graph_connectivity')]:.3f}"
            + f" | {scib(m, 'bio_conservation')} | {scib(m, 'batch_correction')} | {scib(m, 'overall')} | {overall(m):.3f} |")
    lines += ["", "from X_pca: ours = centroids + integration + interpolate, without evaluate's 100k-cell metrics "
              "(evaluate's own seconds: " + ", ".join(f"{r['n']:,}: {r['evaluate_seconds']:.0f}" for r in rows if r.get("evaluate_seconds") is not None)
              + "), which a reference's quality is judged by too, outside its time; a reference = its own call. "
              "scIB bio / batch / overall: psc.metrics.evaluate's aggregate (scib-metrics' grouping: bio = isolated labels, NMI, ARI, "
              "label silhouette, cLISI; batch = batch silhouette, iLISI, graph connectivity; overall = 0.6 bio + 0.4 batch). "
              "issue-7 overall = 0.6 × mean(label purity, cLISI) + 0.4 × mean(batch entropy, iLISI), after integration, "
              "the summary earlier runs reported."]
    ours = [r for r in rows if r["method"].startswith("polars")]
    if len(ours) > 1:
        lines += ["", f"Peak RSS at {ours[-1]['n']:,} cells / at {ours[0]['n']:,}: {ours[-1]['rss'] / ours[0]['rss']:.2f}× (target ≤ 1.25×)"]
        for r in ours:
            peaks = ", ".join(f"{k} {v}" for k, v in r["stage_rss"].items())
            lines.append(f"- {r['n']:,}: peak RSS so far after each stage (GB): {peaks}")
    for r in rows:
        if r["method"].startswith("scbiot"):
            ref = next(x for x in ours if x["n"] == r["n"])
            ratio = r["own_seconds"] / _from_pca(ref)
            e2e = r["own_seconds"] / ref["seconds"]
            if r["detail"].get("timed_out"):
                lines.append(f"- {r['n']:,}: scbiot stopped unfinished after {r['own_seconds']:.0f} s: ≥ {ratio:.1f}× ours "
                             f"from X_pca, ≥ {e2e:.1f}× ours end to end from raw counts (target ≥ 20×; lower bounds)")
            else:
                lines.append(f"- {r['n']:,}: scbiot's own call {r['own_seconds']:.0f} s / ours from X_pca: {ratio:.2f}×, "
                             f"/ ours end to end from raw counts: {e2e:.2f}× (target ≥ 20×); "
                             f"scbiot's metrics: {r['detail']['metrics']}")
    return "\n".join(lines) + "\n"


def scbiot_row(args, n: int, where: Path, flat) -> dict:
    out = where / "out"
    detail, ssecs, srss = run_scbiot(args.scbiot_python, out / "cells_pca.parquet", where / "scbiot.parquet",
                                     "plate", ["cell_line"], timeout=args.scbiot_timeout)
    if detail.get("timed_out"):
        print(f"{n:,}: scbiot stopped after {ssecs:.0f}s (--scbiot-timeout), peak {srss:.2f} GB", flush=True)
        return {"n": n, "method": f"scbiot integrate_centroids on our X_pca (stopped after {ssecs:.0f} s, unfinished)",
                "seconds": ssecs, "own_seconds": ssecs, "rss": srss, "stages": {}, "metrics": {}, "detail": detail}
    sm = evaluate(where / "scbiot.parquet", ["X_scbiot"])
    print(f"{n:,}: scbiot {ssecs:.0f}s, peak {srss:.2f} GB, {detail}", flush=True)
    return {"n": n, "method": f"scbiot {detail['version']} integrate_centroids on our X_pca"
                              + (" (returned its input unchanged)" if detail["unchanged"] else ""),
            "seconds": ssecs, "own_seconds": detail["seconds"], "rss": srss, "stages": {},
            "metrics": flat({("after", k): v for (e, k), v in sm.items()}), "detail": detail}




def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", type=int, default=[1_000_000, 10_000_000])
    ap.add_argument("--data", type=Path, default=ROOT / "bench-data" / "pipeline")
    ap.add_argument("--harmony-max-cells", type=int, default=1_000_000)
    ap.add_argument("--scbiot-python", default=os.environ.get("SCBIOT_PYTHON"), help="a Python with scbiot installed (see the docstring); unset: scbiot is not run")
    ap.add_argument("--scbiot-max-cells", type=int, default=1_000_000)
    ap.add_argument("--keep-scbiot", action="store_true",
                    help="without --scbiot-python: keep the scbiot rows of the JSON beside --out (the same X_pca "
                         "input, a run from an earlier commit), marked with that commit")
    ap.add_argument("--scbiot-timeout", type=float, default=None,
                    help="stop scbiot after this many seconds and record that as a lower bound on its time")
    ap.add_argument("--scbiot-only", action="store_true",
                    help="run only scbiot, on the X_pca of the last run at each size (in --data), and merge "
                         "its rows into the saved JSON")
    ap.add_argument("--regime", choices=sorted(REGIMES), default="tahoe",
                    help="tahoe: 5 of 50 lines missing per plate; hard: 15 missing and line shares differing 5-fold between plates; "
                         "tahoe-none, hard-none: the same without a plate effect (the ceiling a correction can reach)")
    ap.add_argument("--out", type=Path, default=None, help="default: benches/results/pipeline.md (pipeline-hard.md for --regime hard)")
    ap.add_argument("--render", action="store_true", help="only re-render --out from the JSON saved beside it")
    args = ap.parse_args()
    if args.out is None:
        args.out = ROOT / "benches" / "results" / ("pipeline.md" if args.regime == "tahoe" else f"pipeline-{args.regime}.md")
    if args.regime != "tahoe":
        args.data = args.data.with_name(args.data.name + "-" + args.regime)
    saved = args.out.with_suffix(".json")
    if args.render:
        data = json.loads(saved.read_text())
        text = render(data["meta"], data["generated"], data["rows"])
        print(text)
        args.out.write_text(text)
        return
    import polars_singlecell as psc

    flat = lambda m: {f"{e}|{k}": v for (e, k), v in m.items()}
    if args.scbiot_only:
        data = json.loads(saved.read_text())
        sizes = set(args.sizes)
        rows = [r for r in data["rows"] if not (r["method"].startswith("scbiot") and r["n"] in sizes)]
        for n in args.sizes:
            rows.append(scbiot_row(args, n, args.data / f"{n}", flat))
        order = lambda r: (r["n"], 0 if r["method"].startswith("polars") else 1 if r["method"].startswith("Harmony") else 2)
        rows.sort(key=order)
        data["rows"] = rows
        saved.write_text(json.dumps(data, indent=1))
        text = render(data["meta"], data["generated"], rows)
        print(text)
        args.out.write_text(text)
        return

    meta = {"sizes": args.sizes, "date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "cores": os.cpu_count(),
            "polars": pl.__version__, "version": psc.__version__, "commit": commit(), "regime": args.regime}
    rows, gens = [], {}
    kept = []
    if args.keep_scbiot and not args.scbiot_python and saved.is_file():
        before = json.loads(saved.read_text())
        kept = [r | {"method": r["method"] + f" [run at commit {before['meta']['commit']}]"}
                for r in before["rows"] if r["method"].startswith("scbiot") and "[run at" not in r["method"]]
        kept += [r for r in before["rows"] if "[run at" in r["method"]]
    for n in args.sizes:
        where = args.data / f"{n}"
        gens[n] = gen = generate(n, where, args.regime)
        print(f"{n:,} cells generated: {gen}", flush=True)
        out = where / "out"
        shutil.rmtree(out, ignore_errors=True)
        secs, rss = run([sys.executable, "-m", "polars_singlecell", "integrate", str(where / "cells"), str(out),
                         "--batch-key", "plate", "--label-key", "cell_line", "--no-progress"])
        report = json.loads((out / "report.json").read_text())
        stages = {k: v["seconds"] for k, v in report["stages"].items()}
        m = {(r["embedding"], r["metric"]): r["value"] for r in report["stages"]["interpolate"]["evaluate"]}
        rows.append({"n": n, "method": "polars-singlecell integrate", "seconds": secs, "rss": rss, "stages": stages,
                     "evaluate_seconds": report["stages"]["interpolate"].get("evaluate_seconds"),
                     "stage_rss": {k: v.get("peak_rss_gb") for k, v in report["stages"].items()},
                     "metrics": flat({("X_pca" if e == "X_pca" else "after", k): v for (e, k), v in m.items()})})
        print(f"{n:,}: integrate {secs:.0f}s, peak {rss:.2f} GB, stages {stages}", flush=True)
        if n <= args.harmony_max_cells:
            hsecs, hrss = run([sys.executable, "-c", HARMONY, str(out / "cells_pca.parquet"), str(where / "harmony.parquet")])
            hm = evaluate(where / "harmony.parquet", ["X_harmony"])
            rows.append({"n": n, "method": "Harmony (harmonypy) on our X_pca", "seconds": hsecs, "rss": hrss, "stages": {},
                         "metrics": flat({("after", k): v for (e, k), v in hm.items()})})
            print(f"{n:,}: harmony {hsecs:.0f}s, peak {hrss:.2f} GB", flush=True)
        if args.scbiot_python and n <= args.scbiot_max_cells:
            rows.append(scbiot_row(args, n, where, flat))
        rows += [r for r in kept if r["n"] == n]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"meta": meta, "generated": {str(k): v for k, v in gens.items()}, "rows": rows}, indent=1))
    text = render(meta, {str(k): v for k, v in gens.items()}, rows)
    print(text)
    args.out.write_text(text)




if __name__ == "__main__":
    main()
