"""bench/report.py on the committed results: tables for every suite and, with matplotlib, plots."""
from __future__ import annotations

import glob
import os

import pytest

from bench import report


def _results():
    return sorted(glob.glob(os.path.join(report.RESULTS, "*.json")))


def test_report_tables():
    paths = _results()
    if not paths:
        pytest.skip("no bench/results/*.json")
    for path in paths:
        text = report.report(path)
        assert text.count("\n|") >= 2, text


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    paths = [p for p in _results() if p.endswith("_loss.json")]
    if not paths:
        pytest.skip("no bench/results/*_loss.json")
    written = report.plots(paths, str(tmp_path))
    assert written and all(os.path.getsize(p) > 0 for p in written)
