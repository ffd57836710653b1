"""Argument checks shared by the modules: each raises a ValueError that names
the argument, the value and what it must be."""

from __future__ import annotations

import math
import numbers

import numpy as np


def positive_int(name: str, value: object, *, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}={value} exceeds its maximum {upper}")
    return int(value)


def seed(random_state: object) -> int:
    if isinstance(random_state, bool) or not isinstance(random_state, int) or not 0 <= random_state < 2**64:
        msg = f"random_state must be an integer in [0, 2**64), got {random_state!r}"
        raise ValueError(msg)
    return random_state


def tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 <= tol < float("inf")):
        msg = f"tol must be a finite number >= 0, got {tol!r}"
        raise ValueError(msg)
    return float(tol)


def check_scale(scale: object, max_value: object, zero_center: object) -> None:
    """fit_pca's (and integrate's) scaling options, checked before any work."""
    if not isinstance(scale, bool) or not isinstance(zero_center, bool):
        raise ValueError(f"scale and zero_center must be True or False, got scale={scale!r}, zero_center={zero_center!r}")
    if not scale and (max_value is not None or not zero_center):
        raise ValueError("max_value and zero_center=False are options of the scaling (sc.pp.scale's): pass scale=True "
                         "with them (PCA itself always centres)")
    if max_value is not None and (isinstance(max_value, bool) or not isinstance(max_value, numbers.Real)
                                  or not (0 < float(max_value) < math.inf)):
        raise ValueError(f"max_value must be a finite number > 0 (sc.pp.scale's), got {max_value!r}")


def renamed(**old_to_new: str):
    """Accept a parameter's old name for one release, with a
    ``DeprecationWarning`` saying the new one (scanpy's names replace ours:
    ``seed`` is now ``random_state``); both at once is a ``TypeError``."""
    import functools
    import warnings

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() takes {new}= ({old}= is its old name), not both")
                    warnings.warn(f"{fn.__name__}({old}=...) is now {fn.__name__}({new}=...)", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner

    return wrap
