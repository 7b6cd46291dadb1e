"""The specification of Gumbel-max sampling, with the noise made explicit (also re-exported by
`rebel_kernels.reference`)."""
from __future__ import annotations

import torch


def reference_gumbel_sample(logits: torch.Tensor, uniforms: torch.Tensor):
    """The specification, with the noise made explicit.  logits, uniforms [R, V] -> (tokens int64 [R],
    logprobs [R] in logits' dtype).

    logits are already divided by the temperature; uniforms lie in [0, 1).
        token_r = argmax_v (logits[r, v] - log(-log(uniforms[r, v])))   (first index on ties)
        logprob_r = log_softmax(logits[r])[token_r]
    """
    gumbel = -torch.log(-torch.log(uniforms.to(logits.dtype)))
    tokens = torch.argmax(logits + gumbel, dim=-1)  # documented: the first maximal index
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs
