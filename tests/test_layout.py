"""Published sparse layouts in: Tahoe-100M's Parquet release (token-id lists
led by a marker, a gene_metadata vocabulary) read by ``psc.to_cells`` /
``psc.scan_cells`` and ``psc.integrate(counts=..., vocabulary=...)``,
against numpy references and against the same cells in the project's layout."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc
from polars_singlecell.__main__ import main


def reference(genes, values, tokens):
    """The cells a vocabulary gives, by plain Python: drop unknown tokens, sort by gene."""
    row_of = {int(t): g for g, t in enumerate(tokens)}
    out_idx, out_val = [], []
    for gs, vs in zip(genes, values):
        pairs = sorted((row_of[t], v) for t, v in zip(gs, vs) if t in row_of)
        out_idx.append([g for g, _ in pairs])
        out_val.append([float(np.float32(v)) for _, v in pairs])
    return out_idx, out_val


def random_cells(rng, n_cells, tokens, marker=1):
    genes, values = [], []
    for _ in range(n_cells):
        k = int(rng.integers(0, 40))
        chosen = rng.choice(tokens, size=k, replace=False)  # any order
        genes.append([marker] + chosen.tolist())
        values.append([-2.0] + rng.integers(1, 50, k).astype(float).tolist())
    return genes, values


@pytest.mark.parametrize("sparse_ids", [False, True])
@pytest.mark.parametrize("id_dtype,value_dtype", [(pl.Int64, pl.Float32), (pl.Int32, pl.Int32), (pl.UInt64, pl.Float64)])
def test_to_cells_matches_python_reference(sparse_ids, id_dtype, value_dtype):
    rng = np.random.default_rng(3)
    n_genes = 300
    # Dense ids (a table lookup) or ids spread over 2^40 (binary search): same answer.
    tokens = rng.permutation(n_genes) * (2**31 + 7 if sparse_ids and id_dtype != pl.Int32 else 1) + 3
    genes, values = random_cells(rng, 500, tokens)
    vocab = pl.DataFrame({"token_id": tokens, "gene_symbol": [f"S{g}" for g in range(n_genes)]})
    df = pl.DataFrame({"genes": genes, "expressions": values}).cast({"genes": pl.List(id_dtype)})
    if value_dtype.is_integer():  # the marker's -2 does not fit an unsigned type, but does an Int32
        df = df.with_columns(pl.col("expressions").cast(pl.List(value_dtype)))
    else:
        df = df.with_columns(pl.col("expressions").cast(pl.List(value_dtype)))
    got = df.select(psc.to_cells(vocabulary=vocab).struct.unnest())
    assert got.schema == pl.Schema({"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float32)})
    want_idx, want_val = reference(genes, values, tokens)
    assert got["gene_idx"].to_list() == want_idx
    assert got["values"].to_list() == want_val
    # The cells then pass every expression of the package (sorted, in range).
    totals = got.select(psc.total_counts()).to_series().to_numpy()
    np.testing.assert_allclose(totals, [sum(v) for v in want_val])


def test_to_cells_without_vocabulary_and_nulls():
    df = pl.DataFrame({"g": [[4, 0, 2], None, [], [1]], "v": [[1, 2, 3], None, [], [7]]},
                      schema={"g": pl.List(pl.UInt16), "v": pl.List(pl.Int64)})
    got = df.select(psc.to_cells("g", "v", n_genes=5).struct.unnest())
    assert got["gene_idx"].to_list() == [[0, 2, 4], None, [], [1]]
    assert got["values"].to_list() == [[2.0, 3.0, 1.0], None, [], [7.0]]


def test_to_cells_bad_input_names_column_and_row():
    vocab = pl.DataFrame({"token_id": [10, 11, 12]})
    cells = pl.DataFrame({"genes": [[1, 10], [1, 11, 12, 11]], "expressions": [[-2.0, 1.0], [-2.0, 1.0, 1.0, 2.0]]})
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'genes'.*given more than once.*\[11, 11\].*row 1"):
        cells.select(psc.to_cells(vocabulary=vocab))
    neg = pl.DataFrame({"genes": [[1, 10, 12]], "expressions": [[-2.0, 1.0, -3.0]]})
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'expressions'.*-3.*not a finite count.*row 0"):
        neg.select(psc.to_cells(vocabulary=vocab))
    # Without a vocabulary the marker is a gene id like any other: out of range.
    with pytest.raises(pl.exceptions.ComputeError, match=r"gene id 10 is outside \[0, 5\).*row 0"):
        pl.DataFrame({"genes": [[1, 10]], "expressions": [[1.0, 1.0]]}).select(psc.to_cells(n_genes=5))
    with pytest.raises(pl.exceptions.ComputeError, match=r"2 gene ids but 1 values.*row 0"):
        pl.DataFrame({"genes": [[1, 10]], "expressions": [[1.0]]}).select(psc.to_cells(vocabulary=vocab))
    with pytest.raises(pl.exceptions.ComputeError, match="list of integer gene ids"):
        pl.DataFrame({"genes": [[1.5]], "expressions": [[1.0]]}).select(psc.to_cells())
    with pytest.raises(ValueError, match="lists token 10 more than once"):
        psc.to_cells(vocabulary=pl.DataFrame({"token_id": [10, 11, 10]}))
    with pytest.raises(ValueError, match="no column 'token_id'.*token_column"):
        psc.to_cells(vocabulary=pl.DataFrame({"id": [10]}))
    with pytest.raises(ValueError, match="null at row 1"):
        psc.to_cells(vocabulary=pl.DataFrame({"token_id": [10, None]}))
    with pytest.raises(FileNotFoundError, match="no vocabulary file"):
        psc.to_cells(vocabulary="/nonexistent/gene_metadata.parquet")


def test_tahoe_layout_reads_as_the_same_cells(tmp_path):
    kw = dict(n_genes=120, umis_per_cell=80, rows_per_file=700, random_state=5)
    cells = psc.datasets.tahoe_like(2000, tmp_path / "cells", **kw)
    tahoe = psc.datasets.tahoe_like(2000, tmp_path / "tahoe", layout="tahoe", **kw)
    raw = pl.read_parquet(tahoe / "data" / "*.parquet")
    assert raw.schema["genes"] == pl.List(pl.Int64) and raw.schema["expressions"] == pl.List(pl.Float32)
    assert {"plate", "cell_line_id", "drug", "sample", "BARCODE_SUB_LIB_ID"} <= set(raw.columns)
    assert (raw["genes"].list.first() == 1).all() and (raw["expressions"].list.first() == -2.0).all()
    # Tokens are in token order, so not in gene order: the sort path runs.
    vocab = pl.read_parquet(tahoe / "metadata" / "gene_metadata.parquet")
    assert 1 not in vocab["token_id"].to_list() and not vocab["token_id"].is_sorted()
    lf = psc.scan_cells(tahoe / "data", counts=("genes", "expressions"), vocabulary=tahoe / "metadata" / "gene_metadata.parquet")
    got = lf.collect(engine="streaming")
    want = pl.read_parquet(cells / "part-*.parquet")
    assert got.columns == ["drug", "sample", "plate", "cell_line_id", "BARCODE_SUB_LIB_ID", "gene_idx", "values"]
    assert got["gene_idx"].to_list() == want["gene_idx"].to_list()
    assert got["values"].to_list() == want["values"].to_list()
    assert got["plate"].to_list() == want["plate"].to_list()


def test_integrate_reads_the_tahoe_layout_like_the_project_layout(tmp_path):
    kw = dict(n_genes=150, umis_per_cell=90, rows_per_file=1500, random_state=2)
    cells = psc.datasets.tahoe_like(4000, tmp_path / "cells", **kw)
    tahoe = psc.datasets.tahoe_like(4000, tmp_path / "tahoe", layout="tahoe", **kw)
    opts = dict(batch_key="plate", n_top_genes=60, n_comps=8, n_centroids=8, log=None)
    psc.integrate(cells, tmp_path / "a", **opts)
    # The CLI, as a user types it for the Parquet release.
    rc = main(["integrate", str(tahoe / "data"), str(tmp_path / "b"), "--batch-key", "plate", "--n-top-genes", "60",
               "--n-comps", "8", "--n-centroids", "8", "--no-progress", "--counts", "genes", "expressions",
               "--vocabulary", str(tahoe / "metadata" / "gene_metadata.parquet")])
    assert rc == 0
    a, b = pl.read_parquet(tmp_path / "a" / "cells.parquet"), pl.read_parquet(tmp_path / "b" / "cells.parquet")
    for col in ("X_pca", "X_ot"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())
    genes = pl.read_parquet(tmp_path / "b" / "genes.parquet")
    assert genes["gene"].to_list() == [f"G{i}" for i in range(150)]  # the vocabulary's gene_symbol
    assert {"ensembl_id", "token_id", "highly_variable"} <= set(genes.columns)
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["parameters"]["genes"]["counts"] == ["genes", "expressions"]
    # A re-run resumes; a changed vocabulary redoes every stage.
    again = psc.integrate(tahoe / "data", tmp_path / "b", counts=("genes", "expressions"),
                          vocabulary=tahoe / "metadata" / "gene_metadata.parquet", **opts)
    assert all(s.get("resumed") for s in again["stages"].values())
    vocab = pl.read_parquet(tahoe / "metadata" / "gene_metadata.parquet")
    other = psc.integrate(tahoe / "data", tmp_path / "b", counts=("genes", "expressions"), vocabulary=vocab.reverse(), **opts)
    assert not any(s.get("resumed") for s in other["stages"].values())


def test_integrate_counts_errors(tmp_path):
    tahoe = psc.datasets.tahoe_like(500, tmp_path / "t", n_genes=50, layout="tahoe")
    with pytest.raises(FileNotFoundError, match=r"list column 'gene_idx'.*counts=\(gene ids, values\)"):
        psc.integrate(tahoe / "data", tmp_path / "o", batch_key="plate", log=None)
    with pytest.raises(ValueError, match="n_genes=7 but the vocabulary has 50"):
        psc.integrate(tahoe / "data", tmp_path / "o", batch_key="plate", counts=("genes", "expressions"), n_genes=7,
                      vocabulary=tahoe / "metadata" / "gene_metadata.parquet", log=None)


def test_a_vocabulary_that_matches_nothing_and_ids_beyond_int64_are_errors():
    cells = pl.DataFrame({"genes": [[1, 10, 11], [1, 12]], "expressions": [[-2.0, 1.0, 2.0], [-2.0, 3.0]]})
    wrong = pl.DataFrame({"token_id": [10**9, 10**9 + 1]})
    with pytest.raises(pl.exceptions.ComputeError, match=r"none of the 5 gene ids of these 2 cells is in the vocabulary of 2 tokens"):
        cells.select(psc.to_cells(vocabulary=wrong))
    # A subset vocabulary (some genes only) is fine: the others are dropped.
    subset = cells.select(psc.to_cells(vocabulary=pl.DataFrame({"token_id": [11]})).struct.unnest())
    assert subset["gene_idx"].to_list() == [[0], []]
    big = pl.DataFrame({"g": [[2**63 + 5]], "v": [[1.0]]}, schema={"g": pl.List(pl.UInt64), "v": pl.List(pl.Float32)})
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'g' holds a gene id above 9223372036854775807"):
        big.select(psc.to_cells("g", "v"))


def test_generated_row_groups_hold_about_row_group_entries(tmp_path, monkeypatch):
    """The generators size row groups by entries, not rows (as h5ad_to_parquet
    does): readers decode a group at a time, so a dense 50,000-row group
    would be hundreds of MB. Both layouts."""
    from polars_singlecell import _files, _internal

    monkeypatch.setattr(_files, "ROW_GROUP_ENTRIES", 20_000)
    kw = dict(n_genes=120, umis_per_cell=80, rows_per_file=1500, random_state=5)
    for layout, pattern, column in (("cells", "part-*.parquet", "gene_idx"), ("tahoe", "data/*.parquet", "genes")):
        out = psc.datasets.tahoe_like(3000, tmp_path / layout, layout=layout, **kw)
        files = sorted(str(f) for f in out.glob(pattern))
        groups = _internal.parquet_row_groups(files, [column])
        assert sum(n for n, _ in groups) == 3000
        assert sum(e for _, e in groups) / len(files) > 3 * 20_000  # a file's rows in one group would be 3x too many
        # Every group at most ~the budget; all but each file's last one near it.
        assert max(e for _, e in groups) <= 1.2 * 20_000
        assert sum(e >= 0.8 * 20_000 for _, e in groups) >= 3 * len(files)


def test_slices_of_the_tahoe_layout_stay_within_budget(tmp_path, monkeypatch):
    """record_batches plans its slices from the files' footers. Through
    scan_cells the columns it reads (gene_idx, values) are computed from
    others (genes, expressions): the plan must still bound each slice, not
    take the files whole (a 1M-cell run once peaked at 16 GB that way)."""
    from polars_singlecell import _files, _frames

    monkeypatch.setattr(_files, "ROW_GROUP_ENTRIES", 5_000)
    out = psc.datasets.tahoe_like(3000, tmp_path / "t", layout="tahoe", n_genes=120, umis_per_cell=80, rows_per_file=1500, random_state=5)
    monkeypatch.setattr(_frames, "SLICE_ENTRIES", 20_000)
    lf = psc.scan_cells(out / "data", counts=("genes", "expressions"), vocabulary=out / "metadata" / "gene_metadata.parquet")
    q = lf.select("gene_idx", "values")
    plan = _frames._aligned_slices(q, ["gene_idx", "values"])
    assert sum(plan) == 3000 and len(plan) >= 3000 * 80 // 20_000
    got = list(_frames.record_batches(lf, ["gene_idx", "values"]))
    assert [b.height for b in got] == plan
    # Footers count the marker token too: at most a row's worth over the budget.
    assert max(int(b["gene_idx"].list.len().sum()) for b in got) <= 20_000
    assert pl.concat(got).equals(q.collect())
