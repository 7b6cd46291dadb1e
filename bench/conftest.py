"""Benchmark session plumbing: the `slow` marker, the rows each benchmark records, and, with
REBEL_BENCH_SAVE=1, bench/results/<device-slug>_<date>_<suite>.json written at session end
(REBEL_BENCH_RESULTS_DIR=DIR writes them to DIR instead).

Without a CUDA device the GPU-only parameters (CUDA shapes, CUDA-only providers) are deselected at
collection, not skipped. A plain `pytest` runs every benchmarked function once, untimed and without
tables (--benchmark-disable); `pytest bench --benchmark-enable` times them and prints pytest-benchmark's
tables, as do REBEL_BENCH_SAVE=1 (the saved rows carry the timings), REBEL_BENCH_FULL=1, REBEL_BENCH_MODELS=...
and any --benchmark-{only,json,save,autosave,compare,histogram} option."""
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
    _benchmark_defaults(config)


_TIMING_OPTIONS = ("benchmark_enable", "benchmark_only", "benchmark_json", "benchmark_save", "benchmark_autosave",
                   "benchmark_compare", "benchmark_histogram")


def timing_requested(config) -> bool:
    """Timing runs (and tables print) when asked for with an option or a measuring REBEL_BENCH_* variable."""
    return (any(getattr(config.option, name, None) for name in _TIMING_OPTIONS)
            or any(os.environ.get(var, "0") == "1" for var in ("REBEL_BENCH_SAVE", "REBEL_BENCH_FULL"))
            or bool(os.environ.get("REBEL_BENCH_MODELS", "").strip()))


def _benchmark_defaults(config) -> None:
    """--benchmark-disable unless timing is requested: each benchmarked function still runs once (the bench
    code stays tested), pytest-benchmark prints no tables. (pytest-benchmark's own pytest_configure is
    trylast: it reads the option after this.)"""
    if not hasattr(config.option, "benchmark_disable") or timing_requested(config):
        return  # pytest-benchmark is not installed, or numbers are wanted
    config.option.benchmark_disable = True
    session = getattr(config, "_benchmarksession", None)
    if session is not None:  # this conftest was loaded after pytest-benchmark configured itself
        session.disabled = True


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device the GPU-only parameters are deselected (reported as "deselected", not as skips):
    the CUDA cases, marked `cuda` in their parameter lists, and the CUDA-only providers, marked here.
    tests/conftest.py deselects its `cuda` tests the same way; whichever runs second finds none left."""
    if torch.cuda.is_available():
        return
    from bench._providers import CUDA_ONLY

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    for item in items:
        provider = getattr(getattr(item, "callspec", None), "params", {}).get("provider")
        if isinstance(provider, str) and provider in CUDA_ONLY and str(item.path).startswith(here):
            item.add_marker(pytest.mark.cuda)
    gpu_only = [item for item in items if item.get_closest_marker("cuda")]
    if gpu_only:
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
        config.hook.pytest_deselected(items=gpu_only)


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
