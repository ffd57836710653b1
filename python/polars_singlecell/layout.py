"""Cells in the project's layout from the layouts data is published in.

The project reads one row per cell with ``gene_idx: List(UInt32)`` (sorted,
0-based) and ``values: List(Float32)``. Tahoe-100M's Parquet release has
``genes``: ``List(Int64)`` token ids led by a marker token that is no gene,
in no promised order, ``expressions`` beside them, and a ``gene_metadata``
table of ``token_id``. :func:`to_cells` turns the one into the other as an
elementwise expression (it streams; no copy of the source is written) and
:func:`scan_cells` opens a source of either layout for every fit and
:func:`psc.integrate`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from polars_singlecell._frames import IntoExpr
from polars_singlecell._plugin import call

__all__ = ["COUNTS", "cell_files", "is_remote", "read_vocabulary", "scan_cells", "to_cells", "vocabulary_genes"]

Vocabulary = pl.DataFrame | str | os.PathLike

#: The project's count columns.
COUNTS = ("gene_idx", "values")

# Columns that name a gene, most readable first: genes.parquet's ``gene``.
_NAME_COLUMNS = ("gene", "gene_symbol", "gene_name", "ensembl_id")


def is_remote(source: object) -> bool:
    """Whether ``source`` is a URL Polars reads itself (``s3://``, ``hf://``, ``https://``...).

    Parameters
    ----------
    source : object
        A path, a URL, or anything else.

    Returns
    -------
    bool
        ``True`` for a string with ``://`` in it.
    """
    return isinstance(source, str) and "://" in source


def cell_files(source: str | os.PathLike, genes_column: str) -> list[Path]:
    """The Parquet files of cells at ``source`` (a file, a folder, a glob).

    In a folder only those with a list column ``genes_column`` (a folder may
    also hold ``genes.parquet`` and the like, as ``io.h5ad_to_parquet``
    writes).

    Parameters
    ----------
    source : str or os.PathLike
        A file, a folder or a glob.
    genes_column : str
        The cells' list column of gene ids (``"gene_idx"`` in the project's
        layout).

    Returns
    -------
    list of pathlib.Path
        The files, each checked to be readable Parquet.

    Raises
    ------
    FileNotFoundError
        No Parquet files at ``source``, or none with ``genes_column`` in a folder.
    ValueError
        A file is not Parquet or was cut short.
    """
    from polars_singlecell.io import parquet_files, parquet_schema

    files = parquet_files(source)
    if Path(source).is_dir():
        files = [f for f in files if isinstance(parquet_schema(f).get(genes_column), pl.List)]
        if not files:
            raise FileNotFoundError(f"no Parquet files of cells (with a list column '{genes_column}') in {source!s}; "
                                    "for another layout name its columns: counts=(gene ids, values)")
    return files


def read_vocabulary(vocabulary: Vocabulary, *, token_column: str = "token_id") -> pl.DataFrame:
    """The vocabulary table, checked: ``token_column`` is present, integer and without nulls.

    Parameters
    ----------
    vocabulary : polars.DataFrame, polars.LazyFrame, str or os.PathLike
        The table, or its Parquet file (local or remote).
    token_column : str, default "token_id"
        Its column of token ids.

    Returns
    -------
    polars.DataFrame
        The table, one row per gene: its row order is the gene order.

    Raises
    ------
    FileNotFoundError
        No local file at the path.
    TypeError
        ``vocabulary`` is not a path or a frame.
    ValueError
        Not Parquet, empty, or ``token_column`` missing, not integer or null.
    """
    if isinstance(vocabulary, pl.LazyFrame):
        vocabulary = vocabulary.collect()
    if isinstance(vocabulary, (str, os.PathLike)):
        where = str(vocabulary)
        if not is_remote(where) and not Path(where).is_file():
            raise FileNotFoundError(f"no vocabulary file at {where}: give the gene_metadata Parquet file (token_id, gene names)")
        try:
            vocabulary = pl.read_parquet(where)
        except pl.exceptions.PolarsError as e:
            raise ValueError(f"cannot read the vocabulary {where} as Parquet: {e}") from e
    if not isinstance(vocabulary, pl.DataFrame):
        raise TypeError(f"vocabulary must be a Parquet path or a DataFrame, got {type(vocabulary).__name__}")
    if token_column not in vocabulary.columns:
        raise ValueError(f"the vocabulary has no column '{token_column}' (columns: {vocabulary.columns}); "
                         "pass token_column= the column of token ids")
    dtype = vocabulary.schema[token_column]
    if not dtype.is_integer():
        raise ValueError(f"vocabulary column '{token_column}' has dtype {dtype}, expected integer token ids")
    if vocabulary[token_column].null_count():
        row = vocabulary[token_column].is_null().arg_true()[0]
        raise ValueError(f"vocabulary column '{token_column}' is null at row {row}; every gene needs its token id")
    if vocabulary.height == 0:
        raise ValueError("the vocabulary is empty")
    return vocabulary


def vocabulary_genes(vocabulary: Vocabulary, *, token_column: str = "token_id") -> pl.DataFrame:
    """``genes.parquet`` for cells read through ``vocabulary``.

    Parameters
    ----------
    vocabulary : polars.DataFrame, str or os.PathLike
        The vocabulary table, or its Parquet file (see :func:`read_vocabulary`).
    token_column : str, default "token_id"
        Its column of token ids.

    Returns
    -------
    polars.DataFrame
        One row per gene (the vocabulary's rows): ``gene_idx`` (UInt32, the
        row), ``gene`` (String: the first of ``gene``, ``gene_symbol``,
        ``gene_name``, ``ensembl_id`` it has, else the token id as text),
        then the vocabulary's other columns.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc
    >>> v = pl.DataFrame({"token_id": [7, 5], "ensembl_id": ["ENSG2", "ENSG1"], "gene_symbol": ["B", "A"]})
    >>> psc.layout.vocabulary_genes(v).rows()
    [(0, 'B', 7, 'ENSG2'), (1, 'A', 5, 'ENSG1')]
    """
    v = read_vocabulary(vocabulary, token_column=token_column)
    name = next((c for c in _NAME_COLUMNS if c in v.columns), None)
    gene = pl.col(name).cast(pl.String) if name else pl.col(token_column).cast(pl.String)
    rest = [c for c in v.columns if c not in (name, "gene_idx")]
    return v.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("gene_idx"), gene.alias("gene"), *rest)


def _tokens(vocabulary: Vocabulary, token_column: str) -> np.ndarray:
    v = read_vocabulary(vocabulary, token_column=token_column)
    tokens = v[token_column].cast(pl.Int64).to_numpy()
    if np.unique(tokens).size != tokens.size:
        values, counts = np.unique(tokens, return_counts=True)
        raise ValueError(f"vocabulary column '{token_column}' lists token {values[counts > 1][0]} more than once; "
                         "each token must name one gene")
    return tokens


def vocabulary_digest(vocabulary: Vocabulary, *, token_column: str = "token_id") -> str:
    """A digest of the vocabulary's token ids in gene order (the part that decides the cells)."""
    return hashlib.sha256(_tokens(vocabulary, token_column).astype("<i8").tobytes()).hexdigest()[:16]


def to_cells(
    genes: IntoExpr = "genes",
    values: IntoExpr = "expressions",
    *,
    vocabulary: Vocabulary | None = None,
    n_genes: int | None = None,
    token_column: str = "token_id",
) -> pl.Expr:
    """Each cell's published gene ids and values in the project's layout.

    Parameters
    ----------
    genes : str or polars.Expr, default "genes"
        A list of integer gene ids per cell (any integer dtype).
    values : str or polars.Expr, default "expressions"
        The matching values (any float or integer dtype), read as float32.
    vocabulary : polars.DataFrame, str, os.PathLike or None, default None
        A table with ``token_column`` (a Parquet path, local or remote, or a
        DataFrame, e.g. Tahoe-100M's ``gene_metadata``): a cell's gene index
        is the row of its token there, and tokens absent from it (Tahoe's
        leading marker token) are dropped with their values. ``None``: the
        ids are the gene indices.
    n_genes : int or None, default None
        Without a vocabulary, ids must lie in ``[0, n_genes)`` (``None``: any
        id ≥ 0).
    token_column : str, default "token_id"
        The vocabulary's column of token ids.

    Returns
    -------
    polars.Expr
        ``Struct{gene_idx: List(UInt32), values: List(Float32)}``, each cell's
        entries sorted by gene index: ``.struct.unnest()`` gives the two columns.
        An elementwise expression: it streams. A gene given twice in a cell, an
        id out of range, and a negative or non-finite value (after the marker is
        dropped) are errors naming the row. Null cells stay null.

    Examples
    --------
    >>> import polars as pl, polars_singlecell as psc
    >>> vocab = pl.DataFrame({"token_id": [10, 12, 11], "gene_symbol": ["A", "C", "B"]})
    >>> cells = pl.DataFrame({"genes": [[3, 11, 10]], "expressions": [[-2.0, 5.0, 1.0]]})  # 3: the marker
    >>> cells.select(psc.to_cells(vocabulary=vocab).struct.unnest()).rows()
    [([0, 2], [1.0, 5.0])]
    """
    if n_genes is not None and (isinstance(n_genes, bool) or not isinstance(n_genes, (int, np.integer)) or n_genes < 1):
        raise ValueError(f"n_genes must be a positive integer or None, got {n_genes!r}")
    tokens = None if vocabulary is None else _tokens(vocabulary, token_column).astype("<i8").tobytes()
    col = (lambda x: pl.col(x) if isinstance(x, str) else x)
    return call("to_cells", [col(genes), col(values)],
                {"tokens": tokens, "n_genes": None if n_genes is None else int(n_genes)})


def scan_cells(
    source: str | os.PathLike | Sequence[str | os.PathLike] | pl.LazyFrame,
    *,
    counts: tuple[str, str] = COUNTS,
    vocabulary: Vocabulary | None = None,
    n_genes: int | None = None,
    token_column: str = "token_id",
) -> pl.LazyFrame:
    """A LazyFrame of cells in the project's layout from Parquet of any sparse list layout.

    Unless the count columns are already the project's ``(gene_idx, values)``
    with no vocabulary, they are replaced by :func:`to_cells` of them (the
    other columns are kept, in order).

    Parameters
    ----------
    source : str, os.PathLike, sequence of them, or polars.LazyFrame
        A path, a folder, a glob, a URL Polars reads (``hf://datasets/...``,
        ``s3://...``), a list of files, or a LazyFrame.
    counts : tuple of (str, str), default ("gene_idx", "values")
        The source's gene-id and value list columns.
    vocabulary : polars.DataFrame, str, os.PathLike or None, default None
        The token table, as in :func:`to_cells`.
    n_genes : int or None, default None
        Without a vocabulary, the bound on the ids, as in :func:`to_cells`.
    token_column : str, default "token_id"
        The vocabulary's column of token ids.

    Returns
    -------
    polars.LazyFrame
        One row per cell: the source's other columns, then ``gene_idx``
        (``List(UInt32)``) and ``values`` (``List(Float32)``); or the source
        as it is where ``counts`` is the project's and there is no vocabulary.

    Raises
    ------
    ValueError
        ``counts`` does not name two columns the source has.
    FileNotFoundError
        No Parquet files of cells at ``source``.

    Examples
    --------
    >>> import tempfile, polars as pl, polars_singlecell as psc
    >>> d = psc.datasets.tahoe_like(1000, tempfile.mkdtemp(), n_genes=50, layout="tahoe")
    >>> lf = psc.layout.scan_cells(d / "data", counts=("genes", "expressions"),
    ...                            vocabulary=d / "metadata" / "gene_metadata.parquet")
    >>> lf.collect_schema()["gene_idx"], lf.select(pl.len()).collect().item()
    (List(UInt32), 1000)
    """
    if not (isinstance(counts, (tuple, list)) and len(counts) == 2 and all(isinstance(c, str) for c in counts)):
        raise ValueError(f"counts must name two columns (gene ids, values), got {counts!r}")
    if isinstance(source, pl.LazyFrame):
        lf = source
    elif is_remote(source):
        lf = pl.scan_parquet(source)
    elif isinstance(source, (list, tuple)):  # files already found (integrate's)
        lf = pl.scan_parquet([str(s) for s in source])
    else:
        lf = pl.scan_parquet(cell_files(source, counts[0]))
    schema = lf.collect_schema()
    for c in counts:
        if c not in schema:
            raise ValueError(f"the cells have no column '{c}' (columns: {schema.names()}); pass counts=(gene ids, values)")
    if tuple(counts) == COUNTS and vocabulary is None:
        return lf
    rest = [c for c in schema.names() if c not in (*counts, *COUNTS)]
    return lf.select(*rest, to_cells(*counts, vocabulary=vocabulary, n_genes=n_genes, token_column=token_column).struct.unnest())
