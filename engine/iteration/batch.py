"""An iteration's batch: the responses as training rows (`Responses`), the same completed with everything
the losses read (`Batch`), how the sampler's output, dataset responses and preference pairs become
rows, and their per-token log-probabilities under a model by micro-batches."""
from __future__ import annotations

import dataclasses
import math

import torch

from engine.model.generate import Rollout
from engine.model.logprobs import PolicyLogprobs
from engine.model.packing import IGNORE


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
    `engine/iteration/collect.py`. None where the algorithm's feedback does not produce it."""

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


@torch.no_grad()
def sequence_logprobs(model: PolicyLogprobs, batch: Responses, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """Per-token log-probabilities [kB, N] of the batch's responses, by micro-batches of prompt indices
    (the first training epoch walks the same micro-batches, so its ratio starts at exactly 0)."""
    out = torch.zeros(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
    for prompt_ids in micro_batches:
        rows = batch.rows(prompt_ids)
        out[rows] = model(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows],
                          samples=batch.samples).float()
    return out
