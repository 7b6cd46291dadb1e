"""Benchmark session plumbing: the `slow` marker, the rows each benchmark records, and, with
REBEL_BENCH_SAVE=1, bench/results/<device-slug>_<date>_loss.json written at session end."""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from bench._common import environment, slug

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_ROWS = pytest.StashKey[list]()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: big shapes, run only with REBEL_BENCH_FULL=1")
    config.stash[_ROWS] = []


@pytest.fixture
def bench_rows(request) -> list:
    """Append one dict per measured (case, provider, mode); saved at session end."""
    return request.config.stash[_ROWS]


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the correctness checks in bench/ still run
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed")


def results_path(env: dict, suite: str = "loss") -> str:
    return os.path.join(RESULTS_DIR, f"{slug(env['device'])}_{env['date']}_{suite}.json")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("REBEL_BENCH_SAVE", "0") != "1":
        return
    rows = session.config.stash.get(_ROWS, [])
    if not rows:
        return
    env = environment()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for suite in sorted({row.get("suite", "loss") for row in rows}):
        mine = [row for row in rows if row.get("suite", "loss") == suite]
        path = results_path(env, suite)
        with open(path, "w") as f:
            json.dump(dict(suite=suite, environment=env, rows=mine), f, indent=1)
            f.write("\n")
        if reporter is not None:
            reporter.write_line(f"rebel bench: wrote {len(mine)} rows to {os.path.relpath(path)}")
