"""The gemm backward's walk (rebel_kernels/logprobs/plan.py): within its memory budget, covering the
shape, and cutting along the longer dimension."""
import pytest

from rebel_kernels.logprobs import plan

HEADS = {"llama3_8b": (4096, 128256), "qwen2_5_7b": (3584, 152064), "gemma2_2b": (2304, 256000),
         "pythia_2_8b": (2560, 50304)}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("n", [1, 100, 2048, 8192, 16384, 32768, 65536])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("elt", [2, 4])
def test_plans_fit_the_budget_and_cover_the_shape(head, n, gather, elt):
    h, v = HEADS[head]
    walk = plan.gemm_plan(n, v, h, elt, gather=gather)
    assert 1 <= walk.tokens <= n and 1 <= walk.vocab <= v
    assert walk.vocab == v or walk.vocab % 128 == 0
    assert walk.tokens == n or walk.tokens % 128 == 0
    assert walk.memory_bytes(h, elt, gather=gather) <= plan.BUDGET_BYTES
    blocks, chunks = walk.chunks(n, v)
    assert (blocks - 1) * walk.tokens < n <= blocks * walk.tokens
    assert (chunks - 1) * walk.vocab < v <= chunks * walk.vocab


def test_the_plan_minimizes_accumulator_traffic():
    h, v, n = 4096, 128256, 16384
    auto = plan.gemm_plan(n, v, h, 2, gather=False)
    for split in ("tokens", "vocab"):
        forced = plan.gemm_plan(n, v, h, 2, gather=False, split=split)
        assert auto.accumulator_bytes(n, v, h) <= forced.accumulator_bytes(n, v, h)
    tokens = plan.gemm_plan(n, v, h, 2, gather=False, split="tokens")
    assert tokens.vocab == v and tokens.chunks(n, v)[1] == 1  # all of V per chunk: d hidden written once
    vocab = plan.gemm_plan(n, v, h, 2, gather=False, split="vocab")
    assert vocab.tokens == n  # one token block: d weight written once


def test_small_shapes_take_one_chunk_and_tiny_budgets_the_floor():
    assert plan.gemm_plan(24, 131, 40, 4, gather=True) == plan.GemmPlan(24, 131)
    assert plan.gemm_plan(1000, 5000, 64, 2, gather=False, budget=1) == plan.GemmPlan(128, 128)
    assert plan.gemm_plan(1000, 5000, 64, 2, gather=False, budget=1, split="tokens") == plan.GemmPlan(128, 5000)
    assert plan.gemm_plan(1000, 5000, 64, 2, gather=False, budget=1, split="vocab") == plan.GemmPlan(1000, 128)
    with pytest.raises(ValueError, match="split"):
        plan.gemm_plan(10, 50, 64, 2, gather=False, split="rows")
