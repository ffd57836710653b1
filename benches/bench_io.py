"""Peak memory and time of the streaming writers/readers at two sizes, each run
in a fresh child process (benches/_harness.py): psc.datasets.tahoe_like
(generated raw counts → Parquet) and psc.io.h5ad_to_parquet (an h5ad written
by anndata → Parquet). Bounded memory means the peak stays flat as cells grow.

    make bench-io    # or: .venv/bin/python benches/bench_io.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _harness import run


def tahoe_like(n: int, out: str) -> float:
    import polars_singlecell as psc

    t = time.perf_counter()
    psc.datasets.tahoe_like(n, out)
    return time.perf_counter() - t


def write_h5ad(n: int, path: str) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    x = sp.random(n, 2000, density=0.05, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    obs = pd.DataFrame({"batch": pd.Categorical(np.random.default_rng(0).choice(["a", "b"], n))},
                       index=[f"c{i}" for i in range(n)])
    ad.AnnData(x, obs=obs).write_h5ad(path)


def h5ad_to_parquet(path: str, out: str) -> float:
    import polars_singlecell as psc

    t = time.perf_counter()
    psc.io.h5ad_to_parquet(path, out, rows_per_file=50_000)
    return time.perf_counter() - t


def main() -> None:
    print("| step | cells | seconds | peak RSS (MB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for n in (200_000, 800_000):
            secs, peak = run(tahoe_like, n, f"{d}/t{n}")
            print(f"| `datasets.tahoe_like` (2000 genes, 300 UMIs/cell) | {n:,} | {secs:.1f} | {peak:.0f} |", flush=True)
        for n in (100_000, 400_000):
            run(write_h5ad, n, f"{d}/a{n}.h5ad")
            secs, peak = run(h5ad_to_parquet, f"{d}/a{n}.h5ad", f"{d}/o{n}")
            print(f"| `io.h5ad_to_parquet` (2000 genes, 5% non-zero) | {n:,} | {secs:.1f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
