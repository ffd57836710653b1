"""Every public name has a numpydoc docstring (issue 24 item 5).

Public: each name in ``polars_singlecell.__all__`` and in the ``__all__`` of
each public module of the package (every ``polars_singlecell.<name>`` module
whose name has no leading underscore: the ones ``__all__`` lists, ``datasets``,
``distributed``, ``io``, ``layout``, ``metrics``, ``pipeline``, ``plot``, and
the ones whose functions the package face re-exports, ``preprocessing``,
``centroids``, ``integration``, ``ot``, ``scanpy_api``), where the object is
defined in the package, and the public methods and properties of the public
classes (``PcaModel``, ``IntegrationModel``, ``DaskEngine``, ``Partition``).

For each: a docstring; a ``Parameters`` section naming every parameter of the
signature (``self``/``cls`` aside; ``a, b`` on one line counts for both, and
``*args``/``**kwargs`` may be named or not) and nothing else; a ``Returns``
(or ``Yields``) section unless the callable returns ``None`` or is a class;
and no timings (seconds, minutes, rates measured on some machine: those live
in ``benches/results``). Module-level constants are documented by a ``#:``
comment on the line before their assignment (Sphinx's attribute docs), as a
tuple carries no docstring of its own.

Not checked, and why:

- ``__init__``: numpydoc documents a class's constructor parameters in the
  class docstring, and the class is checked against ``__init__``'s signature.
- Dunder methods (``__repr__``, the dataclass' ``__eq__``...): Python's
  protocol, documented by Python.
- Inherited methods, and module-level data of a module without ``__all__``
  (a tuple has no ``__module__`` to tell it was defined there): every public
  module of the package has an ``__all__`` today.
- Properties need a docstring but no ``Parameters``/``Returns`` sections:
  numpydoc documents a property like an attribute (a one-line description).
- The compiled module ``polars_singlecell._internal`` (its streaming-fit
  classes ``GeneStatsFit``, ``CovarianceFit``, ... and kernels) is private:
  no public module re-exports any of its names, so none is collected here.
  Should one be re-exported in a public ``__all__``, it is checked like the
  rest unless it is listed in ``PLUMBING`` with the reason.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import types
from pathlib import Path

import pytest

import polars_singlecell as psc

PACKAGE = psc.__name__

# Compiled (``_internal``) names that a public ``__all__`` re-exports only as
# plumbing between modules, with the reason each is not held to the rules.
# Empty: no public module re-exports a compiled name today.
PLUMBING: dict[str, str] = {}

# A duration or a rate measured on some machine: "takes 3 s", "137 s instead
# of 867 s", "~10 s per 5,000 cells", "2.5 ms", "5 minutes", "38k cells/s".
# The number must stand alone (not the tail of ``n_comps2`` or ``X_1``) and
# the unit must end there: ``min(`` is a function call, ``s_i`` and ``h5ad``
# are names, not units.
_NUMBER = r"(?<![\w.])\d+(?:[.,]\d+)*"
_DURATION = _NUMBER + r"\s?(?:ms|µs|us|ns|s|secs?|seconds?|mins?|minutes?|h|hrs?|hours?|days?)(?![\w(])"
_RATE = _NUMBER + r"\s?[kKM]?\s?[A-Za-z]+\s?/\s?(?:s|sec|second|min|minute|h|hour)(?!\w)"
TIMING = re.compile(f"{_DURATION}|{_RATE}")


# ------------------------------------------------------------ collection


def _public_modules() -> dict[str, types.ModuleType]:
    modules = {PACKAGE: psc}
    for info in pkgutil.iter_modules(psc.__path__):
        if not info.name.startswith("_"):
            name = f"{PACKAGE}.{info.name}"
            modules[name] = importlib.import_module(name)
    return modules


def _in_package(obj: object) -> bool:
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return isinstance(module, str) and (module == PACKAGE or module.startswith(PACKAGE + "."))


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and _in_package(v)
                 and not isinstance(v, types.ModuleType)]
    return list(names)


def _collect() -> dict[str, tuple[str, object, object]]:
    """qualified name → (kind, object, owner); each object once, under its
    first public name (the package face's before a module's)."""
    items: dict[str, tuple[str, object, object]] = {}
    seen: set[int] = set()

    def add(qualname: str, kind: str, obj: object, owner: object) -> bool:
        if kind != "data":
            if id(obj) in seen:
                return False
            seen.add(id(obj))
        items[qualname] = (kind, obj, owner)
        return True

    for modname, module in _public_modules().items():
        add(modname, "module", module, None)
    for modname, module in _public_modules().items():
        for name in _public_names(module):
            obj = getattr(module, name)
            qual = f"{modname}.{name}"
            if isinstance(obj, types.ModuleType):
                continue  # checked as a module above
            if not (inspect.isclass(obj) or callable(obj)):
                add(qual, "data", name, module)
                continue
            if not _in_package(obj):
                continue
            if inspect.isclass(obj):
                if not add(qual, "class", obj, module):
                    continue  # its members are collected under its first name
                for attr, raw in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(raw, property):
                        add(f"{qual}.{attr}", "property", raw, obj)
                    elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw) or inspect.isroutine(raw):
                        add(f"{qual}.{attr}", "method", getattr(obj, attr), obj)
            else:
                add(qual, "function", obj, module)
    return items


ITEMS = _collect()


# --------------------------------------------------------------- parsing


def _sections(doc: str) -> dict[str, list[str]]:
    """numpydoc sections: a title line, then a line of as many dashes."""
    lines = inspect.cleandoc(doc).splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and not lines[i].startswith(" ")
             and re.fullmatch(r"-{3,}", lines[i + 1]) and len(lines[i + 1]) == len(lines[i].strip())]
    out: dict[str, list[str]] = {}
    for j, i in enumerate(heads):
        end = heads[j + 1] if j + 1 < len(heads) else len(lines)
        out[lines[i].strip()] = lines[i + 2:end]
    return out


def _documented_params(body: list[str]) -> tuple[list[str], list[str]]:
    """Names of a Parameters section's entries (unindented lines ``name``,
    ``name : type`` or ``a, b : type``), and the lines that are no such entry."""
    names, bad = [], []
    for line in body:
        if not line.strip() or line.startswith(" "):
            continue  # a description line
        head = line.split(" : ", 1)[0].rstrip(" :")
        for part in head.split(","):
            name = part.strip().lstrip("*")
            (names if name.isidentifier() else bad).append(name if name.isidentifier() else line)
    return names, bad


def _signature(obj: object) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # a compiled callable without a text signature
        return None


def _returns_none(sig: inspect.Signature) -> bool:
    return sig.return_annotation in (None, "None", type(None))


# ----------------------------------------------------------------- tests


def test_the_collection_sees_the_public_api():
    names = set(ITEMS)
    for expected in ("polars_singlecell.fit_pca", "polars_singlecell.PcaModel.save", "polars_singlecell.PcaModel.n_comps",
                     "polars_singlecell.IntegrationModel.read_parquet", "polars_singlecell.distributed.DaskEngine.fold",
                     "polars_singlecell.metrics.evaluate", "polars_singlecell.io.h5ad_to_parquet",
                     "polars_singlecell.layout.COUNTS", "polars_singlecell.plot", "polars_singlecell.sink_parquet"):
        assert expected in names, expected
    # each object once, under the package face's name where it has one
    assert "polars_singlecell.io.sink_parquet" not in names
    assert not [n for n in names if n.split(".")[-1].startswith("_")]


@pytest.mark.parametrize(
    ("text", "is_timing"),
    [
        ("takes 3 s", True), ("took 137 s instead of 867 s", True), ("~10 s per 5,000 cells", True),
        ("in 25s on 2 cores", True), ("2.5 ms a batch", True), ("5 minutes", True), ("1.5 h", True),
        ("integration stage 126 → 49 s", True), ("38k cells/s", True), ("12 min.", True),
        ("n_comps", False), ("n_comps=50", False), ("X_pca2 s", False), ("3 Lloyd passes", False),
        ("× min(cells, cap)", False), ("tol 1e-4", False), ("(s + 1)/2", False), ("0 steps gives s_i", False),
        ("4 digits", False), ("the 2 h5ad files", False), ("64 KiB–1 MiB", False), ("15 neighbours", False),
        ("at most 32 MiB", False), ("2 hvg flavours", False), ("1 ± scaling", False), ("0.5 s_i", False),
    ],
)
def test_the_timing_pattern(text, is_timing):
    assert bool(TIMING.search(text)) is is_timing, TIMING.findall(text)


def test_the_section_parser():
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        Two.
    c
        Three : with a colon.
    **kwargs
        The rest.

    Returns
    -------
    int
        A number.
    """
    sections = _sections(doc)
    assert set(sections) == {"Parameters", "Returns"}
    assert _documented_params(sections["Parameters"]) == (["a", "b", "c", "kwargs"], [])


@pytest.mark.parametrize("qualname", sorted(ITEMS))
def test_docstring(qualname):
    kind, obj, owner = ITEMS[qualname]
    if kind == "data":
        source = Path(inspect.getsourcefile(owner)).read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        where = [n.lineno for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 and any(isinstance(t, ast.Name) and t.id == obj
                         for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]
        assert where, f"{qualname} is not assigned in {owner.__name__}; document it where it is"
        comment = lines[where[0] - 2].strip()
        assert comment.startswith("#:"), f"{qualname}: a '#:' comment on the line before the assignment documents it"
        assert not TIMING.search(comment), f"{qualname}: timings in the comment: {TIMING.findall(comment)}"
        return
    if qualname in PLUMBING:
        pytest.skip(PLUMBING[qualname])
    doc = obj.__doc__
    assert doc and doc.strip(), f"{qualname} has no docstring"
    timings = TIMING.findall(doc)
    assert not timings, f"{qualname}: timings belong in benches/results, not the docstring: {timings}"
    if kind in ("module", "property"):
        return
    sig = _signature(obj)
    assert sig is not None, f"{qualname}: no signature to check (give the compiled function a text_signature)"
    sections = _sections(doc)
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    documented, bad = _documented_params(sections.get("Parameters", []) + sections.get("Other Parameters", []))
    if params:
        assert "Parameters" in sections, f"{qualname}{sig}: no 'Parameters\\n----------' section"
        assert not bad, f"{qualname}: Parameters lines that name no parameter: {bad}"
        missing = [n for n in named if n not in documented]
        assert not missing, f"{qualname}: parameters not in its Parameters section: {missing}"
        extra = [n for n in documented if n not in {p.name for p in params}]
        assert not extra, f"{qualname}: Parameters names what the signature does not have: {extra}"
    else:
        assert not documented, f"{qualname} takes no parameters but documents {documented}"
    if kind != "class" and not _returns_none(sig):
        body = sections.get("Returns") or sections.get("Yields")
        assert body and any(line.strip() for line in body), (
            f"{qualname}{sig}: no 'Returns\\n-------' (or 'Yields') section, and it does not return None")
