"""Markdown tables of the loss benchmark results.

    python bench/report.py                      # every bench/results/*loss*.json
    python bench/report.py FILE.json [...]      # the given files

Per row: provider, mode, shape, dtype, p50 ms, TFLOP/s, peak MiB (peak memory of the op above its
inputs: CUDA allocated bytes, or RSS growth on CPU), and fused / naive ratios of time and peak
memory for the same shape and mode (below 1: fused is faster / smaller).
"""
from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _shape(r: dict) -> str:
    return f"N={r['N']} H={r['H']} V={r['V']} resp={round(100 * r['response_fraction'])}%"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(rows: list[dict]) -> str:
    naive = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "naive"}
    lines = [
        "| provider | mode | device | shape | dtype | p50 ms | TFLOP/s | peak MiB | time / naive | peak / naive |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["device"], r["N"], -r["response_fraction"], r["case"], r["mode"],
                                         r["provider"])):
        base = naive.get((r["case"], r["mode"]), {})
        p50, peak = r.get("p50_s"), r.get("op_peak_bytes")
        status = r.get("status", "ok")
        lines.append("| " + " | ".join([
            r["provider"], r["mode"], r["device"], _shape(r), r["dtype"],
            _num(None if p50 is None else 1e3 * p50, ".3f") if status != "oom" else "OOM",
            _num(r.get("tflops"), ".2f"),
            _num(None if peak is None else peak / 2**20, ".1f"),
            _ratio(p50, base.get("p50_s")),
            _ratio(peak, base.get("op_peak_bytes")),
        ]) + " |")
    return "\n".join(lines)


def report(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    env = data.get("environment", {})
    head = (f"## {os.path.basename(path)}\n\n"
            f"device: {env.get('device')}; driver: {env.get('driver', '-')}; torch {env.get('torch')}, "
            f"triton {env.get('triton')}; commit {env.get('git_commit') or '-'}"
            f"{' (dirty)' if env.get('git_dirty') else ''}; {env.get('datetime_utc', env.get('date'))}\n")
    return head + "\n" + table(data["rows"]) + "\n"


def main(argv: list[str]) -> int:
    paths = argv or sorted(glob.glob(os.path.join(HERE, "results", "*loss*.json")))
    if not paths:
        print("no results: run REBEL_BENCH_SAVE=1 python -m pytest bench/", file=sys.stderr)
        return 1
    print("\n".join(report(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
