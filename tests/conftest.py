"""Test setup: without CUDA, Triton kernels run in the interpreter on CPU tensors, and tests marked
`cuda` are deselected at collection (reported as "deselected", never as skips). Seeds: see `seed`."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates the kernels, i.e. before rebel_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from _inputs import new_seed, seed_mode

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
    """This test's seed: fixed per test (crc32 of its node id, the same on every run), REBEL_TEST_SEED=<int>
    to replay one, REBEL_TEST_FUZZ=1 for fresh random ones. Shown in failure messages and reports."""
    value = new_seed(request.node.nodeid)
    request.node.user_properties.append(("seed", value))
    return value


def pytest_report_header(config):
    return f"rebel test seeds: {seed_mode()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that drew a seed names it in its report, with the command that replays it."""
    report = yield
    seed = dict(item.user_properties).get("seed")
    if report.failed and seed is not None:
        replay = f"REBEL_TEST_SEED={seed} pytest '{item.nodeid}'"
        report.sections.append(("rebel test seed", f"seed={seed}; replay: {replay}"))
    return report


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device, tests marked `cuda` are deselected (not generated as skips). bench/conftest.py
    does the same; whichever runs second finds none left."""
    if torch.cuda.is_available():
        return
    gpu_only = [item for item in items if item.get_closest_marker("cuda")]
    if gpu_only:
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
        config.hook.pytest_deselected(items=gpu_only)
