"""From sampled responses to training batches: response rows and labels, the missing-EOS rules, the
training forward (log-probabilities through the fused op), log pi_t - log pi_ref and the KL-shaped reward."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
from torch import nn

from engine import packing
from engine.generate import Rollout
from engine.head import Head
from rebel_kernels import fused_token_logprobs

IGNORE = packing.IGNORE
log = logging.getLogger("rebel")


class PolicyLogprobs(nn.Module):
    """Wraps a Hugging Face causal LM: response token log-probabilities straight from the final hidden
    states and the LM head (`engine/head.py`: weight, bias, logit scale, soft-cap) through
    `fused_token_logprobs` (no logits). Under FSDP2 this wrapper is the
    root module, so inside forward the LM head weight is the gathered tensor.

    `packed` (set at build where `packing.incompatibility` found it exact): the rows go through the model as one
    padding-free packed sequence (`engine/packing.py`), each prompt once with its `samples` responses
    when `shared`; a micro-batch longer than the model's sliding window takes the padded path.

    `autocast_dtype` (one unsharded process with a bf16 compute dtype; FSDP2's MixedPrecisionPolicy does
    this for sharded runs): the forward runs under torch.autocast and the LM head enters the fused op in
    the hidden states' dtype, while the parameters, their gradients and the optimizer stay float32."""

    def __init__(self, lm: nn.Module, autocast_dtype: torch.dtype | None = None, *, packed: bool = False,
                 shared: bool = False):
        super().__init__()
        self.lm = lm
        self.autocast_dtype = autocast_dtype
        self.packed, self.shared = packed, shared
        self.window = packing.sliding_window(lm.config)
        self.window_notice = False

    def forward(self, input_ids, attention_mask, labels, temperature: float, samples: int = 1) -> torch.Tensor:
        """input_ids/attention_mask [R, P + N] (prompt then response), labels [R, N] -> logp [R, N]. Rows
        are sample-major with `samples` samples per prompt (row s * B + i is sample s of prompt i)."""
        if self.packed:
            layout = packing.pack(input_ids, attention_mask, labels, samples if self.shared else 1)
            if packing.fits_window(layout, self.window):
                return self._packed(layout, temperature)
            if not self.window_notice:
                log.info("packing: a micro-batch holds a sequence of %d tokens, longer than the sliding window (%d):"
                         " such micro-batches take the padded path", layout.longest, self.window)
                self.window_notice = True
        return self._padded(input_ids, attention_mask, labels, temperature)

    def _autocast(self, device: torch.device):
        return (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                else contextlib.nullcontext())

    def _padded(self, input_ids, attention_mask, labels, temperature):
        with self._autocast(input_ids.device):
            hidden = packing.padded_body(self.lm, input_ids, attention_mask, labels.shape[1])
        return self._scored(hidden, labels, temperature)

    def _packed(self, layout: packing.Layout, temperature):
        dtype = self.autocast_dtype or self.lm.get_input_embeddings().weight.dtype
        with self._autocast(layout.input_ids.device):
            hidden = packing.body(self.lm, layout, dtype)
        scored = self._scored(hidden[:, layout.source], layout.labels[None], temperature)  # [1, M]
        return layout.scatter(scored[0])

    def _scored(self, hidden, labels, temperature):
        head = Head.from_model(self.lm)  # read here: under FSDP2 the gathered weight
        if self.autocast_dtype:  # the op takes one dtype; the cast is differentiable (fp32 master grads)
            hidden, head = hidden.to(self.autocast_dtype), head.to(self.autocast_dtype)
        return fused_token_logprobs(hidden, head.weight, labels, temperature=temperature, **head.op_kwargs)


@dataclasses.dataclass(frozen=True)
class Responses:
    """k samples of B prompts, sample-major: row s * B + i is sample s of prompt i (with two samples,
    pair i = rows (i, B + i)). Per-token tensors cover the response positions only."""

    input_ids: torch.Tensor  # [kB, P + N]
    attention_mask: torch.Tensor  # [kB, P + N]
    labels: torch.Tensor  # [kB, N], IGNORE after the first EOS
    finished: torch.Tensor  # [kB] bool
    sampler_logprobs: torch.Tensor  # [kB, N]
    sampled: torch.Tensor  # [kB] bool: drawn from the policy (False: hybrid partner or dataset response)
    prompts: list[str]  # [kB]
    responses: list[str]  # [kB]
    samples: int = 2  # k

    @property
    def groups(self) -> int:
        """B, the number of prompts."""
        return self.labels.shape[0] // self.samples

    def rows(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Row indices of all samples of some prompts, in the sample-major layout of a smaller batch."""
        return torch.cat([prompt_ids + s * self.groups for s in range(self.samples)])


@dataclasses.dataclass(frozen=True)
class Batch(Responses):
    """A complete training batch: the responses and everything the losses read, built once by
    `engine/collect.py`. None where the algorithm's feedback does not produce it."""

    old_logprobs: torch.Tensor | None = None  # [kB, N] log pi_t
    ref_logprobs: torch.Tensor | None = None  # [kB, N] log pi_ref
    kl: torch.Tensor | None = None  # [kB] log pi_t(y|x) - log pi_ref(y|x)
    scores: torch.Tensor | None = None  # [kB] after the missing-EOS penalty
    anchor_preferences: torch.Tensor | None = None  # [2B] P(y_s > y'') (REBEL from preferences, 3 samples)
    rewards: torch.Tensor | None = None  # [kB] (preferences: [2B]) the KL-shaped reward, see shape_rewards

    @classmethod
    def of(cls, responses: Responses, **feedback) -> Batch:
        return cls(**{f.name: getattr(responses, f.name) for f in dataclasses.fields(Responses)}, **feedback)


def from_rollout(ro: Rollout, prompts: list[str], tokenizer, samples: int = 2,
                 sampled: torch.Tensor | None = None) -> Responses:
    """The sampler's output as response rows: labels (IGNORE after EOS), decoded texts, the full mask.
    `sampled` [kB] marks rows drawn from the policy (default: all)."""
    labels = torch.where(ro.response_mask, ro.response_ids, IGNORE)
    responses = tokenizer.batch_decode(torch.where(ro.response_mask, ro.response_ids, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    mask = torch.cat([ro.prompt_mask, ro.response_mask.to(ro.prompt_mask.dtype)], dim=1)
    return Responses(input_ids=ro.sequences, attention_mask=mask, labels=labels, finished=ro.finished,
                     sampler_logprobs=ro.logprobs, sampled=torch.ones_like(ro.finished) if sampled is None else sampled,
                     prompts=list(prompts), responses=responses, samples=samples)


def tokenize_responses(texts: list[str], tokenizer, eos_ids: list[int], device, *, width: int | None = None,
                       max_width: int | None = None):
    """Dataset responses as response rows: tokens + EOS, cut to `width` (None: the longest, at most
    `max_width`); a cut response counts as unfinished. Returns (ids [n, W], mask [n, W] bool, finished [n])."""
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_ids[0]] for text in texts]
    if width is None:
        width = min(max(map(len, tokens)), max_width or math.inf)
    ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(texts), width), dtype=torch.bool, device=device)
    finished = torch.zeros(len(texts), dtype=torch.bool, device=device)
    for i, toks in enumerate(tokens):
        toks = toks[:width]
        ids[i, : len(toks)] = torch.tensor(toks, device=device)
        mask[i, : len(toks)] = True
        finished[i] = toks[-1] in eos_ids
    return ids, mask, finished


def with_offline_partners(ro: Rollout, partners: list[str], tokenizer, eos_ids: list[int]) -> Rollout:
    """Hybrid REBEL: rows B..2B-1 become the dataset's responses y' (tokenized, EOS appended, cut to
    the sampled responses' width); their sampler log-probabilities are 0 (they were not sampled)."""
    ids, mask, finished = tokenize_responses(partners, tokenizer, eos_ids, ro.response_ids.device,
                                             width=ro.response_ids.shape[1])
    return Rollout(prompt_ids=ro.prompt_ids.repeat(2, 1), prompt_mask=ro.prompt_mask.repeat(2, 1),
                   response_ids=torch.cat([ro.response_ids, ids]), response_mask=torch.cat([ro.response_mask, mask]),
                   logprobs=torch.cat([ro.logprobs, torch.zeros_like(ro.logprobs)]),
                   finished=torch.cat([ro.finished, finished]))


def preference_pairs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, chosen: list[str], rejected: list[str],
                     tokenizer, eos_ids: list[int], max_tokens: int) -> Rollout:
    """Offline preference data as a 2-sample rollout: rows 0..B-1 the chosen responses, B..2B-1 the
    rejected ones, each cut at `max_tokens` (with its EOS counted); nothing is sampled."""
    ids, mask, finished = tokenize_responses(chosen + rejected, tokenizer, eos_ids, prompt_ids.device,
                                             max_width=max_tokens)
    return Rollout(prompt_ids=prompt_ids.repeat(2, 1), prompt_mask=prompt_mask.repeat(2, 1), response_ids=ids,
                   response_mask=mask, logprobs=torch.zeros(ids.shape, device=ids.device), finished=finished)


def apply_eos_rule(prefs: torch.Tensor, finished: torch.Tensor, anchor_finished: torch.Tensor) -> torch.Tensor:
    """The missing-EOS penalty for preferences: a response that never emitted EOS loses to a finished
    one whatever the model says (P = 0, or 1 when only the other is cut), two cut responses tie (P = 1/2)."""
    cut, anchor_cut = ~finished, ~anchor_finished
    out = torch.where(cut & ~anchor_cut, torch.zeros_like(prefs), prefs)
    out = torch.where(~cut & anchor_cut, torch.ones_like(prefs), out)
    return torch.where(cut & anchor_cut, torch.full_like(prefs, 0.5), out)


def apply_eos_penalty(raw: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """A response that never emitted EOS gets `penalty` instead of its score (replace, not subtract)."""
    return torch.where(finished, raw, torch.full_like(raw, penalty))


@torch.no_grad()
def sequence_logprobs(model: PolicyLogprobs, batch: Responses, micro_batches: list[torch.Tensor], *,
                      temperature: float) -> torch.Tensor:
    """Per-token log-probabilities [kB, N] of the batch's responses, by micro-batches of prompt indices
    (the first training epoch walks the same micro-batches, so its ratio starts at exactly 0)."""
    out = torch.zeros(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
    for prompt_ids in micro_batches:
        rows = batch.rows(prompt_ids)
        out[rows] = model(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], temperature,
                          samples=batch.samples).float()
    return out


def sequence_kl(old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """log pi_t(y|x) - log pi_ref(y|x) per sequence [R] (ignored positions hold exact zeros)."""
    return old.sum(-1) - ref.sum(-1)


def shape_rewards(signal: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The one place the KL penalty enters: r = signal - kl_coef * (log pi_t - log pi_ref), sequence
    level. `signal` is the score after the missing-EOS penalty, or for REBEL from preferences the
    skew-symmetric target l = 2 P(y > y'') - 1."""
    return signal - kl_coef * kl
