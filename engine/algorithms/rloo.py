"""RLOO: REINFORCE with the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024), k >= 2.

Per prompt, with KL-shaped rewards r_s = score_s - kl_coef * (log pi_t(y_s|x) - log pi_ref(y_s|x)):
    adv_s = r_s - (1/(k-1)) sum_{j != s} r_j          (= k/(k-1) * (r_s - mean_j r_j))
    loss  = -(1/k) sum_s adv_s * log pi_theta(y_s|x)
The paper runs k = 2 and k = 4. With k = 2, adv_0 = r_0 - r_1 = -adv_1: the gradient REBEL takes at
its first step (paper section 3.2), up to the factor 4/eta (see tests/test_algorithms.py).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .base import Algorithm, check_k, samples

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOO(Algorithm):
    samples_per_prompt: int = samples(2)

    def __post_init__(self):
        check_k("RLOO", self.samples_per_prompt, ">= 2", self.samples_per_prompt >= 2)

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        from .inputs import acc_dtype, check_inputs, rewards_and_kl, sequence_sum
        k = self.samples_per_prompt
        b = check_inputs(logprobs, batch, k, ("kl", "rewards"))
        acc = acc_dtype(logprobs)
        seq = sequence_sum(logprobs, batch.labels, batch.ignore_index, acc).view(k, b)  # [k, B]
        rewards, kl = rewards_and_kl(batch, acc)
        rewards = rewards.view(k, b)  # [k, B]
        baseline = (rewards.sum(0, keepdim=True) - rewards) / (k - 1)  # [k, B] mean of the others
        adv = rewards - baseline
        loss = -(adv * seq).mean()  # (1/k) sum_s, then mean over prompts
        return loss, {"loss": loss.detach(), "reward/mean": rewards.mean(), "kl/mean": kl.mean(),
                      "advantage/abs_mean": adv.abs().mean()}
