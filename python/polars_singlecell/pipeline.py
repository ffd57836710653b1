"""The whole integration in one call: raw counts in Parquet → normalize →
highly variable genes per batch → PCA → per-batch centroids → OT
integration → every cell moved, streaming, with a JSON report.

Each stage writes its outputs atomically and then records itself in
``report.json`` with a fingerprint of the source files and of every parameter
it depends on. Running again with the same ``out`` skips the leading stages whose
fingerprint and outputs are still there and redoes the rest, so an
interrupted run resumes, and a changed parameter recomputes its stage and
those after it. A file is never half-written (temporary name, then rename), and a
stage counts as done only once all its files are in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from polars_singlecell import _internal, _progress, metrics
from polars_singlecell._checks import check_scale
from polars_singlecell._device import check_device
from polars_singlecell._files import (
    atomic_path,
    expand,
    remove,
    sink_bounded,
    write_replacing,
)
from polars_singlecell.centroids import fit_centroids
from polars_singlecell.integration import IntegrationModel, knn_interpolate
from polars_singlecell.io import (
    check_writable,
    h5ad_obs_columns,
    parquet_files,
    write_parquet,
)
from polars_singlecell.layout import (
    COUNTS,
    cell_files,
    is_remote,
    read_vocabulary,
    scan_cells,
    vocabulary_digest,
    vocabulary_genes,
)
from polars_singlecell.ot import fit_integration
from polars_singlecell.preprocessing import (
    PcaModel,
    fit_pca,
    highly_variable_genes,
    normalize,
    pca_project,
    select_genes,
)

__all__ = ["integrate"]

STAGES = ("genes", "pca", "project", "centroids", "integration", "interpolate")


def _h5ad_sources(source: str | os.PathLike) -> list[Path]:
    """The ``.h5ad`` files ``source`` names (a file, a folder of them, a glob); [] if none."""
    return [f for f in expand(source, ".h5ad") if f.suffix == ".h5ad"]


def _import_h5ad(files: list[Path], dest: Path, say: Callable[[str], None]) -> list[Path]:
    """Each AnnData file → ``dest/<stem>/`` in the project's layout, once: a
    folder is kept while its ``source.json`` matches the file's size and
    modification time (written last, so a killed import is redone). Returns
    the cells' Parquet files in source order."""
    from polars_singlecell.io import h5ad_to_parquet

    if len({f.stem for f in files}) < len(files):
        raise ValueError(f"the .h5ad files need distinct names: {[str(f) for f in files]}")
    for stale in dest.glob(".*.tmp"):  # a killed import's temporary folder
        shutil.rmtree(stale, ignore_errors=True)
    parts, genes = [], None
    for f in files:
        target = dest / f.stem
        stamp = {"source": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
        done = target / "source.json"
        if not (done.is_file() and json.loads(done.read_text()) == stamp):
            shutil.rmtree(target, ignore_errors=True)
            t = time.perf_counter()
            h5ad_to_parquet(f, target, rows_per_file=50_000)
            _write_json(done, stamp)
            say(f"import: {f.name} -> {target} in {time.perf_counter() - t:.1f}s")
        these = pl.read_parquet(target / "genes.parquet")
        if genes is not None and not these.equals(genes):
            raise ValueError(f"{f} has other genes than {files[0]} (var index): integrate needs one gene space; "
                             "subset the AnnData objects to shared genes (adata[:, genes]) and write them again")
        genes = these
        parts += sorted(target.glob("part-*.parquet"))
    return parts


def _peak_rss_gb() -> float | None:
    """This process's peak resident memory so far, in GB (None where the OS
    does not say): once a stage ends, the peak up to and including it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024**3 if sys.platform == "darwin" else 1024**2), 3)  # bytes on macOS, KiB on Linux


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


logger = logging.getLogger("polars_singlecell")


def log_stage(message: str) -> None:
    """``integrate``'s default ``log``: each stage's line to the package's
    logger (``logging.getLogger("polars_singlecell")``, level INFO) where
    logging is set up (a handler on it or above), else printed, as before
    there was a logger: a script or notebook with no logging set up still
    sees its stages."""
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def integrate(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_key: str = "batch",
    label_key: str | None = None,
    n_genes: int | None = None,
    target_sum: float = 1e4,
    n_top_genes: int = 2000,
    hvg_flavor: str = "seurat",
    scale: bool = False,
    max_value: float | None = None,
    n_comps: int = 50,
    n_centroids: int = 2048,
    min_cells_per_centroid: int = 16,
    max_samples_per_batch: int = 500_000,
    k: int = 8,
    mode: str = "own_batch",
    device: str = "cpu",
    random_state: int = 0,
    integration: dict[str, Any] | None = None,
    evaluate_cells: int = 100_000,
    log: Callable[[str], None] | None = log_stage,
    progress: bool | None = None,
    counts: tuple[str, str] = COUNTS,
    vocabulary: pl.DataFrame | str | os.PathLike | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Integrate raw counts into ``out``, stage by stage, resumably.

    The counts: one row per cell, ``gene_idx``/``values`` (or any sparse
    list layout, see ``counts``), a ``batch_key`` column. Written into ``out``:

    - ``genes.parquet``: per-gene HVG statistics, ``highly_variable`` (scanpy's
      ``batch_key`` ranking: genes variable in the most batches first), of
      :func:`highly_variable_genes` with ``flavor=hvg_flavor``: "seurat" on
      the normalised values, or "seurat_v3" on the raw counts;
    - ``pca.parquet``: the PCA model (:class:`PcaModel`; ``scale=True``:
      of the genes scaled to unit variance and, with ``max_value``, clipped:
      ``sc.pp.scale`` folded in, see :func:`fit_pca`);
    - ``cells_pca.parquet``: every cell's columns except the counts, plus ``X_pca``;
    - ``centroids.parquet``: per-batch k-means centroids with their mass
      (``fit_centroids(low_memory=True)``, ``n_centroids`` per batch but at
      most one per ``min_cells_per_centroid`` cells and at least 64, so a
      batch of a small study is summarised, not copied cell by cell: one
      batch's sample in memory at a
      time, the others in a hidden ``.centroid-sample.*.tmp`` folder in ``out``);
    - ``integration.parquet``: the :class:`IntegrationModel` (displacements, metrics);
    - ``cells.parquet``: every cell with ``X_pca`` and ``X_ot`` (this file and
      ``cells_pca.parquet`` stream through a sink that reads one row group
      ahead, so peak memory does not grow with cells; with an ``engine`` each
      is a dataset folder of ``part-*.parquet`` files in row order);
    - ``report.json``: parameters, versions, seconds and peak RSS so far
      (``peak_rss_gb``) per stage, the
      integration's metrics and, with ``label_key``, :func:`metrics.evaluate`
      of ``X_pca`` and ``X_ot`` on ``evaluate_cells`` sampled cells.

    ``engine``: a :class:`polars_singlecell.distributed.DaskEngine` runs the
    fits that read every cell (HVG statistics, the PCA covariance, the
    centroid samples) on its cluster, one task per partition of the Parquet
    files, with the same outputs bit for bit as without it; the workers
    must read ``source`` and ``out`` at the same paths (a shared file
    system). The projection and the interpolation run there too, one task
    per partition writing its part of a dataset folder
    (``cells_pca.parquet/part-00000.parquet``, ..., in row order; every
    reader of the package takes a file or such a folder), so no cell passes
    through this process; the integration (on the centroids) runs here.

    Parameters
    ----------
    source : str or os.PathLike
        A Parquet file, a folder of them, a glob, or a URL Polars reads
        (``hf://datasets/...``, ``s3://...``). Or AnnData ``.h5ad`` files
        (one, a folder of them, a glob: e.g. one per plate, with CSR counts
        in ``X`` and the batch as an ``obs`` column), streamed once into
        ``out/source/<name>/`` by :func:`polars_singlecell.io.h5ad_to_parquet`
        (kept on re-runs while the file is unchanged).
    out : str or os.PathLike
        The output folder (created if missing); a re-run with the same
        ``out`` resumes.
    batch_key : str, default "batch"
        The cells' batch column.
    label_key : str or None, default None
        The cells' label (cell type) column: with it, ``report.json`` holds
        :func:`polars_singlecell.metrics.evaluate` of ``X_pca`` and ``X_ot``.
    n_genes : int or None, default None
        Genes in the data. ``None``: the row count of a ``genes.parquet``
        beside the cells (in the folder, or next to the file), else the
        largest gene index + 1 (with a ``vocabulary``: its rows).
    target_sum : float, default 1e4
        :func:`normalize`'s total counts per cell.
    n_top_genes : int, default 2000
        Highly variable genes kept.
    hvg_flavor : {"seurat", "seurat_v3"}, default "seurat"
        :func:`highly_variable_genes`' flavour: "seurat" on the normalised
        values, "seurat_v3" on the raw counts.
    scale : bool, default False
        Scale the genes to unit variance before the PCA (``sc.pp.scale``
        folded into :func:`fit_pca`).
    max_value : float or None, default None
        Clip the scaled values at ``±max_value`` (needs ``scale=True``).
    n_comps : int, default 50
        Principal components: ``X_pca`` and ``X_ot`` are
        ``Array(Float32, n_comps)``.
    n_centroids : int, default 2048
        Centroids per batch at most (:func:`fit_centroids`).
    min_cells_per_centroid : int, default 16
        At most one centroid per this many sampled cells of a batch (at least 64).
    max_samples_per_batch : int, default 500_000
        Cells sampled per batch for its k-means.
    k : int, default 8
        Centroids each cell's displacement is interpolated from
        (:func:`knn_interpolate`).
    mode : {"own_batch", "pooled"}, default "own_batch"
        :func:`knn_interpolate`'s search: the cell's own batch's centroids,
        or all of them.
    device : {"cpu", "cuda"}, default "cpu"
        Where the PCA, k-means, projection and interpolation kernels run.
    random_state : int, default 0
        Seed of the centroid samples, the k-means and the evaluation sample.
    integration : dict or None, default None
        Options passed to :func:`fit_integration` (``epsilon``, ``reg_m``, ...).
    evaluate_cells : int, default 100_000
        Cells sampled for the evaluation (with ``label_key``).
    log : callable or None, default log_stage
        Gets one line per stage: by default the package's logger
        (``logging.getLogger("polars_singlecell")``, INFO) where logging is
        set up, else printed; or any callable; ``None``: silent.
    progress : bool or None, default None
        A bar per stage that reads the cells, on stderr (cells processed /
        total, rate): ``None`` when someone watches (a terminal or a Jupyter
        notebook, where it is ``tqdm.auto``'s), ``True`` always (in a log: its
        final line only), ``False`` never.
    counts : tuple of (str, str), default ("gene_idx", "values")
        The source's gene and value list columns, in the project's layout or
        any other sparse list layout: e.g. Tahoe-100M's Parquet release with
        ``counts=("genes", "expressions"), vocabulary=".../gene_metadata.parquet"``,
        read through :func:`to_cells` (the marker token dropped, each cell
        sorted) without a copy of the source.
    vocabulary : polars.DataFrame, str, os.PathLike or None, default None
        The token table for :func:`to_cells`; ``genes.parquet`` then names
        the vocabulary's genes.
    engine : polars_singlecell.distributed.DaskEngine or None, default None
        Runs the stages that read every cell on its cluster (above);
        ``None``: in this process.

    Returns
    -------
    dict
        The report, as written to ``out/report.json``: ``source``, ``out``,
        ``parameters``, ``versions`` and ``stages`` (per stage its
        fingerprint, outputs, seconds and ``peak_rss_gb``, or
        ``resumed: True`` where it was kept, and what the stage adds).

    Raises
    ------
    ValueError
        An unknown ``hvg_flavor``, inconsistent scaling options, a missing
        column, or no counts at all.

    Examples
    --------
    >>> import tempfile, polars_singlecell as psc
    >>> d = tempfile.mkdtemp()
    >>> raw = psc.datasets.write_synthetic_counts(d + "/raw", 3000, n_genes=300, umis_per_cell=60)
    >>> report = psc.integrate(raw, d + "/out", n_top_genes=100, n_comps=10, n_centroids=16, log=None)
    >>> sorted(report["stages"]) == sorted(psc.pipeline.STAGES)
    True
    >>> pl.read_parquet(d + "/out/cells.parquet").columns
    ['cell_id', 'batch', 'label', 'X_pca', 'X_ot']
    """
    device = check_device(device)
    if hvg_flavor not in ("seurat", "seurat_v3"):
        raise ValueError(f"hvg_flavor={hvg_flavor!r} is not supported; use 'seurat' or 'seurat_v3'")
    check_scale(scale, max_value, True)
    out = Path(out)
    remote = is_remote(source)
    h5ads = [] if remote else _h5ad_sources(source)
    files: list[Any] | None = [source] if remote else None if h5ads else cell_files(source, counts[0])
    # Read once (a remote table too): genes.parquet, the fingerprint and to_cells all use it.
    vocabulary = None if vocabulary is None else read_vocabulary(vocabulary)
    genes_of_vocabulary = None if vocabulary is None else vocabulary_genes(vocabulary)
    check_writable(out)
    # Temporary files a killed run left behind (hidden, never under a final
    # name); ours are ".<name>.<hex>.tmp".
    for stale in out.glob(".*.tmp"):  # files, and folders (fit_centroids' samples, an engine's parts)
        remove(stale)
    say = log or (lambda _msg: None)
    if h5ads:
        # The keys before any import: a wrong --batch-key costs nothing.
        for f in h5ads:
            cols = h5ad_obs_columns(f)
            for key in (batch_key, label_key):
                if key and key not in cols:
                    raise ValueError(f"{f.name} has no obs column '{key}' (columns: {cols})")
        files = _import_h5ad(h5ads, out / "source", say)
    schema = pl.scan_parquet(files).collect_schema()
    for c in (batch_key, *counts) + ((label_key,) if label_key else ()):
        if c not in schema:
            raise ValueError(f"the cells have no column '{c}' (columns: {schema.names()})")
    if genes_of_vocabulary is not None:
        if n_genes is not None and n_genes != genes_of_vocabulary.height:
            raise ValueError(f"n_genes={n_genes} but the vocabulary has {genes_of_vocabulary.height} genes; leave n_genes out")
        n_genes = genes_of_vocabulary.height
    # Absolute paths: an engine's workers read the files from their own folder.
    scan = scan_cells(files if remote else [Path(f).absolute() for f in files], counts=counts, vocabulary=vocabulary,
                      n_genes=n_genes)
    # The genes table beside the cells (an h5ad import's var names, the
    # generators'): it sets n_genes where not given and names genes.parquet's genes.
    genes_file = None if remote or vocabulary is not None else next(
        (g for g in (Path(source) / "genes.parquet", files[0].parent / "genes.parquet",
                     files[0].parent.parent / f"{files[0].parent.name}_genes.parquet") if g.is_file()), None)
    if n_genes is None:
        if genes_file is not None:
            n_genes = pl.scan_parquet(genes_file).select(pl.len()).collect().item()
        else:
            top = scan.select(pl.col("gene_idx").list.max().max()).collect(engine="streaming").item()
            if top is None:
                raise ValueError(f"the cells at {source} hold no counts at all (no cells, or only empty ones), so the "
                                 "number of genes is unknown: pass n_genes=, or check the source")
            n_genes = int(top) + 1

    report_path = out / "report.json"
    old = json.loads(report_path.read_text()) if report_path.is_file() else {}
    # A remote source is named, not stat'ed: pass a new out for new data there.
    source_fp = [str(f) if remote else (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    params = {
        "genes": dict(batch_key=batch_key, n_genes=n_genes, target_sum=target_sum, n_top_genes=n_top_genes,
                      hvg_flavor=hvg_flavor, counts=list(counts), vocabulary=None if vocabulary is None else vocabulary_digest(vocabulary)),
        # The GPU sums the covariance and k-means distances in another order
        # (results equal to rounding, not bit for bit): part of the fingerprint.
        "pca": dict(n_comps=n_comps, device=device, **({"scale": True, "max_value": max_value} if scale else {})),
        "project": {},
        "centroids": dict(n_centroids=n_centroids, min_cells_per_centroid=min_cells_per_centroid, max_samples_per_batch=max_samples_per_batch, random_state=random_state,
                          device=device),
        "integration": dict(integration or {}),
        "interpolate": dict(k=k, mode=mode, device=device),
    }
    report: dict[str, Any] = {
        "source": [str(f) for f in files],
        "out": str(out),
        "parameters": params,
        "versions": {"polars_singlecell": _internal.__version__, "polars": pl.__version__, "python": platform.python_version()},
        "stages": {},
    }
    if progress is None:
        progress = _progress.interactive()
    n_cells = scan.select(pl.len()).collect().item() if progress else None  # from the Parquet footers
    keep = [c for c in scan.collect_schema().names() if c not in COUNTS]
    norm = scan.with_columns(normalize(*COUNTS, target_sum=target_sum))
    fp = _fingerprint(source_fp)

    redo = False  # once a stage runs, every later one runs too: its inputs are new

    def stage(name: str, outputs: list[str], run: Callable[[], dict[str, Any] | None]) -> None:
        nonlocal fp, redo
        fp = _fingerprint(fp, params[name])
        done = old.get("stages", {}).get(name)
        if not redo and done and done.get("fingerprint") == fp and all((out / f).exists() for f in outputs):
            report["stages"][name] = done | {"resumed": True}
            say(f"{name}: done before, kept ({', '.join(outputs)})")
            return
        redo = True
        t = time.perf_counter()
        with _progress.track(name, None if name == "integration" else n_cells):  # integration reads no cells
            extra = run() or {}
        secs = time.perf_counter() - t
        report["stages"][name] = {"fingerprint": fp, "seconds": round(secs, 3), "outputs": outputs,
                                  "peak_rss_gb": _peak_rss_gb(), **extra}
        _write_json(report_path, report)  # the stage counts as done only now
        say(f"{name}: {secs:.1f}s ({', '.join(outputs)})")

    def genes() -> dict:
        var = highly_variable_genes(scan if hvg_flavor == "seurat_v3" else norm, n_genes=n_genes,
                                    n_top_genes=n_top_genes, batch_key=batch_key, flavor=hvg_flavor, engine=engine)
        names = genes_of_vocabulary
        if names is None and genes_file is not None:
            names = pl.read_parquet(genes_file)
            # Only a table of these very genes names them (not one of another gene space).
            if "gene_idx" not in names.columns or names.height != n_genes or not names["gene_idx"].equals(
                    pl.Series("gene_idx", range(n_genes)), check_dtypes=False):
                names = None
        if names is not None:
            names = names.select("gene_idx", *[c for c in names.columns if c not in var.columns])
            var = names.join(var, on="gene_idx", how="left", maintain_order="left")
        write_parquet(var, out / "genes.parquet")
        return {"n_genes": n_genes, "highly_variable": int(var["highly_variable"].sum())}

    def selected() -> tuple[pl.LazyFrame, int]:
        hv = pl.read_parquet(out / "genes.parquet").filter("highly_variable")["gene_idx"]
        return norm.with_columns(select_genes(*COUNTS, genes=hv).struct.unnest()), hv.len()

    def pca() -> dict:
        lf, n_hv = selected()
        model = fit_pca(lf, n_genes=n_hv, n_comps=n_comps, device=device, scale=scale, max_value=max_value,
                        engine=engine)
        model.save(out / "pca.parquet")
        return {"explained_variance_ratio": [round(float(v), 5) for v in model.explained_variance_ratio]}

    def write(lf: pl.LazyFrame, name: str, models: list[tuple[Any, Path]]) -> None:
        # With an engine, every partition is a task writing its part of a
        # dataset folder; here, one file. Either replaces the other's output.
        if engine is not None:
            engine.sink(lf, out / name, models)
            return
        write_replacing(out / name, lambda tmp: sink_bounded(lf, tmp))

    def project() -> dict:
        lf, _ = selected()
        model = PcaModel.load(out / "pca.parquet")
        write(lf.select(*keep, pca_project(*COUNTS, model=model, device=device)), "cells_pca.parquet",
              [(model, out / "pca.parquet")])
        return {"n_cells": pl.scan_parquet(parquet_files(out / "cells_pca.parquet")).select(pl.len()).collect().item()}

    def centroids() -> dict:
        cents, summary = fit_centroids(out / "cells_pca.parquet", batch_key=batch_key, n_centroids=n_centroids,
                                           min_cells_per_centroid=min_cells_per_centroid,
                                           max_samples_per_batch=max_samples_per_batch, random_state=random_state, summary=True,
                                           device=device, low_memory=engine is None, temp_dir=out, engine=engine)
        write_parquet(cents, out / "centroids.parquet")
        return {"n_batches": summary.height, "n_centroids": cents.height}

    def fit() -> dict:
        model = fit_integration(pl.read_parquet(out / "centroids.parquet"), batch_key=batch_key,
                                    random_state=random_state, **(integration or {}))
        model.write_parquet(out / "integration.parquet")
        return {"metrics": {k: v for k, v in model.metrics.items() if k != "convergence"}}

    def interpolate() -> dict:
        model = IntegrationModel.read_parquet(out / "integration.parquet")
        cells = pl.scan_parquet([f.absolute() for f in parquet_files(out / "cells_pca.parquet")]).with_columns(
            knn_interpolate("X_pca", batch_key, model=model, k=k, mode=mode, device=device)
        )
        write(cells, "cells.parquet", [(model, out / "integration.parquet")])
        if not label_key:
            return {}
        t = time.perf_counter()
        table = metrics.evaluate(pl.scan_parquet(parquet_files(out / "cells.parquet")), ["X_pca", "X_ot"], batch_key=batch_key,
                                     label_key=label_key, max_cells=evaluate_cells, random_state=random_state)
        # Its own time: judging the result is not integrating (a benchmark
        # compares the integration alone against another method's call).
        return {"evaluate": [dict(zip(table.columns, row)) for row in table.iter_rows()],
                "evaluate_seconds": round(time.perf_counter() - t, 3)}

    stage("genes", ["genes.parquet"], genes)
    stage("pca", ["pca.parquet"], pca)
    stage("project", ["cells_pca.parquet"], project)
    stage("centroids", ["centroids.parquet"], centroids)
    stage("integration", ["integration.parquet"], fit)
    stage("interpolate", ["cells.parquet"], interpolate)
    _write_json(report_path, report)
    return report
