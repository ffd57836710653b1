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

from polars_singlecell._files import OS_ERROR as _OS_ERROR
from polars_singlecell._files import ROW_GROUP_ENTRIES, sink_parquet
from polars_singlecell._files import atomic_path as _atomic_path
from polars_singlecell._files import expand as _expand
from polars_singlecell._files import rows_per_group as _rows_per_group
from polars_singlecell._files import seeded_sample as _seeded_sample
from polars_singlecell._files import write_failed as _write_failed

__all__ = ["h5ad_to_parquet", "parquet_files", "sink_parquet", "to_anndata", "write_parquet"]


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
    """The Parquet files at ``source`` (a file, a folder of ``*.parquet`` or a
    glob), each checked to be readable Parquet by its footer.

    A missing path is a ``FileNotFoundError``; a file that is not Parquet, or
    was cut short (an interrupted copy), a ``ValueError`` naming that file.
    Polars' own error for a bad footer names no file, which in a folder of
    hundreds of plates leaves the user guessing. (Only the footer is read: a
    damaged page inside a file fails later, as Polars reports it.)
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
    """``df.write_parquet(path)``, atomic like :func:`sink_parquet`."""
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
        raise ImportError(f"reading .h5ad files needs {module}{found}: pip install 'polars-singlecell[{extra}]'") from e


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


def h5ad_to_parquet(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    obs_columns: list[str] | None = None,
    rows_per_file: int = 100_000,
) -> Path:
    """Stream an AnnData ``.h5ad`` (CSR counts in ``X`` or ``layers[layer]``)
    into the project's layout: ``out/part-*.parquet`` with ``cell_id`` (the
    obs index), the ``obs`` columns (all, or ``obs_columns``), ``gene_idx``
    (sorted, ``List(UInt32)``) and ``values`` (``List(Float32)``), plus
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
    that looks complete. Returns ``out``.

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


def to_anndata(
    cells: pl.DataFrame | pl.LazyFrame | str | os.PathLike,
    *,
    obsm: tuple[str, ...] = ("X_pca", "X_ot"),
    obs: list[str] | None = None,
    max_cells: int | None = 100_000,
    seed: int = 0,
):
    """An ``anndata.AnnData`` of (a seeded sample of) integrated cells, for
    scanpy's neighbours/UMAP/leiden: ``obsm[name]`` for each embedding column
    in ``obsm``, ``obs`` from the other non-list columns (or ``obs``), no ``X``
    (an empty n × 0 matrix). ``max_cells`` draws the same seeded sample as
    :func:`metrics.evaluate`, in the streaming engine; ``None`` keeps all.

    >>> import polars_singlecell as psc
    >>> cells = pl.DataFrame({"batch": ["a", "b", "a"], "X_ot": pl.Series([[0.0, 1.0]] * 3, dtype=pl.Array(pl.Float32, 2))})
    >>> a = psc.io.to_anndata(cells, obsm=("X_ot",))
    >>> a.shape, a.obsm["X_ot"].shape, list(a.obs.columns)
    ((3, 0), (3, 2), ['batch'])
    """
    import anndata
    import numpy as np
    import pandas as pd

    lf = pl.scan_parquet(parquet_files(cells)) if isinstance(cells, (str, os.PathLike)) else cells.lazy()
    schema = lf.collect_schema()
    for c in obsm:
        if c not in schema:
            raise ValueError(f"the cells have no column '{c}' (columns: {schema.names()})")
        if not isinstance(schema[c], pl.Array):
            raise ValueError(f"column '{c}' is {schema[c]}, expected Array(Float32, d)")
    if obs is None:
        obs = [c for c in schema.names() if c not in obsm and not isinstance(schema[c], (pl.List, pl.Array, pl.Struct))]
    if max_cells is not None:
        lf = _seeded_sample(lf, max_cells, seed)
    df = lf.select(*obs, *obsm).collect(engine="streaming")
    frame = pd.DataFrame({c: df[c].to_numpy() for c in obs})
    if "cell_id" in frame:
        frame.index = frame["cell_id"].astype(str).to_numpy()
    else:
        frame.index = np.arange(df.height).astype(str)
    return anndata.AnnData(obs=frame, obsm={c: df[c].to_numpy() for c in obsm})
