"""REBEL from preferences (paper Appendix D.2: SPO with REBEL as the base learner).

A preference model P(y > y' | x) replaces the reward model; l(x, y, y') = 2 P(y > y' | x) - 1 in [-1, 1]
is skew-symmetric. For each prompt sample three responses from pi_t: y (rows 0..B-1), y' (rows B..2B-1)
and the anchor y'' (rows 2B..3B-1), and regress

    loss_i = ( (rho(y) - rho(y')) / eta - (l(x, y, y'') - l(x, y', y'')) )^2,
    rho = log pi_theta - log pi_t,

i.e. REBEL with the iteration-dependent "reward" r_t(x, y) = l(x, y, y'') (an unbiased sample of
l(x, y, pi_t)). It goes through `rebel_loss_from_logprobs` with rewards [l(y, y''), l(y', y'')]
(minus kl_coef * (log pi_t - log pi_ref), like every algorithm here; D.2 itself has kl_coef = 0).
The anchor only enters through the targets: its rows of `logprobs` get zero gradient, so a loop may
pass them detached (or skip their forward and pass zeros).

Reduction to REBEL: with P(y > y' | x) = (1 + r(y) - r(y')) / 2 (a valid probability when rewards lie
in an interval of length 1), l(y, y'') - l(y', y'') = r(y) - r(y') exactly, so this loss equals REBEL's
on the pairs (y, y'). Bradley-Terry P = sigmoid(r(y) - r(y')) gives l = tanh((r(y) - r(y''))/2): the
same only to first order (targets ~ (r(y) - r(y'))/2 for small reward gaps).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from .base import Algorithm, check_k, positive, samples
from .shaping import preference_signal

if TYPE_CHECKING:
    import torch

    from .inputs import AlgoBatch

# prefer(prompts, ys, ys2) -> [n] tensor of P(ys[j] > ys2[j] | prompts[j])
PreferenceFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], "torch.Tensor"]


def anchor_preferences(prefer: PreferenceFn, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """One preference-model call per rollout: [2B] P(y_s > y'' | x) for s = 0, 1 (rows s*B + i), from
    B prompts and 3B responses laid out sample-major (y, then y', then the anchors y'')."""
    b = len(prompts)
    if b == 0 or len(responses) != 3 * b:
        raise ValueError(f"responses must hold 3 * len(prompts) = {3 * b} texts (y, y', y''), got {len(responses)}")
    anchors = list(responses[2 * b:])
    return prefer(list(prompts) * 2, list(responses[: 2 * b]), anchors * 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RebelPreference(Algorithm):
    samples_per_prompt: int = samples(3)
    eta: float = dataclasses.field(default=1.0,
                                   metadata={"help": "REBEL's eta: the log-ratio difference is divided by it"})
    needs_preferences: ClassVar[bool] = True

    @property
    def queries_per_prompt(self) -> int:
        return 2  # P(y > y'') and P(y' > y'')

    @property
    def trained_samples(self) -> int:
        return 2  # the anchor y'' only enters through the targets

    def reward_signal(self, scores, preferences, dtype):
        """l(x, y_s, y'') = 2 P(y_s > y'') - 1 of the two trained samples [2B] (the anchor only enters
        through the targets); the scores, when a reward is configured too, only monitor."""
        return None if preferences is None else preference_signal(preferences, dtype)

    def __post_init__(self):
        check_k("RebelPreference", self.samples_per_prompt, "== 3 (y, y', anchor y'')", self.samples_per_prompt == 3)
        positive("eta", self.eta)

    def loss(self, logprobs: torch.Tensor, batch: AlgoBatch) -> tuple[torch.Tensor, dict[str, float]]:
        from rebel_kernels import rebel_loss_from_logprobs

        from .inputs import acc_dtype, check_inputs, rewards_and_kl
        b = check_inputs(logprobs, batch, 3, ("old_logprobs", "anchor_preferences", "kl", "rewards"))
        prefs = batch.anchor_preferences.detach()
        if not bool(((prefs >= 0) & (prefs <= 1)).all()):
            raise ValueError(f"anchor_preferences must be probabilities in [0, 1], got min {prefs.min().item()} "
                             f"max {prefs.max().item()}")
        acc, pair = acc_dtype(logprobs), slice(0, 2 * b)
        rewards, kl = rewards_and_kl(batch, acc)  # rewards [2B]: l(x, y_s, y'') - kl_coef * KL
        kl = kl[pair]
        targets = preference_signal(prefs, acc)  # l(x, y_s, y'')
        loss = rebel_loss_from_logprobs(logprobs[pair], batch.labels[pair], batch.old_logprobs[pair], rewards,
                                        eta=self.eta, ignore_index=batch.ignore_index, reduction="mean")
        return loss, {"loss": loss.detach(), "preference/mean": prefs.mean(), "kl/mean": kl.mean(),
                      "target/abs_mean": (targets[:b] - targets[b:]).abs().mean()}
