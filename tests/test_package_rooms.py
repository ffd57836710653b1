"""The package's modules use each other's public names only: a private
helper that two modules need lives in a private module (``_frames``,
``_checks``, ``_arrays``, ``_files``) under a public name there, and no
module imports the package face (``import polars_singlecell``), so each
module's imports show what it depends on."""

from __future__ import annotations

import ast
from pathlib import Path

import polars_singlecell

PACKAGE = Path(polars_singlecell.__file__).parent


def _modules():
    return sorted(p for p in PACKAGE.glob("*.py") if p.name != "__init__.py")


def _violations(source: str, name: str) -> list[str]:
    """Where the module ``name`` with this source imports the package face,
    imports a private name from a public module, or uses one as module._name."""
    tree = ast.parse(source)
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "polars_singlecell" or a.name.startswith("polars_singlecell."):
                    found.append(f"{name}:{node.lineno} imports the package face ({a.name})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polars_singlecell"):
            source_module = node.module.rsplit(".", 1)[-1]
            for a in node.names:
                if node.module == "polars_singlecell":
                    modules[a.asname or a.name] = a.name  # one of the package's modules
                elif a.name.startswith("_") and not source_module.startswith("_"):
                    found.append(f"{name}:{node.lineno} imports {a.name} from {node.module}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                and not modules.get(node.value.id, "_").startswith("_")):
            found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    found = [v for path in _modules() for v in _violations(path.read_text(), path.name)]
    assert not found, "\n".join(found)


def test_the_rule_sees_each_kind_of_violation():
    bad = ("import polars_singlecell as psc\nfrom polars_singlecell.io import _x\n"
           "from polars_singlecell import metrics as m, _internal\nm._y\n_internal.fit_integration\n")
    assert len(_violations(bad, "bad.py")) == 3
    assert _violations("from polars_singlecell._frames import col\nfrom polars_singlecell import _internal\n", "ok.py") == []
