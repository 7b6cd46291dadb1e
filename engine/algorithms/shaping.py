"""How feedback becomes the rewards an algorithm regresses on, in one place: the sequence KL, REBEL from
preferences' signal, the KL penalty, and the quantities screened for NaN/inf before an update. Tensor
methods only: importing this loads no torch (engine/algorithms/base.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The quantities screened before an update, in the order they arise, with the names a warning uses.
SCREENED = (("scores", "reward (scores)"), ("anchor_preferences", "preference (P(y > y''))"),
            ("old_logprobs", "log pi_t (the policy's log-probabilities)"),
            ("ref_logprobs", "log pi_ref (the reference's log-probabilities)"),
            ("kl", "KL (log pi_t - log pi_ref)"), ("rewards", "shaped reward (score - kl_coef * KL)"))


def sequence_kl(old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """log pi_t(y|x) - log pi_ref(y|x) per sequence [R] from per-token [R, T] (ignored positions hold exact
    zeros)."""
    return old.sum(-1) - ref.sum(-1)


def shape_rewards(signal: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The one place the KL penalty enters: r = signal - kl_coef * (log pi_t - log pi_ref), sequence level."""
    return signal - kl_coef * kl


def preference_signal(preferences: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """REBEL from preferences' skew-symmetric target l(x, y, y'') = 2 P(y > y'' | x) - 1, in `dtype`."""
    return 2 * preferences.to(dtype) - 1
