"""Triton kernels of Gumbel-max sampling from the hidden state and the LM head, and their launcher.

Imported only when the backend resolves to "triton" (rebel_kernels/gumbel/api.py imports it
lazily). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1:
  1. `_gumbel_partial_kernel`, grid (vocab splits, row blocks): for its rows and its fixed slice of
     SPLIT_V vocabulary columns, tile by tile (BLOCK_N columns, the on-chip matmul tiled over H by
     BLOCK_K as in `rebel_kernels._triton_common._scaled_logits_tile`, which also applies the logit
     scale and the softcap, a constexpr switch HAS_SOFTCAP): the running max of z + G and
     its column, z at that column, and the online log-sum-exp (m, s = sum exp(z - m)) of z.
  2. `_gumbel_combine_kernel`, one program per BLOCK rows: merges the splits in increasing order.
  The noise of (r, v) is U = tl.rand(seed, r * V + v) (Philox 4x32-10, int64 counter), so it does
  not depend on tiles, splits, launch order or the other rows of the batch (a prefix of the rows
  samples the same tokens alone). The seed is a [1] int64 device tensor drawn from the
  torch.Generator (`draw_seed`) and loaded inside the kernel: sampling never syncs with the host,
  and a captured CUDA graph reads a fresh seed on every replay instead of baking one in.
  Deterministic: fixed loop orders and no atomics; ties go to the smaller index at every level
  (strict `>` while walking tiles and splits in increasing column order, min index within a tile).
Tiles: the "sample" entries of rebel_kernels/_tiles.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._tiles import TileConfig, tile_config
from .._triton_common import _dot_precision, _scaled_logits_tile, _upcast_dot, logit_transform

SEED_HIGH = 2**63 - 1  # seeds are drawn uniformly from [0, SEED_HIGH): all 64 bits key Philox


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gumbel_noise(seed, rows, cols, V):
    """G[m, n] = -log(-log U), U = tl.rand(seed, rows[m] * V + cols[n]) in [0, 1).  -> [BLOCK_M, BLOCK_N]"""
    offsets = rows.to(tl.int64)[:, None] * V + cols[None, :]
    u = tl.rand(seed, offsets)
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel_partial_kernel(
    h_ptr, w_ptr, b_ptr, seed_ptr,              # hidden [R, H], weight [V, H], bias [V], seed [1] int64
    best_ptr, zsel_ptr, m_ptr, s_ptr, idx_ptr,  # partials [num_splits, R]: float32 x 4, int32
    R, V, H, stride_h, stride_w, z_scale, cap_over_temp,  # _triton_common.logit_transform
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ADD_NOISE: tl.constexpr, SPLIT_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Over this program's columns c in [v_begin, v_end), for each of its rows:
    #   best = max_c (z_c + G_c), idx = the smallest c attaining it, zsel = z_idx,
    #   m = max_c z_c, s = sum_c exp(z_c - m)   (online: s <- s * exp(m - m') + sum exp(z - m')).
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    src = tl.where(rmask, rows, 0)
    seed = tl.load(seed_ptr)  # a device scalar: no host round trip for the seed

    v_begin = pid_s * SPLIT_V
    v_end = tl.minimum(v_begin + SPLIT_V, V)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    idx = tl.zeros((BLOCK_M,), dtype=tl.int32) + v_begin  # kept when every score is -inf
    zsel = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < v_end
        z = _scaled_logits_tile(h_ptr, src, rmask, w_ptr, w_ptr, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                                z_scale, cap_over_temp, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                                DOT_PRECISION, UPCAST, False)  # [BLOCK_M, BLOCK_N]
        if ADD_NOISE:
            score = z + _gumbel_noise(seed, rows, cols, V)
        else:
            score = z
        score = tl.where(cmask[None, :], score, float("-inf"))
        # Tile argmax, smallest column on ties. cols[0] = v0 is always in range, so a row whose
        # scores are all -inf picks a valid column (v0), never a masked one. t_idx = V (no column
        # equals a NaN max) is never taken: NaN > best is false, so tokens stay in [0, V).
        t_best = tl.max(score, axis=1)
        t_idx = tl.min(tl.where(score == t_best[:, None], cols[None, :], V), axis=1)
        t_z = tl.sum(tl.where(cols[None, :] == t_idx[:, None], z, 0.0), axis=1)
        take = t_best > best  # strict: an equal score in a later tile keeps the earlier column
        best = tl.where(take, t_best, best)
        idx = tl.where(take, t_idx, idx)
        zsel = tl.where(take, t_z, zsel)
        # online log-sum-exp of z (each tile holds at least one finite z, so m_new is finite)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s * R + rows
    tl.store(best_ptr + out, best, mask=rmask)
    tl.store(zsel_ptr + out, zsel, mask=rmask)
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(idx_ptr + out, idx, mask=rmask)


@triton.jit
def _gumbel_combine_kernel(
    best_ptr, zsel_ptr, m_ptr, s_ptr, idx_ptr,  # partials [NUM_SPLITS, R]
    tok_ptr, logp_ptr,                          # outputs [R]: int64, float32
    R, NUM_SPLITS, BLOCK: tl.constexpr,
):
    # token = idx of the first split with the largest best (splits in increasing column order, strict
    # `>`: ties keep the smaller column); lse = M + log sum_i s_i exp(m_i - M), M = max_i m_i;
    # logprob = zsel(token) - lse.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < R
    best = tl.load(best_ptr + rows, mask=rmask, other=0.0)
    idx = tl.load(idx_ptr + rows, mask=rmask, other=0)
    zsel = tl.load(zsel_ptr + rows, mask=rmask, other=0.0)
    big_m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    for i in range(1, NUM_SPLITS):
        b_i = tl.load(best_ptr + i * R + rows, mask=rmask, other=0.0)
        take = b_i > best
        best = tl.where(take, b_i, best)
        idx = tl.where(take, tl.load(idx_ptr + i * R + rows, mask=rmask, other=0), idx)
        zsel = tl.where(take, tl.load(zsel_ptr + i * R + rows, mask=rmask, other=0.0), zsel)
        big_m = tl.maximum(big_m, tl.load(m_ptr + i * R + rows, mask=rmask, other=0.0))
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, NUM_SPLITS):
        m_i = tl.load(m_ptr + i * R + rows, mask=rmask, other=0.0)
        s += tl.load(s_ptr + i * R + rows, mask=rmask, other=0.0) * tl.exp(m_i - big_m)
    lse = big_m + tl.log(tl.where(rmask, s, 1.0))
    tl.store(tok_ptr + rows, idx.to(tl.int64), mask=rmask)
    tl.store(logp_ptr + rows, zsel - lse, mask=rmask)


@triton.jit
def _uniforms_kernel(seed_ptr, out_ptr, R, V, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out[r, v] = tl.rand(seed, r * V + v): the uniforms behind the sampling kernel's noise.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = rows.to(tl.int64)[:, None] * V + cols[None, :]
    u = tl.rand(tl.load(seed_ptr), offsets)
    tl.store(out_ptr + offsets, u, mask=(rows < R)[:, None] & (cols < V)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A [1] int64 seed on `device`, drawn from `generator` (the device's default one when None)
    without a host sync."""
    return torch.randint(0, SEED_HIGH, (1,), generator=generator, device=device, dtype=torch.int64)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gumbel_sample_triton(hidden, weight, bias, temperature: float, seed: torch.Tensor | None, *,
                         config: TileConfig | None = None, add_noise: bool = True, logit_scale: float = 1.0,
                         softcap: float | None = None):
    """hidden [R, H], weight [V, H], bias [V] or None, seed [1] int64 on the device; logits
    z = softcap_fn(logit_scale * (hidden W^T + b)) / temperature.
    Returns (tokens int64 [R], logprobs float32 [R]). `add_noise=False` gives the plain argmax of z
    (used by the tests to check tie breaking; the seed may then be None)."""
    if seed is None:
        seed = torch.zeros((1,), dtype=torch.int64, device=hidden.device)
    hidden, weight = _last_dim_contiguous(hidden), _last_dim_contiguous(weight)
    bias = None if bias is None else bias.contiguous()
    rows, hdim = hidden.shape
    vocab = weight.shape[0]
    cfg = config or tile_config("sample", hidden.device, hidden.dtype)
    if cfg.split_v % cfg.block_n:
        raise ValueError(f"config.split_v={cfg.split_v} must be a multiple of config.block_n={cfg.block_n}")
    split_v = min(cfg.split_v, triton.cdiv(vocab, cfg.block_n) * cfg.block_n)
    num_splits = triton.cdiv(vocab, split_v)
    dev = hidden.device
    z_scale, cap_over_temp, _ = logit_transform(temperature, logit_scale, softcap)
    parts = _alloc.empty((4, num_splits, rows), dtype=torch.float32, device=dev)  # best, zsel, m, s
    part_idx = _alloc.empty((num_splits, rows), dtype=torch.int32, device=dev)
    _gumbel_partial_kernel[(num_splits, triton.cdiv(rows, cfg.block_m))](
        hidden, weight, bias if bias is not None else weight, seed,
        parts[0], parts[1], parts[2], parts[3], part_idx,
        rows, vocab, hdim, hidden.stride(0), weight.stride(0), z_scale, cap_over_temp,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, ADD_NOISE=add_noise, SPLIT_V=split_v,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dot(hidden.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    tokens = _alloc.empty((rows,), dtype=torch.int64, device=dev)
    logprobs = _alloc.empty((rows,), dtype=torch.float32, device=dev)
    block = 256
    _gumbel_combine_kernel[(triton.cdiv(rows, block),)](
        parts[0], parts[1], parts[2], parts[3], part_idx, tokens, logprobs, rows, num_splits, BLOCK=block,
    )
    return tokens, logprobs


def kernel_uniforms(seed: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """The [rows, vocab] float32 uniforms the Triton kernel draws for `seed` (materialized: for
    tests and debugging only)."""
    out = torch.empty((rows, vocab), dtype=torch.float32, device=seed.device)
    bm, bn = 16, 64
    _uniforms_kernel[(triton.cdiv(rows, bm), triton.cdiv(vocab, bn))](seed, out, rows, vocab, BLOCK_M=bm, BLOCK_N=bn)
    return out
