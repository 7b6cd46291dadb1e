"""Fused REBEL kernels: token log-probabilities and the REBEL loss without materializing logits."""
from . import reference
from .gumbel_sampling import sample_from_hidden
from .api import FusedRebelLoss, fused_rebel_loss, fused_token_logprobs, rebel_loss_from_logprobs

__all__ = ["FusedRebelLoss", "fused_rebel_loss", "fused_token_logprobs", "rebel_loss_from_logprobs", "reference",
           "sample_from_hidden"]
__version__ = "0.1.0"
