"""The tensor side of the algorithms: `AlgoBatch` (a loss's inputs besides the policy's log-probabilities),
its checks, and the math the losses share. The loss methods import this module when they run (see
engine/algorithms/base.py), so that the algorithm dataclasses themselves load no torch.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .shaping import preference_signal, shape_rewards

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgoBatch:
    """Inputs of an algorithm's loss besides the policy's log-probabilities; kB rows, sample-major."""

    labels: torch.Tensor  # [kB, T] int64, ignore_index after the first EOS / on padding
    old_logprobs: torch.Tensor | None = None  # [kB, T] (or [kB] per sequence) log pi_t, no grad
    ref_logprobs: torch.Tensor | None = None  # [kB, T] (or [kB] per sequence) log pi_ref, no grad
    # REBEL from preferences: P(y_s > y'' | x) for the rows s*B + i, s in {0, 1}, against the anchor
    # sample y'' (rows 2B..3B-1). See `rebel_preference.anchor_preferences`.
    anchor_preferences: torch.Tensor | None = None  # [2B] in [0, 1]
    # The KL-shaped reward and the KL, as the loop computes them once per iteration. Left None, they
    # are derived here from `scores` (or `anchor_preferences`), log pi_t, log pi_ref and `kl_coef`.
    rewards: torch.Tensor | None = None  # [kB] (REBEL from preferences: [2B], the trained samples)
    kl: torch.Tensor | None = None  # [kB] log pi_t(y|x) - log pi_ref(y|x)
    scores: torch.Tensor | None = None  # [kB] raw scores after the missing-EOS penalty (when rewards is None)
    kl_coef: float = 0.0
    ignore_index: int = -100

    def __post_init__(self):
        if isinstance(self.kl_coef, bool) or not isinstance(self.kl_coef, numbers.Real):
            raise TypeError(f"kl_coef must be a real number, got {self.kl_coef!r}")
        if not math.isfinite(self.kl_coef) or self.kl_coef < 0:
            raise ValueError(f"kl_coef must be finite and >= 0, got {self.kl_coef!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        self._derive_rewards()

    def _derive_rewards(self) -> None:
        """kl and rewards from raw inputs when they were not passed (shapes that do not fit are left for
        the loss's own checks to name)."""
        per_row = (tuple(self.labels.shape), tuple(self.labels.shape[:1]))
        if self.kl is None and all(isinstance(x, torch.Tensor) and tuple(x.shape) in per_row
                                   for x in (self.old_logprobs, self.ref_logprobs)):
            acc = torch.float64 if self.old_logprobs.dtype == torch.float64 else torch.float32
            kl = (sequence_sum(self.old_logprobs, self.labels, self.ignore_index, acc)
                  - sequence_sum(self.ref_logprobs, self.labels, self.ignore_index, acc))
            object.__setattr__(self, "kl", kl.detach())
        if self.rewards is not None or self.kl is None:
            return
        prefs = self.anchor_preferences
        if isinstance(prefs, torch.Tensor) and prefs.dim() == 1 and prefs.shape[0] <= self.kl.shape[0]:
            signal = preference_signal(prefs.detach(), self.kl.dtype)  # l(x, y_s, y''): REBEL from preferences
            object.__setattr__(self, "rewards", shape_rewards(signal, self.kl[: signal.shape[0]], self.kl_coef))
        elif isinstance(self.scores, torch.Tensor) and self.scores.shape == self.kl.shape:
            object.__setattr__(self, "rewards", shape_rewards(self.scores.detach().to(self.kl.dtype), self.kl,
                                                              self.kl_coef))


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
            hint = " (pass them, or scores [kB] to shape them from)" if name == "rewards" else ""
            raise ValueError(f"{name} is required by this algorithm but the batch has None{hint}")
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(value).__name__}")
        pairs = 2 * rows // k
        shapes = {"old_logprobs": ((rows, t), (rows,)), "ref_logprobs": ((rows, t), (rows,)), "kl": ((rows,),),
                  "rewards": ((pairs,),) if batch.anchor_preferences is not None else ((rows,),),
                  "anchor_preferences": ((pairs,),)}[name]
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


def rewards_and_kl(batch: AlgoBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's KL-shaped rewards and KL [kB], detached, in the loss's accumulation dtype."""
    return batch.rewards.detach().to(dtype), batch.kl.detach().to(dtype)


def acc_dtype(logprobs: torch.Tensor) -> torch.dtype:
    return torch.float64 if logprobs.dtype == torch.float64 else torch.float32
