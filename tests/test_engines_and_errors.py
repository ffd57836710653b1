"""Every apply expression: eager = lazy = streaming, inside scan → sink; and
bad input raises an exception that names the column, the value and the fix."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import polars_singlecell as psc
from conftest import SPARSE, sparse_frame
from polars_singlecell._plugin import check_polars_version


@pytest.fixture(scope="module")
def counts():
    return psc.datasets.synthetic_counts(3000, n_genes=300, umis_per_cell=40, random_state=1)


@pytest.fixture(scope="module")
def model(counts):
    lognorm = counts.with_columns(psc.normalize())
    return psc.fit_pca(lognorm, n_genes=300, n_comps=8)


def exprs(model):
    return {
        "normalize": [psc.normalize("gene_idx", "values", target_sum=1e4)],
        "total_counts": [psc.total_counts()],
        "select_genes": [psc.select_genes(genes=[5, 3, 200, 17]).struct.unnest()],
        "pca_project": [psc.normalize(), psc.pca_project(model=model)],
    }


@pytest.mark.parametrize("op", ["normalize", "total_counts", "select_genes", "pca_project"])
def test_eager_lazy_streaming_and_sink_agree(op, counts, model, tmp_path):
    path = tmp_path / "in.parquet"
    counts.write_parquet(path, row_group_size=700)
    ex = exprs(model)[op]
    eager = counts
    for e in ex:
        eager = eager.with_columns(e)
    q = pl.scan_parquet(path)
    for e in ex:
        q = q.with_columns(e)
    assert_frame_equal(q.collect(), eager)
    assert_frame_equal(q.collect(engine="streaming"), eager)
    psc.sink_parquet(q, tmp_path / "out.parquet")
    assert_frame_equal(pl.read_parquet(tmp_path / "out.parquet"), eager)


def test_over_groups_matches_per_group(counts):
    """target_sum=None is not elementwise: inside .over() the median is per group."""
    got = counts.with_columns(psc.normalize(target_sum=None).over("batch"))
    for (b,), part in counts.group_by("batch"):
        want = part.with_columns(psc.normalize(target_sum=None))
        assert_frame_equal(got.filter(pl.col("batch") == b).sort("cell_id"), want.sort("cell_id"))


def err(df, expr):
    with pytest.raises(pl.exceptions.ComputeError) as e:
        df.select(expr)
    return str(e.value)


def test_one_sided_null_is_an_error():
    df = pl.DataFrame({"gene_idx": [[0], None], "values": [[1.0], [2.0]]}, schema_overrides=SPARSE)
    m = err(df, psc.normalize())
    assert "row 1" in m and "'gene_idx' is null but 'values' is not" in m


def test_inner_null_is_an_error():
    df = pl.DataFrame({"gene_idx": [[0, 1]], "values": [[1.0, None]]}, schema_overrides=SPARSE)
    assert "column 'values': row 0 contains a null entry" in err(df, psc.normalize())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_errors(bad):
    df = sparse_frame([([0], [1.0]), ([0, 3], [1.0, bad])])
    m = err(df, psc.total_counts())
    assert "column 'values'" in m and "non-finite value" in m and "at row 1" in m


def test_negative_counts_are_errors():
    m = err(sparse_frame([([0, 1], [1.0, -2.0])]), psc.normalize())
    assert "column 'values'" in m and "negative count -2" in m


def test_length_mismatch_is_an_error():
    m = err(sparse_frame([([0, 1], [1.0])]), psc.normalize())
    assert "2 gene indices but 1 values" in m and "row 0" in m


@pytest.mark.parametrize("idx", [[3, 1], [1, 1]])
def test_unsorted_or_duplicate_indices_are_errors(idx):
    m = err(sparse_frame([(idx, [1.0, 1.0])]), psc.normalize())
    assert "column 'gene_idx'" in m and "strictly increasing" in m and "sort" in m


def test_model_gene_count_mismatch_is_an_error(model):
    df = sparse_frame([([0, 299], [1.0, 1.0]), ([0, 300], [1.0, 1.0])])
    m = err(df, psc.pca_project(model=model))
    assert "column 'gene_idx'" in m and "gene index 300 is out of range for n_genes=300" in m and "row 1" in m
    assert "select_genes" in m


@pytest.mark.parametrize(
    ("schema", "column"),
    [
        ({"gene_idx": pl.List(pl.Int64), "values": pl.List(pl.Float32)}, "gene_idx"),
        ({"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Int64)}, "values"),
        ({"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Float64)}, "values"),
    ],
)
def test_wrong_dtypes_are_rejected_with_the_cast_to_use(schema, column, model):
    df = pl.DataFrame({"gene_idx": [[0]], "values": [[1]]}, schema=schema)
    for expr in [psc.normalize(), psc.pca_project(model=model), psc.select_genes(genes=[0])]:
        with pytest.raises(pl.exceptions.ComputeError) as e:
            df.lazy().select(expr).collect_schema()  # fails at planning time, before any data moves
        assert f"column '{column}'" in str(e.value) and ".cast(" in str(e.value)


def test_misspelt_or_bad_options_raise():
    with pytest.raises(TypeError, match="target_sums"):
        psc.normalize(target_sums=1e4)
    with pytest.raises(ValueError, match="target_sum"):
        psc.normalize(target_sum=-1)
    with pytest.raises(ValueError, match="target_sum"):
        psc.normalize(target_sum="1e4")
    with pytest.raises(ValueError, match="genes"):
        psc.select_genes(genes=[1, 1])
    with pytest.raises(ValueError, match="flavor"):
        psc.highly_variable_genes(sparse_frame([([0], [1.0])]), n_genes=1, flavor="cell_ranger")
    with pytest.raises(ValueError, match="n_comps"):
        psc.fit_pca(sparse_frame([([0], [1.0])] * 3), n_genes=2, n_comps=3)
    with pytest.raises(ValueError, match="at least 2 cells"):
        psc.fit_pca(sparse_frame([([0], [1.0])]), n_genes=2, n_comps=1)
    with pytest.raises(ValueError, match=r"column\(s\) \['counts'\] not found"):
        psc.fit_pca(sparse_frame([([0], [1.0])]), n_genes=2, n_comps=1, values="counts")


def test_fits_reject_bad_rows_with_names():
    df = sparse_frame([([0], [1.0]), ([5], [1.0])])
    with pytest.raises(ValueError, match="gene index 5 is out of range for n_genes=3"):
        psc.fit_pca(df, n_genes=3, n_comps=1)
    with pytest.raises(ValueError, match="'gene_idx'.*row 1"):
        psc.highly_variable_genes(df, n_genes=3)
    nulls = pl.DataFrame({"gene_idx": [[0], None, [1]], "values": [[1.0], None, [2.0]]}, schema_overrides=SPARSE)
    with pytest.raises(ValueError, match="row 1 is null"):
        psc.fit_pca(nulls, n_genes=2, n_comps=1)
    batch_null = sparse_frame([([0], [1.0]), ([1], [1.0])], batch=["a", None])
    with pytest.raises(ValueError, match="batch column 'batch' is null at row 1"):
        psc.highly_variable_genes(batch_null, n_genes=2, batch_key="batch")


def test_gene_stats_reject_a_batch_column_of_another_length():
    acc = psc._internal.GeneStatsFit(3)
    df = sparse_frame([([0], [1.0]), ([1], [1.0])])
    with pytest.raises(ValueError, match="batch column 'b' has 1 rows but the cells have 2"):
        acc.update(df["gene_idx"], df["values"], pl.Series("b", ["x"]))


def test_eager_frames_large_enough_to_split_match_row_by_row(model):
    """Calls of >= 4 * 65,536 rows run in parallel blocks: same bits as small calls."""
    big = psc.datasets.synthetic_counts(300_000, n_genes=300, umis_per_cell=8, random_state=2)
    whole = big.with_columns(psc.normalize()).with_columns(psc.pca_project(model=model))
    parts = pl.concat([p.with_columns(psc.normalize()).with_columns(psc.pca_project(model=model)) for p in big.iter_slices(50_000)])
    assert_frame_equal(whole, parts)


def test_model_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        psc.pca_project(model=tmp_path / "nope.parquet")
    other = tmp_path / "other.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(other)
    with pytest.raises(ValueError, match="not a polars-singlecell PCA model"):
        psc.PcaModel.load(other)


def test_failed_sink_leaves_no_file(tmp_path):
    good = psc.datasets.synthetic_counts(500, n_genes=50, umis_per_cell=10)
    bad = pl.concat([good, sparse_frame([([1, 0], [1.0, 1.0])], cell_id=["x"], batch=["b"], label=["l"]).select(good.columns)])
    src = tmp_path / "in.parquet"
    bad.write_parquet(src, row_group_size=100)
    out = tmp_path / "out.parquet"
    with pytest.raises(pl.exceptions.ComputeError, match="strictly increasing"):
        psc.sink_parquet(pl.scan_parquet(src).with_columns(psc.normalize()), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_polars_version_gate_names_both_versions():
    check_polars_version("2.1.0", "0.55.2")
    check_polars_version("2.0.3", "0.55.2")
    for v in ["1.30.0", "0.20.1"]:
        with pytest.raises(ImportError) as e:
            check_polars_version(v, "0.55.2")
        assert f"polars {v} is installed" in str(e.value) and "Rust polars 0.55.2" in str(e.value)
    for v in ["2.2.0", "3.0.0"]:  # newer than tested: a warning, the import goes on
        with pytest.warns(RuntimeWarning, match=f"polars {v} is installed: untested"):
            check_polars_version(v, "0.55.2")


def test_synthetic_counts_follow_the_layout():
    df = psc.datasets.synthetic_counts(2000, random_state=3)
    assert df.schema == pl.Schema({"cell_id": pl.String, "batch": pl.String, "label": pl.String, **SPARSE})
    density = df["gene_idx"].list.len().mean() / 2000
    assert 0.08 < density < 0.13
    assert df["values"].explode().min() >= 1
    again = psc.datasets.synthetic_counts(2000, random_state=3)
    assert df.equals(again)


def test_batch_effect_sets_how_far_apart_the_plates_are():
    """The generator's ``batch_effect`` (0.3 by default, the old draws) moves
    the plates' mean log profiles apart; the cells' types stay as they were."""
    base = psc.datasets.synthetic_counts(1500, random_state=4)
    assert base.equals(psc.datasets.synthetic_counts(1500, random_state=4, batch_effect=0.3))

    def plate_gap(effect: float) -> float:
        df = psc.datasets.synthetic_counts(1500, random_state=4, batch_effect=effect).with_columns(psc.normalize())
        means = []
        for _, part in df.group_by("batch", maintain_order=True):
            dense = np.zeros(2000)
            for g, v in zip(part["gene_idx"].explode().to_numpy(), part["values"].explode().to_numpy()):
                dense[g] += v
            means.append(dense / part.height)
        return float(np.mean([np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]))

    assert plate_gap(1.0) > 2 * plate_gap(0.3) > 0
    strong = psc.datasets.synthetic_counts(1500, random_state=4, batch_effect=1.0)
    assert strong["label"].equals(base["label"]) and strong["batch"].equals(base["batch"])
    with pytest.raises(ValueError, match="batch_effect must be a number in"):
        psc.datasets.synthetic_counts(10, batch_effect=-1)


def test_the_demo_runs_and_draws(tmp_path, capsys):
    from polars_singlecell.__main__ import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-cells", "6000"]) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in re.search(r"batch entropy \(0-1\) ([\d.]+) -> ([\d.]+)", out).groups())
    assert before < 0.2 and after > 0.7  # plates apart before (the demo's strong plate effect), mixed after
    assert (tmp_path / "demo" / "before_after.png").read_bytes()[:4] == b"\x89PNG"
