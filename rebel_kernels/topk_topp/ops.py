"""Registration of the native op `torch.ops.rebel_kernels.sample_logits`: loads the compiled extension
rebel_kernels._C (csrc/; its C++ schema names this module as the home of the fake implementation,
`m.set_python_module("rebel_kernels.topk_topp.ops")`) and registers the fake, for torch.compile.

Without the extension (not built, or built against another torch), `_C` is None, `IMPORT_ERROR`
says why, and `sample_logits` falls back to torch_impl.py after warning once (`warn_fallback_once`).
"""
from __future__ import annotations

import importlib
import warnings

import torch

try:  # registers torch.ops.rebel_kernels.sample_logits (import_module: a plain "No module named" when absent)
    _C = importlib.import_module("rebel_kernels._C")
except (ImportError, OSError) as exc:  # not built: the PyTorch fallback and the reference stay usable
    _C = None
    IMPORT_ERROR: Exception | None = exc
else:
    IMPORT_ERROR = None

_WARNED = False


def native_available() -> bool:
    """Is the compiled extension rebel_kernels._C loaded?"""
    return _C is not None


def fallback_message() -> str:
    return (
        f"rebel_kernels._C, the native top-k/top-p sampler behind rebel_kernels.sample_logits, is not "
        f"available ({IMPORT_ERROR}). sample_logits falls back to a pure PyTorch implementation (same "
        f"tokens and log-probabilities, but a full float64 sort of every row: slower, and several "
        f"[rows, vocab] float64 temporaries). To build the extension, install torch first, then "
        f"reinstall this package from its source tree: `pip install --no-build-isolation -e .` "
        f"(REBEL_KERNELS_REQUIRE_EXT=1 makes a failed build an error instead of a warning)."
    )


def warn_fallback_once() -> None:
    """Warns (RuntimeWarning) the first time the fallback runs in this process."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(fallback_message(), RuntimeWarning, stacklevel=3)


if _C is not None:

    @torch.library.register_fake("rebel_kernels::sample_logits")
    def _(logits, uniform, temperature, top_k, top_p):
        rows = logits.shape[0]
        return logits.new_empty((rows,), dtype=torch.int64), logits.new_empty((rows,), dtype=torch.float32)
