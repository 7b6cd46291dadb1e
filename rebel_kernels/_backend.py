"""Backend choice (REBEL_KERNELS_BACKEND=auto|triton|torch, read on every call) and the one switch of
Triton's interpreter (TRITON_INTERPRET=1: the Triton kernels run on CPU tensors).

No triton import at module level: `triton_available()` tries it once, and the Triton kernel modules
(rebel_kernels/*/triton_kernels.py, rebel_kernels/_triton_common.py) are imported only by the launch
paths, after `resolve()` picked "triton". So the package imports, and runs on the torch backend,
where triton is not installed.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Is triton importable? (tried once)"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (read on every call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(hidden: torch.Tensor) -> str:
    """'triton' or 'torch' for this input: auto picks Triton for CUDA tensors when it is importable."""
    choice = os.environ.get("REBEL_KERNELS_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"REBEL_KERNELS_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        usable = hidden.is_cuda and hidden.dtype != torch.float64 and triton_available()  # CPU: no triton import
        return "triton" if usable else "torch"
    if not triton_available():
        raise ValueError("REBEL_KERNELS_BACKEND='triton' but triton is not importable")
    if hidden.dtype == torch.float64:
        raise ValueError("REBEL_KERNELS_BACKEND='triton' does not support float64 hidden; use 'torch'")
    if not hidden.is_cuda and not interpreting():
        raise ValueError(
            f"REBEL_KERNELS_BACKEND='triton' needs CUDA tensors (hidden is on {hidden.device}) "
            "or TRITON_INTERPRET=1"
        )
    return "triton"
