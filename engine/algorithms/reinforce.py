"""REINFORCE with the KL penalty in the reward (Williams 1992; the paper's baseline, Appendix I.1.4).

Per prompt (mean over its k samples, k = 1 by default):
    r_s = score_s - kl_coef * (log pi_t(y_s|x) - log pi_ref(y_s|x))      (detached)
    loss = -(1/k) sum_s r_s * log pi_theta(y_s|x)
No baseline: its gradient is the plain score-function estimate of grad E[r].
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .base import Algorithm, check_k, samples

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reinforce(Algorithm):
    samples_per_prompt: int = samples(1)

    def __post_init__(self):
        check_k("Reinforce", self.samples_per_prompt, ">= 1", self.samples_per_prompt >= 1)

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        from .inputs import acc_dtype, check_inputs, rewards_and_kl, sequence_sum
        check_inputs(logprobs, batch, self.samples_per_prompt, ("kl", "rewards"))
        acc = acc_dtype(logprobs)
        seq = sequence_sum(logprobs, batch.labels, batch.ignore_index, acc)  # [kB]
        rewards, kl = rewards_and_kl(batch, acc)  # [kB]
        loss = -(rewards * seq).mean()  # mean over samples then prompts = mean over rows
        return loss, {"loss": loss.detach(), "reward/mean": rewards.mean(), "kl/mean": kl.mean()}
