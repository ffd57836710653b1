"""The streaming fits' one verb set (update, merge, finish, to_bytes /
from_bytes, pickling) on real data, and the one model registry that
plugin expressions share."""

from __future__ import annotations

import itertools
import pickle
import warnings

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc
from polars_singlecell import _internal

CUTS = [0, 311, 312, 900]  # uneven parts, one of a single row


def parts(df: pl.DataFrame) -> list[tuple[int, pl.DataFrame]]:
    cuts = [*CUTS, df.height]
    return [(a, df.slice(a, b - a)) for a, b in itertools.pairwise(cuts)]


def merged(states):
    first, *rest = states
    for s in rest:
        first.merge(s)
    return first


def test_gene_statistics_of_counts_merge_to_the_one_stream(cellbench):
    """CellBench's raw counts sum exactly in float64: parts merged in order
    are the one stream, to the bit (the table and the wire)."""
    df, n_genes = cellbench
    one = _internal.GeneStatsFit(n_genes, "counts")
    one.update(df["gene_idx"], df["values"], df["batch"])
    states = []
    for _, part in parts(df):
        s = _internal.GeneStatsFit(n_genes, "counts")
        s.update(part["gene_idx"], part["values"], part["batch"])
        states.append(pickle.loads(pickle.dumps(s)))  # each part travels, as to a worker and back
    m = merged(states)
    assert m.to_bytes() == one.to_bytes()
    assert m.finish().equals(one.finish())


def test_covariance_merges_and_travels(cellbench):
    df, _ = cellbench
    df = df.with_columns(psc.select_genes(genes=pl.Series(range(0, 3000, 10), dtype=pl.UInt32)).struct.unnest())
    one = _internal.CovarianceFit(300, 2)
    one.update(df["gene_idx"], df["values"])
    states = []
    for _, part in parts(df):
        s = _internal.CovarianceFit(300, 1)
        s.update(part["gene_idx"], part["values"])
        states.append(_internal.CovarianceFit.from_bytes(s.to_bytes(), 2))
    m = merged(states)
    assert m.n_cells == df.height
    assert m.to_bytes() == one.to_bytes()  # integer counts: exact sums
    a, b = m.finish(5), one.finish(5)
    assert a[0] == b[0] and all(x.equals(y) for x, y in zip(a[1:5], b[1:5]))


def test_centroid_samples_merge_to_the_one_stream(harmony):
    """Partitions start at their global row (the sampling key hashes it): the
    merged sample, and so the centroids, are the one stream's."""
    emb = harmony.select(pl.col("embedding").alias("X_pca"), "batch")
    args = (20, 300, 7, 1)
    one = _internal.CentroidSampleFit(*args)
    one.update(emb["X_pca"], emb["batch"])
    states = []
    for row0, part in parts(emb):
        s = _internal.CentroidSampleFit(*args, first_row=row0)
        s.update(part["X_pca"], part["batch"])
        states.append(pickle.loads(pickle.dumps(s)))
    m = merged(states)
    assert m.n_rows == emb.height and m.to_bytes() == one.to_bytes()
    opts = (16, 100, 1e-4, None)
    for x, y in zip(m.finish(*opts), one.finish(*opts)):
        assert x.equals(y)
    # Merged out of row order: an error, not a different sample.
    late = _internal.CentroidSampleFit(*args, first_row=1000)
    with pytest.raises(ValueError, match="must start at row 2370, where this one ends, but starts at row 1000"):
        m.merge(late)


def test_merge_reads_the_later_state_and_a_failed_merge_changes_nothing(cellbench):
    df, n_genes = cellbench
    a, b = _internal.GeneStatsFit(n_genes, "counts"), _internal.GeneStatsFit(n_genes, "counts")
    a.update(df["gene_idx"][:100], df["values"][:100], df["batch"][:100])
    b.update(df["gene_idx"][100:], df["values"][100:], df["batch"][100:])
    b_before = b.to_bytes()
    a.merge(b)
    assert b.to_bytes() == b_before  # the later state is only read
    a_before = a.to_bytes()
    with pytest.raises(ValueError, match="different n_genes"):
        a.merge(_internal.GeneStatsFit(n_genes + 1))
    with pytest.raises(ValueError, match="cannot merge itself"):
        a.merge(a)
    assert a.to_bytes() == a_before
    with pytest.raises(ValueError, match="not a CovarianceFit state .*GeneStatsFit"):
        _internal.CovarianceFit.from_bytes(a.to_bytes())
    late = _internal.CentroidSampleFit(2, 10, 0, 1, first_row=7)
    first = _internal.CentroidSampleFit(2, 10, 0, 1)
    with pytest.raises(ValueError, match="must start at row 0"):
        first.merge(late)
    assert late.to_bytes() == _internal.CentroidSampleFit(2, 10, 0, 1, first_row=7).to_bytes()


def test_pca_project_builds_its_model_once_per_process(cellbench, tmp_path):
    """PCA models go through the same registry as integration models: built
    once however many record batches and expressions use them."""
    df, _ = cellbench
    df = df.with_columns(psc.select_genes(genes=pl.Series(range(0, 3000, 10), dtype=pl.UInt32)).struct.unnest())
    model = psc.fit_pca(df, n_genes=300, n_comps=4)
    path = tmp_path / "cells.parquet"
    df.write_parquet(path, row_group_size=100)
    psc.clear_models()
    before = _internal.model_builds()
    outs = [pl.scan_parquet(path).select(psc.pca_project(model=model)).collect(engine="streaming") for _ in range(3)]
    assert _internal.model_builds() - before == 1
    assert all(o.equals(outs[0]) for o in outs)
    # What pca_project computes is unchanged: the model's projection.
    want = (df.select(psc.pca_project(model=model))["X_pca"].to_numpy())
    assert np.array_equal(outs[0]["X_pca"].to_numpy(), want)
    expr = psc.pca_project(model=model)
    psc.clear_models()
    with pytest.raises(pl.exceptions.ComputeError, match="is not loaded in this process.*model=<PcaModel"):
        df.select(expr)


def test_knn_takes_model_like_the_other_plugins():
    cells = pl.DataFrame({"X": np.array([[0.1, 0.0]], dtype=np.float32)}, schema={"X": pl.Array(pl.Float32, 2)})
    points = np.array([[5, 5], [0, 0], [1, 0]])
    want = cells.select(psc.knn("X", model=points, k=2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = cells.select(psc.knn("X", index=points, k=2))
    assert old.equals(want) and any(issubclass(x.category, DeprecationWarning) for x in w)
    with pytest.raises(TypeError, match="not both"):
        psc.knn("X", model=points, index=points)
    with pytest.raises(TypeError, match="needs model="):
        psc.knn("X")


def test_seed_is_now_random_state_as_in_scanpy():
    """scanpy's name everywhere; the old one still works for a release, with
    a DeprecationWarning, and both at once is an error."""
    new = psc.datasets.synthetic_counts(50, n_genes=20, random_state=3)
    with pytest.warns(DeprecationWarning, match=r"synthetic_counts\(seed=...\) is now synthetic_counts\(random_state=...\)"):
        old = psc.datasets.synthetic_counts(50, n_genes=20, seed=3)
    assert old.equals(new)
    with pytest.raises(TypeError, match="not both"):
        psc.datasets.synthetic_counts(50, n_genes=20, seed=3, random_state=3)
    import inspect

    for fn in (psc.metrics.evaluate, psc.io.to_anndata, psc.plot.embedding, psc.datasets.tahoe_like):
        assert "random_state" in inspect.signature(fn).parameters and "seed" not in inspect.signature(fn).parameters
