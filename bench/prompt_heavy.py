"""The prompt-heavy CPU iteration: where a pair's prompt dominates its token positions. 16 prompts of
64..256 tokens (uniform, fixed seed) x 2 responses x 24 new tokens, a random Llama (H 256, 4 layers,
4 heads, MLP 688) with a 32000-token head, float32, 4 epochs of one optimizer step over the whole batch,
one thread; each provider in a fresh process (bench/_iteration.py, case "cpu-prompt-heavy"), runs
interleaved, the steady (last) iteration of each run, the median over runs. Prints one JSON object:

    OMP_NUM_THREADS=1 python -m bench.prompt_heavy --runs 3 [--out bench/results/HOST_DATE_prompt-heavy.json]

per provider: iteration_s, the per-phase seconds, tokens_forwarded (token positions that go through
the transformer body in every training pass of the iteration: log pi_t, log pi_ref and each epoch,
padding included; ours only, counted by hooks on the built run) and peak_rss_gib. Providers: "ours"
(the defaults: each prompt forwarded once per pass with both responses, padding-free packing by a
token budget, log pi_t folded into the first epoch; engine/model/packing.py), "ours-off" (all three off:
every prompt forwarded once per response, rows left-padded, a separate no-grad log pi_t pass) and
TRL's RLOOTrainer k = 2 ("trl-rloo", configured as the iteration suite does).
"""
from __future__ import annotations

import argparse
import json
import statistics

from bench import _iteration
from bench._environment import environment

CASE = "cpu-prompt-heavy"
KEYS = ("iteration_s", *(f"{p}_s" for p in _iteration.PHASES), "tokens_forwarded", "peak_gib")


def summarize(rows: list[dict]) -> dict:
    """The median over runs of each key (None where a provider does not report it)."""
    out = {}
    for key in KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out["peak_rss_gib" if key == "peak_gib" else key] = statistics.median(values) if values else None
    out["runs"] = len(rows)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2, help="per run; the last one is measured")
    p.add_argument("--providers", nargs="*", default=["ours", "ours-off", "trl-rloo"], choices=list(_iteration.RUNNERS))
    p.add_argument("--case", default=CASE, choices=list(_iteration.CASES))
    p.add_argument("--out")
    a = p.parse_args(argv)
    steady = {provider: [] for provider in a.providers}
    for _ in range(a.runs):
        for provider in a.providers:  # interleaved
            rows = _iteration.measure(provider, a.case, iterations=a.iterations,
                                      timeout=_iteration.CASES[a.case].timeout_s)
            steady[provider].append(rows[-1])
    result = {"suite": "prompt-heavy", "case": a.case, "environment": environment(),
              "providers": {provider: summarize(rows) for provider, rows in steady.items()},
              "rows": [row | {"run": i} for rows in steady.values() for i, row in enumerate(rows)]}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({provider: s for provider, s in result["providers"].items()}))
    return result


if __name__ == "__main__":
    main()
