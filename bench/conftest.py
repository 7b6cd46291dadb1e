"""Benchmark session plumbing: the `slow` marker, the rows each benchmark records, and, with
REBEL_BENCH_SAVE=1, bench/results/<device-slug>_<date>_<suite>.json written at session end
(REBEL_BENCH_RESULTS_DIR=DIR writes them to DIR instead)."""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from bench._accounting import matmul_peak_record
from bench._environment import environment, slug

RESULTS_DIR = os.environ.get("REBEL_BENCH_RESULTS_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                        "results")
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
    """bench/results/<device>_<date>_<suite>[_<REBEL_BENCH_TAG>].json"""
    tag = slug(os.environ["REBEL_BENCH_TAG"]) if os.environ.get("REBEL_BENCH_TAG") else ""
    return os.path.join(RESULTS_DIR, f"{slug(env['device'])}_{env['date']}_{suite}{'_' + tag if tag else ''}.json")


_ENV = pytest.StashKey[dict]()


def _save(config, final: bool) -> list[tuple[str, int]]:
    """Write every suite's rows so far (after each test too: a run killed by a timeout keeps
    what it measured).  The environment is read once; the matmul peak is added when measured."""
    if os.environ.get("REBEL_BENCH_SAVE", "0") != "1":
        return []
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return []
    if _ENV not in config.stash:
        config.stash[_ENV] = environment()
    env = dict(config.stash[_ENV], **matmul_peak_record())
    env["complete"] = final
    os.makedirs(RESULTS_DIR, exist_ok=True)
    written = []
    for suite in sorted({row.get("suite", "loss") for row in rows}):
        mine = [row for row in rows if row.get("suite", "loss") == suite]
        path = results_path(env, suite)
        with open(path + ".tmp", "w") as f:
            json.dump(dict(suite=suite, environment=env, rows=mine), f, indent=1, default=str)
            f.write("\n")
        os.replace(path + ".tmp", path)
        written.append((path, len(mine)))
    return written


def pytest_runtest_logfinish(nodeid, location):
    config = _CONFIG.get("config")
    if config is not None:
        _save(config, final=False)


_CONFIG: dict = {}


def pytest_sessionstart(session):
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session, exitstatus):
    written = _save(session.config, final=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for path, n in written:
        if reporter is not None:
            reporter.write_line(f"rebel bench: wrote {n} rows to {os.path.relpath(path)}")
