"""One RL iteration end to end: time per phase and peak memory, ours (REBEL, engine/train.py) vs
TRL's RLOOTrainer with k = 2 doing the same work (the paper's runtime/memory figure).

    python -m pytest bench/test_bench_iteration.py -q -rs                  # CPU: tiny Llama, seconds
    REBEL_BENCH_SAVE=1 python -m pytest bench/test_bench_iteration.py
        # + bench/results/<device>_<date>_iteration.json

Cases (bench/_iteration.py): "cpu-tiny" (preset default, 16 prompts x 2 x 8 new tokens, 4 epochs)
on CPU, always (GPUs hidden); "pythia-1.4b-random" (preset pythia_1b4_random: 512 prompts x 2 x 53
new tokens, 4 epochs, random-weight Pythia-1.4B) on CUDA. Each provider runs ITERATIONS iterations in its own process;
one row per iteration, "steady" marks the last one (the first includes warm-up: CUDA graph
capture, allocator growth). Phase accounting: bench/_iteration.py.
"""
from __future__ import annotations

import pytest
import torch

from bench._iteration import CASES, PHASES, measure

ITERATIONS = 2


@pytest.mark.parametrize("provider", ["ours", "trl-rloo"])
@pytest.mark.parametrize("case", [pytest.param(n, marks=pytest.mark.cuda) if c.cuda else n for n, c in CASES.items()])
def test_bench_iteration(bench_rows, case: str, provider: str):
    spec = CASES[case]
    if spec.cuda and not torch.cuda.is_available():
        pytest.skip("CUDA case, no CUDA device")
    if provider == "trl-rloo":
        pytest.importorskip("datasets")
        pytest.importorskip("trl")
    try:
        rows = measure(provider, case, ITERATIONS, timeout=spec.timeout_s)
    except Exception as exc:  # keep a row saying why, then fail
        bench_rows.append(dict(suite="iteration", case=case, provider=provider, status="error",
                               reason=f"{type(exc).__name__}: {str(exc)[-500:]}"))
        raise
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    for r in rows:
        phases = [r[f"{p}_s"] for p in PHASES if r.get(f"{p}_s") is not None]
        assert all(t >= 0 for t in phases) and r["generate_s"] > 0 and r["update_s"] > 0, r
        assert sum(phases) <= r["iteration_s"] * 1.001 + 1e-3, r  # the phases lie within the iteration
        assert 0 < r["tokens"] <= r["prompts"] * r["samples_per_prompt"] * r["new_tokens"], r
        assert r["optimizer_steps"] == r["epochs"] * r["minibatches"], r
        assert r["peak_gib"] > 0, r
        r.update(status="ok", steady=r["iteration"] == ITERATIONS - 1)
    bench_rows.extend(rows)
