"""Generated sparse counts in the project's layout (``../shared/DATA.md``), with
known cell types and batch effects, for demos, tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from polars_singlecell.io import write_parquet

__all__ = ["synthetic_counts", "write_synthetic_counts"]


def _gene_rates(rng: np.random.Generator, n_genes: int, n_types: int, n_batches: int):
    base = rng.lognormal(0.0, 1.0, n_genes)
    # Each cell type up-regulates its own 5% of genes 4-fold.
    types = np.ones((n_types, n_genes))
    for t in range(n_types):
        types[t, rng.choice(n_genes, max(1, n_genes // 20), replace=False)] *= 4.0
    # Each batch scales every gene by a log-normal factor (a plate effect).
    batches = rng.lognormal(0.0, 0.3, (n_batches, n_genes))
    return base, types, batches


def synthetic_counts(
    n_cells: int,
    *,
    n_genes: int = 2000,
    n_batches: int = 3,
    n_types: int = 4,
    umis_per_cell: int = 230,
    seed: int = 0,
    first_cell: int = 0,
) -> pl.DataFrame:
    """``n_cells`` cells of raw UMI counts: ``cell_id``, ``batch``, ``label``,
    ``gene_idx: List(UInt32)``, ``values: List(Float32)``.

    Each cell draws ~``umis_per_cell`` UMIs (Poisson) from its type's gene
    distribution scaled by its batch's effect; with the defaults about 10% of
    entries are non-zero. The gene programme depends only on ``seed``; cells
    depend on ``seed`` and ``first_cell``, so chunks can be generated apart.
    """
    rng = np.random.default_rng(seed)
    base, types, batches = _gene_rates(rng, n_genes, n_types, n_batches)
    crng = np.random.default_rng([seed, first_cell])
    label = crng.integers(0, n_types, n_cells)
    batch = crng.integers(0, n_batches, n_cells)
    n_umi = np.maximum(crng.poisson(umis_per_cell, n_cells), 1)
    cell_of_umi = np.repeat(np.arange(n_cells), n_umi)
    gene_of_umi = np.empty(cell_of_umi.size, dtype=np.int64)
    group = label * n_batches + batch
    group_of_umi = np.repeat(group, n_umi)
    for g in np.unique(group):
        t, b = divmod(int(g), n_batches)
        p = base * types[t] * batches[b]
        cdf = np.cumsum(p / p.sum())
        sel = group_of_umi == g
        gene_of_umi[sel] = np.minimum(np.searchsorted(cdf, crng.random(int(sel.sum()))), n_genes - 1)
    key, count = np.unique(cell_of_umi * n_genes + gene_of_umi, return_counts=True)
    cell, gene = np.divmod(key, n_genes)
    entries = pl.DataFrame(
        {"cell": cell.astype(np.int64), "gene_idx": gene.astype(np.uint32), "values": count.astype(np.float32)}
    )
    rows = entries.group_by("cell", maintain_order=True).agg("gene_idx", "values")
    return pl.DataFrame(
        {
            "cell_id": [f"cell{first_cell + i}" for i in range(n_cells)],
            "batch": [f"plate{b}" for b in batch],
            "label": [f"type{t}" for t in label],
        }
    ).with_columns(rows["gene_idx"], rows["values"])


def write_synthetic_counts(
    out: str | os.PathLike,
    n_cells: int,
    *,
    rows_per_file: int = 100_000,
    seed: int = 0,
    **kwargs,
) -> Path:
    """Write :func:`synthetic_counts` into a folder of Parquet files
    (``part-00000.parquet``, ...), one chunk at a time, plus ``genes.parquet``
    beside them. Memory is bounded by ``rows_per_file``. Returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_genes = kwargs.get("n_genes", 2000)
    write_parquet(
        pl.DataFrame({"gene_idx": np.arange(n_genes, dtype=np.uint32), "gene": [f"G{i}" for i in range(n_genes)]}),
        out.parent / f"{out.name}_genes.parquet",
    )
    for k, start in enumerate(range(0, n_cells, rows_per_file)):
        n = min(rows_per_file, n_cells - start)
        df = synthetic_counts(n, seed=seed, first_cell=start, **kwargs)
        write_parquet(df, out / f"part-{k:05d}.parquet", row_group_size=min(n, 50_000))
    return out
