"""The run planner (engine/plan/) against what runs measure: peak memory and time per phase, predicted
beside measured.

CPU (this machine, one thread): four short runs of the engine, each in a fresh process (bench/_iteration.py's
`run_ours`: build -> loop, phases from the run's metrics, the steady last iteration), their peak RSS read
from /proc/self/status (VmHWM: the process's own high-water mark, not inherited from the parent), beside
the planner's prediction for the same config on the CPU measured in this process:

    OMP_NUM_THREADS=1 python -m bench.plan_check [--cases default prompt-heavy ...] [--out results.json]

GPU: bench/gpu_session.py's iteration part writes `predicted_row` beside its measured rows; the first lend's
numbers refit the device's efficiency factors (engine/plan/devices.py):

    python -m bench.plan_check --refit path/to/iteration.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench import _iteration
from bench._environment import REPO_ROOT, environment
from bench._memory import MMAP_THRESHOLD

MARK = "PLAN_CHECK "
PHASES = ("generate", "score", "logprobs", "update", "sync")
GIB = 2**30

_LONG = (("model.policy", "builtin:llama-32k-random"), ("data.prompts", "builtin:counting_long"),
         ("data.max_prompt_tokens", "300"))
CASES = {c.name: c for c in (
    # the embedded default (tiny Llama, 64 prompts x 2 x 8 new tokens, 4 epochs)
    _iteration.IterCase("default", "default", (("generation.max_new_tokens", "8"),), cuda=False, timeout_s=120,
                        threads=1),
    _iteration.CASES["cpu-prompt-heavy"],
    # short prompts, many of them: the 32k head, activation checkpointing (so a separate generation copy)
    _iteration.IterCase("checkpointed-32k", "default", (
        ("model.policy", "builtin:llama-32k-random"), ("model.activation_checkpointing", "true"),
        ("train.prompts_per_iteration", "32"), ("train.num_epochs", "1"), ("generation.max_new_tokens", "16"),
        ("generation.min_new_tokens", "16")), cuda=False, timeout_s=200, threads=1),
    # LoRA (no reference copy) on padded rows (packing off), long prompts
    _iteration.IterCase("lora-padded", "default", (
        *_LONG, ("model.lora_rank", "8"), ("train.prompts_per_iteration", "8"), ("train.micro_batch_tokens", "0"),
        ("train.shared_prefix", "false"), ("train.num_epochs", "1"), ("generation.max_new_tokens", "12"),
        ("generation.min_new_tokens", "12")), cuda=False, timeout_s=200, threads=1),
)}


def vmhwm_bytes() -> int:
    """This process's peak resident set (VmHWM), from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def planned(case: _iteration.IterCase, iterations: int, dev) -> dict:
    """The planner's prediction for the case's config on one process of `dev`."""
    from engine import plan

    p = plan.plan_run(_iteration.train_config(case, iterations, "runs/plan_check"), dev=dev, world=1)
    return {**{f"{name}_s": p.phases[name].seconds for name in PHASES}, "iteration_s": p.iteration_s,
            "calls": {name: p.phases[name].calls for name in PHASES},
            "roofline_s": {name: p.phases[name].seconds - p.phases[name].fixed_s for name in PHASES},
            "peak_gib": p.peak_bytes / GIB, "peak_phase": max(("generation", "training"), key=p.peak),
            # what torch.cuda.max_memory_allocated sees (the GPU rows' peak_gib): the peak less the runtime
            "peak_allocated_gib": (p.peak_bytes - p.persistent["runtime"]) / GIB,
            "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "device_model": p.device.name,
            "tokens_forwarded": p.work.forwarded_tokens,
            "parts_gib": {k: v / GIB for k, v in {**p.persistent, **p.generation, **p.training}.items()}}


def predicted_row(case_name: str, iterations: int = 2) -> dict:
    """The prediction for one of bench/_iteration.py's cases on this machine's device (its GPU kind, or
    this CPU measured with the case's threads): what bench/gpu_session.py records beside its rows."""
    import torch

    from engine import plan

    case = _iteration.CASES[case_name]
    kind = plan.kind_of(torch.cuda.get_device_name()) if (case.cuda and torch.cuda.is_available()) else "cpu"
    dev = plan.device(kind, threads=case.threads)
    return {"case": case_name, "provider": "planner", **planned(case, iterations, dev)}


def measure(name: str, iterations: int, timed: bool = True) -> dict:
    """The case in fresh processes: the steady iteration's phases (glibc's default allocator, what a run
    gets), and the peak RSS of a one-iteration run whose blocks of 1 MiB or more are mmap'ed and returned
    when freed (MALLOC_MMAP_THRESHOLD_, as bench/_memory.py measures CPU memory: RSS then follows the live
    tensors, not what the allocator keeps of freed ones; the default allocator's peak is kept beside it).
    `timed` False: the memory run only (its phases are a first iteration's)."""
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    live = _run_child(name, 1, {"MALLOC_MMAP_THRESHOLD_": threshold})
    if not timed:
        return {**live, "peak_gib_default_allocator": None}
    steady = _run_child(name, iterations, {})
    return {**steady, "peak_gib": live["peak_gib"], "peak_gib_default_allocator": steady["peak_gib"]}


def _run_child(name: str, iterations: int, env: dict) -> dict:
    case = CASES[name]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(case.threads or 1), **env}
    proc = subprocess.run([sys.executable, "-m", "bench.plan_check", "--child", name, "--iterations", str(iterations)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=case.timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"plan_check {name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def _child(name: str, iterations: int) -> None:
    import torch

    case = CASES[name]
    torch.set_num_threads(case.threads or 1)
    with tempfile.TemporaryDirectory(prefix="rebel_plan_check_") as run_dir:
        rows = _iteration.run_ours(case, iterations, run_dir)
    steady = rows[-1]
    out = {f"{p}_s": steady.get(f"{p}_s") or 0.0 for p in PHASES}
    print(MARK + json.dumps({**out, "iteration_s": steady["iteration_s"], "peak_gib": vmhwm_bytes() / GIB,
                             "tokens": steady["tokens"], "tokens_forwarded": steady.get("tokens_forwarded")}))


def compare(predicted: dict, measured: dict) -> dict:
    """predicted / measured - 1 of the peak and the iteration; per phase the ratio (phases under 5% of the
    measured iteration are listed but not scored: their share is noise at this size)."""
    err = {"peak": predicted["peak_gib"] / measured["peak_gib"] - 1,
           "iteration": predicted["iteration_s"] / measured["iteration_s"] - 1}
    if measured.get("tokens_forwarded"):
        err["tokens_forwarded"] = predicted["tokens_forwarded"] / measured["tokens_forwarded"] - 1
    for p in PHASES:
        m = measured[f"{p}_s"]
        if m >= 0.05 * measured["iteration_s"]:
            err[p] = predicted[f"{p}_s"] / m - 1
    return err


def check(names=tuple(CASES), iterations: int = 2, timed: bool = True) -> dict:
    """Every case measured and predicted (the CPU measured once, here, with one thread); `timed` False:
    memory and token positions only (one run per case, see `measure`)."""
    from engine import plan

    load = os.getloadavg()  # another process on the cores slows every phase (and the matmul measured here)
    dev = plan.measure_cpu(threads=1)
    out = {}
    for name in names:
        measured = measure(name, iterations, timed)
        predicted = planned(CASES[name], iterations, dev)
        out[name] = {"measured": measured, "predicted": predicted, "error": compare(predicted, measured)}
    return {"suite": "plan-check", "environment": environment(), "iterations": iterations,
            "load_average_before_after": [load[0], os.getloadavg()[0]],
            "cpu": {"tflops": dev.bf16_tflops, "copy_tbs": dev.hbm_tbs}, "cases": out, "rows": summary_rows(out)}


def summary_rows(cases: dict) -> list[dict]:
    """One row per case, measured beside predicted (what bench/report.py tabulates)."""
    rows = []
    for name, r in cases.items():
        m, p = r["measured"], r["predicted"]
        rows.append({"case": name, "peak_gib_measured": m["peak_gib"], "peak_gib_predicted": p["peak_gib"],
                     "peak_error": p["peak_gib"] / m["peak_gib"] - 1, "iteration_s_measured": m["iteration_s"],
                     "iteration_s_predicted": p["iteration_s"],
                     "iteration_error": p["iteration_s"] / m["iteration_s"] - 1})
    return rows


def fit(result: dict) -> dict:
    """The CPU's constants (engine/plan/devices.py) that best explain the measured phases of `result` (a
    `check`): measured = roofline / (efficiency factor) + calls . fixed costs, non-negative least squares on
    relative error over every phase above 5% of its iteration; the runtime's resident memory from the default
    case (a tiny model: its peak is almost all runtime), so the other three cases test memory out of sample."""
    import numpy as np

    from engine.plan import devices

    rows, rhs = [], []
    for r in result["cases"].values():
        m, p = r["measured"], r["predicted"]
        for phase in PHASES:
            if m[f"{phase}_s"] >= 0.05 * m["iteration_s"]:
                roof = p["roofline_s"][phase]
                x = [roof, 0.0] if phase != "generate" else [0.0, roof]
                rows.append([v / m[f"{phase}_s"] for v in x + [c * 1e-6 for c in p["calls"][phase]]])
                rhs.append(1.0)
    sol = _nnls(np.array(rows), np.array(rhs))
    names = ("pass_efficiency", "generation_efficiency")
    out = {name: round(float(devices.CPU_EFFICIENCY[name] / sol[i]), 3) if sol[i] > 0 else None
           for i, name in enumerate(names)}
    out |= {name: round(float(c), 1) for name, c in zip(devices.OVERHEADS, sol[2:])}
    default = result["cases"].get("default")
    if default:
        p = default["predicted"]
        out["runtime_gib"] = round(default["measured"]["peak_gib"] - p["peak_gib"] + p["parts_gib"]["runtime"], 3)
    return out


def _nnls(a, b):
    """min ||a x - b|| with x >= 0: least squares, dropping the most negative coefficient until none is."""
    import numpy as np

    keep = list(range(a.shape[1]))
    while True:
        sol = np.linalg.lstsq(a[:, keep], b, rcond=None)[0]
        if (sol >= 0).all():
            break
        keep.pop(int(np.argmin(sol)))
    out = np.zeros(a.shape[1])
    out[keep] = sol
    return out


def refit(path: str) -> dict:
    """From a GPU session's iteration.json: per phase measured / predicted (ours, the steady iteration), the
    peak against the planner's (less the runtime on a GPU: max_memory_allocated does not see the CUDA
    context), and the factors (engine/plan/devices.py) that would have predicted the update and the
    generation exactly."""
    from engine import plan

    rows = json.load(open(path))["rows"]
    steady = [r for r in rows if r.get("provider") == "ours"][-1]
    pred = next(r for r in rows if r.get("provider") == "planner")
    ratios = {p: steady[f"{p}_s"] / pred[f"{p}_s"] for p in PHASES if steady.get(f"{p}_s") and pred.get(f"{p}_s")}
    kind = plan.kind_of(pred["device_model"])
    dev = plan.DEVICES.get(kind)
    ratios["peak_memory"] = steady["peak_gib"] / pred["peak_allocated_gib" if dev else "peak_gib"]
    out = {"device": pred["device_model"], "measured_over_predicted": ratios}
    if dev:
        for factor, phase in (("pass_efficiency", "update"), ("generation_efficiency", "generate")):
            if phase in ratios:
                out[factor] = {"now": getattr(dev, factor), "refit": getattr(dev, factor) / ratios[phase]}
    return out


# The paper's presets on H100s (the README's "Planning a run"): (preset, GPUs, overrides)
PAPER = (("tldr_pythia_1b4", 8, ()), ("tldr_pythia_2b8", 8, ()), ("tldr_pythia_6b9", 8, ()),
         ("tldr_pythia_6b9", 8, (("model.activation_checkpointing", "true"),)),
         ("ultrafeedback_llama3_8b", 8, ()), ("ultrafeedback_llama3_8b", 16, ()))


def paper_table(kind: str = "h100") -> str:
    """Predictions for the paper's presets: peaks, phases, iteration, tokens/s per GPU, bottleneck."""
    from engine import config as config_mod
    from engine import plan

    lines = ["| preset | GPUs | peak GiB (generation / training) | fits | generate s | score s | logprobs s | "
             "update s | sync s | iteration s | tokens/s/GPU | bottleneck |",
             "|---|---:|---|---|" + "---:|" * 7 + "---|"]
    for preset, gpus, overrides in PAPER:
        cfg = config_mod.apply_overrides(config_mod.PRESETS[preset](), list(overrides))
        p = plan.plan_run(cfg, dev=plan.device(kind), world=gpus)
        name = preset + "".join(f", {k} {v}" for k, v in overrides)
        phases = " | ".join(f"{p.phases[n].seconds:.3g}" for n in PHASES)
        where, bound = p.bottleneck
        lines.append(f"| {name} | {gpus} ({p.nodes} node{'s' * (p.nodes > 1)}) | {p.peak('generation') / GIB:.1f} / "
                     f"{p.peak('training') / GIB:.1f} | {'yes' if p.fits else '**no**'} | {phases} | "
                     f"{p.iteration_s:.3g} | {p.tokens_per_s_per_gpu:,.0f} | {where} ({bound}) |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = ["| case | peak RSS GiB measured / predicted (error) | iteration s measured / predicted (error) | "
             "token positions measured / predicted | phases (predicted / measured - 1) |", "|---|---|---|---|---|"]
    for name, r in result["cases"].items():
        m, p, e = r["measured"], r["predicted"], r["error"]
        phases = ", ".join(f"{k} {v:+.0%}" for k, v in e.items() if k in PHASES)
        lines.append(f"| {name} | {m['peak_gib']:.2f} / {p['peak_gib']:.2f} ({e['peak']:+.1%}) | "
                     f"{m['iteration_s']:.3g} / {p['iteration_s']:.3g} ({e['iteration']:+.0%}) | "
                     f"{m.get('tokens_forwarded') or 0:,.0f} / {p['tokens_forwarded']:,.0f} | {phases} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    a.add_argument("--iterations", type=int, default=2)
    a.add_argument("--out")
    a.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    a.add_argument("--refit", help="a GPU session's iteration.json")
    a.add_argument("--paper", metavar="KIND", help="print the predictions for the paper's presets on KIND (h100)")
    a.add_argument("--fit", action="store_true", help="also print the CPU's fixed costs fitted to these runs")
    args = a.parse_args(argv)
    if args.child:
        _child(args.child, args.iterations)
        return 0
    if args.paper:
        print(paper_table(args.paper))
        return 0
    if args.refit:
        print(json.dumps(refit(args.refit), indent=1))
        return 0
    result = check(args.cases, args.iterations)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))
    if args.fit:
        print("fitted CPU overheads (us):", fit(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
