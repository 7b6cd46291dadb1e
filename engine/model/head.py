"""The one place that knows a causal LM's output head.

Every family the engine accepts computes its logits from the final hidden state h as

    z = softcap(logit_scale * (h @ weight.T + bias)) / T,    softcap(x) = cap * tanh(x / cap),

transformers' order (Granite divides by `logits_scaling`, Cohere/Cohere2 multiply by `logit_scale`,
Gemma-2/3 soft-cap with `final_logit_softcapping`; most families are plain: scale 1, no cap). `Head`
describes this once; the training forward (engine/model/logprobs.py), the sampler (engine/model/generate.py) and the
benchmarks pass it to the fused ops. `check_against_model` verifies at load that the description
reproduces the model's own logits: a family it cannot describe is refused by name, never trained on
wrong numbers.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from rebel_kernels.reference import reference_logits


@dataclasses.dataclass(frozen=True)
class Head:
    """An LM head: weight [V, H], bias [V] or None, and the final transform of the logits. Under FSDP2 build
    it inside the wrapped module's forward (`from_model`), where the weight is the gathered tensor."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, lm: nn.Module) -> Head:
        """The head of a Hugging Face causal LM: its output embeddings and the transform its config names."""
        out = lm.get_output_embeddings()
        weight = getattr(out, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{model_type(lm)}: the model has no linear output embeddings (LM head); not supported")
        bias = getattr(out, "bias", None)
        logit_scale, softcap = transform(lm.config)
        return cls(weight=weight, bias=bias if isinstance(bias, torch.Tensor) else None, logit_scale=logit_scale,
                   softcap=softcap)

    def to(self, dtype: torch.dtype) -> Head:
        """The head with weight and bias cast to `dtype` (differentiable: gradients reach float32 masters)."""
        return dataclasses.replace(self, weight=self.weight.to(dtype),
                                   bias=None if self.bias is None else self.bias.to(dtype))

    @property
    def op_kwargs(self) -> dict:
        """Keyword arguments of the fused ops (`fused_token_logprobs`, `fused_rebel_loss`, `FusedRebelLoss`,
        `sample_from_hidden`) besides weight: the bias, and the transform only where it is not the identity."""
        kwargs: dict = {"bias": self.bias}
        if self.logit_scale != 1.0:
            kwargs["logit_scale"] = self.logit_scale
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
        return kwargs

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The spec, materialized (checks and tests only): [..., H] -> [..., V] through the ops' own
        reference (`rebel_kernels.reference.reference_logits`, float32 accumulation)."""
        return reference_logits(hidden, self.weight, bias=self.bias, temperature=temperature,
                                logit_scale=self.logit_scale, softcap=self.softcap)


def model_type(lm: nn.Module) -> str:
    return str(getattr(getattr(lm, "config", None), "model_type", None) or type(lm).__name__)


def transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a config: Granite's `logits_scaling` divides, Cohere's `logit_scale`
    multiplies, Gemma-2/3's `final_logit_softcapping` caps."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, None if cap is None else float(cap)


@torch.no_grad()
def check_against_model(lm: nn.Module, probe_tokens: int = 8) -> Head:
    """Compare the description's log-probabilities with the model's own (`.logits`) on a short probe input;
    a ValueError naming the model type when they differ (1e-4 relative in float32). Returns the head."""
    head = Head.from_model(lm)
    vocab = head.weight.shape[0]
    ids = (torch.arange(probe_tokens, device=head.weight.device) * 7 + 1) % vocab
    ids = ids[None]
    logits = lm(input_ids=ids, use_cache=False).logits
    hidden = getattr(lm.base_model(input_ids=ids, use_cache=False), "last_hidden_state", None)
    if hidden is None:  # the training forward and the sampler read the final hidden state there
        raise ValueError(f"{model_type(lm)}: the model's base_model ({type(lm.base_model).__name__}) returns no "
                         f"last_hidden_state; this model family is not supported")
    expected = torch.log_softmax(logits.float(), -1)
    got = torch.log_softmax(head.logits(hidden), -1)
    tol = max(1e-4, 8 * torch.finfo(logits.dtype).eps) * max(1.0, float(expected.abs().max()))
    err = float((got - expected).abs().max())
    if not err <= tol:  # also catches NaN
        raise ValueError(f"{model_type(lm)}: the engine's description of the LM head (logit_scale={head.logit_scale}, "
                         f"softcap={head.softcap}, bias={head.bias is not None}) does not reproduce the model's own "
                         f"logits (max log-probability error {err:.3g} > {tol:.3g}); this model family is not "
                         f"supported")
    return head
