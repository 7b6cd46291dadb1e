"""How the gemm backward walks the compacted tokens x vocabulary (pure Python: the Triton launcher and
bench/perf_model.py use the same rule).

The d-logits dz = g (onehot - softmax(z)) / T of N tokens x V columns never exists whole: the
backward walks token blocks of `tokens` rows (outer loop) and, in each, vocab chunks of `vocab`
columns. Per chunk, one kernel writes dz [tokens, vocab] and two GEMMs consume it:

    d hidden[block] (+)= dz @ W[chunk]      float32 accumulator [tokens, H], cast once per block
    d weight[chunk] (+)= dz^T @ h[block]    float32 accumulator [V, H], the op's d weight buffer

What the accumulators cost in HBM traffic: d hidden's is read and written once per vocab chunk
when a block has more than one (tokens * H * 8 bytes each time); d weight's once per token block
when there is more than one (V * H * 8). Cutting along the longer dimension is the cheaper way, so
the plan tries token blocks N, N/2, N/4, ... and, for each, the widest vocab chunk the budget leaves,
and keeps the plan with the least accumulator traffic.

Memory beyond the op's outputs (dense d hidden in the compute dtype, the float32 d weight) that the
`budget` bounds: dz (tokens x vocab x e), the block's float32 d hidden accumulator and its cast
(tokens x H x (4 + e)), the block's gathered hidden rows when not every row is a response token
(tokens x H x e), and the d-bias partial sums (ceil(tokens / block_m) x vocab x 4).
"""
from __future__ import annotations

import dataclasses
import math

BUDGET_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    tokens: int  # rows per token block
    vocab: int  # columns per dz chunk

    def chunks(self, n: int, v: int) -> tuple[int, int]:
        """(token blocks, vocab chunks per block)."""
        return math.ceil(n / self.tokens), math.ceil(v / self.vocab)

    def accumulator_bytes(self, n: int, v: int, h: int) -> int:
        """HBM read + write traffic of the float32 accumulators over the whole backward."""
        blocks, chunks = self.chunks(n, v)
        dw = v * h * 8 if blocks > 1 else 0
        dh = self.tokens * h * 8 * chunks if chunks > 1 else 0
        return blocks * (dw + dh)

    def memory_bytes(self, h: int, elt: int, *, gather: bool, block_m: int = 128) -> int:
        """Bytes the plan holds beyond the op's outputs (see the module doc)."""
        return _fixed_bytes(self.tokens, h, elt, gather) + self.vocab * _per_column(self.tokens, elt, block_m)


def _fixed_bytes(tokens: int, h: int, elt: int, gather: bool) -> int:
    return tokens * h * (4 + elt + (elt if gather else 0))


def _per_column(tokens: int, elt: int, block_m: int) -> int:
    return tokens * elt + math.ceil(tokens / block_m) * 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Planner:
    """What the walk is cut to: tiles of block_m rows x block_n columns (the backward's TileConfig),
    within `budget` bytes (see the module doc)."""

    block_m: int = 128
    block_n: int = 128
    budget: int = BUDGET_BYTES

    def widest_chunk(self, tokens: int, v: int, h: int, elt: int, *, gather: bool) -> int:
        """The widest vocab chunk (all of V, or a multiple of block_n) a token block of `tokens` rows
        affords within the budget; 0 when not even block_n columns fit."""
        room = self.budget - _fixed_bytes(tokens, h, elt, gather)
        cols = room // _per_column(tokens, elt, self.block_m) if room > 0 else 0
        if cols >= v:
            return v
        return cols // self.block_n * self.block_n

    def plan(self, n: int, v: int, h: int, elt: int, *, gather: bool, split: str = "auto") -> GemmPlan:
        """The plan for N compacted tokens, vocabulary V, hidden size H, element size `elt` of the
        compute dtype. split: "auto" (least accumulator traffic), "tokens" (every chunk spans all of
        V), "vocab" (one token block of all N rows). A budget too small for any chunk gets the floor:
        blocks of block_m rows x chunks of block_n columns (the tests use that to walk many chunks)."""
        if split not in ("auto", "tokens", "vocab"):
            raise ValueError(f"split must be 'auto', 'tokens' or 'vocab', got {split!r}")
        block_m = self.block_m
        n = max(n, 1)
        floor = GemmPlan(min(n, block_m), min(v, self.block_n))
        if split == "vocab":
            cols = self.widest_chunk(n, v, h, elt, gather=gather)
            return GemmPlan(n, cols) if cols else GemmPlan(n, floor.vocab)
        candidates, tokens = [], n
        while True:
            cols = self.widest_chunk(tokens, v, h, elt, gather=gather)
            if cols and (split == "auto" or cols == v):
                candidates.append(GemmPlan(tokens, cols))
                if split == "tokens":
                    break  # the largest token block that takes all of V
            if tokens <= block_m:
                break
            tokens = max(block_m, math.ceil(tokens / 2 / block_m) * block_m)
        if not candidates:
            return GemmPlan(floor.tokens, v) if split == "tokens" else floor
        return min(candidates, key=lambda p: (p.accumulator_bytes(n, v, h), -p.tokens))


def gemm_plan(n: int, v: int, h: int, elt: int, *, gather: bool, budget: int = BUDGET_BYTES,
              split: str = "auto") -> GemmPlan:
    """`Planner.plan` with 128 x 128 tiles and `budget`: the plan for N compacted tokens, vocabulary
    V, hidden size H, element size `elt` of the compute dtype (split: see `Planner.plan`)."""
    return Planner(budget=budget).plan(n, v, h, elt, gather=gather, split=split)
