"""DaskEngine on a 2-process LocalCluster: partitions fixed by the data, the
centroid fit identical to the local one, workers checked at start."""

from __future__ import annotations

import polars as pl
import pytest

import polars_singlecell as psc
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


def test_partitions_are_whole_row_groups_with_global_rows(cells):
    paths = [str(cells / "a.parquet"), str(cells / "b.parquet")]
    parts = D.partitions(paths, ["X_pca", "batch"], 1000)
    assert [(p.path[-9:], p.offset, p.n_rows, p.first_row, p.groups) for p in parts] == [
        ("a.parquet", 0, 700, 0, (700,)),
        ("a.parquet", 700, 800, 700, (700, 100)),
        ("b.parquet", 0, 870, 1500, (700, 170)),
    ]
    assert [p.n_rows for p in D.partitions(paths, ["X_pca"], 10)] == [700, 700, 100, 700, 170]  # a group is never split


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
    with pytest.raises(TypeError, match="pass the data as Parquet path"):
        psc.fit_centroids(pl.read_parquet(cells / "a.parquet"), engine=engine)
    with pytest.raises(ValueError, match="partition_rows must be a positive integer"):
        D.DaskEngine(client, partition_rows=0)
