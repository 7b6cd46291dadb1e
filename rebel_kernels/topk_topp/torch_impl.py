"""The PyTorch fallback of `torch.ops.rebel_kernels.sample_logits`, used when the native extension
rebel_kernels._C is not built. Same contract as the op: logits [R, V] (float32, float16 or
bfloat16, read as float32), uniforms [R] float32 in [0, 1) -> (tokens int64 [R], logprobs float32
[R]), the log-probability under the truncated, renormalized distribution actually sampled.

It is the specification (reference.py: a stable sort and running sums in float64), so it returns the
CPU kernel's tokens for the same uniforms; it is slower than the sort-free kernels and holds a few
[R, V] float64 temporaries. Bad rows (a NaN, +inf, or no finite value): RuntimeError on the CPU, as
the CPU kernel; token -1 and a NaN log-probability on other devices, as the CUDA kernel (no host
sync).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import reference_sample_logits


def sample_logits_torch(logits: Tensor, uniform: Tensor, temperature: float, top_k: int, top_p: float):
    x = logits.float()
    bad = ~torch.isfinite(x.amax(-1))  # a NaN (amax propagates it), +inf, or every entry -inf
    if x.device.type == "cpu":
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise RuntimeError(
                f"sample_logits: logits row {row} must hold no NaN or +inf and at least one finite value"
            )
        return reference_sample_logits(x, uniform, temperature, top_k, top_p)
    tokens, logprobs = reference_sample_logits(torch.where(bad[:, None], 0.0, x), uniform, temperature, top_k, top_p)
    return torch.where(bad, -1, tokens), torch.where(bad, float("nan"), logprobs)
