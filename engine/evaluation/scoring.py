"""One prompt's evaluation (`Record`) and the row of metrics over all of them (`summarize`).

win rate against the reference: mean over prompts of 1 when the policy's response scores above the
reference response, 1/2 on a tie, 0 below (the missing-EOS penalty applies to the policy's response).
Preference / judge win rates: mean over prompts of P(policy > reference), each pair scored in both
orders, (P(a, b) + 1 - P(b, a)) / 2, so a judge's position bias cancels. Means are over the finite
values: a reward, preference model or judge returning NaN is named in a warning (rewards.checked_output)
and those prompts are left out of its mean (the row's value is null when none is left).
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from engine.data import rewards

LEFT_OUT = "those prompts are left out of the evaluation's mean"  # the warning's consequence


@dataclasses.dataclass(frozen=True)
class Record:
    """One held-out prompt: what the policy wrote, its scores and its KL; the samples table's row."""

    index: int  # position in the held-out set
    prompt: str
    response: str
    reference: str | None
    score: float | None  # the reward of the policy's response (missing-EOS penalty applied)
    reference_score: float | None
    preference: float | None  # P(policy > reference) from the preference model, both orders
    judge: float | None  # the same from eval.judge
    kl: float  # sum over response tokens of log pi - log pi_ref
    length: int  # response tokens (EOS included)
    finished: bool  # emitted EOS


def win(score: float, reference_score: float) -> float:
    """1 when the policy's score is above the reference's, 1/2 on a tie, else 0."""
    return 1.0 if score > reference_score else 0.5 if score == reference_score else 0.0


def summarize(records: list[Record]) -> dict[str, float]:
    """The evaluation's row: means over the records (keys present when their inputs are)."""
    if not records:
        raise ValueError("no evaluation records to summarize")

    def mean(values):  # over the finite values (a broken reward, preference or judge: named in a warning)
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    eos = mean(r.finished for r in records)
    row = {"prompts": len(records), "kl": mean(r.kl for r in records),
           "response_length": mean(r.length for r in records), "eos_rate": eos, "truncation_rate": 1.0 - eos}
    if records[0].score is not None:
        row["score"] = mean(r.score for r in records)
    if records[0].reference_score is not None:
        row["reference_score"] = mean(r.reference_score for r in records)
        row["win_rate"] = mean(win(r.score, r.reference_score) for r in records
                               if math.isfinite(r.score) and math.isfinite(r.reference_score))
    if records[0].preference is not None:
        row["preference_win_rate"] = mean(r.preference for r in records)
    if records[0].judge is not None:
        row["judge_win_rate"] = mean(r.judge for r in records)
    return row


def both_orders(prefer, prompts: list[str], policy: list[str], reference: list[str], *, what: str,
                device) -> torch.Tensor:
    """[n] (P(policy > reference) + 1 - P(reference > policy)) / 2 from a preference function or model.
    A wrong type, count or range is an error naming `what`; non-finite values are named in a warning
    (as in training) and left out of the win rate."""
    ab = rewards.preferences(prefer, prompts, policy, reference, device, what=what, if_non_finite=LEFT_OUT)
    ba = rewards.preferences(prefer, prompts, reference, policy, device, what=what, if_non_finite=LEFT_OUT)
    return (ab + 1 - ba) / 2
