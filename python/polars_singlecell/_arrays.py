"""Embeddings and labels as NumPy arrays, checked: shared by ``metrics`` and
``ot``."""

from __future__ import annotations

import numpy as np
import polars as pl


def matrix(x: object, name: str = "embedding") -> np.ndarray:
    """A finite (n, d) float32 matrix from a NumPy array or an Array Series."""
    if isinstance(x, pl.Series):
        if not isinstance(x.dtype, pl.Array):
            raise TypeError(f"column '{x.name}' has dtype {x.dtype}, expected Array(Float32, d)")
        if x.null_count():
            raise ValueError(f"column '{x.name}' is null at row {x.is_null().arg_true()[0]}; drop null cells first")
        name = x.name
        x = x.cast(pl.Array(pl.Float32, x.dtype.size)).to_numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D (cells × dims) matrix, got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{name} holds {a[row][bad[row]][0]} at row {row}; embeddings must be finite")
    return a


def codes(values: object, name: str) -> tuple[np.ndarray, int]:
    """Category codes 0..C-1 and C (see :func:`categories`)."""
    out, n, _ = categories(values, name)
    return out, n


def categories(values: object, name: str) -> tuple[np.ndarray, int, list[str]]:
    """Category codes 0..C-1, C, and the categories as text, in sorted order."""
    s = pl.Series(name, values) if not isinstance(values, pl.Series) else values
    if s.null_count():
        raise ValueError(f"column '{name}' is null at row {s.is_null().arg_true()[0]}; fill or drop those cells")
    if not s.dtype.is_numeric():  # numbers sort as numbers (scikit-learn's class order), the rest as text
        s = s.cast(pl.String)
    cats = s.unique().sort()
    codes = s.replace_strict(cats, pl.int_range(cats.len(), eager=True), return_dtype=pl.UInt32)
    return codes.to_numpy(), cats.len(), cats.cast(pl.String).to_list()


def series(a: np.ndarray) -> pl.Series:
    return pl.Series(a, dtype=pl.Array(pl.Float32, a.shape[1]))
