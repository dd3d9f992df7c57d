"""Optional compiled kernels for the stable-rank math (Triton on CUDA).

Nothing here is imported by ``import bon_sr``: the Triton module is imported only when a
caller asks for the Triton backend, so the package works without triton. This package
knows nothing about models or selection; it only speeds up ``bon_sr.scoring.stable_rank``.
"""

from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it ships with CUDA PyTorch)."""
    return importlib.util.find_spec("triton") is not None
