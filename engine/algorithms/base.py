"""The common interface of the comparison algorithms, and how feedback becomes the rewards they regress on.

An algorithm is a frozen dataclass with `samples_per_prompt` (k) and a method
`loss(logprobs, batch) -> (loss, metrics)`:

- `logprobs` [k*B, T]: the differentiable per-token log-probabilities of the responses under the
  policy being trained (`fused_token_logprobs`, exactly 0 at ignored positions). Rows are sample-major,
  as `engine/model/generate.py` lays them out: row s*B + i is sample s of prompt i.
- `batch`: an `AlgoBatch` (engine/algorithms/inputs.py) with the non-differentiable inputs (labels,
  log pi_t, log pi_ref, the KL-shaped rewards and the KL...). The training loop asks the algorithm for
  the shaped rewards once per iteration (`Algorithm.rewards`) and passes them in; a batch built from raw
  `scores` shapes them itself, with the same functions.
- `loss`: a scalar, the **mean over the B prompts** of the per-prompt loss (each algorithm's docstring
  says what one prompt contributes). For gradient accumulation over micro-batches of prompts, scale it
  by (prompts in the micro-batch) / (prompts in the optimizer step).
- `metrics`: detached 0-dim tensors for logging (no host sync; the loop reduces them once per step).

A sequence's log-probability is the sum of its valid tokens' log-probabilities (labels != ignore_index),
as in REBEL (docs/design.md section 2). The KL penalty enters through the reward, at the sequence level:
r = signal - kl_coef * (log pi_t(y|x) - log pi_ref(y|x)), detached, where the signal is the score after
the missing-EOS penalty, or 2 P(y > y'') - 1 for REBEL from preferences (`shape_rewards`).

The dataclasses load no torch (the config, engine/config/, constructs them): what here touches tensors
uses tensor methods only, and the loss methods import torch, the kernels and `inputs` when they run.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from .shaping import SCREENED, sequence_kl, shape_rewards

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch


def samples(default: int):
    """The `samples_per_prompt` field of an algorithm (k), with its --help line."""
    return dataclasses.field(default=default, metadata={"help": "responses per prompt the algorithm trains on (k)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
    """Base of every algorithm: k samples per prompt and a loss. Subclasses fix k's allowed values.

    Two class-level facts tell the loop what feedback to collect (they describe the inputs; the
    loss itself is always the subclass's own method):
    - `offline`: trains on a preference dataset's (chosen, rejected) responses instead of samples
      (the loop still samples from the policy, only to monitor it when a reward is available);
    - `needs_preferences`: reads `anchor_preferences` from a preference model instead of scores.
    """

    samples_per_prompt: int = 2  # each subclass declares its own default with `samples(k)`
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

    def reward_signal(self, scores: torch.Tensor | None, preferences: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor | None:
        """What the algorithm regresses on before the KL penalty: the scores (None: nothing was scored)."""
        return scores

    def rewards(self, *, old: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor | None,
                preferences: torch.Tensor | None, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sequence KL [kB] from per-token log pi_t and log pi_ref, and the KL-shaped reward of the
        samples the signal covers (None when there is no signal)."""
        kl = sequence_kl(old, ref)
        signal = self.reward_signal(scores, preferences, kl.dtype)
        return kl, None if signal is None else shape_rewards(signal, kl[: signal.shape[0]], kl_coef)

    def non_finite(self, batch, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda flags: flags) -> list[str]:
        """The names of the batch's screened quantities holding NaN/inf, in the order they arise (the first
        is the cause of the others); empty when everything is finite. `reduce` combines the flags over
        processes (a max or sum all-reduce: every rank then decides alike)."""
        flags = batch.labels.new_zeros(len(SCREENED)).float()
        for i, (field, _) in enumerate(SCREENED):
            x = getattr(batch, field, None)
            if x is not None:
                flags[i] = (~x.isfinite()).any().float()
        flags = reduce(flags).tolist()
        return [name for (_, name), flag in zip(SCREENED, flags) if flag > 0]

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# checks of the dataclasses' fields (no torch)
# ----------------------------------------------------------------------------------------------
def check_k(name: str, k, allowed: str, ok: bool) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"samples_per_prompt must be an int, got {k!r}")
    if not ok:
        raise ValueError(f"{name} needs samples_per_prompt {allowed}, got {k}")


def positive(name: str, value) -> float:
    """`value` as a float if it is a real number, finite and > 0; else TypeError / ValueError naming `name`
    (the words of `rebel_kernels.positive_finite`, written again here because importing rebel_kernels
    loads torch, which the config's algorithm dataclasses must not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)
