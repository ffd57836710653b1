"""Generated sparse counts in the project's layout (``../shared/DATA.md``), with
known cell types and batch effects, for demos, tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from polars_singlecell._checks import renamed
from polars_singlecell._files import rows_per_group as _rows_per_group
from polars_singlecell.io import write_parquet

__all__ = ["synthetic_counts", "tahoe_design", "tahoe_like", "tahoe_like_embedding", "write_synthetic_counts"]


def _gene_rates(rng: np.random.Generator, n_genes: int, n_types: int, n_batches: int, batch_effect: float = 0.3):
    base = rng.lognormal(0.0, 1.0, n_genes)
    # Each cell type up-regulates its own 5% of genes 4-fold.
    types = np.ones((n_types, n_genes))
    for t in range(n_types):
        types[t, rng.choice(n_genes, max(1, n_genes // 20), replace=False)] *= 4.0
    # Each batch scales every gene by a log-normal factor (a plate effect).
    batches = rng.lognormal(0.0, batch_effect, (n_batches, n_genes))
    return base, types, batches


def _draw_rows(rng: np.random.Generator, n_umi: np.ndarray, group: np.ndarray, rates: dict, n_genes: int) -> pl.DataFrame:
    """Sparse rows (``gene_idx``, ``values``): cell i draws ``n_umi[i]`` UMIs
    from the gene distribution ``rates[group[i]]`` (unnormalised)."""
    # One group at a time (its cells in row order, so the random stream is
    # consumed as a plain per-UMI loop would): small sorts, bounded temporaries.
    order = np.argsort(group, kind="stable")
    cuts = np.flatnonzero(np.diff(group[order])) + 1
    parts = []
    for cells in np.split(order, cuts):
        p = rates[int(group[cells[0]])]
        cdf = np.cumsum(p / p.sum())
        nu = n_umi[cells]
        gene = np.minimum(np.searchsorted(cdf, rng.random(int(nu.sum()))), n_genes - 1)
        key, count = np.unique(np.repeat(cells.astype(np.int64), nu) * n_genes + gene, return_counts=True)
        cell, gene = np.divmod(key, n_genes)
        parts.append(pl.DataFrame({"cell": cell, "gene_idx": gene.astype(np.uint32), "values": count.astype(np.float32)}))
    entries = pl.concat(parts)
    return entries.group_by("cell", maintain_order=True).agg("gene_idx", "values").sort("cell")


@renamed(seed="random_state")
def synthetic_counts(
    n_cells: int,
    *,
    n_genes: int = 2000,
    n_batches: int = 3,
    n_types: int = 4,
    umis_per_cell: int = 230,
    random_state: int = 0,
    first_cell: int = 0,
    batch_effect: float = 0.3,
) -> pl.DataFrame:
    """``n_cells`` cells of raw UMI counts of known cell types in batches.

    Each cell draws ~``umis_per_cell`` UMIs (Poisson) from its type's gene
    distribution scaled by its batch's effect; with the defaults about 10% of
    entries are non-zero. Each cell type up-regulates its own 5% of genes
    4-fold. The gene programme depends only on ``random_state``; cells
    depend on ``random_state`` and ``first_cell``, so chunks can be generated apart.

    Parameters
    ----------
    n_cells : int
        Cells to draw.
    n_genes : int, default 2000
        Genes; gene indices are in ``[0, n_genes)``.
    n_batches : int, default 3
        Batches (plates), ``plate0`` ... ; each cell's drawn uniformly.
    n_types : int, default 4
        Cell types, ``type0`` ... ; each cell's drawn uniformly.
    umis_per_cell : int, default 230
        Mean UMIs per cell (Poisson, at least 1).
    random_state : int, default 0
        Seed of the gene programme and, with ``first_cell``, of the cells.
    first_cell : int, default 0
        Row number of the first cell: its ``cell_id`` and the cells' seed.
    batch_effect : float, default 0.3
        The standard deviation of each batch's log gene factors, in [0, 10)
        (0.3: plates that PC1–PC2 barely separate; 1: plates apart on every
        axis).

    Returns
    -------
    polars.DataFrame
        ``n_cells`` rows: ``cell_id``, ``batch``, ``label`` (String),
        ``gene_idx`` (``List(UInt32)``, sorted) and ``values``
        (``List(Float32)``, the counts, each > 0).
    """
    if not (isinstance(batch_effect, (int, float)) and 0 <= batch_effect < 10):
        raise ValueError(f"batch_effect must be a number in [0, 10), got {batch_effect!r}")
    rng = np.random.default_rng(random_state)
    base, types, batches = _gene_rates(rng, n_genes, n_types, n_batches, batch_effect)
    crng = np.random.default_rng([random_state, first_cell])
    label = crng.integers(0, n_types, n_cells)
    batch = crng.integers(0, n_batches, n_cells)
    n_umi = np.maximum(crng.poisson(umis_per_cell, n_cells), 1)
    group = label * n_batches + batch
    rates = {int(g): base * types[g // n_batches] * batches[g % n_batches] for g in np.unique(group)}
    rows = _draw_rows(crng, n_umi, group, rates, n_genes)
    return pl.DataFrame(
        {
            "cell_id": [f"cell{first_cell + i}" for i in range(n_cells)],
            "batch": [f"plate{b}" for b in batch],
            "label": [f"type{t}" for t in label],
        }
    ).with_columns(rows["gene_idx"], rows["values"])


@renamed(seed="random_state")
def write_synthetic_counts(
    out: str | os.PathLike,
    n_cells: int,
    *,
    rows_per_file: int = 100_000,
    random_state: int = 0,
    **kwargs,
) -> Path:
    """Write :func:`synthetic_counts` into a folder of Parquet files, one chunk at a time.

    The cells go to ``out/part-00000.parquet``, ... and the genes
    (``gene_idx``, ``gene``) to ``<out>_genes.parquet`` beside the folder,
    where :func:`polars_singlecell.integrate` finds them. Memory is bounded by
    ``rows_per_file``.

    Parameters
    ----------
    out : str or os.PathLike
        The folder (created if missing).
    n_cells : int
        Cells in all.
    rows_per_file : int, default 100_000
        Cells per file (each file a :func:`synthetic_counts` chunk).
    random_state : int, default 0
        The seed, as in :func:`synthetic_counts`.
    **kwargs
        The other options of :func:`synthetic_counts` (``n_genes``,
        ``n_batches``, ``batch_effect``, ...).

    Returns
    -------
    pathlib.Path
        The folder ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_genes = kwargs.get("n_genes", 2000)
    write_parquet(
        pl.DataFrame({"gene_idx": np.arange(n_genes, dtype=np.uint32), "gene": [f"G{i}" for i in range(n_genes)]}),
        out.parent / f"{out.name}_genes.parquet",
    )
    for k, start in enumerate(range(0, n_cells, rows_per_file)):
        n = min(rows_per_file, n_cells - start)
        df = synthetic_counts(n, random_state=random_state, first_cell=start, **kwargs)
        write_parquet(df, out / f"part-{k:05d}.parquet", row_group_size=_rows_per_group(n, df["gene_idx"].list.len().sum()))
    return out


def tahoe_design() -> pl.DataFrame:
    """Tahoe-100M's design: cells per (plate, cell line), with the line's organ.

    Summed from the dataset's ``obs`` grid (``../shared/data/tahoe100m_metadata``)
    and shipped with the package.

    Returns
    -------
    polars.DataFrame
        700 rows (14 plates × 50 lines, 100,648,790 cells): ``plate``,
        ``cell_line``, ``organ`` (String) and ``n_cells`` (Int64).

    Examples
    --------
    >>> import polars_singlecell as psc
    >>> d = psc.datasets.tahoe_design()
    >>> d.height, d["plate"].n_unique(), d["cell_line"].n_unique(), d["n_cells"].sum()
    (700, 14, 50, 100648790)
    """
    return pl.read_csv(
        Path(__file__).parent / "data" / "tahoe_design.csv",
        schema={"plate": pl.String, "cell_line": pl.String, "organ": pl.String, "n_cells": pl.Int64},
    )


def _design_counts(rng: np.random.Generator, design: pl.DataFrame, n_cells: int, missing: int, line_skew: float = 1.0) -> np.ndarray:
    """Cells per (plate, line), plates × lines in design order: the design's
    proportions with ``missing`` random lines per plate dropped, multinomial.
    ``line_skew`` > 1 multiplies each (plate, line) share by a log-uniform
    factor in [1/√skew, √skew], so a line's share differs up to ``line_skew``-fold
    between plates (drawn after the dropped lines, so skew 1 keeps the old draws)."""
    lines = design["cell_line"].unique(maintain_order=True).to_list()
    share = design.pivot(on="cell_line", index="plate", values="n_cells").select(lines).to_numpy().astype(np.float64)
    for p in range(share.shape[0]):
        share[p, rng.choice(len(lines), missing, replace=False)] = 0.0
    if line_skew != 1.0:
        share *= np.exp(rng.uniform(-0.5, 0.5, share.shape) * np.log(line_skew))
    return rng.multinomial(n_cells, (share / share.sum()).ravel()).reshape(share.shape)


def _skew(line_skew: object) -> float:
    if isinstance(line_skew, bool) or not isinstance(line_skew, (int, float)) or not 1 <= line_skew < float("inf"):
        raise ValueError(f"line_skew must be a number ≥ 1 (1: the design's proportions), got {line_skew!r}")
    return float(line_skew)


def _plate_effect(rng: np.random.Generator, d: int, shift: float, scaling: float, rotation: float):
    """A plate's affine effect x ↦ (x · s) Q + t: per-axis scaling s in
    1 ± ``scaling``, a rotation Q near the identity, a shift t ~ N(0, shift²)."""
    q, _ = np.linalg.qr(np.eye(d) + rng.normal(size=(d, d)) * rotation)
    q = q * np.sign(np.diag(q))  # a rotation near the identity, not a reflection
    return rng.uniform(1 - scaling, 1 + scaling, d), q, rng.normal(size=d) * shift


@renamed(seed="random_state")
def tahoe_like_embedding(
    n_cells: int,
    *,
    n_dims: int = 30,
    missing_lines_per_plate: int = 5,
    line_skew: float = 1.0,
    shift: float = 1.5,
    scaling: float = 0.15,
    rotation: float = 0.05,
    random_state: int = 0,
) -> pl.DataFrame:
    """A PCA-like embedding shaped like Tahoe-100M, with a known plate effect.

    Plate sizes and each plate's cell-line mix follow :func:`tahoe_design`;
    each plate then loses ``missing_lines_per_plate`` lines at random (their
    cells go to the plate's other lines), and with ``line_skew`` > 1 each
    line's share of a plate is multiplied by a log-uniform factor in
    [1/√line_skew, √line_skew] (so it differs up to ``line_skew``-fold between
    plates; the issue's hard regime is ``missing_lines_per_plate=15,
    line_skew=5``). The true embedding ``X_true``: lines
    of one organ near each other (organ centres spread 4, lines 2 around them),
    each line a blob (sd 0.7) stretched along its own drug-response axis.
    The observed ``X_pca`` is each plate's affine distortion of it
    (:func:`_plate_effect`: shift sd ``shift`` per axis, per-axis scaling
    1 ± ``scaling``, rotation of size ``rotation``).

    Parameters
    ----------
    n_cells : int
        Cells in all (≥ 1).
    n_dims : int, default 30
        Dimensions of the embedding.
    missing_lines_per_plate : int, default 5
        Lines each plate lacks, in [0, 49].
    line_skew : float, default 1.0
        ≥ 1: how many-fold a line's share may differ between plates (1: the
        design's proportions).
    shift : float, default 1.5
        Standard deviation of each plate's shift, per axis.
    scaling : float, default 0.15
        Each plate scales each axis by a factor in ``1 ± scaling``.
    rotation : float, default 0.05
        Size of each plate's rotation (0: none).
    random_state : int, default 0
        The seed.

    Returns
    -------
    polars.DataFrame
        ``n_cells`` rows, plates in design order: ``plate``, ``cell_line``,
        ``organ`` (String), ``X_pca`` (the observed embedding) and ``X_true``
        (the embedding without plate effects), both ``Array(Float32, n_dims)``.

    Examples
    --------
    >>> import polars_singlecell as psc
    >>> df = psc.datasets.tahoe_like_embedding(5000, n_dims=10)
    >>> df.height, df["plate"].n_unique(), df.schema["X_pca"]
    (5000, 14, Array(Float32, shape=(10,)))
    >>> # every plate lacks 5 of the 50 lines
    >>> set(df.group_by("plate").agg(pl.col("cell_line").n_unique())["cell_line"]) <= set(range(46))
    True
    """
    if not isinstance(n_cells, int) or n_cells < 1:
        raise ValueError(f"n_cells must be a positive integer, got {n_cells!r}")
    if not isinstance(missing_lines_per_plate, int) or not 0 <= missing_lines_per_plate < 50:
        raise ValueError(f"missing_lines_per_plate must be an integer in [0, 49], got {missing_lines_per_plate!r}")
    design = tahoe_design()
    rng = np.random.default_rng(random_state)
    lines = design["cell_line"].unique(maintain_order=True).to_list()
    organ_of = dict(zip(design["cell_line"], design["organ"]))
    organs = sorted(set(organ_of.values()))
    organ_centre = {o: rng.normal(size=n_dims) * 4 for o in organs}
    centre = np.array([organ_centre[organ_of[line]] + rng.normal(size=n_dims) * 2 for line in lines])
    axis = rng.normal(size=(len(lines), n_dims))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)

    plates = design["plate"].unique(maintain_order=True).to_list()
    counts = _design_counts(rng, design, n_cells, missing_lines_per_plate, _skew(line_skew))

    parts = []
    for p, plate in enumerate(plates):
        s, q, t = _plate_effect(rng, n_dims, shift, scaling, rotation)
        lab = np.repeat(np.arange(len(lines)), counts[p])
        if lab.size == 0:
            continue
        true = centre[lab] + rng.normal(size=(lab.size, n_dims)) * 0.7 + axis[lab] * rng.uniform(0, 3, (lab.size, 1))
        parts.append(pl.DataFrame({
            "plate": np.full(lab.size, plate),
            "cell_line": np.asarray(lines)[lab],
            "organ": np.asarray([organ_of[line] for line in lines])[lab],
            "X_pca": pl.Series(((true * s) @ q + t).astype(np.float32), dtype=pl.Array(pl.Float32, n_dims)),
            "X_true": pl.Series(true.astype(np.float32), dtype=pl.Array(pl.Float32, n_dims)),
        }))
    return pl.concat(parts)


@renamed(seed="random_state")
def tahoe_like(
    n_cells: int,
    out: str | os.PathLike,
    *,
    n_genes: int = 2000,
    umis_per_cell: int = 300,
    missing_lines_per_plate: int = 5,
    line_skew: float = 1.0,
    plate_effect: float = 0.3,
    rows_per_file: int = 50_000,
    random_state: int = 0,
    layout: str = "cells",
) -> Path:
    """Raw counts shaped like Tahoe-100M, streamed to ``out/part-*.parquet``
    (``cell_id``, ``plate``, ``cell_line``, ``organ``, ``gene_idx``,
    ``values``), one file of ``rows_per_file`` cells at a time (memory is
    bounded by that, never by ``n_cells``), plus ``out/genes.parquet``
    (``gene_idx``, ``gene``) and the injected truth in
    ``out/plate_effects.parquet`` (``plate``, ``gene_idx``, ``factor``).

    Cells per (plate, line) follow :func:`tahoe_design`, after dropping
    ``missing_lines_per_plate`` lines per plate (and skewing the lines'
    shares up to ``line_skew``-fold between plates, as
    :func:`tahoe_like_embedding` does). Expression: a log-normal
    base rate per gene; each organ raises its own 5% of genes 3-fold and each
    line its own 3% 4-fold (the ground truth: ``cell_line``, ``organ``); each
    plate multiplies every gene by a log-normal factor of sd ``plate_effect``
    (the batch effect). Each cell draws ~``umis_per_cell`` UMIs (Poisson).
    Rows are in plate order, lines shuffled within each file. Peak memory is
    one file's worth of cells (``make bench-io`` measures it). Tahoe's real
    depth is ``n_genes=62_710, umis_per_cell=2_500`` (~1,400 genes detected
    a cell).

    ``layout="tahoe"`` writes the same cells as Tahoe-100M's Parquet release
    lays them out: ``out/data/train-*.parquet`` with ``genes`` (``List(Int64)``
    token ids: the marker token 1, which no gene has, then the cell's genes'
    tokens in ascending token order), ``expressions`` (``List(Float32)``: -2.0
    for the marker, then the counts), ``drug``, ``sample``, ``plate``,
    ``cell_line_id``, ``BARCODE_SUB_LIB_ID``; and
    ``out/metadata/gene_metadata.parquet`` (``token_id``, ``ensembl_id``,
    ``gene_symbol``; gene ``g`` is row ``g``, its token a seeded permutation
    of ``3..n_genes+2``, so token order is not gene order). Read it with
    ``psc.layout.scan_cells(out / "data", counts=("genes", "expressions"),
    vocabulary=out / "metadata" / "gene_metadata.parquet")``: the same counts
    as ``layout="cells"`` with the same arguments.

    Parameters
    ----------
    n_cells : int
        Cells in all (≥ 1).
    out : str or os.PathLike
        The folder to write (created if missing).
    n_genes : int, default 2000
        Genes; gene indices are in ``[0, n_genes)``.
    umis_per_cell : int, default 300
        Mean UMIs per cell (Poisson, at least 1).
    missing_lines_per_plate : int, default 5
        Lines each plate lacks, in [0, 49].
    line_skew : float, default 1.0
        ≥ 1: how many-fold a line's share may differ between plates.
    plate_effect : float, default 0.3
        Standard deviation of each plate's log gene factors.
    rows_per_file : int, default 50_000
        Cells per Parquet file (what is in memory at once).
    random_state : int, default 0
        The seed.
    layout : {"cells", "tahoe"}, default "cells"
        The project's layout, or Tahoe-100M's Parquet release's (above).

    Returns
    -------
    pathlib.Path
        The folder ``out``.

    Examples
    --------
    >>> import tempfile, polars as pl, polars_singlecell as psc
    >>> d = psc.datasets.tahoe_like(3000, tempfile.mkdtemp(), n_genes=200, rows_per_file=1000)
    >>> df = pl.read_parquet(d / "part-*.parquet")
    >>> df.height, df["plate"].n_unique(), df.columns
    (3000, 14, ['cell_id', 'plate', 'cell_line', 'organ', 'gene_idx', 'values'])
    """
    for name, v in (("n_cells", n_cells), ("n_genes", n_genes), ("umis_per_cell", umis_per_cell), ("rows_per_file", rows_per_file)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(missing_lines_per_plate, int) or not 0 <= missing_lines_per_plate < 50:
        raise ValueError(f"missing_lines_per_plate must be an integer in [0, 49], got {missing_lines_per_plate!r}")
    if layout not in ("cells", "tahoe"):
        raise ValueError(f"layout must be 'cells' or 'tahoe', got {layout!r}")
    line_skew = _skew(line_skew)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    design = tahoe_design()
    rng = np.random.default_rng(random_state)
    plates = design["plate"].unique(maintain_order=True).to_list()
    lines = design["cell_line"].unique(maintain_order=True).to_list()
    organ_of = dict(zip(design["cell_line"], design["organ"]))
    organs = sorted(set(organ_of.values()))
    counts = _design_counts(rng, design, n_cells, missing_lines_per_plate, line_skew).ravel()  # plate-major (plate, line) groups

    base = rng.lognormal(0.0, 1.0, n_genes)
    organ_prog = {o: np.where(rng.random(n_genes) < 0.05, 3.0, 1.0) for o in organs}
    line_prog = np.where(rng.random((len(lines), n_genes)) < 0.03, 4.0, 1.0)
    plate_fac = rng.lognormal(0.0, plate_effect, (len(plates), n_genes))
    line_rate = np.array([base * organ_prog[organ_of[line]] * line_prog[i] for i, line in enumerate(lines)])

    genes = pl.DataFrame({"gene_idx": np.arange(n_genes, dtype=np.uint32), "gene": [f"G{i}" for i in range(n_genes)]})
    if layout == "tahoe":
        # Drawn after every other generator call, so the counts equal layout="cells"'s.
        tokens = np.random.default_rng([random_state, 1 << 20]).permutation(n_genes).astype(np.int64) + _FIRST_GENE_TOKEN
        write_parquet(pl.DataFrame({"token_id": tokens, "ensembl_id": [f"ENSG{i:011d}" for i in range(n_genes)],
                                    "gene_symbol": genes["gene"]}), out / "metadata" / "gene_metadata.parquet")
    else:
        write_parquet(genes, out / "genes.parquet")
    write_parquet(pl.DataFrame({
        "plate": np.repeat(plates, n_genes), "gene_idx": np.tile(np.arange(n_genes, dtype=np.uint32), len(plates)),
        "factor": plate_fac.ravel(),
    }), out / "plate_effects.parquet")
    ends = np.cumsum(counts)
    line_names, organ_names = np.asarray(lines), np.asarray([organ_of[line] for line in lines])
    n_files = -(-n_cells // rows_per_file)
    for k, start in enumerate(range(0, n_cells, rows_per_file)):
        stop = min(start + rows_per_file, n_cells)
        crng = np.random.default_rng([random_state, k])
        group = np.searchsorted(ends, np.arange(start, stop), side="right")
        group = group[np.lexsort((crng.random(group.size), group // len(lines)))]  # shuffle lines within a plate
        plate, line = np.divmod(group, len(lines))
        rates = {int(g): line_rate[g % len(lines)] * plate_fac[g // len(lines)] for g in np.unique(group)}
        rows = _draw_rows(crng, np.maximum(crng.poisson(umis_per_cell, group.size), 1), group, rates, n_genes)
        if layout == "tahoe":
            df = _tahoe_rows(rows, tokens, np.asarray(plates)[plate], line_names[line], start)
            name = out / "data" / f"train-{k:05d}-of-{n_files:05d}.parquet"
        else:
            df = pl.DataFrame({
                "cell_id": [f"cell{i}" for i in range(start, stop)],
                "plate": np.asarray(plates)[plate], "cell_line": line_names[line], "organ": organ_names[line],
            }).with_columns(rows["gene_idx"], rows["values"])
            name = out / f"part-{k:05d}.parquet"
        write_parquet(df, name, row_group_size=_rows_per_group(stop - start, int(rows["gene_idx"].list.len().sum())))
    return out


# Tahoe-100M's vocabulary keeps its first ids for special tokens; genes start after them.
_MARKER_TOKEN, _FIRST_GENE_TOKEN = 1, 3


def _tahoe_rows(rows: pl.DataFrame, tokens: np.ndarray, plate: np.ndarray, line: np.ndarray, start: int) -> pl.DataFrame:
    """Cells as Tahoe-100M's Parquet release has them: the marker first, then
    the genes' tokens in ascending token order with their counts."""
    old, new = pl.Series(np.arange(tokens.size, dtype=np.int64)), pl.Series(tokens)
    order = pl.col("genes").list.eval(pl.element().arg_sort())
    n = plate.size
    return (
        pl.DataFrame({"genes": rows["gene_idx"], "expressions": rows["values"]})
        .with_columns(pl.col("genes").list.eval(pl.element().cast(pl.Int64).replace_strict(old, new)))
        .with_columns(pl.col("genes").list.gather(order), pl.col("expressions").list.gather(order))
        .select(
            pl.concat_list(pl.lit(_MARKER_TOKEN, dtype=pl.Int64), "genes").alias("genes"),
            pl.concat_list(pl.lit(-2.0, dtype=pl.Float32), "expressions").alias("expressions"),
            pl.Series("drug", np.where(np.arange(start, start + n) % 7 == 0, "DMSO_TF", "drug")),
            pl.Series("sample", [f"smp_{p}" for p in plate]),
            pl.Series("plate", plate),
            pl.Series("cell_line_id", line),
            pl.Series("BARCODE_SUB_LIB_ID", [f"{i:08x}" for i in range(start, start + n)]),
        )
    )
