"""The public functions of the token log-probabilities and the REBEL loss: argument checks, backend
choice, and the documentation users read."""
from __future__ import annotations

import torch
from torch import nn

from .. import _backend, _validate
from . import ops  # registers torch.ops.rebel_kernels.token_logprobs, .pair_loss, ...


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """Per-token log-probabilities log softmax(z)[labels] of the logits
        z = softcap_fn(logit_scale * (hidden @ weight.T + bias)) / temperature,
        softcap_fn(x) = softcap * tanh(x / softcap)   (the identity when softcap is None),
    i.e. (hidden @ weight.T + bias) / temperature at the defaults.

    Never materializes the [tokens, vocab] logits; accumulates in float32.

    Args:
        hidden: [..., H] final hidden states, float16 / bfloat16 / float32 (float64: torch backend).
        weight: [V, H] LM head weight, same dtype. Under FSDP2 pass the gathered weight (call this
            inside the wrapped model's forward with `model.lm_head.weight`); a sharded DTensor raises.
        labels: [...] int64, already shifted (`hidden[..., t, :]` predicts `labels[..., t]`);
            positions equal to `ignore_index` are skipped and cost no work.
        bias: optional [V] head bias.
        temperature: the sampling temperature; logits are divided by it, after the two transforms below.
        return_entropy: also return the per-token entropy (detached: for logging only).
        logit_scale: finite, > 0: multiplies the head's logits, as the model's own forward does. Cohere
            and Cohere2 set it (`config.logit_scale`); Granite divides by `config.logits_scaling`, so
            pass `1 / logits_scaling`. 1.0 for every other model.
        softcap: None (off), or a finite cap > 0: logits x become softcap * tanh(x / softcap), applied
            after logit_scale and before the temperature, as in transformers. Gemma-2 and Gemma-3 set it
            (`config.final_logit_softcapping`, 30.0); None for models without it.

    Returns:
        float32 log-probabilities shaped like `labels`, exactly 0 at ignored positions (float64 for
        float64 inputs); with `return_entropy`, the tuple (logp, entropy).
    """
    weight = _validate.unshard("weight", weight)
    bias = None if bias is None else _validate.unshard("bias", bias)
    temperature = _validate.token_inputs(hidden, weight, labels, bias, temperature, ignore_index)
    logit_scale, softcap = _validate.logit_transforms(logit_scale, softcap)
    backend = _backend.resolve(hidden)
    logp, _, entropy = ops.call_token_logprobs(
        hidden, weight, bias, labels, temperature, int(ignore_index), bool(return_entropy), backend,
        logit_scale, softcap,
    )
    return (logp, entropy.detach()) if return_entropy else logp


def fused_rebel_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    *,
    eta: float = 1.0,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The REBEL regression loss, fused from hidden states to the squared error.

    With S_i = sum_t log pi(labels[i, t] | ...) over response tokens and O_i = log pi_old(y_i):
        loss_j = ( ((S_j - O_j) - (S_{B+j} - O_{B+j})) / eta - (rewards[j] - rewards[B+j]) )^2
    for the pairs j = 0..B-1 (rows j and B+j).

    Args:
        hidden: [2B, T, H]; rows 0..B-1 are the responses y, rows B..2B-1 their partners y'.
        weight, bias, labels, temperature, ignore_index: as in `fused_token_logprobs`.
        logit_scale, softcap: the LM head's final transforms, as in `fused_token_logprobs`: set them
            from the model config (Gemma-2/3: softcap=config.final_logit_softcapping; Cohere/Cohere2:
            logit_scale=config.logit_scale; Granite: logit_scale=1 / config.logits_scaling), so the
            log-probabilities are the model's own.
        old_logprobs: log pi_old, per token [2B, T] (ignored where labels == ignore_index) or per
            sequence [2B].
        rewards: [2B] rewards of each response.
        eta: the REBEL step size 1/eta scaling the log-ratio difference.
        reduction: "mean" over pairs, "sum", or "none" ([B] per-pair losses).

    Returns:
        float32 loss (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias.
    """
    weight = _validate.unshard("weight", weight)
    bias = None if bias is None else _validate.unshard("bias", bias)
    temperature = _validate.token_inputs(hidden, weight, labels, bias, temperature, ignore_index)
    eta = _validate.loss_inputs(hidden, labels, old_logprobs, rewards, eta, reduction)
    logit_scale, softcap = _validate.logit_transforms(logit_scale, softcap)
    backend = _backend.resolve(hidden)
    logp, _, _ = ops.call_token_logprobs(
        hidden, weight, bias, labels, temperature, int(ignore_index), False, backend, logit_scale, softcap,
    )
    per_pair, _ = ops.call_pair_loss(logp, labels, old_logprobs, rewards, eta, int(ignore_index),
                                                    backend)
    return _reduce(per_pair, reduction)


def rebel_loss_from_logprobs(
    logprobs: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    *,
    eta: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The REBEL loss epilogue alone, on per-token log-probabilities [2B, T] (0 at ignored positions),
    e.g. those `fused_token_logprobs` returned inside an FSDP-wrapped model's forward.
    Same formula and arguments as `fused_rebel_loss`."""
    _validate.tensor("logprobs", logprobs, floating=True)
    _validate.tensor("labels", labels)
    if logprobs.dim() != 2 or tuple(labels.shape) != tuple(logprobs.shape):
        raise ValueError(f"logprobs must be [2B, T] with labels' shape {tuple(labels.shape)}, "
                         f"got {tuple(logprobs.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError(f"empty batch: labels has shape {tuple(labels.shape)}")
    eta = _validate.loss_inputs(logprobs[..., None], labels, old_logprobs, rewards, eta, reduction)
    backend = _backend.resolve(logprobs)
    per_pair, _ = ops.call_pair_loss(logprobs, labels, old_logprobs, rewards, eta,
                                                    int(ignore_index), backend)
    return _reduce(per_pair, reduction)


def _reduce(per_pair, reduction: str):
    """The per-pair losses [B] under `reduction`: "none", "sum" or "mean"."""
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


class FusedRebelLoss(nn.Module):
    """Module form of `fused_rebel_loss`, taking the `nn.Linear` LM head in forward.

    >>> loss_fn = FusedRebelLoss(eta=1.0, temperature=0.7)
    >>> loss = loss_fn(hidden, model.lm_head, labels, old_logprobs, rewards)

    For a Gemma-2/3 head: FusedRebelLoss(softcap=config.final_logit_softcapping); Cohere:
    logit_scale=config.logit_scale; Granite: logit_scale=1 / config.logits_scaling (see
    `fused_token_logprobs`). These two are checked here (TypeError / ValueError naming them).
    """

    def __init__(self, *, eta: float = 1.0, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", logit_scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.eta, self.temperature = eta, temperature
        self.ignore_index, self.reduction = ignore_index, reduction
        self.logit_scale, self.softcap = _validate.logit_transforms(logit_scale, softcap)

    def forward(self, hidden, lm_head: nn.Linear, labels, old_logprobs, rewards) -> torch.Tensor:
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear, got {type(lm_head).__name__}")
        return fused_rebel_loss(
            hidden, lm_head.weight, labels, old_logprobs, rewards, eta=self.eta, bias=lm_head.bias,
            temperature=self.temperature, ignore_index=self.ignore_index, reduction=self.reduction,
            logit_scale=self.logit_scale, softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        extra = "" if self.logit_scale == 1.0 else f", logit_scale={self.logit_scale}"
        extra += "" if self.softcap is None else f", softcap={self.softcap}"
        return f"eta={self.eta}, temperature={self.temperature}, reduction={self.reduction!r}{extra}"
