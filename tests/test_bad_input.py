"""Issue 8: bad input thrown at every public function.

Property tests (hypothesis, derandomized so CI sees the same cases every run)
generate frames where any row may be null on one side, hold inner nulls,
NaN/±Inf, negative counts, ragged, unsorted, duplicate or out-of-range gene
indices. Each call must either return exactly what a numpy reference computes
from the same rows, or raise the documented exception naming the column and
a row that really is bad. A Rust panic (pyo3's PanicException is a
BaseException) fails every test here. The table at the end pins the exception
type and message of each explicit case docs/guarantees.md lists.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polars_singlecell as psc
from conftest import SPARSE

N_GENES = 12
PROPS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------- sparse rows

value = st.one_of(
    st.integers(0, 40).map(float),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0]),
)
good_cell = st.sets(st.integers(0, N_GENES - 1), max_size=6).flatmap(
    lambda s: st.tuples(st.just(sorted(s)), st.lists(st.integers(0, 40).map(float), min_size=len(s), max_size=len(s)))
)
any_side_idx = st.one_of(st.none(), st.lists(st.one_of(st.integers(0, N_GENES + 2), st.none()), max_size=6))
any_side_val = st.one_of(st.none(), st.lists(st.one_of(value, st.none()), max_size=6))


@st.composite
def one_flaw(draw):
    """A good cell with one flaw, so that each check is met on its own."""
    idx, val = draw(good_cell.filter(lambda c: len(c[0]) >= 2))
    idx, val = list(idx), list(val)
    at = draw(st.integers(0, len(idx) - 1))
    flaw = draw(st.sampled_from(["value", "inner_null_idx", "inner_null_val", "dup", "swap", "beyond", "short", "null_side"]))
    if flaw == "value":
        val[at] = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0]))
    elif flaw == "inner_null_idx":
        idx[at] = None
    elif flaw == "inner_null_val":
        val[at] = None
    elif flaw == "dup":
        idx[1] = idx[0]
    elif flaw == "swap":
        idx[0], idx[1] = idx[1], idx[0]
    elif flaw == "beyond":
        idx[-1] = N_GENES + draw(st.integers(0, 3))
    elif flaw == "short":
        val.pop()
    else:
        return draw(st.sampled_from([(idx, None), (None, val)]))
    return idx, val


@st.composite
def cells_with_flaws(draw):
    """Mostly good cells (and null ones) with 0–2 flawed cells at random rows:
    few enough that a frame whose only flaw is, say, one negative count is common."""
    cells = draw(st.lists(st.one_of(good_cell, good_cell, good_cell, st.just((None, None))), max_size=20))
    for flawed in draw(st.lists(st.one_of(one_flaw(), one_flaw(), st.tuples(any_side_idx, any_side_val)), max_size=2)):
        cells.insert(draw(st.integers(0, len(cells))), flawed)
    return cells

def bad_rows(cells, *, n_genes: int | None, negative_is_bad: bool) -> set[int]:
    """The rows that break the layout contract (DATA.md), written apart from the code under test."""
    bad = set()
    for r, (idx, val) in enumerate(cells):
        if idx is None and val is None:
            continue
        if idx is None or val is None or None in idx or None in val or len(idx) != len(val) or any(b <= a for a, b in itertools.pairwise(idx)) or (n_genes is not None and any(i >= n_genes for i in idx)) or any(not math.isfinite(v) for v in val) or (negative_is_bad and any(v < 0 for v in val)):
            bad.add(r)
    return bad


def frame(cells) -> pl.DataFrame:
    return pl.DataFrame({"gene_idx": [c[0] for c in cells], "values": [c[1] for c in cells]}, schema=SPARSE)


def check_error(message: str, bad: set[int], columns=("'gene_idx'", "'values'")) -> None:
    assert bad, f"refused good input: {message}"
    assert any(c in message for c in columns), message
    named = {int(n) for n in re.findall(r"\brow (\d+)", message)}
    assert named and named <= bad, f"{message} (bad rows {sorted(bad)})"


def dense(cells) -> np.ndarray:
    x = np.zeros((len(cells), N_GENES + 4), dtype=np.float64)  # room for indices beyond n_genes (valid where none is given)
    for r, (idx, val) in enumerate(cells):
        if idx is not None:
            x[r, idx] = val
    return x


@pytest.fixture(scope="module")
def pca_model():
    rng = np.random.default_rng(0)
    cells = [(sorted(rng.choice(N_GENES, 5, replace=False).tolist()), rng.integers(1, 9, 5).astype(float).tolist()) for _ in range(50)]
    return psc.fit_pca(frame(cells), n_genes=N_GENES, n_comps=3)


@PROPS
@given(cells=cells_with_flaws())
def test_sparse_expressions_are_exact_or_name_a_bad_row(cells, pca_model):
    df = frame(cells)
    nulls = [c[0] is None and c[1] is None for c in cells]
    ops = {
        "total_counts": (psc.total_counts(), None, False),
        "normalize": (psc.normalize(target_sum=1e4), None, True),
        "pca_project": (psc.pca_project(model=pca_model), N_GENES, False),
        "select_genes": (psc.select_genes(genes=[1, 4, 7]), None, False),
    }
    for op, (expr, n_genes, negative_is_bad) in ops.items():
        bad = bad_rows(cells, n_genes=n_genes, negative_is_bad=negative_is_bad)
        try:
            out = df.select(expr)
        except pl.exceptions.ComputeError as e:
            check_error(str(e), bad)
            continue
        assert not bad, f"{op} accepted bad rows {sorted(bad)}"
        col = out.to_series()
        if op == "select_genes":  # a struct of the pair; its fields carry the nulls
            col = col.struct.field("gene_idx")
        assert col.len() == len(cells) and col.is_null().to_list() == nulls, op
        x = dense(cells)
        if op == "total_counts":
            np.testing.assert_allclose(col.fill_null(0).to_numpy(), x.sum(axis=1), rtol=1e-6)
        elif op == "normalize":
            tot = x.sum(axis=1, keepdims=True)
            want = np.log1p(np.divide(x * 1e4, tot, out=np.zeros_like(x), where=tot > 0))
            np.testing.assert_allclose(dense(list(zip(df["gene_idx"].to_list(), col.to_list()))), want, rtol=1e-5, atol=1e-6)
        elif op == "pca_project":
            got = np.array([r if r is not None else [0.0] * 3 for r in col.to_list()], dtype=np.float64).reshape(-1, 3)
            want = (x[:, :N_GENES] - pca_model.mean) @ pca_model.components.T
            want[nulls] = 0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            # Selected genes renumbered by their place in genes=[1, 4, 7]; others dropped.
            kept = [[[1, 4, 7].index(i) for i in c[0] if i in (1, 4, 7)] if c[0] is not None else None for c in cells]
            assert col.to_list() == kept


@PROPS
@given(cells=cells_with_flaws())
def test_fits_accept_exactly_the_good_frames(cells):
    df = frame(cells)
    bad = bad_rows(cells, n_genes=N_GENES, negative_is_bad=False)
    null_rows = {r for r, c in enumerate(cells) if c == (None, None)}
    for fit in (lambda: psc.highly_variable_genes(df, n_genes=N_GENES, n_top_genes=3),
                lambda: psc.fit_pca(df, n_genes=N_GENES, n_comps=1)):
        try:
            fit()
        except ValueError as e:
            msg = str(e)
            if "at least" in msg or "no cells" in msg:  # too few cells: nothing to name
                assert len(cells) - len(null_rows) < 2 or not cells, msg
                continue
            # Fits take every row: a null cell is bad too (its message names the row, not a column).
            if named_null := {int(n) for n in re.findall(r"\brow (\d+) is null", msg)}:
                assert named_null <= null_rows and "drop_nulls" in msg, msg
            else:
                check_error(msg, bad)
        else:
            assert not bad and not null_rows


# ------------------------------------------------------------------ embeddings

entry = st.one_of(st.floats(-5, 5, width=32), st.floats(-5, 5, width=32), st.sampled_from([math.nan, math.inf, -math.inf]))
emb_row = st.one_of(st.lists(entry, min_size=4, max_size=4), st.lists(st.floats(-5, 5, width=32), min_size=4, max_size=4), st.none())


@pytest.fixture(scope="module")
def integration():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    cells = pl.DataFrame({"X_pca": x, "batch": ["a"] * 60 + ["b"] * 60}).with_columns(pl.col("X_pca").cast(pl.Array(pl.Float32, 4)))
    return psc.fit_integration(psc.fit_centroids(cells, n_centroids=6))


@PROPS
@given(rows=st.lists(emb_row, max_size=30), batches=st.lists(st.sampled_from(["a", "b", None]), min_size=30, max_size=30),
       k=st.integers(1, 6))
def test_embedding_expressions_are_finite_or_name_a_bad_row(rows, batches, k, integration):
    df = pl.DataFrame({"X_pca": rows, "batch": batches[: len(rows)]},
                      schema={"X_pca": pl.Array(pl.Float32, 4), "batch": pl.String})
    nonfinite = {r for r, x in enumerate(rows) if x is not None and not all(math.isfinite(v) for v in x)}
    null = {r for r, x in enumerate(rows) if x is None}
    no_batch = {r for r, b in enumerate(batches[: len(rows)]) if b is None}
    cases = {
        # Expressions on embeddings take every cell (docs/guarantees.md: a null cell is an error naming its row).
        "knn_interpolate": (lambda: df.with_columns(psc.knn_interpolate(model=integration, k=k)), nonfinite | no_batch | null),
        "knn": (lambda: df.with_columns(psc.knn(model=integration, k=k)), nonfinite | null),
        "kmeans_centroids": (lambda: df.select(psc.kmeans_centroids(n_centroids=k)), nonfinite | null),
    }
    for op, (run, bad) in cases.items():
        try:
            out = run()
        except pl.exceptions.ComputeError as e:
            check_error(str(e), bad, columns=("'X_pca'", "'batch'"))
            continue
        assert not bad, f"{op} accepted bad rows {sorted(bad)}"
        if op == "knn_interpolate":
            moved = out["X_ot"]
            assert moved.null_count() == 0 and np.isfinite(moved.to_numpy()).all()
            # Each cell moves by a convex combination of its batch's displacements: never further than the largest.
            longest = np.linalg.norm(integration.table["displacement"].to_numpy(), axis=1).max()
            step = np.linalg.norm(moved.to_numpy() - np.asarray(rows, dtype=np.float32).reshape(-1, 4), axis=1)
            assert (step <= longest * (1 + 1e-5) + 1e-6).all()
        elif op == "knn":  # the k nearest centroids, as brute force finds them
            x = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
            c = integration.table["centroid"].to_numpy().astype(np.float64)
            want = np.sort(np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1)), axis=1)[:, :k]
            got = np.array(out["knn"].struct.field(out["knn"].struct.fields[1]).to_list(), dtype=np.float64).reshape(-1, k)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        elif op == "kmeans_centroids":
            cents = out.unnest("centroids").explode("centroid", "mass").drop_nulls()
            assert cents.height == min(k, len({tuple(r) for r in rows}))
            assert math.isclose(cents["mass"].sum(), len(rows))


# --------------------------------------------------------- explicit cases

def _emb(n: int, d: int = 4, batch: str = "a") -> pl.DataFrame:
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    return pl.DataFrame({"X_pca": x, "batch": [batch] * n}).with_columns(pl.col("X_pca").cast(pl.Array(pl.Float32, d)))


def _model_files(tmp: Path, integration, pca_model) -> dict[str, Path]:
    good = _emb(50)
    good.write_parquet(tmp / "cells.parquet")
    whole = (tmp / "cells.parquet").read_bytes()
    (tmp / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp / "junk.parquet").write_bytes(b"this is not parquet")
    integration.write_parquet(tmp / "integration.parquet")
    pca_model.save(tmp / "pca.parquet")
    return {p.stem: p for p in tmp.iterdir()}


CASES = {
    # empty frames, single cells, tiny batches
    "fit_pca of one cell": (lambda f, m: psc.fit_pca(frame([([0], [1.0])]), n_genes=3, n_comps=1), ValueError, ["at least 2 cells"]),
    "hvg of no cells": (lambda f, m: psc.highly_variable_genes(frame([]), n_genes=3), ValueError, ["no cells"]),
    "fit_centroids of no cells": (lambda f, m: psc.fit_centroids(_emb(0)), ValueError, ["no cells", "'X_pca'"]),
    "kmeans_centroids of no rows": (lambda f, m: _emb(0).select(psc.kmeans_centroids(n_centroids=3)).unnest("centroids")
                                    .pipe(lambda d: None if d["centroid"].list.len().item() == 0 else 1 / 0), None, []),
    "evaluate of too few cells": (lambda f, m: psc.metrics.evaluate(_emb(5), ["X_pca"]), ValueError, ["n_neighbors=90", "got 5"]),
    "fit_integration of one batch": (lambda f, m: psc.fit_integration(psc.fit_centroids(_emb(30), n_centroids=4)), ValueError, ["batch"]),
    # k / n_centroids out of range, unknown options
    "knn_interpolate k=0": (lambda f, m: psc.knn_interpolate(model=m["integration"], k=0), ValueError, ["k must be a positive integer", "0"]),
    "knn_interpolate k > centroids": (lambda f, m: psc.knn_interpolate(model=m["integration"], k=99), ValueError, ["k=99"]),
    "kmeans n_centroids=0": (lambda f, m: psc.kmeans_centroids(n_centroids=0), ValueError, ["n_centroids", "got 0"]),
    "evaluate n_neighbors=0": (lambda f, m: psc.metrics.evaluate(_emb(50), ["X_pca"], n_neighbors=0), ValueError, ["n_neighbors", "got 0"]),
    "misspelt option": (lambda f, m: psc.fit_centroids(_emb(9), n_centroid=3), TypeError, ["n_centroid"]),
    "unknown mode": (lambda f, m: psc.knn_interpolate(model=m["integration"], mode="pool"), ValueError, ["mode", "'pool'"]),
    "unknown device": (lambda f, m: psc.pca_project(model=m["pca"], device="gpu"), ValueError, ["device", "'gpu'"]),
    # wrong dtypes: rejected with the cast to use
    "Float64 embedding": (lambda f, m: psc.fit_centroids(_emb(9).with_columns(pl.col("X_pca").cast(pl.Array(pl.Float64, 4)))),
                          ValueError, ["'X_pca'", "Float64", ".cast(pl.Array(pl.Float32, 4))"]),
    "Int64 counts": (lambda f, m: psc.fit_pca(pl.DataFrame({"gene_idx": [[0]], "values": [[1]]},
                                                           schema={"gene_idx": pl.List(pl.UInt32), "values": pl.List(pl.Int64)}),
                                              n_genes=2, n_comps=1), ValueError, ["'values'", ".cast(pl.List(pl.Float32))"]),
    # a model from another dataset
    "cells of another width": (lambda f, m: _emb(5, d=3).with_columns(psc.knn_interpolate(model=m["integration"])),
                               pl.exceptions.ComputeError, ["'X_pca' has width 3", "centroids have 4"]),
    "a batch the model lacks": (lambda f, m: _emb(5, batch="plate9").with_columns(psc.knn_interpolate(model=m["integration"])),
                                pl.exceptions.ComputeError, ["'plate9'", "unknown_batch='pooled'"]),
    "genes beyond the PCA model": (lambda f, m: frame([([0, 40], [1.0, 1.0])]).with_columns(psc.pca_project(model=m["pca"])),
                                   pl.exceptions.ComputeError, ["gene index 40 is out of range", "select_genes"]),
    "integration model as PCA model": (lambda f, m: psc.PcaModel.load(m["integration"]), ValueError, ["not a polars-singlecell PCA model"]),
    "PCA model as integration model": (lambda f, m: psc.IntegrationModel.read_parquet(m["pca"]), ValueError, ["no column 'centroid'"]),
    # truncated / corrupt / missing files: each names the file
    "cut-short cells": (lambda f, m: psc.fit_centroids(m["cut"]), ValueError, ["cut.parquet", "not a Parquet file, or it was cut short"]),
    "junk cells": (lambda f, m: psc.integrate(m["junk"], f / "out", log=None), ValueError, ["junk.parquet", "not a Parquet file, or it was cut short"]),
    "cut-short PCA model": (lambda f, m: psc.pca_project(model=m["cut"]), ValueError, ["cut.parquet"]),
    "cut-short integration model": (lambda f, m: psc.knn_interpolate(model=m["cut"]), ValueError, ["cut.parquet"]),
    "junk h5ad": (lambda f, m: psc.io.h5ad_to_parquet(m["junk"], f / "x.parquet"), ValueError, ["junk.parquet", "HDF5"]),
    "missing source": (lambda f, m: psc.integrate(f / "nope", f / "out", log=None), FileNotFoundError, ["nope"]),
    "missing model": (lambda f, m: psc.pca_project(model=f / "nope.parquet"), FileNotFoundError, ["nope.parquet"]),
    "missing cells": (lambda f, m: psc.fit_centroids(f / "nope.parquet"), FileNotFoundError, ["nope.parquet"]),
    "output under a file": (lambda f, m: psc.integrate(m["cells"], m["cells"] / "out", log=None), NotADirectoryError, ["cells.parquet"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_gets_its_documented_exception(case, tmp_path, integration, pca_model):
    files = _model_files(tmp_path, integration, pca_model)
    run, exc, fragments = CASES[case]
    if exc is None:
        run(tmp_path, files)
        return
    with pytest.raises(exc) as e:
        run(tmp_path, files)
    for frag in fragments:
        assert frag in str(e.value), f"{frag!r} not in {e.value}"


def test_kmeans_in_group_by_names_the_column():
    """Polars hands a group's Series to the plugin unnamed; the message still
    names it, and says its row counts from the group's first."""
    df = pl.concat([_emb(20, batch="a"), _emb(20, batch="b")])
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 23).then(None).otherwise(pl.col("X_pca")).alias("X_pca"))
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'X_pca' is null at row 3.*rows count from the group's first"):
        df.group_by("batch").agg(psc.kmeans_centroids(n_centroids=2))
    assert _emb(0).group_by("batch").agg(psc.kmeans_centroids(n_centroids=2)).height == 0


# ---------------------------------------------------- full disk, unwritable

def _limit_file_size(limit: int):
    def apply():
        # A write past the limit fails with EFBIG, as a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_reported_and_leaves_no_file(tmp_path):
    code = f"""
import numpy as np, polars as pl, polars_singlecell as psc
df = pl.DataFrame({{"a": np.arange(2_000_000, dtype=np.float64)}})
for name, write in [("w", lambda p: psc.io.write_parquet(df, p)), ("s", lambda p: psc.sink_parquet(df.lazy(), p))]:
    try:
        write({str(tmp_path)!r} + f"/{{name}}.parquet")
    except OSError as e:
        print(type(e).__name__, e.errno, e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=_limit_file_size(300_000), check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    for line, name in zip(lines, ["w", "s"]):
        assert line.startswith("OSError 27 ") and f"cannot write {tmp_path}/{name}.parquet" in line and "ulimit -f" in line
    assert list(tmp_path.iterdir()) == []


def test_integrate_on_a_full_disk_says_so_and_the_rerun_finishes(tmp_path):
    src = tmp_path / "cells.parquet"
    psc.datasets.synthetic_counts(3000, n_genes=200, umis_per_cell=30, random_state=4).write_parquet(src)
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "polars_singlecell", "integrate", str(src), str(out), "--n-top-genes", "100",
           "--n-comps", "10", "--n-centroids", "20"]
    env = {**os.environ, "POLARS_MAX_THREADS": "2"}
    full = subprocess.run(cli, capture_output=True, text=True, env=env, preexec_fn=_limit_file_size(150_000), check=False)
    assert full.returncode == 2, full.stdout + full.stderr
    assert "cannot write" in full.stderr and "File too large" in full.stderr and "Traceback" not in full.stderr
    report = out / "report.json"
    done = set(__import__("json").loads(report.read_text())["stages"]) if report.exists() else set()
    assert "interpolate" not in done
    for f in out.iterdir():  # whatever is there under a final name is complete
        if f.suffix == ".parquet":
            pl.read_parquet(f)
    again = subprocess.run(cli, capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 0, again.stderr
    assert pl.read_parquet(out / "cells.parquet").height == 3000


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_any_work(tmp_path):
    src = tmp_path / "cells.parquet"
    psc.datasets.synthetic_counts(100, n_genes=50, umis_per_cell=10).write_parquet(src)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write"):
            psc.integrate(src, ro, log=None)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("dtype", [pl.Decimal(10, 2), pl.Float16])
def test_rare_value_dtypes_are_named_not_a_panic(dtype):
    """Every Polars dtype crosses into the plugin (Cargo.toml keeps
    dtype-full for this): without it, a Decimal or Float16 column made the
    plugin panic at the boundary, before any check could name it."""
    df = pl.DataFrame({"gene_idx": pl.Series([[0, 1]], dtype=pl.List(pl.UInt32)),
                       "values": pl.Series([[1.5, 2.5]], dtype=pl.List(dtype))})
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'values' has dtype list\[.*expected list\[f32\]: cast it"):
        df.select(psc.normalize())


def test_to_cells_reads_wide_and_narrow_number_types():
    ids = pl.Series("genes", [[2, 1]], dtype=pl.List(pl.Int128))
    out = pl.DataFrame([ids, pl.Series("expressions", [[1.5, 2.5]], dtype=pl.List(pl.Float16))]).select(
        psc.to_cells("genes", "expressions", n_genes=10)).unnest("genes")
    assert out.to_dicts() == [{"gene_idx": [1, 2], "values": [2.5, 1.5]}]
    decimal = pl.DataFrame([ids, pl.Series("expressions", [[1.5, 2.5]], dtype=pl.List(pl.Decimal(10, 2)))])
    with pytest.raises(pl.exceptions.ComputeError, match=r"column 'expressions' has dtype list\[decimal"):
        decimal.select(psc.to_cells("genes", "expressions", n_genes=10))
