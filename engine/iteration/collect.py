"""Collection: this rank's prompts of an iteration -> a complete training batch and the rollout metrics.

    generate k responses per prompt -> cut at EOS -> score (missing-EOS penalty) or ask the preference
    model -> no-grad log pi_t and log pi_ref (the fused op) -> the algorithm's KL and shaped reward (once)

On-policy algorithms train on what they sample; offline ones (DPO) train on the dataset's chosen /
rejected pairs and sample only to monitor the policy when a reward is configured.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch

from engine.algorithms import anchor_preferences, shape_rewards
from engine.data import rewards
from engine.data.prompts import left_pad
from engine.runtime import parallel

from .batch import IGNORE, Batch, Responses, from_rollout, preference_pairs, sequence_logprobs, with_offline_partners
from .micro_batches import folds, micro_batches
from .run import Run


@dataclasses.dataclass(frozen=True)
class Collected:
    """An iteration's training batch (without log pi_t, the KL and the rewards when they are folded into
    the update), the sampled batch the rollout metrics describe when it is another one (offline
    algorithms sample only to monitor), and the generation's seconds (None: nothing was sampled)."""

    batch: Batch
    monitor: Batch | None
    generate_s: float | None


def iteration_batch(run: Run) -> Collected:
    """This rank's training batch of the next iteration."""
    cfg, d = run.cfg, run.dist
    chosen = run.order.take(cfg.train.prompts_per_iteration)[d.rank :: d.world]
    if not cfg.algorithm.offline:
        batch, gen_s = collect(run, chosen)
        return Collected(batch=batch, monitor=None, generate_s=gen_s)
    monitor, gen_s = collect(run, chosen) if run.feedback.reward is not None else (None, None)
    return Collected(batch=collect_preference_pairs(run, chosen), monitor=monitor, generate_s=gen_s)


def collect(run: Run, chosen: list[int]) -> tuple[Batch, float]:
    """Generate, score and compute log pi_ref and (unless folded) log pi_t for the prompts `chosen`
    (indices into the set); returns the batch and the generation's seconds."""
    cfg, d, tok, prompt_set = run.cfg, run.dist, run.tokenizer, run.prompts
    ids, mask = left_pad([prompt_set.prompt_ids[i] for i in chosen], tok.pad_token_id, d.device)
    hybrid = prompt_set.partners is not None  # y' from the dataset: sample one response per prompt
    gen_cfg = dataclasses.replace(cfg.generation, samples_per_prompt=1) if hybrid else cfg.generation
    with run.timer("generate"):
        t0 = time.perf_counter()
        ro = run.sampler.generate(ids, mask, gen_cfg, generator=run.sample_generator)
        gen_s = time.perf_counter() - t0
    sampled = None
    if hybrid:
        partners = [prompt_set.partners[i] for i in chosen]
        ro = with_offline_partners(ro, partners, tok, run.sampler.eos_ids.tolist())
        sampled = torch.arange(2 * len(chosen), device=ro.finished.device) < len(chosen)
    k = cfg.generation.samples_per_prompt
    responses = from_rollout(ro, [prompt_set.prompts[i] for i in chosen] * k, tok, samples=k, sampled=sampled)
    scores = prefs = None
    with run.timer("score"):
        if run.feedback.reward is not None:
            raw = rewards.score(run.feedback.reward, responses.prompts, responses.responses, d.device)
            scores = rewards.apply_eos_penalty(raw, responses.finished, cfg.reward.missing_eos_penalty)
        if run.feedback.prefer is not None:
            prefs = _anchor_preferences(run.feedback.prefer, responses, d.device)
    with run.timer("logprobs"):
        parts = _micro_batches(run, responses)  # one cut for both passes (and the first epoch's)
        ref = sequence_logprobs(run.reference_lp, responses, parts)
        old = None if folds(cfg) else sequence_logprobs(run.policy_lp, responses, parts)  # folded: the update's
    kl = shaped = None
    if old is not None:
        kl, shaped = cfg.algorithm.rewards(old=old, ref=ref, scores=scores, preferences=prefs,
                                           kl_coef=cfg.reward.kl_coef)
    batch = Batch.of(responses, old_logprobs=old, ref_logprobs=ref, kl=kl, scores=scores, anchor_preferences=prefs,
                     rewards=shaped)
    return batch, gen_s


def _micro_batches(run: Run, responses: Responses) -> list[torch.Tensor]:
    """The update's first-epoch micro-batches of the responses' prompts, in order."""
    return micro_batches(run, responses, torch.arange(responses.groups, device=responses.labels.device))


def _anchor_preferences(prefer, batch: Responses, device) -> torch.Tensor:
    """REBEL from preferences: [2B] P(y_s > y'' | x) for s = 0, 1 against the anchor sample y'' (rows
    2B..3B-1), one preference-model call, with the missing-EOS rule applied."""
    b = batch.groups
    checked = functools.partial(rewards.preferences, prefer, device=device)  # count and range checked
    prefs = anchor_preferences(checked, batch.prompts[:b], batch.responses)
    ruled = rewards.apply_eos_rule(prefs, batch.finished[: 2 * b], batch.finished[2 * b :].repeat(2))
    return torch.where(torch.isfinite(prefs), ruled, prefs)  # a broken model's NaN still skips the update


def rollout_stats(batch: Batch, gen_s: float, d: parallel.Dist, kl_coef: float) -> dict:
    """The iteration's rollout metrics, over all ranks (those of log pi_t only when the batch has it: an
    iteration screened out before a folded update has none). With a reward configured, the KL-shaped
    score is the training target of reward-based algorithms and a monitor for the others."""
    valid = batch.labels != IGNORE
    stats = {
        "eos_rate": parallel.global_mean_std(batch.finished.float(), d)[0],
        "response_length/mean": parallel.global_mean_std(valid.sum(-1).float(), d)[0],
        "generation/tokens_per_s": parallel.all_reduce(
            torch.tensor(valid.sum().item() / max(gen_s, 1e-9), device=d.device), d).item(),
    }
    stats["truncation_rate"] = 1 - stats["eos_rate"]
    if batch.kl is not None:
        gap = (batch.sampler_logprobs - batch.old_logprobs).abs()[valid & batch.sampled[:, None]]
        stats["kl/mean"] = parallel.global_mean_std(batch.kl, d)[0]
        stats["logprob_gap/mean_abs"] = parallel.global_mean_std(gap, d)[0]
    if batch.scores is not None and batch.kl is not None:
        scored = shape_rewards(batch.scores, batch.kl, kl_coef)
        stats["reward/mean"], stats["reward/std"] = parallel.global_mean_std(scored, d)
        stats["score/mean"] = parallel.global_mean_std(batch.scores, d)[0]
    if batch.anchor_preferences is not None:
        stats["preference/mean"] = parallel.global_mean_std(batch.anchor_preferences, d)[0]
    return stats


def collect_preference_pairs(run: Run, chosen: list[int]) -> Batch:
    """Offline algorithms (DPO): the prompts with the dataset's chosen (rows 0..B-1) and rejected
    (rows B..2B-1) responses, and their log pi_ref; nothing is sampled or scored."""
    cfg, tok, prompt_set = run.cfg, run.tokenizer, run.prompts
    ids, mask = left_pad([prompt_set.prompt_ids[i] for i in chosen], tok.pad_token_id, run.dist.device)
    texts = {role: [prompt_set.responses[role][i] for i in chosen] for role in ("chosen", "rejected")}
    ro = preference_pairs(ids, mask, texts["chosen"], texts["rejected"], tok, run.sampler.eos_ids.tolist(),
                                  cfg.generation.max_new_tokens)
    responses = from_rollout(ro, [prompt_set.prompts[i] for i in chosen] * 2, tok, samples=2,
                             sampled=torch.zeros_like(ro.finished))
    with run.timer("logprobs"):
        ref = sequence_logprobs(run.reference_lp, responses, _micro_batches(run, responses))
    return Batch.of(responses, ref_logprobs=ref)
