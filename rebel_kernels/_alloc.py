"""Output allocation. Tests switch on poisoning so that any element a kernel forgets to write is NaN."""
from __future__ import annotations

import contextlib

import torch

_POISON = False


@contextlib.contextmanager
def poisoned():
    """Within this block, every output buffer the ops allocate starts as NaN (or -1 for integers)."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, NaN-filled while `poisoned()` is active."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
