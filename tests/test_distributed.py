"""DaskEngine on a 2-process LocalCluster: partitions fixed by the data; the
HVG, PCA and centroid fits identical to the local ones, bit for bit; workers
checked at start."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc
from polars_singlecell import _frames
from polars_singlecell import distributed as D

dask_distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cells(tmp_path_factory, harmony):
    """Harmony's cell lines in two Parquet files of 700-row row groups."""
    folder = tmp_path_factory.mktemp("cells")
    emb = harmony.select(pl.col("embedding").alias("X_pca"), "batch")
    emb.head(1500).write_parquet(folder / "a.parquet", row_group_size=700)
    emb.slice(1500).write_parquet(folder / "b.parquet", row_group_size=700)
    return folder


@pytest.fixture(scope="module")
def client():
    cluster = dask_distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    c = dask_distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def counts(tmp_path_factory, cellbench):
    """CellBench's raw counts (1,408 cells, 5 batches) in two Parquet files of 300-row row groups."""
    df, n_genes = cellbench
    folder = tmp_path_factory.mktemp("counts")
    df = df.select("gene_idx", "values", "batch")
    df.head(800).write_parquet(folder / "a.parquet", row_group_size=300)
    df.slice(800).write_parquet(folder / "b.parquet", row_group_size=300)
    return folder, n_genes


def test_partitions_are_whole_row_groups_with_global_rows(cells):
    scan = pl.scan_parquet(cells / "*.parquet").select("X_pca", "batch")
    parts = _frames.scan_partitions(scan, [], 1000)
    # Row groups 700, 700, 100 (a.parquet), 700, 170 (b.parquet); a partition may span files.
    assert [(p.first_row, p.n_rows, [n for n, _ in p.groups]) for p in parts] == [
        (0, 700, [700]),
        (700, 800, [700, 100]),
        (1500, 870, [700, 170]),
    ]
    assert [p.n_rows for p in _frames.scan_partitions(scan, [], 10)] == [700, 700, 100, 700, 170]  # a group is never split
    assert [p.n_rows for p in _frames.scan_partitions(scan, [], 10**9)] == [2370]
    # No partitions where a row slice does not reach the scan: one stream.
    assert _frames.scan_partitions(scan.filter(pl.col("batch") != ""), [], 1000) is None
    assert _frames.scan_partitions(pl.read_parquet(cells / "a.parquet").lazy(), [], 1000) is None


@pytest.fixture(params=[300, None], ids=["partitions-of-300", "default-partitions"])
def partition_rows(request, monkeypatch):
    """The local path's partition size and the engine's, the same."""
    if request.param is not None:
        monkeypatch.setattr(_frames, "PARTITION_ROWS", request.param)
    return _frames.PARTITION_ROWS


@pytest.mark.parametrize("flavor", ["seurat", "seurat_v3"])
def test_hvg_on_the_cluster_is_the_local_one(counts, client, partition_rows, flavor):
    folder, n_genes = counts
    scan = pl.scan_parquet(folder / "*.parquet")
    # seurat ranks log-normalised values: the workers rebuild normalize from the plan.
    data = scan.with_columns(psc.normalize("gene_idx", "values")) if flavor == "seurat" else scan
    opts = dict(n_genes=n_genes, n_top_genes=500, batch_key="batch", flavor=flavor)
    local = psc.highly_variable_genes(data, **opts)
    remote = psc.highly_variable_genes(data, engine=D.DaskEngine(client, partition_rows=partition_rows), **opts)
    assert local.equals(remote)
    assert local["highly_variable"].sum() == 500


@pytest.mark.parametrize("clipped", [False, True], ids=["plain", "scaled-clipped"])
def test_pca_on_the_cluster_is_the_local_one(counts, client, partition_rows, clipped):
    folder, n_genes = counts
    norm = pl.scan_parquet(folder / "*.parquet").with_columns(psc.normalize("gene_idx", "values"))
    var = psc.highly_variable_genes(norm, n_genes=n_genes, n_top_genes=300)
    hv = var.filter("highly_variable")["gene_idx"].to_list()
    lf = norm.with_columns(psc.select_genes("gene_idx", "values", genes=hv).struct.unnest())
    opts = dict(n_genes=len(hv), n_comps=10, scale=clipped, max_value=10.0 if clipped else None)
    local = psc.fit_pca(lf, **opts)
    remote = psc.fit_pca(lf, engine=D.DaskEngine(client, partition_rows=partition_rows), **opts)
    for name in ("mean", "components", "explained_variance", "explained_variance_ratio", "std", "scaled_mean"):
        a, b = getattr(local, name), getattr(remote, name)
        assert (a is None and b is None) or np.array_equal(a, b), name
    assert local.n_cells == remote.n_cells == 1408


def test_partitions_change_the_sums_by_rounding_only(counts, monkeypatch):
    """The local fold of many partitions against one stream: the float64
    sums are grouped differently, so they agree to rounding, not in bits."""
    folder, n_genes = counts
    lf = pl.scan_parquet(folder / "*.parquet").with_columns(psc.normalize("gene_idx", "values"))
    opts = dict(n_genes=n_genes, n_top_genes=500, batch_key="batch")
    one = psc.highly_variable_genes(lf, **opts)
    monkeypatch.setattr(_frames, "PARTITION_ROWS", 300)
    many = psc.highly_variable_genes(lf, **opts)
    np.testing.assert_allclose(many["means"].to_numpy(), one["means"].to_numpy(), rtol=1e-12)
    assert many["highly_variable"].equals(one["highly_variable"])


@pytest.mark.parametrize("partition_rows", [700, 1_000_000])
def test_centroids_on_the_cluster_are_the_local_ones(cells, client, partition_rows):
    engine = D.DaskEngine(client, partition_rows=partition_rows)
    opts = dict(batch_key="batch", n_centroids=64, max_samples_per_batch=500, random_state=3, summary=True)
    local = psc.fit_centroids(cells, **opts)
    remote = psc.fit_centroids(cells, engine=engine, **opts)
    for a, b in zip(local, remote):
        assert a.equals(b)
    assert remote[1]["n_cells"].sum() == 2370


def test_the_engine_checks_workers_and_its_input(cells, client, monkeypatch):
    # This process as another build of the extension (workers compute their own).
    monkeypatch.setattr(D, "_build", lambda: "another-build")
    with pytest.raises(RuntimeError, match=r"worker tcp://\S+ runs \{.*'build': '[0-9a-f]{16}'\}, this process \{.*'build': 'another-build'\}"):
        D.DaskEngine(client)
    monkeypatch.undo()
    engine = D.DaskEngine(client)
    with pytest.raises(ValueError, match="engine= needs data its workers can read"):
        psc.fit_centroids(pl.read_parquet(cells / "a.parquet"), engine=engine)
    with pytest.raises(ValueError, match=r"column\(s\) \['plate'\] not found; the frame has \['X_pca', 'batch'\]"):
        engine.fold(pl.scan_parquet(cells / "*.parquet"), ["X_pca", "plate"], None)
    with pytest.raises(ValueError, match="partition_rows must be a positive integer"):
        D.DaskEngine(client, partition_rows=0)


def test_a_plan_with_our_expressions_needs_the_extension_at_the_same_path(counts, client):
    folder, n_genes = counts
    engine = D.DaskEngine(client)
    engine._elsewhere = ["tcp://worker (/elsewhere/_internal.so)"]  # as if a worker had another install
    norm = pl.scan_parquet(folder / "*.parquet").with_columns(psc.normalize("gene_idx", "values"))
    with pytest.raises(RuntimeError, match=r"install it at the same path on every worker .* pass the files"):
        psc.highly_variable_genes(norm, n_genes=n_genes, engine=engine)
    # Files alone travel anywhere.
    assert psc.highly_variable_genes(folder, n_genes=n_genes, flavor="seurat_v3", engine=engine).height == n_genes


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3,000 generated cells in three files."""
    d = tmp_path_factory.mktemp("pipeline")
    return psc.datasets.write_synthetic_counts(d / "raw", 3000, n_genes=300, umis_per_cell=60, rows_per_file=1000,
                                               random_state=5)


def _same_outputs(a, b):
    for name in ("genes.parquet", "pca.parquet", "cells_pca.parquet", "centroids.parquet", "integration.parquet",
                 "cells.parquet"):
        assert pl.read_parquet(a / name).equals(pl.read_parquet(b / name)), name
    pa, pb = psc.PcaModel.load(a / "pca.parquet"), psc.PcaModel.load(b / "pca.parquet")
    assert np.array_equal(pa.explained_variance, pb.explained_variance)


def test_integrate_on_the_cluster_is_the_local_run(raw, client, monkeypatch, tmp_path):
    monkeypatch.setattr(_frames, "PARTITION_ROWS", 700)  # several partitions a file
    opts = dict(n_top_genes=100, n_comps=10, n_centroids=16, log=None, progress=False)
    local = psc.integrate(raw, tmp_path / "local", **opts)
    remote = psc.integrate(raw, tmp_path / "dask", engine=D.DaskEngine(client, partition_rows=700), **opts)
    _same_outputs(tmp_path / "local", tmp_path / "dask")
    untimed = [{k: v for k, v in r["stages"]["integration"]["metrics"].items() if k != "seconds"} for r in (local, remote)]
    assert untimed[0] == untimed[1]
    # The apply stages ran as tasks: one part file a partition, in row order.
    for name in ("cells_pca.parquet", "cells.parquet"):
        assert (tmp_path / "local" / name).is_file()
        parts = sorted((tmp_path / "dask" / name).iterdir())
        assert len(parts) > 1 and all(p.name.startswith("part-") for p in parts), parts
    assert not list((tmp_path / "dask").glob(".*")), "hidden temporary files left behind"


def test_one_worker_gives_the_bits_of_two(raw, client, monkeypatch, tmp_path):
    """Partitions come from the files, not the cluster: one worker process
    writes what two write (and what the local run writes, above)."""
    monkeypatch.setattr(_frames, "PARTITION_ROWS", 700)
    opts = dict(n_top_genes=100, n_comps=10, n_centroids=16, log=None, progress=False)
    psc.integrate(raw, tmp_path / "two", engine=D.DaskEngine(client, partition_rows=700), **opts)
    with dask_distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                       dashboard_address=None) as cluster, dask_distributed.Client(cluster) as one:
        psc.integrate(raw, tmp_path / "one", engine=D.DaskEngine(one, partition_rows=700), **opts)
    _same_outputs(tmp_path / "one", tmp_path / "two")


def test_a_run_resumes_and_replaces_across_engines(raw, client, monkeypatch, tmp_path):
    """A run with an engine (dataset folders) resumes locally, and a changed
    stage's output replaces the other kind (folder by file, file by folder)."""
    monkeypatch.setattr(_frames, "PARTITION_ROWS", 700)
    engine = D.DaskEngine(client, partition_rows=700)
    opts = dict(n_top_genes=100, n_comps=10, n_centroids=16, log=None, progress=False)
    out = tmp_path / "out"
    first = psc.integrate(raw, out, engine=engine, **opts)
    assert (out / "cells.parquet").is_dir()
    again = psc.integrate(raw, out, **opts)  # locally: every stage kept
    assert all(s.get("resumed") for s in again["stages"].values())
    before = pl.read_parquet(out / "cells.parquet")
    third = psc.integrate(raw, out, k=4, **opts)  # interpolate redone here: a file now
    assert third["stages"]["interpolate"].get("resumed") is None and (out / "cells.parquet").is_file()
    assert (out / "cells_pca.parquet").is_dir()
    moved = pl.read_parquet(out / "cells.parquet")
    assert moved.drop("X_ot").equals(before.drop("X_ot")) and not moved["X_ot"].equals(before["X_ot"])
    psc.integrate(raw, out, k=8, engine=engine, **opts)  # and back to a folder, the first run's bits
    assert (out / "cells.parquet").is_dir() and pl.read_parquet(out / "cells.parquet").equals(before)
    assert first["stages"]["project"]["n_cells"] == 3000
    assert not list(out.glob(".*")), "hidden temporary files left behind"


def test_a_worker_killed_mid_write_changes_nothing(cells, client, tmp_path):
    """The first part to be written kills its worker process midway, leaving
    an unfinished hidden file: Dask reruns the task, the stale file is
    removed, and the folder holds the local result, bit for bit."""
    marker = str(tmp_path / "killed")

    def patch() -> None:  # local, so cloudpickle sends it by value to the workers
        import os
        from pathlib import Path

        from polars_singlecell import distributed as dm

        real = getattr(dm, "_real_sink_parquet", dm.sink_parquet)
        dm._real_sink_parquet = real

        def dying(lf, dest, **kwargs):
            if not os.path.exists(marker):
                open(marker, "w").close()
                Path(dest).with_name(f".{Path(dest).name}.dead.tmp").write_text("half a part")
                os._exit(1)
            real(lf, dest, **kwargs)

        dm.sink_parquet = dying

    def unpatch() -> None:
        from polars_singlecell import distributed as dm

        dm.sink_parquet = getattr(dm, "_real_sink_parquet", dm.sink_parquet)

    client.run(patch)
    try:
        lf = pl.scan_parquet(cells / "*.parquet").with_columns(pl.col("X_pca").arr.sum().alias("total"))
        written = D.DaskEngine(client, partition_rows=700).sink(lf, tmp_path / "out.parquet")
    finally:
        client.run(unpatch)
    import os

    assert os.path.exists(marker)  # a worker did die
    assert written == lf.select(pl.len()).collect().item()
    assert pl.read_parquet(tmp_path / "out.parquet").equals(lf.collect())
    assert not [p for p in (tmp_path / "out.parquet").iterdir() if not p.name.startswith("part-")]


def test_a_model_file_changed_under_the_workers_is_refused(raw, client, tmp_path):
    """The workers read the model from its file: one that differs from the
    driver's (rewritten meanwhile) is an error, and nothing is written."""
    cells = pl.DataFrame({"X_pca": np.arange(12, dtype=np.float32).reshape(6, 2), "batch": ["a", "b"] * 3},
                         schema={"X_pca": pl.Array(pl.Float32, 2), "batch": pl.String})
    cells.write_parquet(tmp_path / "cells.parquet", row_group_size=2)
    table = pl.DataFrame({"batch": ["a", "b"], "centroid": [[0.0, 0.0], [5.0, 5.0]], "displacement": [[1.0, 0.0], [0.0, 1.0]]},
                         schema={"batch": pl.String, "centroid": pl.Array(pl.Float32, 2), "displacement": pl.Array(pl.Float32, 2)})
    model = psc.IntegrationModel(table)
    model.write_parquet(tmp_path / "model.parquet")
    engine = D.DaskEngine(client, partition_rows=2)
    lf = pl.scan_parquet(tmp_path / "cells.parquet").with_columns(psc.knn_interpolate("X_pca", "batch", model=model, k=1))
    assert engine.sink(lf, tmp_path / "moved.parquet", [(model, tmp_path / "model.parquet")]) == 6
    assert pl.read_parquet(tmp_path / "moved.parquet").equals(lf.collect())
    assert len(list((tmp_path / "moved.parquet").iterdir())) == 3
    psc.IntegrationModel(table.with_columns(pl.col("displacement").arr.eval(pl.element() * 2))).write_parquet(
        tmp_path / "model.parquet")
    before = pl.read_parquet(tmp_path / "moved.parquet")
    with pytest.raises(RuntimeError, match=r"model.parquet on this worker is not the one the driver loaded"):
        engine.sink(lf, tmp_path / "moved.parquet", [(model, tmp_path / "model.parquet")])
    # The failed stage left the earlier output as it was, and nothing else.
    assert pl.read_parquet(tmp_path / "moved.parquet").equals(before) and not list(tmp_path.glob(".*"))
    # A model the workers never loaded (the first one they keep for the process's life).
    unseen = psc.IntegrationModel(table.with_columns(pl.col("displacement").arr.eval(pl.element() * 3)))
    lf = pl.scan_parquet(tmp_path / "cells.parquet").with_columns(psc.knn_interpolate("X_pca", "batch", model=unseen, k=1))
    with pytest.raises(RuntimeError, match=r"uses a model that was not passed to DaskEngine.sink: pass models="):
        engine.sink(lf, tmp_path / "nomodel.parquet")
    assert not (tmp_path / "nomodel.parquet").exists()


def test_files_without_rows_give_one_empty_part(client, tmp_path):
    empty = pl.DataFrame({"X_pca": [], "batch": []}, schema={"X_pca": pl.Array(pl.Float32, 2), "batch": pl.String})
    empty.write_parquet(tmp_path / "empty.parquet")
    lf = pl.scan_parquet(tmp_path / "empty.parquet").with_columns(pl.col("X_pca").arr.sum().alias("total"))
    assert D.DaskEngine(client).sink(lf, tmp_path / "out.parquet") == 0
    assert [p.name for p in (tmp_path / "out.parquet").iterdir()] == ["part-00000.parquet"]
    assert pl.read_parquet(tmp_path / "out.parquet").schema == lf.collect_schema()


def test_the_cli_runs_the_fits_on_a_local_cluster(raw, tmp_path, capsys):
    from polars_singlecell.__main__ import main

    flags = ["--n-top-genes", "100", "--n-comps", "10", "--n-centroids", "16", "--no-progress"]
    assert main(["integrate", str(raw), str(tmp_path / "local"), *flags]) == 0
    assert main(["integrate", str(raw), str(tmp_path / "dask"), "--workers", "2", *flags]) == 0
    _same_outputs(tmp_path / "local", tmp_path / "dask")
    assert main(["integrate", str(raw), str(tmp_path / "x"), "--workers", "0", *flags]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_a_worker_killed_mid_fit_changes_nothing(counts, client, tmp_path, monkeypatch):
    """The first task to start kills its worker process; Dask restarts it
    and runs the task again elsewhere: the same statistics, bit for bit."""
    import os

    from polars_singlecell import _internal

    folder, n_genes = counts
    marker = str(tmp_path / "killed")

    class KillOnce:  # local, so cloudpickle sends it by value to the workers
        def __init__(self, n: int) -> None:
            self.fit = _internal.GeneStatsFit(n)

        def update(self, *columns) -> None:
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker process dies mid-partition
            self.fit.update(*columns)

        def merge(self, later: KillOnce) -> None:
            self.fit.merge(later.fit)

        def to_bytes(self) -> bytes:
            return self.fit.to_bytes()

        @classmethod
        def from_bytes(cls, b: bytes) -> KillOnce:
            out = cls.__new__(cls)
            out.fit = _internal.GeneStatsFit.from_bytes(b)
            return out

    monkeypatch.setattr(_frames, "PARTITION_ROWS", 300)
    lf = pl.scan_parquet(folder / "*.parquet").with_columns(psc.normalize("gene_idx", "values"))
    cols = ["gene_idx", "values", "batch"]
    local = _frames.fold(lf, cols, _frames.FitSpec(_internal.GeneStatsFit, (n_genes,)))
    remote = D.DaskEngine(client, partition_rows=300).fold(lf, cols, _frames.FitSpec(KillOnce, (n_genes,)))
    assert os.path.exists(marker)  # a worker did die
    assert local.finish().equals(remote.fit.finish())


def test_a_plan_shorter_than_its_files_folds_alike(cells, counts, client, monkeypatch):
    """A head() ends inside a partition: both paths fold up to there and read
    no further (the centroid sample, whose merges check row order, too)."""
    from polars_singlecell import _internal

    monkeypatch.setattr(_frames, "PARTITION_ROWS", 300)
    engine = D.DaskEngine(client, partition_rows=300)
    short = pl.scan_parquet(cells / "*.parquet").head(1000)
    opts = dict(batch_key="batch", n_centroids=32, random_state=1, summary=True)
    local, remote = psc.fit_centroids(short, **opts), psc.fit_centroids(short, engine=engine, **opts)
    assert all(a.equals(b) for a, b in zip(local, remote)) and remote[1]["n_cells"].sum() == 1000
    folder, n_genes = counts
    lf = pl.scan_parquet(folder / "*.parquet").head(1000)
    cols, spec = ["gene_idx", "values", "batch"], _frames.FitSpec(_internal.GeneStatsFit, (n_genes,))
    a, b = _frames.fold(lf, cols, spec).finish(), engine.fold(lf, cols, spec).finish()
    assert a.equals(b)
    assert a.group_by("batch").agg(pl.col("n_cells").first())["n_cells"].sum() == 1000


def test_workers_get_absolute_paths(cells, client, monkeypatch):
    monkeypatch.chdir(cells)
    engine = D.DaskEngine(client)
    with pytest.raises(ValueError, match=r"reads \[.a.parquet.\] by relative path.*scan absolute paths"):
        psc.fit_centroids(pl.scan_parquet("a.parquet"), engine=engine)
    # A path given as text is made absolute before it travels.
    local = psc.fit_centroids("a.parquet", n_centroids=16)
    assert local.equals(psc.fit_centroids("a.parquet", n_centroids=16, engine=engine))
