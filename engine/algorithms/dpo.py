"""Offline DPO (Rafailov et al. 2023) on a preference dataset, regularized to pi_ref, beta = 0.05.

Rows 0..B-1 are the chosen responses y_c, rows B..2B-1 the rejected y_r of the same prompts (the
dataset's chosen / rejected columns, stacked in that order). Per prompt:
    loss_i = -log sigmoid( beta * ((log pi_theta(y_c) - log pi_ref(y_c)) - (log pi_theta(y_r) - log pi_ref(y_r))) )
Only `labels` and `ref_logprobs` of the batch are read.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from .base import Algorithm, check_k, positive, samples

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPO(Algorithm):
    samples_per_prompt: int = samples(2)
    beta: float = dataclasses.field(default=0.05, metadata={"help": "DPO's beta: the implicit reward's scale"})
    offline: ClassVar[bool] = True

    def __post_init__(self):
        check_k("DPO", self.samples_per_prompt, "== 2 (chosen, rejected)", self.samples_per_prompt == 2)
        positive("beta", self.beta)

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        import torch.nn.functional as F

        from .inputs import acc_dtype, check_inputs, sequence_sum
        b = check_inputs(logprobs, batch, 2, ("ref_logprobs",))
        acc = acc_dtype(logprobs)
        implicit = self.beta * (sequence_sum(logprobs, batch.labels, batch.ignore_index, acc)
                                - sequence_sum(batch.ref_logprobs, batch.labels, batch.ignore_index, acc).detach())
        margin = implicit[:b] - implicit[b:]  # [B]
        loss = -F.logsigmoid(margin).mean()
        implicit = implicit.detach()
        return loss, {"loss": loss.detach(), "accuracy": (margin > 0).float().mean(),
                      "margin/mean": margin.detach().mean(), "reward/chosen": implicit[:b].mean(),
                      "reward/rejected": implicit[b:].mean()}
