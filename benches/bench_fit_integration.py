"""fit_integration alone, on the centroids of the 1M-cell pipeline benchmark
(14 plates × 2,048 = 28,672 centroids × 50 dims; issue 26 item 6), against
the NumPy implementation it replaced, read from git at ``--against``
(default 170b51e, the last commit where the algorithm was Python around the
Rust Sinkhorn). Each runs in its own spawned process: seconds (fit only, the
table already read), peak RSS, passes and Sinkhorn iterations; then how far
apart the two displacements are.

    .venv/bin/python benches/bench_pipeline.py 1000000      # makes the centroids, once
    .venv/bin/python benches/bench_fit_integration.py       # → benches/results/fit-integration.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import commit, cpu, hwm_mb, run

ROOT = Path(__file__).resolve().parent.parent
CENTROIDS = ROOT / "bench-data" / "pipeline" / "1000000" / "out" / "centroids.parquet"


def fit(module_path: str | None, centroids: str, batch_key: str, out: str) -> dict:
    """One contender: this checkout's fit_integration (module_path None) or
    the ot.py at module_path, loaded as a module beside the installed package."""
    import numpy as np
    import polars as pl

    if module_path is None:
        from polars_singlecell import fit_integration
    else:
        spec = importlib.util.spec_from_file_location("ot_then", module_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fit_integration = mod.fit_integration
    table = pl.read_parquet(centroids)
    before = hwm_mb()
    t = time.perf_counter()
    model = fit_integration(table, batch_key=batch_key)
    secs = time.perf_counter() - t
    np.save(out, model.table["displacement"].to_numpy())
    m = model.metrics
    return {"seconds": secs, "peak_mb": hwm_mb(), "peak_before_fit_mb": before, "passes": m["params"]["passes"],
            "iterations": sum(c["iterations"] for c in m["convergence"]), "mix_after": m["after"]["mix"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("centroids", nargs="?", type=Path, default=CENTROIDS)
    ap.add_argument("--batch-key", default="plate")
    ap.add_argument("--against", default="170b51e", help="the commit whose python/polars_singlecell/ot.py to compare with")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "fit-integration.md")
    args = ap.parse_args()
    if not args.centroids.exists():
        sys.exit(f"{args.centroids} is missing: run `.venv/bin/python benches/bench_pipeline.py 1000000` first (it writes it)")
    import numpy as np
    import polars as pl

    import polars_singlecell as psc

    shape = pl.read_parquet(args.centroids, columns=["centroid"])
    n, d = len(shape), shape["centroid"].dtype.size
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "ot_then.py"
        src = subprocess.run(["git", "show", f"{args.against}:python/polars_singlecell/ot.py"], capture_output=True, text=True, cwd=ROOT, check=False)
        if src.returncode:
            sys.exit(f"git show {args.against}:python/polars_singlecell/ot.py failed: {src.stderr.strip()}")
        old.write_text(src.stdout)
        ours, _ = run(fit, None, str(args.centroids), args.batch_key, str(Path(tmp) / "ours.npy"))
        then, _ = run(fit, str(old), str(args.centroids), args.batch_key, str(Path(tmp) / "then.npy"))
        a, b = np.load(Path(tmp) / "ours.npy").astype(np.float64), np.load(Path(tmp) / "then.npy").astype(np.float64)
    rel = float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))
    rows = [("Rust (this commit)", ours), (f"NumPy + Rust Sinkhorn ({args.against})", then)]
    lines = [f"# benches/bench_fit_integration.py {args.centroids.relative_to(ROOT) if args.centroids.is_relative_to(ROOT) else args.centroids}", "",
             f"{time.strftime('%Y-%m-%d')}, commit {commit()}, polars-singlecell {psc.__version__}, {cpu()}, {os.cpu_count()} cores; "
             f"{n:,} centroids × {d} dims, fit_integration defaults", "",
             "| implementation | seconds | peak RSS MB (before the fit) | passes | Sinkhorn iterations | centroid mix after |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} ({r['peak_before_fit_mb']:.0f}) | {', '.join(r['passes'])} | {r['iterations']} | {r['mix_after']:.4f} |")
    lines += ["", f"Speed-up {then['seconds'] / ours['seconds']:.2f}×. Displacements: RMS difference {rel:.2e} of their RMS, largest {np.abs(a - b).max():.2e}."]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"ours": ours, "then": then, "rms_rel_diff": rel}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
