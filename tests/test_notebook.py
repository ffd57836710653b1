"""The example notebook runs, top to bottom, on small generated data: its
code cells executed in order in one namespace, as a kernel would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "scanpy_tour.ipynb"


def test_the_scanpy_tour_notebook_runs_and_integrates():
    pytest.importorskip("scanpy")
    pytest.importorskip("umap")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    ns: dict = {}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), "plain Python only"
        exec(compile(source, f"{NOTEBOOK.name} cell {i}", "exec"), ns)  # noqa: S102 (running the notebook is the test)
    summary = {r["metric"]: r for r in ns["summary"].to_dicts()}
    assert summary["batch_entropy"]["X_ot"] > summary["batch_entropy"]["X_pca"] + 0.1
    assert summary["label_purity"]["X_ot"] >= summary["label_purity"]["X_pca"]  # 0.299 -> 0.331 when written
    assert summary["overall"]["X_ot"] > summary["overall"]["X_pca"]
    adata = ns["adata"]
    assert {"X_umap_X_pca", "X_umap_X_ot", "X_pca_ot"} <= set(adata.obsm) and adata.varm["PCs"].shape == (500, 20)
