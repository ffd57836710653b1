"""Shared by the benchmark scripts: run one contender in a fresh child process
and report its result with its own peak RSS."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import resource
import subprocess
import tempfile
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mb() -> float:
    """This process's own peak RSS (VmHWM: reset by exec, unlike ru_maxrss,
    which a spawned child inherits from its parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["batch_entropy_norm", "ilisi", "label_purity", "clisi", "overall"]


def _child(fn, args, q):
    out = fn(*args)
    # VmHWM: ru_maxrss would report the parent's peak when that was higher
    # (bench_preprocessing's streaming rows showed the parent's PCA fit).
    hwm = hwm_mb()
    q.put((out, peak_mb() if math.isnan(hwm) else hwm))


def run(fn, *args):
    """``(fn(*args), peak RSS in MB)`` from a spawned child. Spawned, not forked:
    a parent that has run scikit-learn (OpenMP) deadlocks its forked children."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    while True:  # a child that dies (an exception, the OOM killer) puts nothing: say so, don't wait forever
        try:
            out, peak = q.get(timeout=1)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its child process (exit code {p.exitcode}); "
                                   "its traceback is above") from None
    p.join()
    return out, peak


# scbiot.ot.integrate_centroids (the reference method) with its defaults on
# the CPU, in the Python that has it. argv: cells Parquet (with X_pca), output
# Parquet, batch column, columns to keep. Prints one JSON line.
SCBIOT = """
import json, sys, time, numpy as np, pandas as pd, polars as pl, anndata, scbiot
from scbiot.ot import integrate_centroids
src, dst, batch, keep = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cells = pl.read_parquet(src, columns=[batch, *keep, "X_pca"])
x = cells["X_pca"].to_numpy().astype(np.float32)
adata = anndata.AnnData(obs=pd.DataFrame({batch: cells[batch].cast(pl.String).to_numpy()}), obsm={"X_pca": x})
t = time.perf_counter()
adata, metrics = integrate_centroids(adata, obsm_key="X_pca", batch_key=batch, out_key="X_scbiot",
                                     use_gpu=False, random_state=0, verbose=False)
secs = time.perf_counter() - t
z = np.asarray(adata.obsm["X_scbiot"], dtype=np.float32)
cells.select(batch, *keep).with_columns(pl.Series("X_scbiot", z).cast(pl.Array(pl.Float32, z.shape[1]))).write_parquet(dst)
print(json.dumps({"seconds": secs, "version": scbiot.__version__, "unchanged": bool(np.array_equal(z, x)),
                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}))
"""


def run_scbiot(python: str, cells: Path, out: Path, batch: str, keep: list[str],
               timeout: float | None = None) -> tuple[dict, float, float]:
    """scbiot on ``cells`` (a Parquet file with ``X_pca``) → ``out`` with
    ``X_scbiot``: (what it printed: its own seconds, version, whether it
    returned its input unchanged, its metrics; wall seconds of the whole
    child; the child's peak RSS in GB, from wait4). Past ``timeout`` seconds
    the child is killed and the info is ``{"timed_out": True, "seconds": wall}``:
    a lower bound on its time."""
    with tempfile.TemporaryFile("w+") as sink:
        t = time.perf_counter()
        p = subprocess.Popen([python, "-c", SCBIOT, str(cells), str(out), batch, *keep], stdout=sink,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - t > timeout:
                p.kill()
                _, status, usage = os.wait4(p.pid, 0)
                secs = time.perf_counter() - t
                return {"timed_out": True, "seconds": secs}, secs, usage.ru_maxrss / 1024**2
            time.sleep(1.0)
        secs = time.perf_counter() - t
        if status != 0:
            raise SystemExit(f"scbiot failed ({status}) on {cells}")
        sink.seek(0)
        info = json.loads(sink.read().strip().splitlines()[-1])
    return info, secs, usage.ru_maxrss / 1024**2


def commit() -> str:
    """The short commit the benchmark ran at ("?" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "?"


def cpu() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


@contextlib.contextmanager
def recorded(name: str):
    """Everything the script prints inside the block, also written to
    ``benches/results/<name>`` under a title (the command) and a line saying
    when, where and at which commit, for ``make docs`` to include: the
    scripts that only printed their tables (k-means, kNN, metrics) keep
    printing them and now leave them where the docs read them. The file is
    written only if the block ends without an error."""
    import io
    import sys

    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            buffer.write(s)
            return real.write(s)

        def flush(self) -> None:
            real.flush()

    real = sys.stdout
    sys.stdout = Tee()
    try:
        yield
    finally:
        sys.stdout = real
    script = Path(sys.argv[0]).name
    head = (f"# benches/{script} {' '.join(sys.argv[1:])}".rstrip() + "\n\n"
            f"{time.strftime('%Y-%m-%d')}, {cpu()}, {os.cpu_count()} cores, commit {commit()}\n\n")
    out = Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(head + buffer.getvalue())
