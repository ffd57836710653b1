"""The one caller of ``register_plugin_function`` and the polars version gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from polars.plugins import register_plugin_function

LIB = Path(__file__).parent

# Python polars versions this build is tested with; pyproject.toml says the same.
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
    """Raise ImportError naming both versions when ``version`` is unsupported."""
    if not (POLARS_MIN <= _parse(version) < POLARS_BELOW):
        msg = (
            f"polars-singlecell needs Python polars {SUPPORTED} (its plugin is built against "
            f"Rust polars {plugin_polars}), but polars {version} is installed. "
            f"Fix: pip install 'polars{SUPPORTED}'"
        )
        raise ImportError(msg)


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
