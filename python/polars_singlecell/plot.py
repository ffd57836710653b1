"""Before/after pictures of an integration, for a seeded sample of cells.

Needs matplotlib (``pip install matplotlib``; the demo's setup installs it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from polars_singlecell._checks import renamed

__all__ = ["embedding"]


@renamed(seed="random_state")
def embedding(
    cells: pl.DataFrame | pl.LazyFrame | str | os.PathLike,
    *,
    basis: Sequence[str] = ("X_pca", "X_ot"),
    color: Sequence[str] = ("batch", "label"),
    components: tuple[int, int] = (0, 1),
    max_cells: int = 20_000,
    random_state: int = 0,
    path: str | os.PathLike | None = None,
    point_size: float = 2.0,
):
    """Scatter plots of two components of each embedding in ``basis`` (rows)
    coloured by each column in ``color`` (columns): with the defaults, PCA
    before and OT after, by batch and by label. Like ``sc.pl.embedding`` but
    from Parquet, on a seeded sample of ``max_cells`` cells (the same sample
    as :func:`polars_singlecell.metrics.evaluate`, drawn in the streaming
    engine, so a 100M-cell file is fine). Points are drawn in a seeded random
    order, so no batch hides the others.

    Returns the matplotlib ``Figure``; with ``path`` also writes it (PNG, or
    the format of the suffix) atomically.

    >>> import polars as pl, polars_singlecell as psc
    >>> cells = pl.DataFrame({"batch": ["a", "b"] * 50,
    ...                       "X_pca": pl.Series([[float(i), float(i % 7)] for i in range(100)], dtype=pl.Array(pl.Float32, 2))})
    >>> fig = psc.plot.embedding(cells, basis=["X_pca"], color=["batch"])
    >>> [ax.get_title() for ax in fig.axes]
    ['X_pca by batch']
    """
    # The object API, not pyplot: no backend is chosen or changed (a notebook's stays as it is).
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from polars_singlecell._files import atomic_path, seeded_sample
    from polars_singlecell.io import parquet_files

    basis, color = list(basis), list(color)
    if not basis or not color:
        raise ValueError("basis and color each need at least one column")
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive integer, got {max_cells!r}")
    lf = pl.scan_parquet(parquet_files(cells)) if isinstance(cells, (str, os.PathLike)) else cells.lazy()
    schema = lf.collect_schema()
    for c in basis + color:
        if c not in schema:
            raise ValueError(f"the cells have no column '{c}' (columns: {schema.names()})")
    for b in basis:
        dt = schema[b]
        if not isinstance(dt, pl.Array) or not max(components) < dt.size or min(components) < 0:
            raise ValueError(f"column '{b}' is {dt}: components {components} need an Array with more than {max(components)} entries")
    df = seeded_sample(lf.select(basis + color), max_cells, random_state).collect(engine="streaming")
    df = df.sample(fraction=1.0, shuffle=True, seed=random_state)  # the drawing order: no batch always on top
    fig = Figure(figsize=(4.2 * len(color), 3.8 * len(basis)))
    axes = fig.subplots(len(basis), len(color), squeeze=False)
    for j, c in enumerate(color):
        values = df[c].cast(pl.String).fill_null("(null)")
        cats = sorted(values.unique().to_list())
        cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]  # tab20's pairs look alike
        code = values.replace_strict(cats, list(range(len(cats))), return_dtype=pl.Int64).to_numpy()
        for i, b in enumerate(basis):
            x = df[b].to_numpy()[:, list(components)]
            ax = axes[i][j]
            ax.scatter(x[:, 0], x[:, 1], c=cmap(code % cmap.N), s=point_size, linewidths=0, rasterized=True)
            ax.set_title(f"{b} by {c}")
            ax.set_xlabel(f"{b}[{components[0]}]")
            ax.set_ylabel(f"{b}[{components[1]}]")
            ax.set_xticks([])
            ax.set_yticks([])
        if len(cats) <= cmap.N:
            handles = [Line2D([], [], marker="o", ls="", color=cmap(k), label=str(v)) for k, v in enumerate(cats)]
            axes[0][j].legend(handles=handles, fontsize=6, markerscale=0.8, loc="best", frameon=False)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    return fig
