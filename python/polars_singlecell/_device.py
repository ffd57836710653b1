"""The ``device`` option shared by the heavy operations."""

from __future__ import annotations

from polars_singlecell import _internal


def cuda_available() -> bool:
    """Whether ``device="cuda"`` works here.

    It needs a build with the ``cuda`` feature (``make build CUDA=1``), an
    NVIDIA driver and GPU, and the CUDA 12/13 libraries cuBLAS and NVRTC on
    the library path. Where one is missing, ``device="cuda"`` is a
    ``ValueError`` saying which.

    Returns
    -------
    bool
        ``True`` where ``device="cuda"`` can run.

    Examples
    --------
    >>> import polars_singlecell as psc
    >>> isinstance(psc.cuda_available(), bool)
    True
    """
    return bool(_internal.cuda_available())


def check_device(device: object) -> str:
    """``device`` if it can run now; else a ValueError saying what is missing."""
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        _internal.cuda_device()  # raises ValueError with the reason
        return "cuda"
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
