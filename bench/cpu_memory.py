"""CPU memory and time of the op's forward + backward against naive PyTorch and PyTorch's chunked
linear_cross_entropy, each run in a fresh process (bench/_memory.py): after a warm-up of plain PyTorch
(--warmup torch, the default: what each provider's first call imports is counted; --warmup op leaves
it out), peak RSS over two calls counted from before the first call with the inputs allocated (the
returned gradients included and reported apart), the second call timed. Writes the JSON that
bench/results/*_loss-cpu-memory.json holds.

    OMP_NUM_THREADS=1 python -m bench.cpu_memory --out bench/results/HOST_DATE_loss-cpu-memory.json
    OMP_NUM_THREADS=1 python -m bench.cpu_memory --cases cpu_acceptance --runs 1 --out /tmp/m.json   # quicker
"""
from __future__ import annotations

import argparse
import json
import statistics

from bench._cases import CASES_BY_NAME
from bench._environment import environment
from bench._memory import WARMUPS, measure_cpu_op_memory

MIB = 2**20


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["case"], r["provider"]) for r in rows):
        runs = [r for r in rows if (r["case"], r["provider"]) == key]
        peaks = [r["op_peak_bytes"] / MIB for r in runs]
        grads = runs[0]["grad_bytes"] / MIB
        out.append(dict(case=key[0], provider=key[1], runs=len(runs), op_peak_mib_median=statistics.median(peaks),
                        op_peak_mib_max=max(peaks), grad_mib=grads,
                        above_grads_mib_median=statistics.median(peaks) - grads,
                        input_mib=runs[0]["input_bytes"] / MIB,
                        warm_call_s_p50=statistics.median(r["warm_call_s"] for r in runs)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", nargs="*", default=["cpu_acceptance", "cpu_head"], choices=list(CASES_BY_NAME))
    p.add_argument("--providers", nargs="*", default=["fused", "naive", "torch-lce"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", default="torch", choices=WARMUPS)
    a = p.parse_args(argv)
    doc = {"suite": "loss-cpu-memory", "environment": environment(), "mode": "fwdbwd", "warmup": a.warmup,
           "method": (measure_cpu_op_memory.__doc__ or "").strip(), "rows": [], "summary": []}
    for case in a.cases:
        for run in range(a.runs):  # interleaved: providers alternate within each run
            for provider in a.providers:
                row = measure_cpu_op_memory(case, provider, "fwdbwd", warmup=a.warmup)
                doc["rows"].append(dict(case=case, provider=provider, run=run, **row))
                doc["summary"] = summarize(doc["rows"])
                with open(a.out, "w") as f:
                    json.dump(doc, f, indent=1)
                print(json.dumps(next(row for row in doc["summary"]
                                      if (row["case"], row["provider"]) == (case, provider))), flush=True)


if __name__ == "__main__":
    main()
