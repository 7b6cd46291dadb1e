"""The specification of Gumbel-max sampling, with the noise made explicit (also re-exported by
`rebel_kernels.reference`)."""
from __future__ import annotations

import torch

from .._reference_common import reference_logits


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


def reference_gumbel_sample_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, uniforms: torch.Tensor, *,
                                        bias: torch.Tensor | None = None, temperature: float = 1.0,
                                        logit_scale: float = 1.0, softcap: float | None = None):
    """The specification of `sample_from_hidden` with explicit uniforms [R, V]: `reference_gumbel_sample`
    on the materialized logits z = softcap_fn(logit_scale * (hidden @ weight.T + bias)) / temperature
    (`rebel_kernels.reference.reference_logits`).  -> (tokens int64 [R], logprobs [R])"""
    z = reference_logits(hidden, weight, bias=bias, temperature=temperature, logit_scale=logit_scale,
                         softcap=softcap)
    return reference_gumbel_sample(z, uniforms)
