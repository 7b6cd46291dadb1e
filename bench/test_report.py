"""bench/report.py on the committed results (tables for every suite and, with matplotlib, plots) and on a
synthetic iteration-suite file."""
from __future__ import annotations

import glob
import json
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


def _loss_row(provider: str, n: int, p50: float, peak: int | None, fraction: float = 1.0) -> dict:
    return dict(case=f"c{n}", provider=provider, mode="fwd", device="cuda", dtype="bfloat16", N=n, H=64, V=1000,
                response_fraction=fraction, valid_tokens=n, status="ok", p50_s=p50, op_peak_bytes=peak)


def test_report_plots_curves_and_bars(tmp_path, monkeypatch):
    """Several N: a line per provider over N (log axes); one N: a bar per provider (linear, from 0)."""
    pytest.importorskip("matplotlib")
    rows = [_loss_row("fused", 2048, 1e-3, 2**20), _loss_row("fused", 8192, 3e-3, 2**21),
            _loss_row("naive", 2048, 2e-3, 2**24), _loss_row("naive", 8192, 7e-3, None),
            _loss_row("fused", 2048, 1e-3, None, 0.5), _loss_row("naive", 2048, 2e-3, None, 0.5)]
    path = tmp_path / "gpu_2026-01-01_loss.json"
    path.write_text(json.dumps(dict(suite="loss", environment={"device": "gpu"}, rows=rows)))
    drawn = []
    for kind in ("_curves", "_bars"):
        real = getattr(report, kind)
        monkeypatch.setattr(report, kind, lambda axes, rs, kind=kind, real=real: (drawn.append((kind, len(rs))),
                                                                                  real(axes, rs)))
    written = report.plots([str(path)], str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in written] == ["loss_cuda_bfloat16_H64_V1000_r50_fwd.png",
                                                      "loss_cuda_bfloat16_H64_V1000_r100_fwd.png"]
    assert drawn == [("_bars", 2), ("_curves", 4)]
    assert all(os.path.getsize(p) > 0 for p in written)


def _iteration_row(provider: str, iteration: int, total: float, peak: float) -> dict:
    phases = dict(generate_s=0.4 * total, score_s=0.01 * total, logprobs_s=0.1 * total, update_s=0.45 * total,
                  sync_s=0.01 * total if provider == "ours" else None)
    return dict(suite="iteration", case="cpu-tiny", provider=provider, model="tiny-llama", prompts=16,
                samples_per_prompt=2, new_tokens=8, epochs=4, minibatches=1, dtype="float32", device="cpu",
                iteration=iteration, iteration_s=total, peak_gib=peak, tokens=200, optimizer_steps=4,
                precision="train float32", note=f"{provider} note", status="ok", steady=iteration == 1, **phases)


def test_report_iteration_table(tmp_path):
    """The iteration suite's table: per-phase seconds, steady rows first, ratios to ours on the same
    case and iteration, configuration notes and rows that did not run."""
    rows = [_iteration_row("ours", 0, 2.0, 1.0), _iteration_row("ours", 1, 1.0, 1.0),
            _iteration_row("trl-rloo", 0, 3.0, 1.5), _iteration_row("trl-rloo", 1, 2.5, 2.0),
            dict(suite="iteration", case="pythia-1.4b-random", provider="trl-rloo", status="error",
                 reason="RuntimeError: boom")]
    path = tmp_path / "cpu_2026-01-01_iteration.json"
    path.write_text(json.dumps(dict(suite="iteration", environment={"device": "cpu"}, rows=rows)))
    text = report.report(str(path))
    table = [line for line in text.splitlines() if line.startswith("| cpu-tiny")]
    assert [line.split(" | ")[1:3] for line in table] == [["ours", "1 (steady)"], ["trl-rloo", "1 (steady)"],
                                                         ["ours", "0 (warm-up)"], ["trl-rloo", "0 (warm-up)"]]
    assert table[1].endswith("| 2.50 | 2.00 |") and table[3].endswith("| 1.50 | 1.50 |"), table
    assert table[0].endswith("| 1.00 | 1.00 |") and "| - |" in table[1]  # TRL has no sync phase
    assert "- cpu-tiny / trl-rloo (cpu, float32): train float32; trl-rloo note" in text
    assert "pythia-1.4b-random / trl-rloo: ERROR RuntimeError: boom" in text
