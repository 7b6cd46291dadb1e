"""Triton helpers shared by the token log-probability kernels (rebel_kernels/logprobs) and the
Gumbel-max sampler (rebel_kernels/gumbel): the on-chip tile of logits
z = softcap_fn(logit_scale * (h W^T + b)) / T (softcap_fn(x) = cap * tanh(x / cap), or the identity)
and the launch-time choices it depends on (dot precision, the interpreter's bf16 upcast, TMA weight
loads, the scalars of the logit transforms).

Imports triton: only the Triton launch paths import this module (see rebel_kernels/_backend.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._backend import interpreting
from ._tiles import TileConfig


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (no tf32), so they match a float64 reference to 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def _use_tma(weight: torch.Tensor, cfg: TileConfig) -> bool:
    """Load weight tiles through TMA tensor descriptors (Hopper+, or the interpreter) when
    REBEL_KERNELS_TMA=1. Off by default until measured against the pointer path on an H100."""
    if os.environ.get("REBEL_KERNELS_TMA", "0") != "1":
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not interpreting() and (weight.device.type != "cuda" or torch.cuda.get_device_capability(weight.device)[0] < 9):
        return False
    row_bytes = weight.stride(0) * weight.element_size()
    if row_bytes % 16 or weight.data_ptr() % 16 or cfg.block_k * weight.element_size() < 16:
        return False
    triton.set_allocator(_descriptor_scratch)
    return True


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global scratch for descriptors built on the device (tl.make_tensor_descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if not interpreting() else "cpu")


def _upcast_dot(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584); float32
    # operands give the exact products (a bf16 x bf16 product fits in float32).
    return interpreting() and dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# the tile of logits
# ----------------------------------------------------------------------------------------------
@triton.jit
def _weight_tile(w_ptr, w_desc, cols, cmask, v0, k0, ks, kmask, stride_w, USE_TMA: tl.constexpr):
    """w[v0 : v0 + BLOCK_N, k0 : k0 + BLOCK_K], zero outside [V, H]: a TMA tensor-descriptor load
    on Hopper when enabled, else plain pointer loads (the path the interpreter runs)."""
    if USE_TMA:
        return w_desc.load([v0, k0])
    else:
        return tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _weight_desc(w_ptr, V, H, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        return tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[stride_w, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        return w_ptr


@triton.jit
def _logits_tile(h_ptr, src, rmask, w_ptr, w_desc, v0, cols, cmask, H, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """acc[m, n] = sum_k h[src[m], k] * w[cols[n], k], float32 accumulation.  -> [BLOCK_M, BLOCK_N]"""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        a = tl.load(h_ptr + src[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = _weight_tile(w_ptr, w_desc, cols, cmask, v0, k0, ks, kmask, stride_w, USE_TMA)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


def logit_transform(temperature: float, logit_scale: float, softcap: float | None) -> tuple[float, float, float]:
    """The scalars the kernels take for z = softcap_fn(logit_scale * pre) / T, pre = h W^T + b:
    (z_scale, cap_over_temp, grad_scale) with
      softcap None:  z = pre * z_scale,                     z_scale = logit_scale / T
      softcap cap:   z = cap_over_temp * tanh(pre * z_scale), z_scale = logit_scale / cap, cap_over_temp = cap / T
    and grad_scale = logit_scale / T (dL/dpre = dL/dz * grad_scale * (1 - tanh^2) with softcap, without the
    last factor otherwise). At the defaults (1.0, None) z_scale = grad_scale = 1.0 / T exactly."""
    if softcap is None:
        return logit_scale / temperature, 1.0, logit_scale / temperature
    return logit_scale / softcap, softcap / temperature, logit_scale / temperature


@triton.jit
def _tanh(x):
    """tanh in float32 from one exp (Triton's interpreter has no libdevice): sign(x) (1 - e) / (1 + e),
    e = exp(-2|x|) in (0, 1], so nothing overflows; the absolute error is a few float32 ulps of 1
    (1 - e is exact for e >= 1/2), i.e. a few ulps of the cap in the capped logits."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _head_logits_tile(h_ptr, src, rmask, w_ptr, w_desc, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      USE_TMA: tl.constexpr):
    """pre = h W^T + b for one tile, float32, 0 outside the columns in `cmask`.  -> [BLOCK_M, BLOCK_N]"""
    acc = _logits_tile(h_ptr, src, rmask, w_ptr, w_desc, v0, cols, cmask, H, stride_h, stride_w,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST, USE_TMA)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _final_logits(pre, cmask, z_scale, cap_over_temp, HAS_SOFTCAP: tl.constexpr):
    """z from pre = h W^T + b (see `logit_transform`), -inf outside the columns in `cmask`."""
    if HAS_SOFTCAP:
        z = _tanh(pre * z_scale) * cap_over_temp
    else:
        z = pre * z_scale
    return tl.where(cmask[None, :], z, float("-inf"))


@triton.jit
def _scaled_logits_tile(h_ptr, src, rmask, w_ptr, w_desc, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                        z_scale, cap_over_temp,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """z = softcap_fn(logit_scale * (h W^T + b)) / T for one tile (scalars from `logit_transform`), float32,
    -inf outside the columns in `cmask`.  -> [BLOCK_M, BLOCK_N]"""
    pre = _head_logits_tile(h_ptr, src, rmask, w_ptr, w_desc, b_ptr, v0, cols, cmask, H, stride_h, stride_w,
                            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST, USE_TMA)
    return _final_logits(pre, cmask, z_scale, cap_over_temp, HAS_SOFTCAP)


@triton.jit
def _grouped_tile(pid, num_m, num_v, GROUP_M: tl.constexpr):
    """(token block, vocab tile) of program `pid` in grouped order: GROUP_M token blocks sweep the
    vocab tiles together, so a weight tile is reused from L2 by GROUP_M programs in a row."""
    per_group = GROUP_M * num_v
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    return pid_m, pid_v
