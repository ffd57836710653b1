"""Reading and writing cells: Parquet written whole or not at all
(:func:`sink_parquet`, :func:`write_parquet`: a temporary file in the same
folder, then a rename), Parquet sources checked file by file, and AnnData in
and out (:func:`h5ad_to_parquet`, :func:`to_anndata`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from polars_singlecell._checks import positive_int, renamed
from polars_singlecell._files import OS_ERROR as _OS_ERROR
from polars_singlecell._files import ROW_GROUP_ENTRIES, sink_parquet
from polars_singlecell._files import atomic_path as _atomic_path
from polars_singlecell._files import expand as _expand
from polars_singlecell._files import rows_per_group as _rows_per_group
from polars_singlecell._files import seeded_sample as _seeded_sample
from polars_singlecell._files import write_failed as _write_failed

__all__ = ["from_anndata", "h5ad_to_parquet", "parquet_files", "sink_parquet", "to_anndata", "write_obsm", "write_parquet"]


def check_writable(folder: Path) -> None:
    """Create ``folder`` and a hidden file in it, before hours of work go into
    outputs that could not be written: an ``OSError`` naming it if not."""
    probe = folder / f".write-check.{uuid.uuid4().hex[:8]}.tmp"  # hidden: a killed run's is cleaned like any .*.tmp
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise (_write_failed(folder, e) or e) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def parquet_files(source: str | os.PathLike) -> list[Path]:
    """The Parquet files at ``source``, each checked to be readable Parquet by its footer.

    Polars' own error for a bad footer names no file, which in a folder of
    hundreds of plates leaves the user guessing. (Only the footer is read: a
    damaged page inside a file fails later, as Polars reports it.)

    Parameters
    ----------
    source : str or os.PathLike
        A file, a folder of ``*.parquet`` or a glob.

    Returns
    -------
    list of pathlib.Path
        The files, in the order a scan reads them.

    Raises
    ------
    FileNotFoundError
        No file at ``source``.
    ValueError
        A file is not Parquet, or was cut short (an interrupted copy); the
        message names it.
    """
    files = _expand(source, ".parquet")
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no Parquet files at {source!s}: give a file, a folder of *.parquet or a glob")
    for f in files:
        parquet_schema(f)
    return files


def parquet_schema(path: Path) -> pl.Schema:
    """``pl.read_parquet_schema``, with a file that is not Parquet or was cut
    short named. Errors of the file system (no permission) pass as they are."""
    try:
        return pl.read_parquet_schema(path)
    except pl.exceptions.PolarsError as e:
        if m := _OS_ERROR.search(str(e)):
            raise OSError(int(m.group(1)), f"cannot read {path}: {e}") from e
        raise ValueError(
            f"cannot read {path}: it is not a Parquet file, or it was cut short: {e}. "
            "Re-write or re-copy it, or move it out of the folder"
        ) from e


def write_parquet(df: pl.DataFrame, path: str | os.PathLike, **kwargs: Any) -> None:
    """``df.write_parquet(path)``, atomic like :func:`sink_parquet`.

    Written to a temporary file in the same folder, then renamed: ``path``
    is either the old file or the whole new one.

    Parameters
    ----------
    df : polars.DataFrame
        The frame to write.
    path : str or os.PathLike
        The file (replaced if it exists).
    **kwargs
        Options of ``polars.DataFrame.write_parquet`` (``row_group_size``,
        ``metadata``, ...).
    """
    with _atomic_path(path) as tmp:
        df.write_parquet(tmp, **kwargs)


def _needs(extra: str, module: str):
    """``import module``, or an ImportError naming the extra that installs it."""
    import importlib

    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        try:  # installed, but too old to have `module`
            found = f" ({top} {importlib.import_module(top).__version__} is installed; {module} needs a newer one)"
        except Exception:  # noqa: BLE001 (any failure to tell the version: say nothing of it)
            found = ""
        raise ImportError(f"AnnData and .h5ad support needs {module}{found}: pip install 'polars-singlecell[{extra}]'") from e


def _obs_readers(obs, columns: list[str] | None) -> dict[str, Any]:
    """For each wanted column of AnnData's ``obs`` group, a function of a row
    slice giving that slice as a Polars Series. Categorical and nullable
    integer/boolean columns are read once by anndata's element reader (codes
    and masks: 1–9 bytes a cell); plain arrays and strings, the index and
    nullable strings among them, are read a slice at a time, so a plate's
    barcodes are never all in memory."""
    import h5py

    read_elem = _needs("h5ad", "anndata.io").read_elem

    def plain(name: str, ds) -> Any:
        if ds.dtype.kind in "OSU":
            return lambda sl: pl.Series(name, ds.asstr()[sl], dtype=pl.String)
        return lambda sl: pl.Series(name, ds[sl])

    index = obs.attrs.get("_index", "_index")
    order = list(obs.attrs.get("column-order", []))
    wanted = order if columns is None else columns
    out: dict[str, Any] = {"cell_id": plain("cell_id", obs[index])}
    for name in wanted:
        if name not in obs:
            raise ValueError(f"obs has no column '{name}' (columns: {order})")
        node = obs[name]
        kind = node.attrs.get("encoding-type", "array")
        if isinstance(node, h5py.Dataset) and kind in ("array", "string-array"):
            out[name] = plain(name, node)
        elif kind == "categorical":
            cat = read_elem(node)
            cats = pl.Series(name, [str(c) for c in cat.categories], dtype=pl.String)
            codes = cat.codes
            out[name] = lambda sl, cats=cats, codes=codes: cats.gather(pl.Series(codes[sl]).cast(pl.Int64).replace(-1, None))
        elif kind == "nullable-string-array":
            # Strings a slice at a time, as plain ones: read whole, a plate's
            # would be millions of Python objects.
            out[name] = lambda sl, name=name, node=node: pl.Series(name, node["values"].asstr()[sl], dtype=pl.String).set(
                pl.Series(node["mask"][sl]), None)
        elif kind in ("nullable-integer", "nullable-boolean"):
            out[name] = lambda sl, name=name, values=read_elem(node): _masked_series(name, values[sl])  # noqa: B008 (read once, now)
        else:
            raise ValueError(f"obs column '{name}' has encoding '{kind}', which is not supported; drop it with obs_columns=[...]")
    return out


def _masked_series(name: str, part) -> pl.Series:
    """A pandas masked array (nullable Int/boolean/string, anndata's
    encodings) as a Polars Series with nulls, its dtype kept even where the
    slice is all missing. Without pyarrow: Polars converts only numpy-backed
    pandas data itself."""
    if part.dtype.kind in "OSU" or str(part.dtype).startswith("string"):
        return pl.Series(name, part.to_numpy(dtype=object, na_value=None), dtype=pl.String)
    valid = pl.Series(~np.asarray(part.isna(), dtype=bool))
    data = pl.Series(name, part.to_numpy(dtype=part.dtype.numpy_dtype, na_value=part.dtype.numpy_dtype.type(0)))
    return pl.select(pl.when(valid).then(data).alias(name)).to_series()


def h5ad_obs_columns(path: str | os.PathLike) -> list[str]:
    """The ``obs`` columns of an ``.h5ad`` file, read from its header only
    (what a run can check before importing anything)."""
    h5py = _needs("h5ad", "h5py")
    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            return [str(c) for c in obs.attrs.get("column-order", [])] or [k for k in obs if k != obs.attrs.get("_index", "_index")]
    except (OSError, KeyError) as e:
        raise ValueError(f"cannot read the obs of {path}: not an AnnData .h5ad file, or cut short: {e}") from e


def h5ad_to_parquet(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    obs_columns: list[str] | None = None,
    rows_per_file: int = 100_000,
) -> Path:
    """Stream an AnnData ``.h5ad`` file of CSR counts into the project's layout.

    Writes ``out/part-*.parquet`` with ``cell_id`` (the obs index), the
    ``obs`` columns (all, or ``obs_columns``), ``gene_idx`` (sorted,
    ``List(UInt32)``) and ``values`` (``List(Float32)``), plus
    ``out/genes.parquet`` (``gene_idx``, ``gene`` from the var index).

    Needs h5py and anndata (``pip install 'polars-singlecell[h5ad]'``). The
    matrix is read through anndata's backed CSR reader one row group at a
    time (about ``ROW_GROUP_ENTRIES`` non-zeros, whatever the density), and
    its list columns are built from the CSR offsets in Rust; ``obs`` as
    :func:`_obs_readers` says. Each file of ``rows_per_file`` cells is
    streamed into Parquet row group by row group, so memory does not grow
    with the file or with the density. Duplicate entries of a row are summed
    and each row sorted, as scipy does. Writes into a temporary folder
    renamed to ``out`` at the end, so an interrupted import leaves no folder
    that looks complete.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.h5ad`` file (``n_obs`` cells × ``n_vars`` genes, CSR).
    out : str or os.PathLike
        The folder to create; it must not exist.
    layer : str or None, default None
        Read ``layers[layer]`` instead of ``X``.
    obs_columns : list of str or None, default None
        The ``obs`` columns to keep; ``None``: all.
    rows_per_file : int, default 100_000
        Cells per ``part-*.parquet`` file.

    Returns
    -------
    pathlib.Path
        The folder ``out``: ``n_obs`` cells in ``part-*.parquet`` and
        ``n_vars`` genes in ``genes.parquet``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    FileExistsError
        ``out`` exists.
    ValueError
        Not an ``.h5ad`` file, no such layer, a matrix not stored as CSR, an
        unsupported ``obs`` encoding, or a bad entry (the rows named).
    ImportError
        h5py or anndata is missing.

    Examples
    --------
    >>> import tempfile, numpy as np, scipy.sparse as sp, anndata as ad, polars_singlecell as psc
    >>> d = tempfile.mkdtemp()
    >>> X = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3]], dtype=np.float32))
    >>> ad.AnnData(X).write_h5ad(d + "/a.h5ad")
    >>> df = pl.read_parquet(psc.io.h5ad_to_parquet(d + "/a.h5ad", d + "/out") / "part-*.parquet")
    >>> df["gene_idx"].to_list(), df["values"].to_list()
    ([[1], [0, 2]], [[2.0], [1.0, 3.0]])
    """
    h5py = _needs("h5ad", "h5py")
    sparse_dataset = _needs("h5ad", "anndata.io").sparse_dataset
    from polars.io.plugins import register_io_source

    from polars_singlecell import _internal

    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file must be a positive integer, got {rows_per_file!r}")
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another folder")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"cannot read {path}: not an HDF5 (.h5ad) file, or cut short: {e}") from e
        with f:
            where = f"layers/{layer}" if layer else "X"
            if where not in f:
                raise ValueError(f"{path} has no {where}")
            node = f[where]
            kind = node.attrs.get("encoding-type", "array") if isinstance(node, h5py.Group) else "array"
            if kind != "csr_matrix":
                raise ValueError(f"{where} in {path} is stored as {kind!r}; h5ad_to_parquet reads CSR counts "
                                 "(in anndata: adata.X = scipy.sparse.csr_matrix(adata.X) before writing)")
            x = sparse_dataset(node)
            n_cells, n_genes = x.shape
            indptr = node["indptr"]
            obs = _obs_readers(f["obs"], obs_columns)
            var = f["var"]
            genes = _needs("h5ad", "anndata.io").read_elem(var[var.attrs.get("_index", "_index")])
            write_parquet(pl.DataFrame({"gene_idx": np.arange(n_genes, dtype=np.uint32),
                                        "gene": pl.Series([str(g) for g in genes], dtype=pl.String)}), tmp / "genes.parquet")

            def rows(start: int, stop: int) -> pl.DataFrame:
                m = x[start:stop]  # anndata reads this slice's indptr, indices and data only
                try:
                    gene_idx, values = _internal.from_csr(pl.Series(m.indptr.astype(np.int64)), pl.Series(m.indices),
                                                          pl.Series(m.data), n_genes)
                except ValueError as e:
                    raise ValueError(f"{where} in {path}, rows {start}..{stop}: {e}") from e
                return pl.DataFrame([read(slice(start, stop)) for read in obs.values()]).with_columns(gene_idx, values)

            for k, start in enumerate(range(0, n_cells, rows_per_file)):
                stop = min(start + rows_per_file, n_cells)
                # Rows per group from this file's mean density (indptr: two reads).
                group = _rows_per_group(stop - start, int(indptr[stop]) - int(indptr[start]), ROW_GROUP_ENTRIES)
                first = rows(start, min(start + 1, stop))

                failed: list[ValueError] = []

                def source(with_columns, predicate, n_rows, batch_size, start=start, stop=stop, group=group, failed=failed):
                    for a in range(start, stop, group):
                        try:
                            chunk = rows(a, min(a + group, stop))
                        except ValueError as e:
                            failed.append(e)
                            raise
                        yield chunk

                lf = register_io_source(source, schema=first.schema)
                with _atomic_path(tmp / f"part-{k:05d}.parquet") as part:
                    try:
                        lf.sink_parquet(part, row_group_size=group)
                    except pl.exceptions.PolarsError:
                        if failed:  # bad data in a later group: the same ValueError as in the first
                            raise failed[0] from None
                        raise
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@renamed(seed="random_state")
def to_anndata(
    cells: pl.DataFrame | pl.LazyFrame | str | os.PathLike,
    *,
    obsm: tuple[str, ...] = ("X_pca", "X_ot"),
    obs: list[str] | None = None,
    max_cells: int | None = 100_000,
    random_state: int = 0,
    genes: pl.DataFrame | str | os.PathLike | None = None,
    pca: Any = None,
):
    """An ``anndata.AnnData`` of (a seeded sample of) integrated cells, for scanpy.

    For scanpy's neighbours/UMAP/leiden: ``obsm[name]`` for each embedding
    column in ``obsm``, ``obs`` from the other non-list columns (or ``obs``),
    no ``X``. ``max_cells`` draws the same seeded sample as
    :func:`polars_singlecell.metrics.evaluate`, in the streaming engine.

    With ``genes`` (a ``genes.parquet`` of :func:`integrate`, or its table)
    the genes become ``var`` (indexed by the ``gene`` column, else by
    ``gene_idx``), HVG statistics and ``highly_variable`` included. With
    ``pca`` (a :class:`PcaModel` or its Parquet path) ``uns["pca"]`` and
    ``varm["PCs"]`` are written as ``sc.pp.pca(adata, mask_var="highly_variable")``
    writes them: the loadings of the highly variable genes, zeros elsewhere.

    Parameters
    ----------
    cells : polars.DataFrame, polars.LazyFrame, str or os.PathLike
        The cells (e.g. :func:`polars_singlecell.integrate`'s
        ``cells.parquet``), or their Parquet path, folder or glob.
    obsm : tuple of str, default ("X_pca", "X_ot")
        Embedding columns, each an ``Array`` (``Array(Float32, d)`` as the
        package writes them).
    obs : list of str or None, default None
        Columns for ``obs``; ``None``: every column that is not a list,
        array or struct.
    max_cells : int or None, default 100_000
        Cells in the seeded sample; ``None`` keeps every cell.
    random_state : int, default 0
        The sample's seed.
    genes : polars.DataFrame, str, os.PathLike or None, default None
        The genes table (``gene_idx``, ``gene``, HVG statistics), or its
        Parquet file, for ``var``.
    pca : PcaModel, str, os.PathLike or None, default None
        The PCA model, or its Parquet file, for ``varm["PCs"]`` and
        ``uns["pca"]``.

    Returns
    -------
    anndata.AnnData
        ``n_obs`` = the sampled cells, ``obsm[name]`` a ``(n_obs, d)`` array
        per embedding (float32 from ``Array(Float32, d)``), ``obs`` indexed
        by ``cell_id`` where there is one; with ``genes``, ``var`` of its ``n_genes`` rows and,
        with ``pca``, ``varm["PCs"]`` ``(n_vars, n_comps)``.

    Raises
    ------
    ValueError
        An ``obsm`` column is missing or not an Array, or the genes table and
        the PCA model disagree on the genes.
    ImportError
        anndata or pandas is missing.

    Examples
    --------
    >>> import polars_singlecell as psc
    >>> cells = pl.DataFrame({"batch": ["a", "b", "a"], "X_ot": pl.Series([[0.0, 1.0]] * 3, dtype=pl.Array(pl.Float32, 2))})
    >>> a = psc.io.to_anndata(cells, obsm=("X_ot",))
    >>> a.shape, a.obsm["X_ot"].shape, list(a.obs.columns)
    ((3, 0), (3, 2), ['batch'])
    """
    anndata = _needs("h5ad", "anndata")
    pd = _needs("h5ad", "pandas")

    lf = pl.scan_parquet(parquet_files(cells)) if isinstance(cells, (str, os.PathLike)) else cells.lazy()
    schema = lf.collect_schema()
    for c in obsm:
        if c not in schema:
            raise ValueError(f"the cells have no column '{c}' (columns: {schema.names()})")
        if not isinstance(schema[c], pl.Array):
            raise ValueError(f"column '{c}' is {schema[c]}, expected Array(Float32, d)")
    if obs is None:
        obs = [c for c in schema.names() if c not in obsm and not isinstance(schema[c], (pl.List, pl.Array, pl.Struct))]
    var, varm, uns = _genes_and_pca(genes, pca)
    if max_cells is not None:
        lf = _seeded_sample(lf, max_cells, random_state)
    df = lf.select(*obs, *obsm).collect(engine="streaming")
    frame = pd.DataFrame({c: df[c].to_numpy() for c in obs})
    if "cell_id" in frame:
        frame.index = frame["cell_id"].astype(str).to_numpy()
    else:
        frame.index = np.arange(df.height).astype(str)
    return anndata.AnnData(obs=frame, var=var, obsm={c: df[c].to_numpy() for c in obsm}, varm=varm, uns=uns)


def _genes_and_pca(genes: Any, pca: Any) -> tuple[Any, dict, dict]:
    """``var``, ``varm`` and ``uns`` of :func:`to_anndata` from a genes table
    and a PCA model (either may be None)."""
    import pandas as pd

    from polars_singlecell.preprocessing import PcaModel

    table = None
    if genes is not None:
        table = genes if isinstance(genes, pl.DataFrame) else pl.read_parquet(genes)
        if "gene_idx" not in table.columns:
            raise ValueError(f"the genes table has no 'gene_idx' column (columns: {table.columns}); pass integrate's genes.parquet")
        table = table.sort("gene_idx")
    if pca is None:
        if table is None:
            return None, {}, {}
        return _var_frame(table, pd), {}, {}
    model = pca if isinstance(pca, PcaModel) else PcaModel.load(pca)
    loadings = np.ascontiguousarray(model.components.T)  # (n_genes of the model, n_comps)
    if table is None:
        var = pd.DataFrame(index=np.arange(model.n_genes).astype(str))
        pcs, mask = loadings, None
    elif "highly_variable" in table.columns and int(table["highly_variable"].sum()) == model.n_genes:
        rows = table.with_row_index("row").filter("highly_variable")["row"].to_numpy()
        pcs = np.zeros((table.height, model.n_comps), dtype=loadings.dtype)
        pcs[rows] = loadings
        var, mask = _var_frame(table, pd), "highly_variable"
    elif table.height == model.n_genes:
        var, pcs, mask = _var_frame(table, pd), loadings, None
    else:
        hv = int(table["highly_variable"].sum()) if "highly_variable" in table.columns else None
        raise ValueError(f"the PCA model has {model.n_genes} genes but the genes table has {table.height}"
                         + ("" if hv is None else f" ({hv} highly variable)") + "; pass the genes.parquet of the same run")
    params = {"zero_center": bool(model.zero_center), "use_highly_variable": mask is not None}
    if mask is not None:
        params["mask_var"] = mask
    uns = {"pca": {"params": params, "variance": np.asarray(model.explained_variance),
                   "variance_ratio": np.asarray(model.explained_variance_ratio)}}
    return var, {"PCs": pcs}, uns


def _var_frame(table: pl.DataFrame, pd: Any) -> Any:
    """A genes table as AnnData's ``var``: scalar columns, indexed by gene name."""
    cols = [c for c in table.columns if not isinstance(table.schema[c], (pl.List, pl.Array, pl.Struct))]
    frame = pd.DataFrame({c: table[c].to_numpy() for c in cols})
    frame.index = (table["gene"] if "gene" in table.columns else table["gene_idx"]).cast(pl.String).to_numpy().astype(str)
    return frame


def _obs_series(name: str, col: Any) -> pl.Series:
    """A pandas ``obs`` column as a Polars Series, missing values as nulls:
    categoricals and text as String, pandas' nullable numbers and booleans
    with their dtype, numpy columns as they are (without pyarrow)."""
    import pandas as pd

    if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype.kind in "OSU" or str(col.dtype).startswith("string"):
        missing = np.asarray(col.isna(), dtype=bool)
        text = pl.Series(name, col.astype(str).to_numpy(dtype=object), dtype=pl.String)
        return text.set(pl.Series(missing), None) if missing.any() else text
    if isinstance(col.dtype, pd.api.extensions.ExtensionDtype):
        return _masked_series(name, col.array)
    return pl.Series(name, col.to_numpy())


def from_anndata(
    adata: Any,
    out: str | os.PathLike,
    *,
    obs: Any = None,
    var_names: Any = None,
    layer: str | None = None,
    obs_columns: list[str] | None = None,
    rows_per_file: int = 100_000,
) -> Path:
    """Write an in-memory ``AnnData`` (or a bare matrix) in the project's layout.

    As :func:`h5ad_to_parquet` writes a file: ``out/part-*.parquet`` with ``cell_id`` (obs names), the ``obs`` columns
    (all, or ``obs_columns``), ``gene_idx`` and ``values``, and
    ``out/genes.parquet`` (``gene_idx``, ``gene``). The matrix (``X``, or
    ``layers[layer]``; CSR, CSC, COO or dense) is converted one row group at
    a time, so memory beyond the AnnData stays bounded (a COO matrix is
    first made CSC, a copy). A backed AnnData is an error pointing to
    :func:`h5ad_to_parquet`, which streams the file. Written into a
    temporary folder renamed to ``out`` at the end.

    Parameters
    ----------
    adata : anndata.AnnData, scipy.sparse matrix or numpy.ndarray
        An in-memory AnnData, or a bare ``(n_cells, n_genes)`` matrix (CSR,
        CSC, COO or dense) with ``obs`` and ``var_names``.
    out : str or os.PathLike
        The folder to create; it must not exist.
    obs : pandas.DataFrame or None, default None
        A bare matrix's ``n_cells`` rows of cell annotations (its index the
        ``cell_id``); ``None``: ids ``"0"``, ``"1"``, ... and no columns.
    var_names : sequence of str or None, default None
        A bare matrix's ``n_genes`` gene names; ``None``: ``"0"``, ``"1"``, ...
    layer : str or None, default None
        Read ``adata.layers[layer]`` instead of ``adata.X``.
    obs_columns : list of str or None, default None
        The ``obs`` columns to keep; ``None``: all.
    rows_per_file : int, default 100_000
        Cells per ``part-*.parquet`` file.

    Returns
    -------
    pathlib.Path
        The folder ``out``.

    Raises
    ------
    FileExistsError
        ``out`` exists.
    ValueError
        A backed AnnData, ``obs``/``var_names`` with an AnnData, lengths that
        do not match the matrix, a missing layer or ``obs`` column, or a bad
        entry (the rows named).

    Examples
    --------
    >>> import tempfile, numpy as np, pandas as pd, scipy.sparse as sp, polars_singlecell as psc
    >>> X = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3]], dtype=np.float32))
    >>> out = psc.io.from_anndata(X, tempfile.mkdtemp() + "/cells", obs=pd.DataFrame({"plate": ["p1", "p2"]}))
    >>> pl.read_parquet(out / "part-*.parquet").select("cell_id", "plate", "gene_idx").rows()
    [('0', 'p1', [1]), ('1', 'p2', [0, 2])]
    """
    pd = _needs("h5ad", "pandas")
    sp = _needs("h5ad", "scipy.sparse")
    from polars_singlecell import _internal

    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(f"rows_per_file must be a positive integer, got {rows_per_file!r}")
    if hasattr(adata, "obs") and hasattr(adata, "X"):
        if getattr(adata, "isbacked", False):
            raise ValueError(f"this AnnData is backed by {adata.filename}: read the file with "
                             "psc.io.h5ad_to_parquet(path, out), which streams it")
        if obs is not None or var_names is not None:
            raise ValueError("obs= and var_names= are for a bare matrix; an AnnData carries its own")
        if layer is not None and layer not in adata.layers:
            raise ValueError(f"adata.layers has no {layer!r} (layers: {list(adata.layers.keys())})")
        x = adata.layers[layer] if layer is not None else adata.X
        obs, var_names = adata.obs, adata.var_names
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    else:
        x, where = adata, "the matrix"
    if x is None or len(getattr(x, "shape", ())) != 2:
        raise ValueError(f"{where} is not a cells × genes matrix (got {type(x).__name__})")
    n_cells, n_genes = x.shape
    obs = pd.DataFrame(index=pd.RangeIndex(n_cells).astype(str)) if obs is None else obs
    if len(obs) != n_cells:
        raise ValueError(f"obs has {len(obs)} rows but {where} has {n_cells} cells")
    columns = list(obs.columns) if obs_columns is None else obs_columns
    if missing := [c for c in columns if c not in obs.columns]:
        raise ValueError(f"obs has no column {missing[0]!r} (columns: {list(obs.columns)})")
    names = pd.RangeIndex(n_genes).astype(str) if var_names is None else var_names
    if len(names) != n_genes:
        raise ValueError(f"var_names has {len(names)} names but {where} has {n_genes} genes")
    # CSR rows are sliced where they lie; CSC and COO chunks are converted one at a time.
    x = x.tocsc() if sp.issparse(x) and x.format not in ("csr", "csc") else x
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another folder")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        write_parquet(pl.DataFrame({"gene_idx": np.arange(n_genes, dtype=np.uint32),
                                    "gene": pl.Series([str(g) for g in names], dtype=pl.String)}), tmp / "genes.parquet")
        cell_id = np.asarray(obs.index).astype(str)

        def rows(a: int, b: int) -> pl.DataFrame:
            m = x[a:b].tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x[a:b]))
            try:
                gene_idx, values = _internal.from_csr(pl.Series(m.indptr.astype(np.int64)), pl.Series(m.indices),
                                                      pl.Series(m.data), n_genes)
            except ValueError as e:
                raise ValueError(f"{where}, rows {a}..{b}: {e}") from e
            cols = [pl.Series("cell_id", cell_id[a:b], dtype=pl.String)]
            cols += [_obs_series(c, obs[c].iloc[a:b]) for c in columns]
            return pl.DataFrame(cols).with_columns(gene_idx, values)

        for k, start in enumerate(range(0, n_cells, rows_per_file)):
            stop = min(start + rows_per_file, n_cells)
            if sp.issparse(x) and x.format == "csr":
                nnz = int(x.indptr[stop] - x.indptr[start])
            else:
                nnz = int(x[start:stop].nnz if sp.issparse(x) else np.count_nonzero(x[start:stop]))
            group = _rows_per_group(stop - start, nnz, ROW_GROUP_ENTRIES)
            parts = (rows(a, min(a + group, stop)) for a in range(start, stop, group))
            with _atomic_path(tmp / f"part-{k:05d}.parquet") as part:
                _write_groups(parts, part, group)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _write_groups(frames: Any, path: Path, group: int) -> None:
    """Frames of ``group`` rows (the last may be shorter) streamed into one
    file as its row groups, one frame in memory at a time."""
    from polars.io.plugins import register_io_source

    first = next(frames)

    def source(with_columns, predicate, n_rows, batch_size):
        yield first
        yield from frames

    register_io_source(source, schema=first.schema).sink_parquet(path, row_group_size=group)


def write_obsm(
    h5ad_paths: str | os.PathLike | list,
    cells: pl.DataFrame | pl.LazyFrame | str | os.PathLike,
    *,
    key: str = "X_pca_ot",
    column: str = "X_ot",
    rows_per_chunk: int = 262_144,
) -> list[Path]:
    """Put an embedding of ``cells`` into each plate's ``.h5ad`` as ``obsm[key]``, ``X`` untouched.

    The files in order (a list, a folder, a glob: as
    :func:`polars_singlecell.integrate` read them), each taking the next
    ``n_obs`` rows of ``cells``.

    Every file's cell count is checked against ``cells`` first, and where
    ``cells`` has ``cell_id`` (integrate keeps the obs names) each file's obs
    names are compared with it; on a mismatch nothing is written. Each array
    is written ``rows_per_chunk`` rows at a time under a temporary name and
    renamed over ``obsm[key]`` once complete, so a file never holds a partial
    embedding under ``key``; files are updated one after another, so an
    error in a later file leaves the earlier ones updated (each whole). An
    interrupted HDF5 write can damage the file it was writing: keep a copy
    of plates you cannot regenerate. HDF5 does not give back the space of a
    replaced array: ``h5repack`` a file after many rewrites.

    Parameters
    ----------
    h5ad_paths : str, os.PathLike or list
        The ``.h5ad`` files: a list in order, a folder or a glob.
    cells : polars.DataFrame, polars.LazyFrame, str or os.PathLike
        The cells in the files' order (e.g. integrate's ``cells.parquet``),
        as many as the files hold together.
    key : str, default "X_pca_ot"
        The ``obsm`` key to write (replaced if present).
    column : str, default "X_ot"
        The ``Array(Float32, d)`` column of ``cells`` to write, as a float32
        ``(n_obs, d)`` array per file; no nulls.
    rows_per_chunk : int, default 262_144
        Rows read and written at a time.

    Returns
    -------
    list of pathlib.Path
        The files written, in order.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        ``column`` is missing, not an Array or has nulls; the cell counts or
        (with ``cell_id``) the obs names do not match the files.
    """
    h5py = _needs("h5ad", "h5py")
    files = [Path(f) for f in h5ad_paths] if isinstance(h5ad_paths, (list, tuple)) else _expand(h5ad_paths, ".h5ad")
    if not files or any(not f.is_file() for f in files):
        raise FileNotFoundError(f"no .h5ad file at {[str(f) for f in files if not f.is_file()] or h5ad_paths}")
    lf = pl.scan_parquet(parquet_files(cells)) if isinstance(cells, (str, os.PathLike)) else cells.lazy()
    schema = lf.collect_schema()
    if not isinstance(schema.get(column), pl.Array):
        raise ValueError(f"the cells have no embedding column {column!r} (columns: {schema.names()})")
    d = schema[column].size
    rows_per_chunk = positive_int("rows_per_chunk", rows_per_chunk)
    has_id = "cell_id" in schema
    total, nulls = lf.select(pl.len(), pl.col(column).null_count()).collect().row(0)
    if nulls:
        raise ValueError(f"column {column!r} has {nulls} null rows; an embedding in obsm needs every cell's vector")

    def obs_names(f) -> Any:
        obs = f["obs"]
        return obs[obs.attrs.get("_index", "_index")]

    sizes = []
    for path in files:
        with h5py.File(path, "r") as f:
            sizes.append(len(obs_names(f)))
    if sum(sizes) != total:
        raise ValueError(f"the files hold {sum(sizes)} cells ({dict(zip([f.name for f in files], sizes))}) "
                         f"but the cells have {total} rows; pass the same files, in the order integrate read them")

    def chunks(offset: int, n: int):
        for a in range(0, n, rows_per_chunk):
            b = min(a + rows_per_chunk, n)
            yield a, b, lf.slice(offset + a, b - a).select(column, *(["cell_id"] if has_id else [])).collect()

    if has_id:  # every file's names before any file is touched
        offset = 0
        for path, n in zip(files, sizes):
            with h5py.File(path, "r") as f:
                names = obs_names(f)
                for a, b, part in chunks(offset, n):
                    theirs, ours = names.asstr()[a:b], part["cell_id"].cast(pl.String).to_numpy()
                    if (bad := np.flatnonzero(theirs != ours)).size:
                        i = int(bad[0])
                        raise ValueError(f"{path.name} row {a + i} is cell {theirs[i]!r} but the cells have {ours[i]!r} there; "
                                         "pass the same files, in the order integrate read them")
            offset += n
    offset = 0
    for path, n in zip(files, sizes):
        with h5py.File(path, "r+") as f:
            obsm = f.require_group("obsm")
            obsm.attrs.setdefault("encoding-type", "dict")
            obsm.attrs.setdefault("encoding-version", "0.1.0")
            tmp = f".{key}.tmp"
            if tmp in obsm:
                del obsm[tmp]
            ds = obsm.create_dataset(tmp, shape=(n, d), dtype=np.float32)
            for a, b, part in chunks(offset, n):
                ds[a:b] = part[column].to_numpy()
            ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
            if key in obsm:
                del obsm[key]
            obsm.move(tmp, key)
        offset += n
    return files
