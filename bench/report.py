"""Markdown tables (and PNG plots) of the benchmark results.

    python bench/report.py                      # every bench/results/*.json
    python bench/report.py FILE.json [...]      # the given files
    python bench/report.py --plots [FILE ...]   # + bench/results/plots/*.png (needs matplotlib)

Loss suite, per row: provider, mode, shape (N positions, valid = response tokens), dtype, status,
p20/p50/p80 ms, TFLOP/s at p50 over the rows the method computes (2NHV fwd, 8NHV fwd+bwd) and over
the valid tokens only, the fraction of the bf16 matmul peak measured in the same run (computed
rows), the op's peak memory above its inputs and the absolute peak (CUDA allocated bytes; on CPU
the RSS growth and the process's peak RSS), and time / peak memory relative to the fused op on the
same shape and mode (above 1: the fused op is faster / smaller).  Rows that did not run say why
(oom, error, incorrect: a peer that does not match the reference is not timed).

Generate suite, per row: tokens/s, decode step time, the bytes a step must read over the step time,
against the device-to-device copy bandwidth measured in the same run.

Iteration suite, per (case, iteration, provider): seconds per phase (generate, score, logprobs,
update, sync), the whole iteration, peak memory (CUDA max allocated in the iteration; CPU: process
max RSS), response tokens sampled, and time / peak memory relative to ours on the same case and
iteration (above 1: ours is faster / smaller); each provider's precision and configuration notes
follow the table.  "steady" is the last iteration measured, "warm-up" the first.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def _mib(x) -> str:
    return _num(None if x is None else x / 2**20, ".1f")


def _ms(x) -> str:
    return _num(None if x is None else 1e3 * x, ".3f")


def _shape(r: dict) -> str:
    return f"N={r['N']} valid={r.get('valid_tokens', '-')} H={r['H']} V={r['V']}"


def _sort_key(r: dict):
    return (r["device"], r["dtype"], r["H"], r["V"], r["N"], -r["response_fraction"], r["mode"], r["provider"])


def loss_table(rows: list[dict]) -> str:
    fused = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "fused" and r.get("status") == "ok"}
    lines = [
        "| provider | mode | shape | dtype | status | p20 ms | p50 ms | p80 ms | TFLOP/s | TFLOP/s valid "
        "| % bf16 peak | op peak MiB | abs peak MiB | time / fused | peak / fused |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=_sort_key):
        base = fused.get((r["case"], r["mode"]), {})
        status = r.get("status", "ok")
        frac = r.get("peak_fraction")
        lines.append("| " + " | ".join([
            r["provider"], r["mode"], _shape(r), r["dtype"], status.upper() if status != "ok" else "ok",
            _ms(r.get("p20_s")), _ms(r.get("p50_s")), _ms(r.get("p80_s")),
            _num(r.get("tflops"), ".2f"), _num(r.get("tflops_valid"), ".2f"),
            _num(None if frac is None else 100 * frac, ".1f"),
            _mib(r.get("op_peak_bytes")), _mib(r.get("abs_peak_bytes")),
            _ratio(r.get("p50_s"), base.get("p50_s")), _ratio(r.get("op_peak_bytes"), base.get("op_peak_bytes")),
        ]) + " |")
    skipped = [r for r in rows if r.get("status") not in (None, "ok", "not-timed") and r.get("reason")]
    notes = "".join(f"\n- {r['provider']} {r['mode']} {r['case']}: {r['reason']}" for r in
                    sorted(skipped, key=_sort_key))
    return "\n".join(lines) + ("\n\nNot timed:" + notes if notes else "")


def generate_table(rows: list[dict]) -> str:
    lines = [
        "| case | provider | rows | new tokens | dtype | p50 s | tokens/s | step ms | achieved GB/s | copy GB/s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["case"], r["provider"])):
        copy = r.get("copy_bytes_per_s")
        copy = None if copy is None or copy != copy else copy  # NaN on CPU
        lines.append("| " + " | ".join([
            r["case"], r["provider"], str(r["rows"]), str(r["new_tokens"]), r["dtype"],
            _num(r.get("p50_s"), ".3f"), _num(r.get("tokens_per_s"), ".0f"), _num(r.get("step_ms"), ".2f"),
            _num(None if r.get("achieved_bytes_per_s") is None else r["achieved_bytes_per_s"] / 1e9, ".1f"),
            _num(None if copy is None else copy / 1e9, ".1f"),
        ]) + " |")
    return "\n".join(lines)


ITERATION_PHASES = ("generate", "score", "logprobs", "update", "sync")


def iteration_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    ours = {(r["case"], r["iteration"]): r for r in ok if r["provider"] == "ours"}
    lines = [
        "| case | provider | iteration | batch | epochs | " + " | ".join(f"{p} s" for p in ITERATION_PHASES)
        + " | iteration s | peak GiB | tokens | time / ours | peak / ours |",
        "|---|---|---|---|---:|" + "---:|" * (len(ITERATION_PHASES) + 5),
    ]
    for r in sorted(ok, key=lambda r: (r["case"], -r["iteration"], r["provider"] != "ours", r["provider"])):
        base = ours.get((r["case"], r["iteration"]), {})
        lines.append("| " + " | ".join([
            r["case"], r["provider"], f"{r['iteration']} ({'steady' if r.get('steady') else 'warm-up'})",
            f"{r['prompts']} x {r['samples_per_prompt']} x {r['new_tokens']} tok", str(r["epochs"]),
            *(_num(r.get(f"{p}_s"), ".4g") for p in ITERATION_PHASES),
            _num(r.get("iteration_s"), ".4g"), _num(r.get("peak_gib"), ".2f"), str(r.get("tokens", "-")),
            _ratio(r.get("iteration_s"), base.get("iteration_s")), _ratio(r.get("peak_gib"), base.get("peak_gib")),
        ]) + " |")
    configs = {(r["case"], r["provider"]): r for r in ok}
    notes = [f"- {case} / {provider} ({r['device']}, {r['dtype']}): {r.get('precision', '-')}; {r.get('note', '')}"
             for (case, provider), r in sorted(configs.items())]
    notes += [f"- {r['case']} / {r['provider']}: {r.get('status', '').upper()} {r.get('reason', '')}"
              for r in rows if r.get("status", "ok") != "ok"]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def _head(path: str, env: dict) -> str:
    peak = env.get("bf16_matmul_peak_tflops")
    peers = ", ".join(f"{k} {v}" for k, v in (env.get("peers") or {}).items() if v)
    return (f"## {os.path.basename(path)}\n\n"
            f"device: {env.get('device')}; driver: {env.get('driver', '-')}; torch {env.get('torch')}, "
            f"triton {env.get('triton')}{'; ' + peers if peers else ''}; commit {env.get('git_commit') or '-'}"
            f"{' (dirty)' if env.get('git_dirty') else ''}; {env.get('datetime_utc', env.get('date'))}"
            f"{f'; bf16 matmul peak {peak:.0f} TFLOP/s (measured)' if peak else ''}\n")


def plain_table(rows: list[dict]) -> str:
    """Any other suite (e.g. engine/compare.py's): one column per key, numbers to 3 decimals."""
    keys = list(rows[0]) if rows else []
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path}: not a results file (expected an object with 'rows')")
    suite = data.get("suite", "loss")
    tables = {"generate": generate_table, "loss": loss_table, "iteration": iteration_table}
    table = tables.get(suite, plain_table)(data["rows"])
    return _head(path, data.get("environment", {})) + f"\n### {suite}\n\n" + table + "\n"


def plots(paths: list[str], out_dir: str) -> list[str]:
    """One PNG per (device, dtype, H, V, response fraction, mode): p50 time and op peak memory vs
    N, one line per provider."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    groups = defaultdict(list)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("suite", "loss") != "loss":
            continue
        for r in data["rows"]:
            if r.get("status") == "ok" and r.get("p50_s") is not None:
                key = (r["device"], r["dtype"], r["H"], r["V"], round(100 * r["response_fraction"]), r["mode"])
                groups[key].append(r)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (device, dtype, h, v, pct, mode), rows in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        for provider in sorted({r["provider"] for r in rows}):
            mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["N"])
            ns = [r["N"] for r in mine]
            ax_t.plot(ns, [1e3 * r["p50_s"] for r in mine], marker="o", label=provider)
            mem = [(r["N"], r["op_peak_bytes"] / 2**20) for r in mine if r.get("op_peak_bytes") is not None]
            if mem:
                ax_m.plot(*zip(*mem), marker="o", label=provider)
        for ax, label in ((ax_t, "p50 time (ms)"), (ax_m, "op peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (positions)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{mode}, {device} {dtype}, H={h} V={v}, {pct}% response tokens")
        fig.tight_layout()
        path = os.path.join(out_dir, f"loss_{device}_{dtype}_H{h}_V{v}_r{pct}_{mode}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    want_plots = "--plots" in argv
    paths = [a for a in argv if a != "--plots"] or sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    if not paths:
        print("no results: run REBEL_BENCH_SAVE=1 python -m pytest bench/", file=sys.stderr)
        return 1
    print("\n".join(report(p) for p in paths))
    if want_plots:
        for path in plots(paths, os.path.join(RESULTS, "plots")):
            print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
