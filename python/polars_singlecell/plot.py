"""Before/after pictures of an integration, for a seeded sample of cells.

Needs matplotlib (``pip install matplotlib``; the demo's setup installs it),
and umap-learn for UMAPs (``pip install 'polars-singlecell[umap]'``).
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
    basis: str | Sequence[str] = ("X_pca", "X_ot"),
    color: Sequence[str] = ("batch", "label"),
    components: tuple[int, int] = (0, 1),
    max_cells: int = 20_000,
    random_state: int = 0,
    path: str | os.PathLike | None = None,
    point_size: float = 2.0,
):
    """Scatter plots of two components of each embedding, coloured by each column.

    One row per embedding in ``basis``, one column per colouring in
    ``color``: with the defaults, PCA before and OT after, by batch and by
    label. Like ``sc.pl.embedding`` but
    from Parquet, on a seeded sample of ``max_cells`` cells (the same sample
    as :func:`polars_singlecell.metrics.evaluate`, drawn in the streaming
    engine, so a 100M-cell file is fine). Points are drawn in a seeded random
    order, so no batch hides the others.

    ``basis="umap"``: a UMAP of ``X_pca`` (before) and one of ``X_ot``
    (after), computed on the sample (umap-learn, scanpy's defaults:
    15 neighbours, ``min_dist=0.5``, seeded by ``random_state``), as users
    judge an integration; ``"umap:<column>"`` is the UMAP of any embedding
    column. A UMAP's cost grows with the sampled cells (and numba compiles
    on first use): lower ``max_cells`` for a quick look.

    Parameters
    ----------
    cells : polars.DataFrame, polars.LazyFrame, str or os.PathLike
        The cells, or their Parquet path, folder or glob.
    basis : str or sequence of str, default ("X_pca", "X_ot")
        Embedding columns (``Array``, more entries than ``max(components)``),
        ``"umap:<column>"`` entries, or ``"umap"`` alone.
    color : sequence of str, default ("batch", "label")
        Columns to colour by (any dtype, shown as text; nulls as ``"(null)"``).
    components : tuple of (int, int), default (0, 1)
        The two entries of each embedding on the x and y axes.
    max_cells : int, default 20_000
        Cells in the seeded sample.
    random_state : int, default 0
        Seed of the sample, the drawing order and the UMAPs.
    path : str, os.PathLike or None, default None
        Also write the figure here (PNG, or the format of the suffix), atomically.
    point_size : float, default 2.0
        Marker size of each cell.

    Returns
    -------
    matplotlib.figure.Figure
        ``len(basis)`` × ``len(color)`` axes.

    Raises
    ------
    ValueError
        A missing column, an embedding that is not an Array or too narrow for
        ``components``, or an empty ``basis``/``color``.
    ImportError
        matplotlib (or, for UMAPs, umap-learn) is missing.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc
    >>> cells = pl.DataFrame({"batch": ["a", "b"] * 50,
    ...                       "X_pca": pl.Series([[float(i), float(i % 7)] for i in range(100)], dtype=pl.Array(pl.Float32, 2))})
    >>> fig = psc.plot.embedding(cells, basis=["X_pca"], color=["batch"])
    >>> [ax.get_title() for ax in fig.axes]
    ['X_pca by batch']
    """
    # The object API, not pyplot: no backend is chosen or changed (a notebook's stays as it is).
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError("plot.embedding needs matplotlib: pip install 'polars-singlecell[plot]'") from e

    from polars_singlecell._files import atomic_path, seeded_sample
    from polars_singlecell.io import parquet_files

    basis = ["umap:X_pca", "umap:X_ot"] if basis == "umap" else [basis] if isinstance(basis, str) else list(basis)
    color = list(color)
    if not basis or not color:
        raise ValueError("basis and color each need at least one column")
    umap_of = {b: b.removeprefix("umap:") for b in basis if b.startswith("umap:")}
    if umap_of:
        try:
            import umap  # noqa: F401  (checked before any data is read)
        except ImportError as e:
            raise ImportError(f"basis {list(umap_of)} needs umap-learn: pip install 'polars-singlecell[umap]'") from e
    columns = list(dict.fromkeys(umap_of.get(b, b) for b in basis))
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError(f"max_cells must be a positive integer, got {max_cells!r}")
    lf = pl.scan_parquet(parquet_files(cells)) if isinstance(cells, (str, os.PathLike)) else cells.lazy()
    schema = lf.collect_schema()
    for c in columns + color:
        if c not in schema:
            raise ValueError(f"the cells have no column '{c}' (columns: {schema.names()})")
    for b in columns:
        dt = schema[b]
        if not isinstance(dt, pl.Array):
            raise ValueError(f"column '{b}' is {dt}, expected an embedding (Array)")
        if b not in umap_of.values() and not (max(components) < dt.size and min(components) >= 0):
            raise ValueError(f"column '{b}' is {dt}: components {components} need an Array with more than {max(components)} entries")
    df = seeded_sample(lf.select(columns + [c for c in color if c not in columns]), max_cells, random_state).collect(
        engine="streaming")
    df = df.sample(fraction=1.0, shuffle=True, seed=random_state)  # the drawing order: no batch always on top
    points = {b: _umap(df[umap_of[b]].to_numpy(), random_state) if b in umap_of else df[b].to_numpy()[:, list(components)]
              for b in basis}
    fig = Figure(figsize=(4.2 * len(color), 3.8 * len(basis)))
    axes = fig.subplots(len(basis), len(color), squeeze=False)
    for j, c in enumerate(color):
        values = df[c].cast(pl.String).fill_null("(null)")
        cats = sorted(values.unique().to_list())
        cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]  # tab20's pairs look alike
        code = values.replace_strict(cats, list(range(len(cats))), return_dtype=pl.Int64).to_numpy()
        for i, b in enumerate(basis):
            x = points[b]
            ax = axes[i][j]
            ax.scatter(x[:, 0], x[:, 1], c=cmap(code % cmap.N), s=point_size, linewidths=0, rasterized=True)
            name = f"UMAP of {umap_of[b]}" if b in umap_of else b
            ax.set_title(f"{name} by {c}")
            ax.set_xlabel("UMAP1" if b in umap_of else f"{b}[{components[0]}]")
            ax.set_ylabel("UMAP2" if b in umap_of else f"{b}[{components[1]}]")
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


def _umap(x, random_state: int):
    """A 2-d UMAP of the rows of ``x`` with scanpy's defaults (15 neighbours,
    ``min_dist=0.5``), seeded (umap-learn then runs single-threaded: the
    same picture every time)."""
    import umap

    return umap.UMAP(n_neighbors=15, min_dist=0.5, random_state=random_state).fit_transform(x)
