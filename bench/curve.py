"""The default run's learning curve with packing on and off: is the packed path's training within the
seed noise of the padded one? Runs `engine/train.py` (the embedded default: 200 iterations on the
counting task) for each seed with the defaults ("ours": shared prefix, packing by a token budget, log
pi_t folded) and with all three off ("ours-off"), one process at a time, one thread, then prints one
JSON object: per provider and seed the score, reward and KL of the first and the last iteration (what the
run prints) and their means over windows of 50 iterations, the mean seconds per iteration and the
iterations' total seconds; and the held-out evaluation's first and last rows (eval.jsonl: score,
reference score, win rate against the reference, KL) with the evaluations' total seconds.

    OMP_NUM_THREADS=1 python -m bench.curve --seeds 0 1 2 [--out bench/results/HOST_DATE_default-curve.json]

Both paths compute the same numbers up to float32 rounding; the runs part ways where a rounding flips a
sampled token, so the comparison is against the spread over seeds, not run by run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench._environment import environment
from bench._iteration import UNPACKED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDERS = {"ours": (), "ours-off": UNPACKED}
WINDOW = 50


def run(provider: str, seed: int, run_dir: str) -> tuple[list[dict], list[dict]]:
    """One default run; its metrics rows and its evaluation rows."""
    args = [sys.executable, "-m", "engine.train", "--run_dir", run_dir, "--seed", str(seed), "--logging.progress",
            "false", "--logging.tensorboard", "false", "--logging.plots", "false", "--checkpoint.every", "0"]
    for key, value in PROVIDERS[provider]:
        args += [f"--{key}", value]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(args, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    for name in ("metrics.jsonl", "eval.jsonl"):
        with open(os.path.join(run_dir, name)) as f:
            rows.append([json.loads(line) for line in f])
    return rows[0], rows[1]


def summarize(provider: str, seed: int, rows: list[dict], evals: list[dict]) -> dict:
    out = {"provider": provider, "seed": seed, "iterations": len(rows),
           "iteration_s": statistics.mean(r["time/iteration"] for r in rows[10:])}
    for key in ("score/mean", "reward/mean", "kl/mean"):  # what the run's own summary prints
        out[f"{key.split('/')[0]}_first"], out[f"{key.split('/')[0]}_last"] = rows[0][key], rows[-1][key]
    out["run_s"] = sum(r["time/iteration"] for r in rows)
    for start in range(0, len(rows), WINDOW):
        window = rows[start : start + WINDOW]
        for key in ("score/mean", "reward/mean", "kl/mean"):
            out[f"{key.split('/')[0]}_{start}_{start + len(window)}"] = statistics.mean(r[key] for r in window)
    for key in ("score", "reference_score", "win_rate", "kl"):
        out[f"eval_{key}_first"], out[f"eval_{key}_last"] = evals[0][key], evals[-1][key]
    out["eval_iterations"] = [r["iteration"] for r in evals]
    out["eval_s"] = sum(r["seconds"] for r in evals)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for provider in PROVIDERS:  # interleaved
                rows.append(summarize(provider, seed, *run(provider, seed, os.path.join(tmp, f"{provider}-{seed}"))))
    result = {"suite": "default-curve", "environment": environment(), "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(rows))
    return result


if __name__ == "__main__":
    main()
