"""Plain PyTorch specification of the token log-probabilities and the REBEL loss: the oracle every
kernel is tested against (also re-exported by `rebel_kernels.reference`).

It materializes the [tokens, vocab] logits on purpose (clarity over memory) and accumulates in
float32 (or float64 when given float64 inputs). Shapes follow docs/design.md section 4.
"""
from __future__ import annotations

import torch

from .._reference_common import reference_logits


def reference_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """log softmax(z)[labels], 0 where labels == ignore_index, with the logits z of `reference_logits`
    (z = (hidden @ weight.T + bias) / temperature at the default logit_scale=1, softcap=None)."""
    logits = reference_logits(hidden, weight, bias=bias, temperature=temperature, logit_scale=logit_scale,
                              softcap=softcap)
    logsm = torch.log_softmax(logits, dim=-1)  # [..., V]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


def sequence_old_logprobs(old_logprobs: torch.Tensor, labels: torch.Tensor, ignore_index: int, acc):
    """Per-sequence sum of the old log-probabilities: [2B] as given, or [2B, T] summed over valid tokens."""
    if old_logprobs.dim() == 1:
        return old_logprobs.to(acc)
    valid = labels != ignore_index
    return torch.where(valid, old_logprobs.to(acc), torch.zeros((), dtype=acc, device=labels.device)).sum(-1)


def reference_rebel_loss_from_logprobs(
    logp: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    *,
    eta: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """REBEL's regression on per-token log-probabilities logp [2B, T] (0 at ignored positions).

    ratio_i = sum_t logp[i, t] - log pi_old(y_i);  pair j = rows (j, B + j);
    loss_j = ((ratio_j - ratio_{B+j}) / eta - (r_j - r_{B+j}))^2.
    """
    acc = logp.dtype
    seq = logp.sum(-1) - sequence_old_logprobs(old_logprobs, labels, ignore_index, acc)  # [2B]
    half = seq.shape[0] // 2
    rew = rewards.to(acc)
    err = (seq[:half] - seq[half:]) / eta - (rew[:half] - rew[half:])  # [B]
    per_pair = err * err
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    return per_pair.mean()


def reference_rebel_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    *,
    eta: float = 1.0,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The specification of `fused_rebel_loss` (same arguments), through materialized logits."""
    logp = reference_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        logit_scale=logit_scale, softcap=softcap,
    )
    return reference_rebel_loss_from_logprobs(
        logp, labels, old_logprobs, rewards, eta=eta, ignore_index=ignore_index, reduction=reduction
    )
