"""PyTorch helpers shared by the chunked PyTorch paths of the token log-probabilities
(rebel_kernels/logprobs/torch_impl.py) and of the Gumbel-max sampler
(rebel_kernels/gumbel/torch_impl.py), as _triton_common.py holds the Triton ones: the accumulation
dtype and one tile of logits z = softcap_fn(logit_scale * (h W^T + b)) / T
(softcap_fn(x) = cap * tanh(x / cap), or the identity).
"""
from __future__ import annotations

import torch


def acc_dtype(h: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the PyTorch paths: float64 for float64 inputs, else float32."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def logits_tile(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, inv_temp: float,
                logit_scale: float = 1.0, softcap: float | None = None):
    """z = softcap_fn(logit_scale * (h @ w.T + b)) / T in float32 (float64 for float64 inputs), a fresh
    tensor transformed in place (softcap_fn(x) = softcap * tanh(x / softcap), the identity for None).
    h [n, H], w [v, H] already in the accumulation dtype -> [n, v]."""
    z = torch.mm(h, w.T)
    if b is not None:
        z.add_(b)
    if softcap is not None:
        return z.mul_(logit_scale / softcap).tanh_().mul_(softcap * inv_temp)
    scale = logit_scale * inv_temp  # = inv_temp exactly at logit_scale = 1
    if scale != 1.0:
        z.mul_(scale)
    return z
