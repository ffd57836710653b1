"""`_internal.pyi` describes the compiled module: the same names, and for
every function, class constructor and method the same parameters with the
same defaults (read from the module's text signatures)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from polars_singlecell import _internal

STUB = Path(_internal.__file__).with_name("_internal.pyi")


def _params(fn: ast.FunctionDef, drop_self: bool) -> list[tuple[str, str | None]]:
    args = fn.args.args[1:] if drop_self else fn.args.args
    defaults = [None] * (len(args) - len(fn.args.defaults)) + [ast.unparse(d) for d in fn.args.defaults]
    return [(a.arg, d) for a, d in zip(args, defaults)]


def _static(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)


def _compiled(obj) -> list[tuple[str, str | None]]:
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.name in ("self", "$self"):
            continue
        out.append((p.name, None if p.default is inspect.Parameter.empty else repr(p.default).replace("'", '"')))
    return out


def _norm(params):
    return [(n, None if d is None else d.replace("'", '"')) for n, d in params]


def test_stub_matches_the_compiled_module():
    tree = ast.parse(STUB.read_text())
    stubbed = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            stubbed[node.name] = ("function", _norm(_params(node, False)))
        elif isinstance(node, ast.ClassDef):
            methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
            stubbed[node.name] = ("class", {name: _norm(_params(f, not _static(f))) for name, f in methods.items()})
        elif isinstance(node, ast.AnnAssign):
            stubbed[node.target.id] = ("value", None)
    public = {n for n in dir(_internal) if not n.startswith("_") or n == "__version__"}
    assert set(stubbed) == public, f"in the stub only: {set(stubbed) - public}; compiled only: {public - set(stubbed)}"
    for name, (kind, spec) in stubbed.items():
        obj = getattr(_internal, name)
        if kind == "function":
            assert _compiled(obj) == spec, name
        elif kind == "class":
            compiled = {k for k in vars(obj) if not k.startswith("_")}
            assert set(spec) - {"__init__"} == compiled, f"{name}: {set(spec) ^ compiled}"
            assert _compiled(obj) == spec["__init__"], f"{name}.__init__"
            for m, params in spec.items():
                attr = inspect.getattr_static(obj, m, None)
                if m != "__init__" and not isinstance(attr, property) and getattr(attr, "__text_signature__", None):
                    assert _compiled(getattr(obj, m)) == params, f"{name}.{m}"
