"""REBEL (paper eq. 1): regress the relative log-ratio onto the relative KL-shaped reward, k = 2.

Per prompt i (pair = rows i and B + i), with rho(y) = log pi_theta(y|x) - log pi_t(y|x):
    loss_i = ( (rho(y) - rho(y')) / eta - (r(y) - r(y')) )^2,
    r = score - kl_coef * (log pi_t - log pi_ref)                      (detached)
through `rebel_kernels.rebel_loss_from_logprobs` (the same epilogue the training loop uses).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .base import Algorithm, check_k, positive, samples

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rebel(Algorithm):
    samples_per_prompt: int = samples(2)
    eta: float = dataclasses.field(default=1.0,
                                   metadata={"help": "REBEL's eta: the log-ratio difference is divided by it"})

    def __post_init__(self):
        check_k("Rebel", self.samples_per_prompt, "== 2", self.samples_per_prompt == 2)
        positive("eta", self.eta)

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        from rebel_kernels import rebel_loss_from_logprobs

        from .inputs import acc_dtype, check_inputs, rewards_and_kl
        check_inputs(logprobs, batch, 2, ("old_logprobs", "kl", "rewards"))
        rewards, kl = rewards_and_kl(batch, acc_dtype(logprobs))
        loss = rebel_loss_from_logprobs(logprobs, batch.labels, batch.old_logprobs, rewards, eta=self.eta,
                                        ignore_index=batch.ignore_index, reduction="mean")
        return loss, {"loss": loss.detach(), "reward/mean": rewards.mean(), "kl/mean": kl.mean()}
