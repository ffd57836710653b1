"""Time and peak RSS of the pipeline's interpolate write, one plain sink vs
one row group of Parquet read-ahead (`_files.sink_bounded`), each in its own
process, on the output folder of a `bench_pipeline.py` run
(cells_pca.parquet + integration.parquet):

    .venv/bin/python benches/bench_sink_bounded.py bench-data/pipeline/1000000/out bench-data/pipeline/10000000/out
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

CHILD = """
import sys, time, resource, polars as pl, polars_singlecell as psc
from polars_singlecell.io import _sink_bounded, sink_parquet
out, how, dst = sys.argv[1:]
model = psc.IntegrationModel.read_parquet(out + "/integration.parquet")
cells = pl.scan_parquet(out + "/cells_pca.parquet").with_columns(
    psc.knn_interpolate("X_pca", "plate", model=model, k=8, mode="own_batch"))
t = time.perf_counter()
(sink_parquet if how == "one sink" else _sink_bounded)(cells, dst)
print(f"{time.perf_counter() - t:.1f} s, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")
"""

if __name__ == "__main__":
    for out in sys.argv[1:]:
        for how in ("one sink", "bounded"):
            with tempfile.TemporaryDirectory() as d:
                r = subprocess.run([sys.executable, "-c", CHILD, out, how, d + "/cells.parquet"], capture_output=True,
                                   text=True, check=True)
                print(f"{out}: {how}: {r.stdout.strip()}", flush=True)
