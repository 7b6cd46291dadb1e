"""Iterative DPO (paper Appendix I.1.3, Algorithm 2): pairs from pi_t, labelled by the sign of the
reward difference, DPO regularized to pi_t (not to pi_ref), beta = 0.05.

Per prompt i (pair = rows i and B + i), with rho(y) = log pi_theta(y|x) - log pi_t(y|x) and the
KL-shaped reward r = score - kl_coef * (log pi_t - log pi_ref) (the paper lists kl coefficient 0.05):
    s_i    = sgn(r(y) - r(y'))
    loss_i = -|s_i| * log sigmoid( s_i * beta * (rho(y) - rho(y')) )
Ties (s_i = 0) carry no preference: zero weight (eq. 20 would give the constant log 2, no gradient).
The mean runs over all B prompts, ties included as zeros.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .base import Algorithm, check_k, positive, samples

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeDPO(Algorithm):
    samples_per_prompt: int = samples(2)
    beta: float = dataclasses.field(default=0.05, metadata={"help": "DPO's beta: the implicit reward's scale"})

    def __post_init__(self):
        check_k("IterativeDPO", self.samples_per_prompt, "== 2", self.samples_per_prompt == 2)
        positive("beta", self.beta)

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        from .inputs import acc_dtype, check_inputs, rewards_and_kl, sequence_sum
        b = check_inputs(logprobs, batch, 2, ("old_logprobs", "kl", "rewards"))
        acc = acc_dtype(logprobs)
        rho = (sequence_sum(logprobs, batch.labels, batch.ignore_index, acc)
               - sequence_sum(batch.old_logprobs, batch.labels, batch.ignore_index, acc).detach())  # [2B]
        rewards, kl = rewards_and_kl(batch, acc)
        sign = torch.sign(rewards[:b] - rewards[b:])  # [B] +1: y chosen, -1: y' chosen, 0: tie
        margin = self.beta * (rho[:b] - rho[b:]) * sign
        per_prompt = -F.logsigmoid(margin) * sign.abs()
        loss = per_prompt.mean()
        decided = sign != 0
        right = ((margin > 0) & decided).float().sum()
        return loss, {"loss": loss.detach(), "reward/mean": rewards.mean(), "kl/mean": kl.mean(),
                      "ties": (~decided).float().mean(),
                      "accuracy": right / decided.float().sum()}  # NaN (no sync) when every pair ties
