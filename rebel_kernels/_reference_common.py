"""The specification shared by more than one op's reference.py: the LM head's logits with its logit
scale, softcap and temperature (re-exported by `rebel_kernels.reference` and by
rebel_kernels/logprobs/reference.py).
"""
from __future__ import annotations

import torch


def reference_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """z = softcap_fn(logit_scale * (hidden @ weight.T + bias)) / temperature, materialized [..., V], in
    float32 (float64 for float64 inputs); softcap_fn(x) = softcap * tanh(x / softcap), the identity
    when softcap is None. The order is transformers': the LM head, its logit scale (Cohere's
    `logit_scale`, Granite's 1 / `logits_scaling`), Gemma-2/3's `final_logit_softcapping`, then the
    sampling temperature."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T  # [..., V]
    if bias is not None:
        logits = logits + bias.to(acc)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature
