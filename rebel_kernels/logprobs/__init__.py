"""Token log-probabilities and the REBEL loss, fused from the last hidden state and the LM head.

Layers, bottom up: triton_kernels.py (Triton kernels and launchers, imported only when the Triton
backend runs) and torch_impl.py (the chunked PyTorch path) -> ops.py (torch.library custom ops,
fakes, autograd, token compaction) -> api.py (the public functions: checks, backend choice, docs).
reference.py is the plain PyTorch specification.
"""
from .api import FusedRebelLoss, fused_rebel_loss, fused_token_logprobs, rebel_loss_from_logprobs

__all__ = ["FusedRebelLoss", "fused_rebel_loss", "fused_token_logprobs", "rebel_loss_from_logprobs"]
