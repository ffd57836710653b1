"""Frame helpers shared by the fits: column arguments, frames of any kind as
a LazyFrame, streaming a LazyFrame in record batches, and folding a fit over
the data's partitions."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
        # Absolute: a DaskEngine's workers read the same files from their own folder.
        return pl.scan_parquet([os.path.abspath(f) for f in parquet_files(data)])
    raise TypeError(f"expected a LazyFrame, DataFrame or Parquet path, got {type(data).__name__}")


# Rows per record batch where the rows are read slice by slice (see below).
SLICE_ROWS = 65_536
SLICE_ENTRIES = 24_000_000
PROBE_ROWS = 1_024


# A fit's partition: at most this many rows, whole row groups. Each
# partition's state is folded from a fresh one and the states are merged in
# row order, on this machine as on a DaskEngine's workers: a float64 sum
# depends on how its terms are grouped, so the grouping is fixed by the data
# (the row groups in the footers), never by the number of workers. 100,000
# rows: a million cells are ten tasks for a cluster to balance, and a merge
# (a 2,000-gene covariance: 4M additions, a few ms) stays noise beside the
# partition's read.
PARTITION_ROWS = 100_000


@dataclass(frozen=True)
class Partition:
    """Rows ``first_row .. first_row + n_rows`` of a scan, in whole row groups.

    A fit's unit of work (its row groups possibly from several files): each
    partition's state is folded from a fresh one, here or on a
    :class:`polars_singlecell.distributed.DaskEngine`'s worker, and the
    states are merged in row order.

    Parameters
    ----------
    first_row : int
        The partition's first row in the whole scan (0-based).
    n_rows : int
        Its rows, as the Parquet footers count them.
    groups : tuple of (int, int)
        Each of its row groups' ``(rows, entries)`` in order: rows, and
        the number of list entries in the group, from the footers.
    """

    first_row: int
    n_rows: int
    groups: tuple[tuple[int, int], ...]  # each row group's (rows, entries), in order


def partitions(groups: list[tuple[int, int]], partition_rows: int) -> list[Partition]:
    """Consecutive row groups, up to ``partition_rows`` rows a partition (a
    larger group is a partition of its own), in row order."""
    out: list[Partition] = []
    first, rows, current = 0, 0, []
    for g in [*groups, None]:
        if current and (g is None or rows + g[0] > partition_rows):
            out.append(Partition(first, rows, tuple(current)))
            first, rows, current = first + rows, 0, []
        if g is not None and g[0]:
            current.append(g)
            rows += g[0]
    return out


def scan_partitions(q: pl.LazyFrame, lists: list[str], partition_rows: int) -> list[Partition] | None:
    """``q``'s partitions where a row slice reaches its one Parquet scan and
    the files' footers can be read; ``None`` otherwise (the data is then one
    stream, one state)."""
    if not slice_reaches_scan(q):
        return None
    groups = _footer_groups(q, lists)
    return None if groups is None else partitions(groups, partition_rows)


@dataclass(frozen=True)
class FitSpec:
    """How to make a fresh fit state: ``cls(*args, **kwargs)``, with the
    partition's first row as ``first_row=`` where the state numbers its rows
    (the centroid sample). Picklable, so a worker makes its own."""

    cls: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    numbers_rows: bool = False

    def new(self, first_row: int = 0) -> Any:
        kwargs = {**self.kwargs, "first_row": first_row} if self.numbers_rows else self.kwargs
        return self.cls(*self.args, **kwargs)


def update(fit: Any, batch: pl.DataFrame, columns: list[str | None]) -> None:
    """``fit.update`` with the batch's columns in order; ``None`` for an
    absent optional input (no batch key)."""
    fit.update(*(batch[c] if c is not None else None for c in columns))


def fold_data(data: Frame, columns: list[str | None], spec: FitSpec, engine: Any = None) -> Any:
    """``fold`` here, or on ``engine``'s cluster (the same partitions, so the
    same bits)."""
    lf = lazy(data)
    return fold(lf, columns, spec) if engine is None else engine.fold(lf, columns, spec)


def fit_query(lf: pl.LazyFrame, columns: list[str | None],
              partition_rows: int) -> tuple[pl.LazyFrame, list[str], list[Partition] | None]:
    """A fit's query (``lf``'s named ``columns``), their names, and its
    partitions (``None``: one stream). A missing column is an error naming it."""
    names = [c for c in columns if c is not None]
    missing = [c for c in names if c not in lf.collect_schema()]
    if missing:
        raise ValueError(f"column(s) {missing} not found; the frame has {lf.collect_schema().names()}")
    q = lf.select(names)
    schema = q.collect_schema()
    return q, names, scan_partitions(q, [c for c in names if isinstance(schema[c], pl.List)], partition_rows)


def fold(lf: pl.LazyFrame, columns: list[str | None], spec: FitSpec, *,
         partition_rows: int | None = None) -> Any:
    """The fit of ``spec`` over ``columns`` of ``lf``: one fresh state per
    partition (see ``PARTITION_ROWS``), merged in row order, so a
    ``DaskEngine`` that folds the same partitions on its workers gets the same
    bits. Data with no partitions (an in-memory frame, a filter or join
    before the scan) is one stream into one state, as before."""
    q, names, parts = fit_query(lf, columns, PARTITION_ROWS if partition_rows is None else partition_rows)
    if not parts:
        fit = spec.new()
        for batch in record_batches(lf, names):
            update(fit, batch, columns)
        return fit
    total = None
    for part in parts:
        fit, rows = fold_partition(q, part, columns, spec)
        if total is None:
            total = fit
        else:
            total.merge(fit)
        del fit  # one state beside the total, not two (a covariance can be GBs)
        if rows < part.n_rows:  # the plan ends here (a head()): no later rows to read
            break
    check_no_rows_after(q, parts)
    return total


def fold_partition(q: pl.LazyFrame, part: Partition, columns: list[str | None], spec: FitSpec) -> tuple[Any, int]:
    """A fresh state of ``spec`` over the partition's rows of the fit's
    query ``q``, and the rows it read (here, or in a worker's task)."""
    fit, rows = spec.new(part.first_row), 0
    for batch in partition_batches(q, part, [c for c in columns if c is not None]):
        update(fit, batch, columns)
        rows += batch.height
    return fit, rows


def check_no_rows_after(q: pl.LazyFrame, parts: list[Partition]) -> None:
    """Refuse rows past the footers (a file that grew while the fit ran),
    rather than drop them or fold them differently."""
    rest = q.slice(parts[-1].first_row + parts[-1].n_rows, 1).collect(engine="streaming")
    if rest.height:
        raise RuntimeError("the data has more rows than its Parquet footers said when the fit started; "
                           "was a file changed while the fit ran? run it again")


def partition_batches(q: pl.LazyFrame, part: Partition, names: list[str]) -> Iterator[pl.DataFrame]:
    """The partition's rows in record batches: slices of whole row groups,
    as ``record_batches`` reads them, none crossing the partition's end. A
    plan with fewer rows than its files (a ``head``) ends at its last row."""
    schema = q.collect_schema()
    lists = [c for c in names if isinstance(schema[c], pl.List)]
    count = _progress.counter()
    start = part.first_row
    for size in _group_slices(list(part.groups), lists):
        batch = q.slice(start, size).collect(engine="streaming")
        if batch.height:
            if count is not None:
                count(batch.height)
            yield batch
        if batch.height < size:
            return
        start += size


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
    groups = _footer_groups(q, lists)
    return [] if groups is None else _group_slices(groups, lists)


def _footer_groups(q: pl.LazyFrame, lists: list[str]) -> list[tuple[int, int]] | None:
    """(rows, entries) of each row group of ``q``'s one Parquet scan, from
    the footers; ``None`` where they cannot be read."""
    paths = scan_paths(q)
    if not paths:
        return None
    try:
        return [(int(n), int(e)) for n, e in _internal.parquet_row_groups(paths, lists)]
    except Exception:  # noqa: BLE001 (a footer it cannot read, whatever the error: the plan is only a hint)
        return None


def _group_slices(groups: list[tuple[int, int]], lists: list[str]) -> list[int]:
    """Row counts of consecutive slices over ``groups`` (see ``_aligned_slices``)."""
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


def scan_paths(q: pl.LazyFrame) -> list[str] | None:
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
