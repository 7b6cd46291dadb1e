"""Fused REBEL kernels: token log-probabilities and the REBEL loss without materializing logits, and
sampling (Gumbel-max from the hidden state; temperature + top-k + top-p from logits).

One folder per op, each layered kernel -> launcher -> registration -> public function:
  logprobs/   fused_token_logprobs, fused_rebel_loss, rebel_loss_from_logprobs, FusedRebelLoss
  gumbel/     sample_from_hidden
  topk_topp/  sample_logits (the native extension rebel_kernels._C, or its PyTorch fallback)
Shared: _validate.py (argument checks), _backend.py (backend choice, TRITON_INTERPRET), _tiles.py
(Triton tiles), _alloc.py (output allocation), _triton_common.py (Triton helpers; imported only when
a Triton kernel runs: `import rebel_kernels` does not need triton), _torch_common.py (the PyTorch
paths' helpers), _reference_common.py (the spec the ops share: reference_logits), reference.py
(every op's spec). An op folder imports from these, never from another op folder.
`positive_finite(name, value)` is the ops' own check of a finite, > 0 argument (temperature, eta),
public for callers that validate the same arguments.
"""
from . import reference
from ._validate import positive_finite
from .gumbel import sample_from_hidden
from .logprobs import FusedRebelLoss, fused_rebel_loss, fused_token_logprobs, rebel_loss_from_logprobs
from .topk_topp import sample_logits

__all__ = ["FusedRebelLoss", "fused_rebel_loss", "fused_token_logprobs", "positive_finite",
           "rebel_loss_from_logprobs", "reference", "sample_from_hidden", "sample_logits"]
__version__ = "0.1.0"
