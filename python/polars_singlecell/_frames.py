"""Frame helpers shared by the fits: column arguments, frames of any kind as
a LazyFrame, and streaming a LazyFrame in record batches."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import polars as pl

from polars_singlecell import _internal, _progress
from polars_singlecell._checks import positive_int
from polars_singlecell.io import parquet_files

IntoExpr = str | pl.Expr
Frame = pl.LazyFrame | pl.DataFrame | str | os.PathLike


def col(x: IntoExpr) -> pl.Expr:
    return pl.col(x) if isinstance(x, str) else x


def lazy(data: Frame) -> pl.LazyFrame:
    if isinstance(data, pl.LazyFrame):
        return data
    if isinstance(data, pl.DataFrame):
        return data.lazy()
    if isinstance(data, (str, os.PathLike)):
        return pl.scan_parquet(parquet_files(data))
    raise TypeError(f"expected a LazyFrame, DataFrame or Parquet path, got {type(data).__name__}")


# Rows per record batch where the rows are read slice by slice (see below).
SLICE_ROWS = 65_536
SLICE_ENTRIES = 24_000_000
PROBE_ROWS = 1_024


def record_batches(lf: pl.LazyFrame, columns: list[str]) -> Iterator[pl.DataFrame]:
    """Stream `columns` of `lf` in row order, one record batch at a time.

    Where a row slice reaches the Parquet scan (a scan with elementwise
    columns on it: the pipeline's case), the rows are read one slice at a
    time (whole row groups, at most ``SLICE_ENTRIES`` list entries and
    ``SLICE_ROWS`` rows; see below), each collected when asked for. ``collect_batches``
    would be simpler, but its Parquet source decodes ahead of a slow consumer
    (pola-rs/polars#28569): fit_pca's peak RSS went from 1.6 GB at 1M cells to
    3.3 GB at 10M. Other plans (filters, joins: a slice there would re-run
    the query from its first row) keep ``collect_batches``."""
    missing = [c for c in columns if c not in lf.collect_schema()]
    if missing:
        raise ValueError(f"column(s) {missing} not found; the frame has {lf.collect_schema().names()}")
    count = _progress.counter()
    q = lf.select(columns)
    if slice_reaches_scan(q):
        # Slices of about SLICE_ENTRIES list entries, whatever the density:
        # 65,536 Tahoe cells (~1,400 genes each, int64 token ids) would be
        # 1.1 GB as read plus their conversions. Each slice is whole row
        # groups where the files' footers can be read: a slice that starts
        # inside a row group makes Polars decode the group from its first
        # row, so misaligned slices decoded the data ~1.8 times over
        # (docs/benchmarks.md, counts throughput). A row group larger than the budget
        # is split evenly (that re-decode is the price of bounded memory).
        schema = q.collect_schema()
        lists = [c for c in columns if isinstance(schema[c], pl.List)]
        # No footers (or rows beyond them): slices sized by the density that
        # a first, small slice measures.
        plan = iter(_aligned_slices(q, lists))
        start, size = 0, next(plan, None)
        if size is None:
            plan, size = None, PROBE_ROWS if lists else SLICE_ROWS
        while True:
            batch = q.slice(start, size).collect(engine="streaming")
            if batch.height:
                if count is not None:
                    count(batch.height)
                yield batch
            if batch.height < size:
                return
            start += batch.height
            planned = None if plan is None else next(plan, None)
            if planned is not None:
                size = planned
            elif plan is not None:  # the plan ran out (rows past the footers): probe
                plan, size = None, PROBE_ROWS if lists else SLICE_ROWS
            elif size == PROBE_ROWS and lists:
                per_row = max(1.0, float(batch[lists[0]].list.len().mean() or 0.0))
                size = int(min(SLICE_ROWS, max(PROBE_ROWS, SLICE_ENTRIES // per_row)))
    for batch in q.collect_batches(maintain_order=True):
        if count is not None:
            count(batch.height)
        yield batch


def _aligned_slices(q: pl.LazyFrame, lists: list[str]) -> list[int]:
    """Row counts of consecutive slices of ``q``'s one Parquet scan that
    start and end on row-group boundaries, each at most SLICE_ENTRIES entries
    of the ``lists`` columns (as the footers count them) and SLICE_ROWS rows,
    unless one row group alone is more (one group over the entries is split);
    ``[]`` where the files' footers cannot be read (remote sources, a plan
    Polars shows differently): the caller then slices by density alone."""
    paths = _scan_paths(q)
    if not paths:
        return []
    try:
        groups = _internal.parquet_row_groups(paths, lists)
    except Exception:  # noqa: BLE001 (a footer it cannot read, whatever the error: the plan is only a hint)
        return []
    slices, rows, entries = [], 0, 0
    for n, e in groups:
        if not lists:
            e = n * SLICE_ENTRIES // SLICE_ROWS  # rows are the budget
        # Whole groups while both budgets hold (rows bound the other columns).
        if rows and (entries + e > SLICE_ENTRIES or rows + n > SLICE_ROWS):
            slices.append(rows)
            rows, entries = 0, 0
        if e > SLICE_ENTRIES:  # one group over the entries: split it evenly by rows
            parts = -(-e // SLICE_ENTRIES)  # (a group over SLICE_ROWS alone is taken whole: its lists are short)
            slices += [n // parts + (i < n % parts) for i in range(parts)]
            continue
        rows, entries = rows + n, entries + e
    if rows:
        slices.append(rows)
    return [s for s in slices if s > 0]


def _scan_paths(q: pl.LazyFrame) -> list[str] | None:
    """The local files of ``q``'s one Parquet scan, from its optimised plan
    (Polars' plan visitor, the interface its GPU engine reads), or None."""
    try:
        nt = q._ldf.visit()
        node = nt.view_current_node()
        while type(node).__name__ != "Scan":
            inputs = nt.get_inputs()
            if len(inputs) != 1:
                return None
            nt.set_node(inputs[0])
            node = nt.view_current_node()
        paths = [str(p) for p in node.paths]
    except Exception:  # noqa: BLE001 (an internal interface: any change means "unknown")
        return None
    # A glob stays a pattern in the plan; Polars reads its matches sorted.
    paths = [f for p in paths for f in ([p] if os.path.isfile(p) else sorted(glob.glob(p)))]
    return paths if paths and all(os.path.isfile(p) for p in paths) else None


def slice_reaches_scan(q: pl.LazyFrame) -> bool:
    """Whether the optimiser pushes a row slice of ``q`` into its one
    Parquet scan (so that reading a slice decodes only its rows)."""
    try:
        plan = q.slice(1, 1).explain()
    except pl.exceptions.PolarsError:
        return False
    lines = [line.strip() for line in plan.splitlines()]
    scans = [i for i, line in enumerate(lines) if "Parquet SCAN" in line]
    others = ("FILTER", "JOIN", "AGGREGATE", "UNION", "SORT", "UNIQUE", "HCONCAT", "DF [")
    return (len(scans) == 1 and any(line.startswith("SLICE: Positive { offset: 1, len: 1 }") for line in lines[scans[0]:])
            and not any(line.startswith(others) for line in lines))


def n_threads(n_threads: int | None) -> int:
    if n_threads is None:
        return int(os.environ.get("POLARS_MAX_THREADS", "0")) or pl.thread_pool_size()
    return positive_int("n_threads", n_threads)
