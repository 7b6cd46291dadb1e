"""Markdown tables (and PNG plots) of the benchmark results.

    python -m bench.report                      # every bench/results/*.json
    python -m bench.report FILE.json [...]      # the given files
    python -m bench.report --plots [FILE ...]   # + bench/results/plots/*.png (needs matplotlib)

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
    """The file's environment record on one line; fields an older file lacks are left out."""
    peak = env.get("bf16_matmul_peak_tflops")
    peers = ", ".join(f"{k} {v}" for k, v in (env.get("peers") or {}).items() if v)
    device = env.get("device")
    host = [f"CPU {env['cpu']}" if env.get("cpu") and env["cpu"] != device else "",
            f"{env['cpu_count']} cores" if env.get("cpu_count") else ""]
    parts = [f"device: {device}" + (f" ({', '.join(p for p in host if p)})" if any(host) else ""),
             f"driver: {env['driver']}" if env.get("driver") else "",
             ", ".join(f"{lib} {env[lib]}" for lib in ("torch", "triton", "transformers") if env.get(lib)), peers,
             f"commit {env.get('git_commit') or '-'}{' (dirty)' if env.get('git_dirty') else ''}",
             str(env.get("datetime_utc", env.get("date"))),
             f"bf16 matmul peak {peak:.0f} TFLOP/s (measured)" if peak else ""]
    return f"## {os.path.basename(path)}\n\n" + "; ".join(p for p in parts if p) + "\n"


def plain_table(rows: list[dict]) -> str:
    """Any other suite (e.g. bench/compare.py's): one column per key, numbers to 3 decimals."""
    keys = list(rows[0]) if rows else []

    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

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


def _loss_groups(paths: list[str]) -> dict:
    """Timed loss rows by (device, dtype, H, V, response %, mode), one per (provider, N)."""
    groups = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("suite", "loss") != "loss":
            continue
        for r in data["rows"]:
            if r.get("status") == "ok" and r.get("p50_s") is not None:
                key = (r["device"], r["dtype"], r["H"], r["V"], round(100 * r["response_fraction"]), r["mode"])
                groups[key][(r["provider"], r["N"])] = r  # measured twice: the later file's row
    return {key: list(rows.values()) for key, rows in groups.items()}


def _metrics(r: dict) -> tuple:
    """(p50 ms, op peak MiB or None) of a row."""
    mem = r.get("op_peak_bytes")
    return 1e3 * r["p50_s"], None if mem is None else mem / 2**20


PLOT_PANELS = ("p50 time (ms)", "op peak memory (MiB)")
# One colour per provider in every plot (the loss suite's providers, fused first); others get the next ones.
PLOT_ORDER = ("fused", "naive", "naive-response", "compile", "torch-lce", "liger", "liger-scaled", "cce", "cce_exact")


def _providers(rows: list[dict]) -> list[str]:
    names = {r["provider"] for r in rows}
    return [p for p in PLOT_ORDER if p in names] + sorted(names - set(PLOT_ORDER))


def _color(provider: str, providers: list[str]) -> str:
    extra = [p for p in providers if p not in PLOT_ORDER]
    return f"C{PLOT_ORDER.index(provider) if provider in PLOT_ORDER else len(PLOT_ORDER) + extra.index(provider)}"


def _curves(axes, rows: list[dict]) -> None:
    """Several N: one line per provider over N, log-log."""
    providers = _providers(rows)
    for provider in providers:
        mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["N"])
        for k, ax in enumerate(axes):
            pts = [(r["N"], _metrics(r)[k]) for r in mine if _metrics(r)[k] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider, color=_color(provider, providers))
    for ax, label in zip(axes, PLOT_PANELS):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (positions)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)


def _bars(axes, rows: list[dict]) -> None:
    """One N: one bar per provider (linear axis from 0, the value on each bar)."""
    providers = _providers(rows)
    rows = sorted(rows, key=lambda r: providers.index(r["provider"]))
    for k, (ax, label) in enumerate(zip(axes, PLOT_PANELS)):
        pts = [(r["provider"], _metrics(r)[k]) for r in rows if _metrics(r)[k] is not None]
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            names, values = zip(*pts)
            bars = ax.bar(names, values, color=[_color(p, providers) for p in names])
            ax.bar_label(bars, labels=[f"{x:.0f}" if x >= 100 else f"{x:.3g}" for x in values], fontsize=8)
            ax.margins(y=0.12)
            if len(names) > 4:
                for tick in ax.get_xticklabels():
                    tick.set(rotation=30, ha="right")
        ax.set_xlabel(f"provider (N={rows[0]['N']} positions)")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)


def plots(paths: list[str], out_dir: str) -> list[str]:
    """One PNG per (device, dtype, H, V, response fraction, mode): p50 time and op peak memory
    per provider, as a line over N where the results hold several N, as bars where they hold one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (device, dtype, h, v, pct, mode), rows in sorted(_loss_groups(paths).items()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        (_curves if len({r["N"] for r in rows}) > 1 else _bars)(axes, rows)
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
