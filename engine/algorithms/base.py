"""The common interface of the comparison algorithms, and the helpers they share.

An algorithm is a frozen dataclass with `samples_per_prompt` (k) and a method
`loss(logprobs, batch) -> (loss, metrics)`:

- `logprobs` [k*B, T]: the differentiable per-token log-probabilities of the responses under the
  policy being trained (`fused_token_logprobs`, exactly 0 at ignored positions). Rows are sample-major,
  as `engine/generate.py` lays them out: row s*B + i is sample s of prompt i.
- `batch`: an `AlgoBatch` with the non-differentiable inputs (labels, log pi_t, log pi_ref, scores...).
- `loss`: a scalar, the **mean over the B prompts** of the per-prompt loss (each algorithm's docstring
  says what one prompt contributes). For gradient accumulation over micro-batches of prompts, scale it
  by (prompts in the micro-batch) / (prompts in the optimizer step).
- `metrics`: detached floats for logging.

A sequence's log-probability is the sum of its valid tokens' log-probabilities (labels != ignore_index),
as in REBEL (DESIGN.md section 2). The KL penalty enters through the reward, at the sequence level:
r = score - kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), detached.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

import torch

from rebel_kernels._validate import positive_finite

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgoBatch:
    """Inputs of an algorithm's loss besides the policy's log-probabilities; kB rows, sample-major."""

    labels: torch.Tensor  # [kB, T] int64, ignore_index after the first EOS / on padding
    old_logprobs: torch.Tensor | None = None  # [kB, T] (or [kB] per sequence) log pi_t, no grad
    ref_logprobs: torch.Tensor | None = None  # [kB, T] (or [kB] per sequence) log pi_ref, no grad
    scores: torch.Tensor | None = None  # [kB] reward-model scores after the missing-EOS penalty
    kl_coef: float = 0.0
    # REBEL from preferences: P(y_s > y'' | x) for the rows s*B + i, s in {0, 1}, against the anchor
    # sample y'' (rows 2B..3B-1). See `rebel_preference.anchor_preferences`.
    anchor_preferences: torch.Tensor | None = None  # [2B] in [0, 1]
    ignore_index: int = -100

    def __post_init__(self):
        if isinstance(self.kl_coef, bool) or not isinstance(self.kl_coef, numbers.Real):
            raise TypeError(f"kl_coef must be a real number, got {self.kl_coef!r}")
        if not math.isfinite(self.kl_coef) or self.kl_coef < 0:
            raise ValueError(f"kl_coef must be finite and >= 0, got {self.kl_coef!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
    """Base of every algorithm: k samples per prompt and a loss. Subclasses fix k's allowed values.

    Two class-level facts tell the loop what feedback to collect (they describe the inputs; the
    loss itself is always the subclass's own method):
    - `offline`: trains on a preference dataset's (chosen, rejected) responses instead of samples
      (the loop still samples from the policy, only to monitor it when a reward is available);
    - `needs_preferences`: reads `anchor_preferences` from a preference model instead of scores.
    """

    samples_per_prompt: int = 2
    offline: ClassVar[bool] = False
    needs_preferences: ClassVar[bool] = False

    @property
    def trained_samples(self) -> int:
        """The leading samples of a prompt whose log-probabilities the loss differentiates (the loop
        skips the policy forward of the others and passes zeros for them)."""
        return self.samples_per_prompt

    @property
    def queries_per_prompt(self) -> int:
        """Reward (or preference) model calls per prompt of an iteration's training batch."""
        return 0 if self.offline else self.samples_per_prompt

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def check_k(name: str, k, allowed: str, ok: bool) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"samples_per_prompt must be an int, got {k!r}")
    if not ok:
        raise ValueError(f"{name} needs samples_per_prompt {allowed}, got {k}")


positive = positive_finite  # the op's own check: finite and > 0, naming the argument


def check_inputs(logprobs: torch.Tensor, batch: AlgoBatch, k: int, needs: tuple[str, ...]) -> int:
    """Shapes of logprobs and of the batch fields this algorithm needs. Returns B (prompts)."""
    if not isinstance(logprobs, torch.Tensor) or logprobs.dtype not in _FLOATS:
        raise TypeError(f"logprobs must be a floating torch.Tensor, got {getattr(logprobs, 'dtype', type(logprobs))}")
    if not isinstance(batch, AlgoBatch):
        raise TypeError(f"batch must be an AlgoBatch, got {type(batch).__name__}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [k*B, T], got shape {tuple(logprobs.shape)}")
    rows, t = logprobs.shape
    if rows == 0 or rows % k:
        raise ValueError(f"logprobs must have a positive multiple of samples_per_prompt={k} rows "
                         f"(row s*B + i = sample s of prompt i), got {rows}")
    if not isinstance(batch.labels, torch.Tensor) or tuple(batch.labels.shape) != (rows, t):
        got = tuple(getattr(batch.labels, "shape", ()))
        raise ValueError(f"labels must have logprobs' shape {(rows, t)}, got {got}")
    if batch.labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {batch.labels.dtype}")
    for name in needs:
        value = getattr(batch, name)
        if value is None:
            raise ValueError(f"{name} is required by this algorithm but the batch has None")
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(value).__name__}")
        shapes = {"old_logprobs": ((rows, t), (rows,)), "ref_logprobs": ((rows, t), (rows,)),
                  "scores": ((rows,),), "anchor_preferences": ((2 * rows // k,),)}[name]
        if tuple(value.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(value.shape)}")
        if value.device != logprobs.device:
            raise ValueError(f"{name} is on {value.device} but logprobs is on {logprobs.device}")
    return rows // k


# ----------------------------------------------------------------------------------------------
# shared math
# ----------------------------------------------------------------------------------------------
def sequence_sum(x: torch.Tensor, labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """[R, T] per token -> [R], summed over valid tokens; a [R] per-sequence input passes through."""
    if x.dim() == 1:
        return x.to(dtype)
    valid = labels != ignore_index
    return torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device)).sum(-1)


def shaped_rewards(batch: AlgoBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """r = score - kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), sequence level, detached. Returns (r, kl) [kB]."""
    kl = (sequence_sum(batch.old_logprobs, batch.labels, batch.ignore_index, dtype)
          - sequence_sum(batch.ref_logprobs, batch.labels, batch.ignore_index, dtype)).detach()
    return batch.scores.detach().to(dtype) - batch.kl_coef * kl, kl


def acc_dtype(logprobs: torch.Tensor) -> torch.dtype:
    return torch.float64 if logprobs.dtype == torch.float64 else torch.float32
