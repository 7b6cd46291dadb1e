"""Test setup: without CUDA, Triton kernels run in the interpreter on CPU tensors."""
import os
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels, i.e. before rebel_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared helpers (tests/_inputs.py) import as `_inputs`, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

from _inputs import new_seed  # noqa: E402

BACKENDS = ["torch", "triton"]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Forces REBEL_KERNELS_BACKEND (read on every call) for the duration of one test."""
    if request.param == "triton" and not _triton_importable():
        pytest.skip("triton is not importable")
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    """CUDA when present (the Triton kernels need it there), else CPU (Triton runs interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def seed(request):
    """A fresh seed per test (os.urandom), or REBEL_TEST_SEED to replay one; shown in failure messages."""
    value = new_seed()
    request.node.user_properties.append(("seed", value))
    return value
