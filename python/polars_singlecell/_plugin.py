"""The one caller of ``register_plugin_function`` and the polars version gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from polars.plugins import register_plugin_function

LIB = Path(__file__).parent

# Python polars versions this build is tested with. Below POLARS_MIN the
# plugin ABI is known to differ: a refusal. From POLARS_BELOW on it is only
# untested: a warning, so a new polars release neither breaks the import nor
# makes pip downgrade a user's polars (pyproject.toml has the lower bound only).
POLARS_MIN = (2, 0)
POLARS_BELOW = (2, 2)
SUPPORTED = ">=2.0,<2.2"


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_polars_version(version: str, plugin_polars: str) -> None:
    """ImportError below the supported polars, a warning above the tested
    range; both name the two versions."""
    v = _parse(version)
    said = (f"polars-singlecell's plugin is built against Rust polars {plugin_polars} and tested with Python "
            f"polars {SUPPORTED}, but polars {version} is installed")
    if v < POLARS_MIN:
        raise ImportError(f"{said}. Fix: pip install 'polars{SUPPORTED}'")
    if v >= POLARS_BELOW:
        import warnings

        warnings.warn(f"{said}: untested. If plugin calls fail, pip install 'polars{SUPPORTED}' "
                      "or a polars-singlecell release built for it", RuntimeWarning, stacklevel=3)


def call(
    name: str,
    args: list[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    is_elementwise: bool = True,
    returns_scalar: bool = False,
) -> pl.Expr:
    return register_plugin_function(
        plugin_path=LIB,
        function_name=name,
        args=args,
        kwargs=kwargs,
        is_elementwise=is_elementwise,
        returns_scalar=returns_scalar,
    )
