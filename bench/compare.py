"""The paper's comparison (its Table 1 / Figure 5) on the built-in task: every algorithm through the
same loop, fused op and generation, with the same budget of reward queries per iteration.

    python -m bench.compare                      # writes runs/compare/{table.md, results.json, reward_vs_kl.png}
    python -m bench.compare --run_dir out --iterations 50

Each algorithm gets 128 feedback queries per iteration: reward-model calls for the on-policy
algorithms (RLOO with k = 4 gets 32 prompts, k = 2 algorithms 64), preference-model calls for REBEL
from preferences (2 per prompt: 64 prompts, 3 samples each); offline DPO reads 64 labelled pairs of
the built-in preference dataset per iteration (its labels were paid for up front) and samples 2
responses per prompt only to measure its policy. REBEL with LoRA (rank 8) is the default run with
adapters instead of full fine-tuning. Reported per algorithm: the mean reward and score of the last 10%
of iterations (with their standard error over those iterations), the KL to the reference, wall time
(process start included) and peak memory (RSS on CPU, allocated on GPU); each entry runs in its own
process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from bench._environment import REPO_ROOT, environment
from engine import config as C

TRAIN = ("-m", "engine.train")  # the entry point each entry runs (from the repository root)
QUERIES_PER_ITERATION = 128
ENTRIES = ["default", "counting_reinforce", "counting_rloo2", "counting_rloo4", "counting_iterative_dpo",
           "counting_dpo", "counting_rebel_preference", "counting_lora"]


def prompts_per_iteration(algorithm) -> int:
    """Prompts that spend QUERIES_PER_ITERATION feedback queries (offline: as many pairs as REBEL's)."""
    return QUERIES_PER_ITERATION // (algorithm.queries_per_prompt or algorithm.samples_per_prompt)


def overrides(preset: str, run_dir: str, iterations: int) -> list[tuple[str, str]]:
    """The config overrides of one entry: same task, iterations and feedback queries per iteration."""
    prompts = prompts_per_iteration(C.PRESETS[preset]().algorithm)
    return [("run_dir", os.path.join(run_dir, preset)), ("train.prompts_per_iteration", str(prompts)),
            ("optim.iterations", str(iterations)), ("logging.tensorboard", "false"),
            ("logging.progress", "false"), ("checkpoint.every", "0"), ("checkpoint.export_hf", "false"),
            ("eval.prompts", "none")]  # training alone: its wall time and feedback queries, as measured


def run(preset: str, run_dir: str, iterations: int) -> tuple[C.TrainConfig, float]:
    """One entry in its own process (python -m engine.train --preset P --key value ..., run from the
    repository root), so that its peak memory is its own; its config (the same overrides on the same
    preset) and wall time."""
    run_dir = os.path.abspath(run_dir)  # the child's working directory is the repository root
    pairs = overrides(preset, run_dir, iterations)
    argv = ["--preset", preset, *(arg for key, value in pairs for arg in (f"--{key}", value))]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *TRAIN, *argv], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return C.apply_overrides(C.PRESETS[preset](), pairs), time.perf_counter() - t0


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of a finished run's metrics.jsonl (one JSON object per line)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(preset: str, cfg: C.TrainConfig, wall_s: float) -> dict:
    rows = read_metrics(cfg.run_dir)
    tail = rows[-max(1, len(rows) // 10):]

    def mean_se(key):
        xs = [r[key] for r in tail if r.get(key) is not None]
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))
        return m, sd / math.sqrt(len(xs))

    reward, reward_se = mean_se("reward/mean")
    score, score_se = mean_se("score/mean")
    name = type(cfg.algorithm).__name__ + (f" + LoRA r={cfg.model.lora_rank}" if cfg.model.lora_rank else "")
    return dict(preset=preset, algorithm=name, k=cfg.algorithm.samples_per_prompt,
                feedback="offline pairs" if cfg.algorithm.offline else
                ("preference model" if cfg.algorithm.needs_preferences else "reward model"),
                prompts=cfg.train.prompts_per_iteration,
                epochs=cfg.train.num_epochs, iterations=len(rows), first_score=rows[0]["score/mean"],
                reward=reward, reward_se=reward_se, score=score, score_se=score_se,
                kl=mean_se("kl/mean")[0], wall_s=wall_s, peak_gib=max(r["memory/peak_gib"] for r in rows))


def table(results: list[dict]) -> str:
    lines = ["| algorithm | feedback | k | prompts/iter | epochs | score (last 10%) | reward (score - KL term) | KL "
             "| wall s | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['algorithm']} | {r.get('feedback', 'reward model')} | {r['k']} | {r.get('prompts', '-')} | "
                     f"{r['epochs']} | {r['score']:.3f} +- {r['score_se']:.3f} | "
                     f"{r['reward']:.3f} +- {r['reward_se']:.3f} | {r['kl']:.2f} | {r['wall_s']:.0f} | "
                     f"{r['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    placed = []
    for r in results:
        ax.errorbar(r["kl"], r["score"], yerr=r.get("score_se"), fmt="o", ms=6, capsize=3)
        near = sum(abs(r["kl"] - kl) < 0.6 and abs(r["score"] - score) < 0.05 for kl, score in placed)
        placed.append((r["kl"], r["score"]))  # labels of coinciding points stack instead of overlapping
        ax.annotate(f"{r['algorithm']} k={r['k']}", (r["kl"], r["score"]), fontsize=8, xytext=(4, 4 + 10 * near),
                    textcoords="offset points")
    ax.margins(x=0.12, y=0.15)  # room for the labels
    ax.set_xlabel("KL to the reference (nats, last 10% of iterations)")
    ax.set_ylabel("task score (last 10% of iterations, +- s.e.)")
    ax.set_title("Counting task: score vs KL, equal feedback queries")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/compare")
    parser.add_argument("--iterations", type=int, default=C.default().optim.iterations)
    parser.add_argument("--only", nargs="*", choices=ENTRIES, default=ENTRIES)
    args = parser.parse_args(argv)
    os.makedirs(args.run_dir, exist_ok=True)
    results = []
    for preset in args.only:
        cfg, wall_s = run(preset, args.run_dir, args.iterations)
        results.append(summarize(preset, cfg, wall_s))
        print(f"{preset}: score {results[-1]['score']:.3f}, KL {results[-1]['kl']:.2f}", flush=True)
    with open(os.path.join(args.run_dir, "results.json"), "w") as f:
        json.dump({"suite": "compare", "environment": environment(), "rows": results}, f, indent=1)
    with open(os.path.join(args.run_dir, "table.md"), "w") as f:
        f.write(table(results))
    plot(results, os.path.join(args.run_dir, "reward_vs_kl.png"))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
