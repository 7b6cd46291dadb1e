"""The plain PyTorch specifications of every op, the oracles the kernels are tested against: this
module re-exports the reference.py of each op folder and the spec they share.

  shared:    reference_logits (the LM head's logits with its logit scale, softcap and temperature;
             _reference_common.py)
  logprobs:  reference_token_logprobs, reference_rebel_loss, reference_rebel_loss_from_logprobs,
             sequence_old_logprobs
  gumbel:    reference_gumbel_sample, reference_gumbel_sample_from_hidden
  topk_topp: reference_kept_mask, reference_sample_logits
"""
from ._reference_common import reference_logits
from .gumbel.reference import reference_gumbel_sample, reference_gumbel_sample_from_hidden
from .logprobs.reference import (
    reference_rebel_loss,
    reference_rebel_loss_from_logprobs,
    reference_token_logprobs,
    sequence_old_logprobs,
)
from .topk_topp.reference import reference_kept_mask, reference_sample_logits

__all__ = [
    "reference_gumbel_sample",
    "reference_gumbel_sample_from_hidden",
    "reference_kept_mask",
    "reference_logits",
    "reference_rebel_loss",
    "reference_rebel_loss_from_logprobs",
    "reference_sample_logits",
    "reference_token_logprobs",
    "sequence_old_logprobs",
]
