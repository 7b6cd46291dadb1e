"""The public function of top-k/top-p sampling from logits: argument checks, the native op or its
PyTorch fallback, and its documentation."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate
from . import ops, torch_impl


def sample_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row of `logits` [R, V] (float32, float16 or bfloat16).

    temperature > 0 divides the logits; top_k in [0, V] (0 = off) keeps the k largest (exactly k,
    ties broken by lower index); top_p in (0, 1] (1 = off) then keeps the smallest head of the
    descending order whose probability reaches top_p (every entry tied with its last one included).
    Returns (tokens int64 [R], logprobs float32 [R]), the log-probability of each token under the
    truncated, renormalized distribution that was sampled. One uniform per row is drawn with
    `torch.rand(R, generator=generator)` on logits' device; no host synchronization.

    Runs the native op of rebel_kernels._C; where the extension is not built, a pure PyTorch
    implementation with the same results (slower; warns once).
    """
    temperature, top_k, top_p = _validate.logits_sample_inputs(logits, temperature, top_k, top_p, generator)
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device, dtype=torch.float32)
    if ops._C is None:
        ops.warn_fallback_once()
        return torch_impl.sample_logits_torch(logits.detach(), uniform, temperature, top_k, top_p)
    return torch.ops.rebel_kernels.sample_logits(logits.detach(), uniform, temperature, top_k, top_p)
