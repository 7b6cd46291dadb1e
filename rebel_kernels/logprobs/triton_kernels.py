"""Triton kernels of the token log-probabilities and the REBEL loss, and their launchers.

Imported only when the backend resolves to "triton" (rebel_kernels/logprobs/ops.py imports it
lazily); the shared tile of logits is in rebel_kernels/_triton_common.py, the tiles in
rebel_kernels/_tiles.py.

All kernels work on the compacted valid tokens: `idx[r]` is the flat position of the r-th token
whose label is not `ignore_index`, so prompt and padding rows cost nothing. No kernel writes a
[tokens, vocab] tensor: logits live in registers, one [BLOCK_M, BLOCK_N] tile at a time.

Forward (deterministic: fixed loop orders, no atomics, and per-row results that do not depend on
the batch around the row, since the vocabulary is split at fixed offsets):
  1. `_fwd_partial_kernel`, grid (vocab splits, token blocks): for its token block and its slice of
     the vocabulary, the online max m, sum s = sum exp(z - m), sum exp(z - m) * z (entropy) and the
     target logit, with z = softcap_fn(logit_scale * (h W^T + b)) / T computed tile by tile on chip
     (`_triton_common._scaled_logits_tile`; the softcap is a constexpr switch, HAS_SOFTCAP).
  2. `_fwd_combine_kernel`: merges the splits in a fixed order into lse, logp = z_y - lse and the
     entropy lse - E_p[z], and writes every dense position (0 where the label is ignored).
Backward, two designs, chosen by REBEL_KERNELS_BWD (read on every call):
  gemm (default): deterministic, no atomics.  The compacted tokens x vocabulary are walked in token
     blocks x vocab chunks chosen by `plan.Planner` (rebel_kernels/logprobs/plan.py: the least
     float32 accumulator traffic within `DZ_BUDGET_BYTES` of working memory; one token block and
     vocab chunks when N < V).  Per chunk: `_dz_kernel` recomputes the logits tiles from the
     forward's lse and writes dz (float32 in registers, rounded once to the compute dtype; float32
     for float32 inputs) plus per-token-block column sums for d bias; then two dense GEMMs with
     float32 accumulation (`_acc_mm`):
       d hidden[block] += dz @ W[chunk]   (float32 per block, cast once into the dense d hidden)
       d weight[chunk] += dz^T @ h[block] (the float32 d weight)
     and d bias[chunk] += (column sums).sum(0) in float32.
  atomic: `_bwd_kernel`, one program per (token block, vocab tile), recomputes the tile of logits
     and accumulates d hidden, d weight and d bias with float32 atomics (not bitwise deterministic).
Loss epilogue: `_pair_loss_kernel`, one program per pair.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._backend import interpreting  # noqa: F401  (the one interpreter switch, re-exported for tests)
from .._tiles import TileConfig, tile_config  # noqa: F401  (TileConfig: for callers passing config=)
from .._triton_common import (
    _dot_precision,
    _final_logits,
    _grouped_tile,
    _head_logits_tile,
    _scaled_logits_tile,
    _tanh,
    _upcast_dot,
    _use_tma,
    _weight_desc,
    _weight_tile,
    logit_transform,
)
from . import plan


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_partial_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, y_ptr,          # hidden [*, H], idx [N], weight [V, H], bias [V], labels [*]
    m_ptr, s_ptr, t_ptr, sz_ptr,                  # partials [num_splits, N] float32
    N, V, H, stride_h, stride_w, z_scale, cap_over_temp,   # _triton_common.logit_transform
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, SPLIT_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Split index varies fastest: the programs resident at one time cover few token blocks (their
    # hidden rows stay in L2) and every split (each vocab tile is read once per resident group).
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    src = tl.load(idx_ptr + rows, mask=rmask, other=0)
    y = tl.load(y_ptr + src, mask=rmask, other=-1)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_desc = _weight_desc(w_ptr, V, H, stride_w, BLOCK_N, BLOCK_K, USE_TMA)
    v_begin = pid_s * SPLIT_V
    v_end = tl.minimum(v_begin + SPLIT_V, V)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < v_end
        z = _scaled_logits_tile(h_ptr, src, rmask, w_ptr, w_desc, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                                z_scale, cap_over_temp, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                                DOT_PRECISION, UPCAST, USE_TMA)
        t += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            sz = sz * alpha + tl.sum(e * tl.where(cmask[None, :], z, 0.0), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(t_ptr + out, t, mask=rmask)
    if WITH_ENTROPY:
        tl.store(sz_ptr + out, sz, mask=rmask)


@triton.jit
def _fwd_combine_kernel(
    m_ptr, s_ptr, t_ptr, sz_ptr, pos_ptr,         # partials [S, N]; pos [NT]: compact row or -1
    logp_ptr, lse_ptr, ent_ptr,                   # dense outputs [NT] float32
    NT, N, NUM_SPLITS, WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < NT
    pos = tl.load(pos_ptr + offs, mask=inb, other=-1)
    valid = pos >= 0
    row = tl.where(valid, pos, 0)
    lmask = inb & valid
    big_m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for i in range(0, NUM_SPLITS):
        big_m = tl.maximum(big_m, tl.load(m_ptr + i * N + row, mask=lmask, other=0.0))
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    sz = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, NUM_SPLITS):
        scale = tl.exp(tl.load(m_ptr + i * N + row, mask=lmask, other=0.0) - big_m)
        s += tl.load(s_ptr + i * N + row, mask=lmask, other=0.0) * scale
        t += tl.load(t_ptr + i * N + row, mask=lmask, other=0.0)
        if WITH_ENTROPY:
            sz += tl.load(sz_ptr + i * N + row, mask=lmask, other=0.0) * scale
    s = tl.where(valid, s, 1.0)
    lse = tl.where(valid, big_m + tl.log(s), 0.0)
    tl.store(lse_ptr + offs, lse, mask=inb)
    tl.store(logp_ptr + offs, tl.where(valid, t - lse, 0.0), mask=inb)
    if WITH_ENTROPY:
        tl.store(ent_ptr + offs, tl.where(valid, lse - sz / s, 0.0), mask=inb)


def token_logprobs_fwd(h2, weight, bias, y, idx, pos, temperature: float, with_entropy: bool, config=None,
                       out_shape=None, *, logit_scale: float = 1.0, softcap: float | None = None):
    """h2 [NT, H] (row-contiguous), y [NT], idx [N] valid flat rows, pos [NT] compact index or -1.
    Logits z = softcap_fn(logit_scale * (h W^T + b)) / temperature (softcap None: no cap).

    Returns dense float32 (logp, lse, entropy or None), each of `out_shape` (default [NT]), contiguous.
    """
    nt, hdim = h2.shape
    vocab = weight.shape[0]
    n = idx.numel()
    cfg = config or tile_config("fwd", h2.device, h2.dtype)
    split_v = max(cfg.block_n, min(cfg.split_v, triton.cdiv(vocab, cfg.block_n) * cfg.block_n))
    num_splits = triton.cdiv(vocab, split_v)
    dev = h2.device
    z_scale, cap_over_temp, _ = logit_transform(temperature, logit_scale, softcap)
    parts = _alloc.empty((4, num_splits, max(n, 1)), dtype=torch.float32, device=dev)
    if n > 0:
        _fwd_partial_kernel[(num_splits, triton.cdiv(n, cfg.block_m))](
            h2, idx, weight, bias if bias is not None else weight, y,
            parts[0], parts[1], parts[2], parts[3],
            n, vocab, hdim, h2.stride(0), weight.stride(0), z_scale, cap_over_temp,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy, SPLIT_V=split_v,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_PRECISION=_dot_precision(h2.dtype), UPCAST=_upcast_dot(h2.dtype), USE_TMA=_use_tma(weight, cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    shape = (nt,) if out_shape is None else out_shape
    logp = _alloc.empty(shape, dtype=torch.float32, device=dev)
    lse = _alloc.empty(shape, dtype=torch.float32, device=dev)
    ent = _alloc.empty(shape, dtype=torch.float32, device=dev) if with_entropy else logp
    block = 256
    _fwd_combine_kernel[(triton.cdiv(nt, block),)](
        parts[0], parts[1], parts[2], parts[3], pos, logp, lse, ent,
        nt, max(n, 1), num_splits, WITH_ENTROPY=with_entropy, BLOCK=block,
    )
    return logp, lse, (ent if with_entropy else None)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# For a token with label y, upstream gradient g = dL/dlogp, pre = h W^T + b, u = logit_scale * pre and
# z = softcap_fn(u) / T (softcap_fn(u) = cap * tanh(u / cap), or u when softcap is None):
#   dL/dz_v = g * (1[v = y] - softmax(z)_v),   softmax(z)_v = exp(z_v - lse)
#   dz := dL/dpre = dL/dz * (1 / T) * (1 - tanh^2(u / cap)) * logit_scale   (HAS_SOFTCAP)
#               = dL/dz * logit_scale / T                                    (no softcap)
#      = g * (onehot(y) - p) * grad_scale [* (1 - tanh^2)],  grad_scale = logit_scale / T,
#        tanh(u / cap) = tanh(pre * z_scale)                                  [BLOCK_M, BLOCK_N], float32
#   dh += dz @ W[tile],   dW[tile] += dz^T @ h,   db[tile] += sum_m dz
# dz is formed in float32 and rounded once to the input dtype for the two tensor-core products,
# whose results are accumulated in float32 buffers (never summed in bf16).
@triton.jit
def _bwd_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr,   # lse, g: compact [N] float32
    dh_ptr, dw_ptr, db_ptr,                                # float32 accumulators [N, H], [V, H], [V]
    N, V, H, stride_h, stride_w, z_scale, cap_over_temp, grad_scale,   # _triton_common.logit_transform
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    src = tl.load(idx_ptr + rows, mask=rmask, other=0)
    y = tl.load(y_ptr + src, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    cols = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < V

    w_desc = _weight_desc(w_ptr, V, H, stride_w, BLOCK_N, BLOCK_K, USE_TMA)
    v0 = pid_v * BLOCK_N
    pre = _head_logits_tile(h_ptr, src, rmask, w_ptr, w_desc, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST, USE_TMA)
    z = _final_logits(pre, cmask, z_scale, cap_over_temp, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])  # 0 outside the vocabulary
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = (onehot - p) * (g * grad_scale)[:, None]
    if HAS_SOFTCAP:
        th = _tanh(pre * z_scale)
        dz = dz * (1.0 - th * th)
    dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=cmask, sem="relaxed")
    dzc = dz.to(h_ptr.dtype.element_ty)
    if UPCAST:
        dzc = dzc.to(tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        if NEED_DH:
            w = _weight_tile(w_ptr, w_desc, cols, cmask, v0, k0, ks, kmask, stride_w, USE_TMA)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dzc, w, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_K]
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], dh,
                          mask=rmask[:, None] & kmask[None, :], sem="relaxed")
        if NEED_DW:
            a = tl.load(h_ptr + src[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            dw = tl.dot(tl.trans(dzc), a, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_K]
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw,
                          mask=cmask[:, None] & kmask[None, :], sem="relaxed")


BWD_MODES = ("gemm", "atomic")
DZ_BUDGET_BYTES = plan.BUDGET_BYTES  # the gemm backward's working memory beyond its outputs (plan.py)
CHUNKS = "auto"  # the plan's split: "auto", "tokens" or "vocab" (tests force one, and a tiny budget)
_SLICE_BYTES = 32 << 20  # float32 temporaries of the GEMM fall-backs (_acc_mm)


def bwd_mode() -> str:
    mode = os.environ.get("REBEL_KERNELS_BWD", "gemm")
    if mode not in BWD_MODES:
        raise ValueError(f"REBEL_KERNELS_BWD must be one of {BWD_MODES}, got {mode!r}")
    return mode


def token_logprobs_bwd(g, h2, weight, bias, y, idx, lse, temperature: float,
                       need_dh: bool, need_dw: bool, need_db: bool, config=None, *, logit_scale: float = 1.0,
                       softcap: float | None = None):
    """g, lse: compact [N] float32; logit_scale, softcap as in `token_logprobs_fwd`.
    Returns (dh [NT, H] dense in h2's dtype, 0 at ignored rows;
    dw [V, H] float32; db [V] float32), None for each gradient not needed."""
    dh = None
    if need_dh:
        dh = torch.zeros_like(h2, memory_format=torch.contiguous_format)
    if bwd_mode() == "atomic":
        dh_c, dw, db = _bwd_atomic(g, h2, weight, bias, y, idx, lse, temperature, need_dh, need_dw, need_db, config,
                                   logit_scale=logit_scale, softcap=softcap)
        if need_dh:
            dh.index_copy_(0, idx, dh_c.to(h2.dtype))
        return dh, dw, db
    dw, db = _bwd_gemm(g, h2, weight, bias, y, idx, lse, temperature, dh, need_dw, need_db, config,
                       logit_scale=logit_scale, softcap=softcap)
    return dh, dw, db


def _bwd_atomic(g, h2, weight, bias, y, idx, lse, temperature: float,
                need_dh: bool, need_dw: bool, need_db: bool, config=None, *, logit_scale: float = 1.0,
                softcap: float | None = None):
    """The atomic backward: float32 (dh [N, H] compact, dw [V, H], db [V]) or None each."""
    n = idx.numel()
    vocab, hdim = weight.shape
    dev = h2.device
    cfg = config or tile_config("bwd", dev, h2.dtype)
    dh = torch.zeros((n, hdim), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros((vocab, hdim), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((vocab,), dtype=torch.float32, device=dev) if need_db else None
    if n > 0 and (need_dh or need_dw or need_db):
        grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(vocab, cfg.block_n),)
        _bwd_kernel[grid](
            h2, idx, weight, bias if bias is not None else weight, y, lse, g,
            dh if need_dh else g, dw if need_dw else g, db if need_db else g,
            n, vocab, hdim, h2.stride(0), weight.stride(0), *logit_transform(temperature, logit_scale, softcap),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            DOT_PRECISION=_dot_precision(h2.dtype), UPCAST=_upcast_dot(h2.dtype), USE_TMA=_use_tma(weight, cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dh, dw, db


# The gemm backward.  Same gradient as `_bwd_kernel` above, for a token n with label y_n, upstream
# g_n = dL/dlogp_n, pre_n = h_n W^T + b, u_n = logit_scale * pre_n, z_n = softcap_fn(u_n) / T and
# lse_n from the forward (dz = dL/dpre = dL/dz * (1 / T) * (1 - tanh^2(u / cap)) * logit_scale):
#   dz[n, v] = g_n * (1[v = y_n] - exp(z[n, v] - lse_n)) * logit_scale / T        (no softcap)
#   dz[n, v] = g_n * (1[v = y_n] - exp(z[n, v] - lse_n)) * logit_scale / T
#              * (1 - tanh^2(u[n, v] / cap))                                      (HAS_SOFTCAP)
#              float32 in registers, stored once rounded to the compute dtype (float32 inputs: float32)
#   dh = dz @ W,   dW = dz^T @ h,   db = sum_n dz[n, :]           (dense GEMMs, float32 accumulation)
# `_dz_kernel` writes dz for compacted rows [r0, r0 + n_rows) and vocab columns [c0, c0 + n_cols)
# into a dense [n_rows, n_cols] buffer, and (NEED_DB) the float32 column sums of each token block
# into dbp [cdiv(n_rows, BLOCK_M), n_cols] (summed afterwards in a fixed order: deterministic).
@triton.jit
def _dz_kernel(
    h_ptr, idx_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr,   # lse, g: compact [N] float32
    dz_ptr, dbp_ptr,                                       # dz [n_rows, n_cols]; dbp float32
    r0, n_rows, c0, n_cols, V, H, stride_h, stride_w, z_scale, cap_over_temp, grad_scale,  # logit_transform
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_N), GROUP_M)

    lrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = lrows < n_rows
    rows = r0 + lrows
    src = tl.load(idx_ptr + rows, mask=rmask, other=0)
    y = tl.load(y_ptr + src, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    lcols = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = lcols < n_cols
    v0 = c0 + pid_v * BLOCK_N
    cols = c0 + lcols

    w_desc = _weight_desc(w_ptr, V, H, stride_w, BLOCK_N, BLOCK_K, USE_TMA)
    pre = _head_logits_tile(h_ptr, src, rmask, w_ptr, w_desc, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST, USE_TMA)
    z = _final_logits(pre, cmask, z_scale, cap_over_temp, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])  # 0 outside the chunk's columns
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = (onehot - p) * (g * grad_scale)[:, None]
    if HAS_SOFTCAP:
        th = _tanh(pre * z_scale)
        dz = dz * (1.0 - th * th)
    mask = rmask[:, None] & cmask[None, :]
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + lrows[:, None] * n_cols + lcols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.store(dbp_ptr + pid_m * n_cols + lcols, tl.sum(dz, axis=0), mask=cmask)


@functools.cache
def _lowp_gemm_mode(device: torch.device, dtype: torch.dtype) -> str:
    """How `_acc_mm` gets float32 results from bf16/fp16 operands on this device:
    "addmm"  torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  (CUDA, recent torch)
    "mm"     acc[rows] += torch.mm(a[rows], b, out_dtype=torch.float32), row slices  (CUDA, torch 2.8+)
    "upcast" acc += a[:, k].float() @ b[k].float(), slices of K  (CPU, the interpreter, older torch)
    Each CUDA mode is probed once on a small product and kept only if it matches the upcast one."""
    if device.type != "cuda":
        return "upcast"
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(64, 48, generator=gen).to(device, dtype)
    b = torch.randn(48, 32, generator=gen).to(device, dtype)
    c = torch.randn(64, 32, generator=gen).to(device)
    want = c + a.float() @ b.float()
    for mode in ("addmm", "mm"):
        try:
            acc = c.clone()
            if mode == "addmm":
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                acc += torch.mm(a, b, out_dtype=torch.float32)
            if torch.allclose(acc, want, rtol=1e-4, atol=1e-4):
                return mode
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return "upcast"


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32 [M, P], a [M, K], b [K, P] in the compute dtype; products and sums
    in float32 (bf16/fp16: float32 accumulation and float32 output, never rounded in between)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    mode = _lowp_gemm_mode(a.device, a.dtype)
    if mode == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm":
        step = max(1, _SLICE_BYTES // (4 * acc.shape[1]))
        for r in range(0, acc.shape[0], step):
            acc[r : r + step] += torch.mm(a[r : r + step], b, out_dtype=torch.float32)
    else:
        step = max(1, _SLICE_BYTES // (4 * (acc.shape[0] + acc.shape[1])))
        for k in range(0, a.shape[1], step):
            acc.addmm_(a[:, k : k + step].float(), b[k : k + step].float())


def _bwd_gemm(g, h2, weight, bias, y, idx, lse, temperature: float, dh, need_dw: bool, need_db: bool,
              config=None, *, logit_scale: float = 1.0, softcap: float | None = None):
    """The gemm backward (see the module doc).  Writes d hidden into `dh` (dense [NT, H], zeros, h2's
    dtype) when given; returns float32 (dw [V, H] or None, db [V] or None)."""
    n = idx.numel()
    vocab, hdim = weight.shape
    dev, dtype = h2.device, h2.dtype
    cfg = config or tile_config("bwd", dev, dtype)
    dw = torch.zeros((vocab, hdim), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((vocab,), dtype=torch.float32, device=dev) if need_db else None
    if n == 0 or not (dh is not None or need_dw or need_db):
        return dw, db
    all_rows = n == h2.shape[0]  # then idx = arange(NT): h2 is the compacted hidden
    planner = plan.Planner(block_m=cfg.block_m, block_n=cfg.block_n, budget=DZ_BUDGET_BYTES)
    walk = planner.plan(n, vocab, hdim, h2.element_size(), gather=not all_rows, split=CHUNKS)
    launch = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, NEED_DB=need_db,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(dtype), UPCAST=_upcast_dot(dtype), USE_TMA=_use_tma(weight, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    b_arg = bias if bias is not None else weight
    scalars = logit_transform(temperature, logit_scale, softcap)  # z_scale, cap_over_temp, grad_scale

    def dz_chunk(r0, n_rows, c0, n_cols):
        dz = _alloc.empty((n_rows, n_cols), dtype=dtype, device=dev)  # NaN-poisoned in tests: all written
        dbp = _alloc.empty((triton.cdiv(n_rows, cfg.block_m), n_cols) if need_db else (1,),
                          dtype=torch.float32, device=dev)
        grid = (triton.cdiv(n_rows, cfg.block_m) * triton.cdiv(n_cols, cfg.block_n),)
        _dz_kernel[grid](h2, idx, weight, b_arg, y, lse, g, dz, dbp,
                         r0, n_rows, c0, n_cols, vocab, hdim, h2.stride(0), weight.stride(0), *scalars, **launch)
        if need_db:
            db[c0 : c0 + n_cols] += dbp.sum(0)
        return dz

    for r0 in range(0, n, walk.tokens):  # token blocks (plan.py): one unless N is large against V
        rows = idx[r0 : r0 + walk.tokens]
        h_block = h2[r0 : r0 + rows.numel()] if all_rows else (h2.index_select(0, rows) if need_dw else None)
        dh_acc = torch.zeros((rows.numel(), hdim), dtype=torch.float32, device=dev) if dh is not None else None
        for c0 in range(0, vocab, walk.vocab):  # vocab chunks: d hidden accumulates over them in float32
            n_cols = min(walk.vocab, vocab - c0)
            dz = dz_chunk(r0, rows.numel(), c0, n_cols)
            if dh_acc is not None:
                _acc_mm(dh_acc, dz, weight[c0 : c0 + n_cols])
            if need_dw:  # d weight accumulates over token blocks in float32
                _acc_mm(dw[c0 : c0 + n_cols], dz.T, h_block)
            del dz
        if dh_acc is not None:
            dh.index_copy_(0, rows, dh_acc.to(dtype))
        del h_block, dh_acc
    return dw, db


# ----------------------------------------------------------------------------------------------
# loss epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pair_loss_kernel(
    logp_ptr, y_ptr, old_ptr, rew_ptr, loss_ptr, err_ptr,   # logp, labels [2B, T]; old [2B, T] or [2B]
    B, T, eta, ignore_index,
    OLD_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # err_j = ((S_j - O_j) - (S_{B+j} - O_{B+j})) / eta - (r_j - r_{B+j}),  loss_j = err_j^2,
    # S_i = sum_t logp[i, t], O_i the old log-probability of sequence i; sums in a fixed order.
    j = tl.program_id(0)
    acc_y = tl.zeros((BLOCK_T,), dtype=tl.float32)   # S_j - S_{B+j}, per lane
    acc_o = tl.zeros((BLOCK_T,), dtype=tl.float32)   # O_j - O_{B+j}, per lane (per-token form)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tm = ts < T
        acc_y += tl.load(logp_ptr + j * T + ts, mask=tm, other=0.0)
        acc_y -= tl.load(logp_ptr + (B + j) * T + ts, mask=tm, other=0.0)
        if OLD_PER_TOKEN:
            v0 = tl.load(y_ptr + j * T + ts, mask=tm, other=ignore_index) != ignore_index
            v1 = tl.load(y_ptr + (B + j) * T + ts, mask=tm, other=ignore_index) != ignore_index
            acc_o += tl.load(old_ptr + j * T + ts, mask=tm & v0, other=0.0).to(tl.float32)
            acc_o -= tl.load(old_ptr + (B + j) * T + ts, mask=tm & v1, other=0.0).to(tl.float32)
    ratio_diff = tl.sum(acc_y, axis=0) - tl.sum(acc_o, axis=0)
    if not OLD_PER_TOKEN:
        ratio_diff -= tl.load(old_ptr + j).to(tl.float32) - tl.load(old_ptr + B + j).to(tl.float32)
    reward_diff = tl.load(rew_ptr + j).to(tl.float32) - tl.load(rew_ptr + B + j).to(tl.float32)
    err = ratio_diff / eta - reward_diff
    tl.store(err_ptr + j, err)
    tl.store(loss_ptr + j, err * err)


def pair_loss(logp, labels, old_logprobs, rewards, eta: float, ignore_index: int):
    """logp [2B, T] float32 contiguous -> (loss [B], err [B]) float32."""
    rows, t = logp.shape
    b = rows // 2
    loss = _alloc.empty((b,), dtype=torch.float32, device=logp.device)
    err = _alloc.empty((b,), dtype=torch.float32, device=logp.device)
    _pair_loss_kernel[(b,)](
        logp, labels.contiguous(), old_logprobs.contiguous(), rewards.contiguous(), loss, err,
        b, t, float(eta), int(ignore_index),
        OLD_PER_TOKEN=old_logprobs.dim() == 2, BLOCK_T=min(1024, triton.next_power_of_2(max(t, 16))),
    )
    return loss, err
