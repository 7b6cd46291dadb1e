"""Backend choice: REBEL_KERNELS_BACKEND=auto|triton|torch, read on every call."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(hidden: torch.Tensor) -> str:
    """'triton' or 'torch' for this input: auto picks Triton for CUDA tensors when it is importable."""
    choice = os.environ.get("REBEL_KERNELS_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"REBEL_KERNELS_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        usable = triton_available() and hidden.is_cuda and hidden.dtype != torch.float64
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
