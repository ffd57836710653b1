"""Shared by the benchmark scripts: run one contender in a fresh child process
and report its result with its own peak RSS."""

from __future__ import annotations

import multiprocessing as mp
import resource


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(fn, args, q):
    out = fn(*args)
    q.put((out, peak_mb()))


def run(fn, *args):
    """``(fn(*args), peak RSS in MB)`` from a spawned child. Spawned, not forked:
    a parent that has run scikit-learn (OpenMP) deadlocks its forked children."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out, peak = q.get()
    p.join()
    return out, peak
