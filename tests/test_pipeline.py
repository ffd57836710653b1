"""psc.integrate: the whole pipeline on generated counts, resume after an
interruption or a changed parameter, bad input."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import polars as pl
import pytest

import polars_singlecell as psc
from polars_singlecell import _files

SMALL = dict(n_top_genes=200, n_comps=15, n_centroids=32, log=None)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    return psc.datasets.write_synthetic_counts(d / "raw", 6000, n_genes=500, umis_per_cell=200, random_state=4, rows_per_file=2500)


def test_integrates_and_reports(raw, tmp_path):
    report = psc.integrate(raw, tmp_path / "out", label_key="label", **SMALL)
    cells = pl.read_parquet(tmp_path / "out" / "cells.parquet")
    source = pl.read_parquet(raw / "*.parquet")
    assert cells.columns == ["cell_id", "batch", "label", "X_pca", "X_ot"]
    assert cells["cell_id"].equals(source["cell_id"])  # every cell, in order
    assert cells.schema["X_ot"] == pl.Array(pl.Float32, 15)
    assert cells["X_ot"].null_count() == 0
    m = {(r["embedding"], r["metric"]): r["value"] for r in report["stages"]["interpolate"]["evaluate"]}
    assert m["X_ot", "batch_entropy_norm"] > m["X_pca", "batch_entropy_norm"] + 0.1
    assert m["X_ot", "label_purity"] >= 0.98 * m["X_pca", "label_purity"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(on_disk["stages"]) == list(psc.pipeline.STAGES)
    assert on_disk["stages"]["genes"]["n_genes"] == 500  # from raw_genes.parquet beside the folder
    assert on_disk["stages"]["centroids"]["n_centroids"] == 3 * 32
    assert on_disk["parameters"]["pca"]["n_comps"] == 15 and on_disk["versions"]["polars"] == pl.__version__
    assert all(s["seconds"] >= 0 for s in on_disk["stages"].values())
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_rerun_resumes_and_a_changed_parameter_redoes_only_what_it_touches(raw, tmp_path):
    out = tmp_path / "out"
    psc.integrate(raw, out, **SMALL)
    stamp = {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")}
    again = psc.integrate(raw, out, **SMALL)
    assert all(s.get("resumed") for s in again["stages"].values())
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.parquet")} == stamp
    changed = psc.integrate(raw, out, **(SMALL | {"n_centroids": 24}))
    resumed = [name for name, s in changed["stages"].items() if s.get("resumed")]
    assert resumed == ["genes", "pca", "project"]
    assert pl.read_parquet(out / "centroids.parquet").height == 3 * 24


def test_an_interrupted_run_leaves_no_stage_that_looks_done_and_resumes(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of the integration stage

    monkeypatch.setattr(psc.pipeline, "fit_integration", boom)  # the name integrate calls
    with pytest.raises(KeyboardInterrupt):
        psc.integrate(raw, out, **SMALL)
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == ["genes", "pca", "project", "centroids"]
    assert not (out / "integration.parquet").exists() and not (out / "cells.parquet").exists()
    monkeypatch.undo()
    done = psc.integrate(raw, out, **SMALL)
    assert [n for n, s in done["stages"].items() if s.get("resumed")] == ["genes", "pca", "project", "centroids"]
    assert pl.read_parquet(out / "cells.parquet").height == 6000


def test_a_killed_run_leaves_only_complete_files_and_resumes(tmp_path):
    """SIGKILL (no cleanup runs) in the middle of the pipeline: report.json
    still parses, every stage it lists has readable outputs, no file under a
    final name is truncated, and a re-run resumes to the same cells as a run
    that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = psc.datasets.write_synthetic_counts(tmp_path / "raw", 40_000, n_genes=500, umis_per_cell=200, random_state=5,
                                              rows_per_file=10_000)
    out = tmp_path / "out"
    args = ["--n-top-genes", "200", "--n-comps", "15", "--n-centroids", "64"]
    cmd = [sys.executable, "-m", "polars_singlecell", "integrate", str(raw), str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    report = out / "report.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if report.is_file() and "pca" in json.loads(report.read_text())["stages"]:
            break  # the projection stage is writing cells_pca.parquet now
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(report.read_text())["stages"]
    assert list(done) == list(psc.pipeline.STAGES)[: len(done)] and len(done) < len(psc.pipeline.STAGES)
    for stage in done.values():
        for f in stage["outputs"]:
            pl.read_parquet(out / f)  # complete and readable
    for f in out.glob("*.parquet"):
        pl.read_parquet(f)  # nothing truncated under a final name

    # Where the kill lands inside a sink, its temporary file stays; make sure one does.
    (out / ".cells_pca.parquet.0badf00d.tmp").write_bytes(b"PAR1 half a file")
    again = psc.integrate(raw, out, n_top_genes=200, n_comps=15, n_centroids=64, log=None)
    assert [n for n, s in again["stages"].items() if s.get("resumed")] == list(done)
    assert not list(out.glob(".*.tmp"))  # the killed run's temporary files are gone
    clean = psc.integrate(raw, tmp_path / "clean", n_top_genes=200, n_comps=15, n_centroids=64, log=None)
    assert clean["stages"]["interpolate"]["outputs"] == ["cells.parquet"]
    assert pl.read_parquet(out / "cells.parquet").equals(pl.read_parquet(tmp_path / "clean" / "cells.parquet"))


def test_a_deleted_output_is_recomputed(raw, tmp_path):
    out = tmp_path / "out"
    psc.integrate(raw, out, **SMALL)
    (out / "pca.parquet").unlink()
    again = psc.integrate(raw, out, **SMALL)
    assert [n for n, s in again["stages"].items() if s.get("resumed")] == ["genes"]


@pytest.mark.parametrize(
    "source, kwargs, error, match",
    [
        ("missing", {}, FileNotFoundError, "no Parquet files"),
        (None, {"batch_key": "plate"}, ValueError, "no column 'plate'"),
        (None, {"label_key": "celltype"}, ValueError, "no column 'celltype'"),
        (None, {"device": "gpu"}, ValueError, "device must be 'cpu' or 'cuda'"),
    ],
)
def test_bad_input(raw, tmp_path, source, kwargs, error, match):
    with pytest.raises(error, match=match):
        psc.integrate(tmp_path / source if source else raw, tmp_path / "out", **(SMALL | kwargs))


def test_command_line(raw, tmp_path, capsys):
    from polars_singlecell.__main__ import main

    assert main(["integrate", str(raw), str(tmp_path / "out"), "--n-top-genes", "200", "--n-comps", "15",
                 "--n-centroids", "32"]) == 0
    assert pl.read_parquet(tmp_path / "out" / "cells.parquet").height == 6000
    assert "done in" in capsys.readouterr().out
    assert main(["integrate", str(raw), str(tmp_path / "out2"), "--batch-key", "plate"]) == 2
    assert "no column 'plate'" in capsys.readouterr().err


def test_command_line_documents_itself_and_passes_integration_options(raw, tmp_path, capsys, monkeypatch):
    from polars_singlecell.__main__ import main

    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no wrapping inside "(default: ...)"
    with pytest.raises(SystemExit):
        main(["integrate", "--help"])
    text = capsys.readouterr().out
    for option, default in [("--n-comps", "50"), ("--epsilon", "0.05"), ("--reg-m", "2.0"), ("--device {cpu,cuda}", "cpu")]:
        assert option in text and f"(default: {default})" in text, option
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith(f"polars-singlecell {psc.__version__} (")
    with pytest.raises(SystemExit):
        main(["integrate", str(raw), str(tmp_path / "x"), "--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    assert main(["integrate", str(raw), str(tmp_path / "eps"), "--n-top-genes", "200", "--n-comps", "15",
                 "--n-centroids", "32", "--epsilon", "0.1", "--reg-m", "inf", "--no-progress"]) == 0
    report = json.loads((tmp_path / "eps" / "report.json").read_text())
    assert report["parameters"]["integration"] == {"epsilon": 0.1, "reg_m": float("inf")}


def test_tahoe_like_counts_follow_the_design(tmp_path):
    out = psc.datasets.tahoe_like(20_000, tmp_path / "t", n_genes=300, rows_per_file=7000, random_state=5)
    df = pl.read_parquet(out / "part-*.parquet")
    assert df.height == 20_000 and df["cell_id"].n_unique() == 20_000
    assert len(list(out.glob("part-*.parquet"))) == 3
    design = psc.datasets.tahoe_design()
    # plate sizes follow the design (multinomial: within 5 standard errors)
    want = design.group_by("plate").agg(pl.col("n_cells").sum() / design["n_cells"].sum() * 20_000)
    got = df.group_by("plate").len().join(want, on="plate")
    assert ((got["len"] - got["n_cells"]).abs() <= 5 * got["n_cells"].sqrt() + 1).all()
    # every plate lacks exactly 5 lines (some rare lines may also draw no cell)
    assert df.group_by("plate").agg(pl.col("cell_line").n_unique())["cell_line"].max() <= 45
    # sparse layout: sorted unique gene indices, positive counts
    assert df["gene_idx"].list.eval(pl.element().diff().drop_nulls().min() > 0).explode().fill_null(True).all()
    assert df["values"].list.min().min() >= 1 and df["gene_idx"].list.max().max() < 300
    effects = pl.read_parquet(out / "plate_effects.parquet")
    assert effects.height == 14 * 300 and (effects["factor"] > 0).all()
    again = psc.datasets.tahoe_like(20_000, tmp_path / "u", n_genes=300, rows_per_file=7000, random_state=5)
    assert pl.read_parquet(again / "part-*.parquet").equals(df)


def test_integrate_tahoe_like_counts(tmp_path):
    """The pipeline on Tahoe-shaped counts: plates mix, lines stay apart."""
    raw = psc.datasets.tahoe_like(30_000, tmp_path / "raw", n_genes=500, random_state=1)
    report = psc.integrate(raw, tmp_path / "out", batch_key="plate", label_key="cell_line", n_top_genes=300,
                           n_comps=20, n_centroids=64, log=None)
    m = {(r["embedding"], r["metric"]): r["value"] for r in report["stages"]["interpolate"]["evaluate"]}
    assert report["stages"]["genes"]["n_genes"] == 500  # from genes.parquet in the folder
    assert m["X_ot", "batch_entropy_norm"] > m["X_pca", "batch_entropy_norm"] + 0.1
    assert m["X_ot", "label_purity"] >= 0.98 * m["X_pca", "label_purity"]


def test_every_stage_same_bits_at_one_and_two_threads(raw, tmp_path):
    """The whole pipeline in fresh processes at POLARS_MAX_THREADS=1 and 2:
    every output table and every metric in report.json identical."""
    import os
    import subprocess
    import sys

    outs = {}
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        env = os.environ | {"POLARS_MAX_THREADS": threads, "RAYON_NUM_THREADS": threads,
                            "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-m", "polars_singlecell", "integrate", str(raw), str(out), "--label-key", "label",
                        "--n-top-genes", "200", "--n-comps", "15", "--n-centroids", "32"], check=True, env=env,
                       capture_output=True)
        outs[threads] = out
    files = sorted(f.name for f in outs["1"].glob("*.parquet"))
    assert files == sorted(f.name for f in outs["2"].glob("*.parquet")) and "cells.parquet" in files
    for f in files:
        assert pl.read_parquet(outs["1"] / f).equals(pl.read_parquet(outs["2"] / f)), f
    r1, r2 = (json.loads((o / "report.json").read_text())["stages"] for o in outs.values())
    for r in (r1, r2):
        r["integration"]["metrics"].pop("seconds")  # wall time, the only thing allowed to differ
    for name in psc.pipeline.STAGES:
        for key in ("fingerprint", "metrics", "evaluate", "explained_variance_ratio", "n_centroids"):
            assert r1[name].get(key) == r2[name].get(key), (name, key)


def test_plot_embedding_draws_the_seeded_sample_and_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    cells = pl.DataFrame({
        "batch": rng.choice(["p1", "p2", "p3"], n), "label": rng.choice(["A", "B"], n),
        "X_pca": rng.normal(size=(n, 5)).astype(np.float32), "X_ot": rng.normal(size=(n, 5)).astype(np.float32),
    }).with_columns(pl.col("X_pca", "X_ot").cast(pl.Array(pl.Float32, 5)))
    cells.write_parquet(tmp_path / "cells.parquet")
    png = tmp_path / "plots" / "before_after.png"
    fig = psc.plot.embedding(tmp_path / "cells.parquet", components=(1, 3), max_cells=1000, path=png)
    assert [ax.get_title() for ax in fig.axes] == ["X_pca by batch", "X_pca by label", "X_ot by batch", "X_ot by label"]
    drawn = fig.axes[0].collections[0].get_offsets()
    assert drawn.shape == (1000, 2)
    # The sample is metrics.evaluate's (rows whose seeded hash is smallest), here components 1 and 3.
    want = _files.seeded_sample(cells.lazy(), 1000, 0).collect()["X_pca"].to_numpy()[:, [1, 3]]
    assert sorted(map(tuple, np.asarray(drawn))) == sorted(map(tuple, want))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in png.parent.iterdir()] == [png.name]
    with pytest.raises(ValueError, match="no column 'X_umap'"):
        psc.plot.embedding(cells, basis=["X_umap"])
    with pytest.raises(ValueError, match=r"components \(0, 5\)"):
        psc.plot.embedding(cells, components=(0, 5))


def test_plot_umap_keeps_apart_what_is_apart(monkeypatch):
    """basis="umap": a UMAP of X_pca and of X_ot on the sample; two
    populations far apart stay apart in it; seeded, so the same picture twice."""
    pytest.importorskip("umap")
    rng = np.random.default_rng(1)
    n = 600
    label = rng.choice(["A", "B"], n)
    x = rng.normal(size=(n, 8)) + 12.0 * (label == "B")[:, None]
    cells = pl.DataFrame({"batch": rng.choice(["p1", "p2"], n), "label": label,
                          "X_pca": x.astype(np.float32), "X_ot": (x + 1.0).astype(np.float32)}).with_columns(
        pl.col("X_pca", "X_ot").cast(pl.Array(pl.Float32, 8)))
    fig = psc.plot.embedding(cells, basis="umap", color=["label"], max_cells=400)
    assert [ax.get_title() for ax in fig.axes] == ["UMAP of X_pca by label", "UMAP of X_ot by label"]
    xy = np.asarray(fig.axes[0].collections[0].get_offsets())
    seeded = _files.seeded_sample(cells.lazy(), 400, 0).collect()
    drawn = seeded.sample(fraction=1.0, shuffle=True, seed=0)["label"].to_numpy()  # the drawing order
    a, b = xy[drawn == "A"], xy[drawn == "B"]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    assert gap > 3 * max(a.std(0).max(), b.std(0).max())
    again = psc.plot.embedding(cells, basis=["umap:X_pca"], color=["label"], max_cells=400)
    assert np.array_equal(np.asarray(again.axes[0].collections[0].get_offsets()), xy)
    assert seeded.height == 400
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(ImportError, match=r"needs umap-learn: pip install 'polars-singlecell\[umap\]'"):
        psc.plot.embedding(cells, basis="umap")


def test_progress_bars_count_every_cell_and_change_no_output(raw, tmp_path, capsys):
    psc.integrate(raw, tmp_path / "quiet", **SMALL)
    capsys.readouterr()
    psc.integrate(raw, tmp_path / "bars", **SMALL | {"progress": True})
    lines = capsys.readouterr().err.strip().splitlines()  # not a terminal: one final line per stage
    stages = [ln.split()[0] for ln in lines]
    assert stages == ["genes", "pca", "project", "centroids", "interpolate"], lines
    for ln in lines:
        assert re.search(r" 6,000/6,000 cells 100\.0%  [\d,]+ cells/s  [\d.]+s$", ln), ln
    for f in ["genes.parquet", "pca.parquet", "cells_pca.parquet", "centroids.parquet", "integration.parquet", "cells.parquet"]:
        assert pl.read_parquet(tmp_path / "bars" / f).equals(pl.read_parquet(tmp_path / "quiet" / f)), f
    # A resumed run reads no cells: no bars.
    psc.integrate(raw, tmp_path / "bars", **SMALL | {"progress": True})
    assert capsys.readouterr().err == ""


def test_stage_lines_go_to_the_package_logger_and_notebooks_get_tqdm(raw, tmp_path, capsys, caplog, monkeypatch):
    """By default each stage's line is an INFO record of the package's logger,
    bars only when someone watches (here stderr is no terminal: none); in a
    notebook the bars are tqdm.auto's."""
    import logging

    opts = {k: v for k, v in SMALL.items() if k != "log"}
    with caplog.at_level(logging.INFO, logger="polars_singlecell"):
        psc.integrate(raw, tmp_path / "a", **opts)
    stages = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "polars_singlecell"]
    assert stages == ["genes", "pca", "project", "centroids", "integration", "interpolate"], stages
    assert capsys.readouterr().err == ""  # progress=None and no terminal, no notebook: no bars
    # With no logging set up anywhere, the lines are printed (as before the logger).
    monkeypatch.setattr(psc.pipeline.logger, "hasHandlers", lambda: False)
    psc.integrate(raw, tmp_path / "a", **opts)
    assert capsys.readouterr().out.splitlines()[0].startswith("genes: done before, kept")
    monkeypatch.undo()
    pytest.importorskip("tqdm")
    monkeypatch.setattr(psc._progress, "in_notebook", lambda: True)
    psc.integrate(raw, tmp_path / "b", **SMALL)
    err = capsys.readouterr().err
    for stage in ("genes", "pca", "project", "centroids", "interpolate"):
        assert re.search(rf"{stage}: 100%.*6000/6000", err), (stage, err[-500:])


def test_prefetch_is_the_variable_polars_reads():
    # Polars ignores a variable it does not know: a misspelt name (02a9fe5
    # to this test) left the pipeline's sinks unbounded without any test
    # noticing. The name must be in the installed Polars' own binary.
    import importlib.util
    from pathlib import Path

    from polars_singlecell._files import PREFETCH as _PREFETCH

    roots = [Path(pl.__file__).parent]
    for name in ("_polars_runtime_32", "_polars_runtime_64", "_polars_runtime_compat"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.append(Path(spec.origin).parent)
    libs = [p for r in roots for pattern in ("*.so", "*.pyd") for p in r.glob(pattern)]
    assert libs, roots
    assert any(_PREFETCH.encode() in p.read_bytes() for p in libs), (_PREFETCH, libs)


def test_sink_bounded_writes_what_one_sink_writes(tmp_path, monkeypatch):
    # The pipeline's project and interpolate stages sink with one row group
    # of read-ahead (bounded memory, pola-rs/polars#28569): same rows, same
    # order, same values; the setting holds during the query only.
    import os

    from polars_singlecell import _progress
    from polars_singlecell._files import PREFETCH as _PREFETCH
    from polars_singlecell._files import sink_bounded as _sink_bounded

    monkeypatch.delenv(_PREFETCH, raising=False)
    seen = []

    def spy(s: pl.Series) -> pl.Series:
        seen.append(os.environ.get(_PREFETCH))
        return s

    rng = np.random.default_rng(0)
    n = 5_500
    src = tmp_path / "src.parquet"
    pl.DataFrame({"i": np.arange(n), "x": rng.normal(size=n)}).write_parquet(src, row_group_size=700)
    q = pl.scan_parquet(src).with_columns(y=(pl.col("x") * 2 + pl.col("i")).map_batches(spy, return_dtype=pl.Float64, is_elementwise=True))
    with _progress.track("t", n, stream=open(tmp_path / "bar.txt", "w")) as bar:
        _sink_bounded(q, tmp_path / "out.parquet")
    assert bar.done == n  # every row counted once
    assert seen and set(seen) == {"1"}  # read one row group ahead, while the query ran
    assert _PREFETCH not in os.environ  # and not after
    assert pl.read_parquet(tmp_path / "out.parquet").equals(q.collect())
    # A value the user set is theirs.
    monkeypatch.setenv(_PREFETCH, "3")
    seen.clear()
    _sink_bounded(q, tmp_path / "out.parquet")
    assert set(seen) == {"3"} and os.environ[_PREFETCH] == "3"
    monkeypatch.delenv(_PREFETCH)
    # A query that fails leaves the old file as it was, no temporary file, and the variable unset.
    bad = pl.scan_parquet(src).with_columns(
        y=pl.when(pl.col("i") < 3000).then(pl.col("x")).otherwise(pl.col("x").cast(pl.String).cast(pl.Int64, strict=True)))
    before = (tmp_path / "out.parquet").read_bytes()
    with pytest.raises(pl.exceptions.PolarsError):
        _sink_bounded(bad, tmp_path / "out.parquet")
    assert (tmp_path / "out.parquet").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert _PREFETCH not in os.environ
