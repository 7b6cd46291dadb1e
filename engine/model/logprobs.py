"""The training forward: a causal LM's response-token log-probabilities straight from its final hidden
states and LM head, through the fused op (no logits), packed or padded."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from rebel_kernels import fused_token_logprobs

from . import forward, packing
from .head import Head

log = logging.getLogger("rebel")


class PolicyLogprobs(nn.Module):
    """Wraps a Hugging Face causal LM: response token log-probabilities straight from the final hidden
    states and the LM head (`engine/model/head.py`: weight, bias, logit scale, soft-cap) through
    `fused_token_logprobs` (no logits). Under FSDP2 this wrapper is the
    root module, so inside forward the LM head weight is the gathered tensor.

    `packed` (set at build where `forward.incompatibility` found it exact): the rows go through the model as one
    padding-free packed sequence (`engine/model/packing.py`), each prompt once with its `samples` responses
    when `shared`; a micro-batch longer than the model's sliding window takes the padded path.

    `autocast_dtype` (one unsharded process with a bf16 compute dtype; FSDP2's MixedPrecisionPolicy does
    this for sharded runs): the forward runs under torch.autocast and the LM head enters the fused op in
    the hidden states' dtype, while the parameters, their gradients and the optimizer stay float32."""

    def __init__(self, lm: nn.Module, autocast_dtype: torch.dtype | None = None, *, temperature: float = 1.0,
                 packed: bool = False, shared: bool = False):
        super().__init__()
        self.lm = lm
        self.temperature = temperature  # the sampling temperature: logits are divided by it here too
        self.autocast_dtype = autocast_dtype
        self.packed, self.shared = packed, shared
        self.window = packing.sliding_window(lm.config)
        self.window_notice = False

    def forward(self, input_ids, attention_mask, labels, samples: int = 1) -> torch.Tensor:
        """input_ids/attention_mask [R, P + N] (prompt then response), labels [R, N] -> logp [R, N]. Rows
        are sample-major with `samples` samples per prompt (row s * B + i is sample s of prompt i)."""
        if self.packed:
            layout = packing.pack(input_ids, attention_mask, labels, samples if self.shared else 1)
            if packing.fits_window(layout, self.window):
                return self._packed(layout)
            if not self.window_notice:
                log.info("packing: a micro-batch holds a sequence of %d tokens, longer than the sliding window (%d):"
                         " such micro-batches take the padded path", layout.longest, self.window)
                self.window_notice = True
        return self._padded(input_ids, attention_mask, labels)

    def _autocast(self, device: torch.device):
        return (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                else contextlib.nullcontext())

    def _padded(self, input_ids, attention_mask, labels):
        with self._autocast(input_ids.device):
            hidden = forward.padded_body(self.lm, input_ids, attention_mask, labels.shape[1])
        return self._scored(hidden, labels)

    def _packed(self, layout: packing.Layout):
        dtype = self.autocast_dtype or self.lm.get_input_embeddings().weight.dtype
        with self._autocast(layout.input_ids.device):
            hidden = forward.body(self.lm, layout, dtype)
        scored = self._scored(hidden[:, layout.source], layout.labels[None])  # [1, M]
        return layout.scatter(scored[0])

    def _scored(self, hidden, labels):
        head = Head.from_model(self.lm)  # read here: under FSDP2 the gathered weight
        if self.autocast_dtype:  # the op takes one dtype; the cast is differentiable (fp32 master grads)
            hidden, head = hidden.to(self.autocast_dtype), head.to(self.autocast_dtype)
        return fused_token_logprobs(hidden, head.weight, labels, temperature=self.temperature, **head.op_kwargs)
