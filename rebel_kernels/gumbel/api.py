"""The public function of Gumbel-max sampling: argument checks, backend choice, and its documentation."""
from __future__ import annotations

import torch

from .. import _backend, _validate
from . import torch_impl


@torch.no_grad()
def sample_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """Sample one token per row from softmax(z), z = softcap_fn(logit_scale * (hidden @ weight.T + bias))
    / temperature (softcap_fn(x) = softcap * tanh(x / softcap), the identity when softcap is None),
    without materializing the [R, V] logits and without a host sync.

    Plain temperature sampling (no top-k/top-p) by the Gumbel-max trick: token = argmax_v (z_v + G_v)
    with i.i.d. Gumbel(0, 1) noise G, tile by tile over the vocabulary; logits accumulate in float32.

    Args:
        hidden: [R, H] last hidden states, float16 / bfloat16 / float32 (float64: torch backend).
        weight: [V, H] LM head weight, same dtype and device (a replicated DTensor is unwrapped).
        bias: optional [V] head bias.
        temperature: finite and > 0; logits are divided by it (the same temperature the training
            log-probabilities must use).
        logit_scale: finite, > 0, multiplies the head's logits before the softcap and the temperature:
            Cohere/Cohere2 `config.logit_scale`, Granite 1 / `config.logits_scaling`, else 1.0.
        softcap: None (off) or a finite cap > 0: logits x become softcap * tanh(x / softcap) before the
            temperature: Gemma-2/3 `config.final_logit_softcapping`. Use the same logit_scale and
            softcap as the training log-probabilities (`fused_token_logprobs`), so the sampled
            distribution is the model's and the returned log-probabilities are the policy's.
        generator: a torch.Generator on hidden's device, or None for the device's default one. Each
            call advances it; the same generator state gives the same tokens (on the same backend,
            device and tile configuration).

    Returns:
        (tokens int64 [R], logprobs [R]): the sampled token ids and log softmax(z)[token], float32
        (float64 for float64 inputs). Rows are independent samples, even when their hidden states
        are equal. Non-finite logits give unspecified tokens.
    """
    weight = _validate.unshard("weight", weight)
    bias = None if bias is None else _validate.unshard("bias", bias)
    temperature = _validate.hidden_sample_inputs(hidden, weight, bias, temperature, generator)
    logit_scale, softcap = _validate.logit_transforms(logit_scale, softcap)
    if _backend.resolve(hidden) == "torch":
        return torch_impl.gumbel_sample_torch(hidden, weight, bias, temperature, generator,
                                              logit_scale=logit_scale, softcap=softcap)
    from . import triton_kernels  # imports triton: only on the Triton path

    seed = triton_kernels.draw_seed(generator, hidden.device)
    return triton_kernels.gumbel_sample_triton(hidden, weight, bias, temperature, seed,
                                               logit_scale=logit_scale, softcap=softcap)
