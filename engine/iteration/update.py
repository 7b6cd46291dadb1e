"""The update: `num_epochs` passes over an iteration's batch, each `minibatches` AdamW steps on the
algorithm's loss (REBEL by default). All samples of a prompt stay in one micro-batch (the REBEL loss
couples a pair); micro-batches are formed by a token budget (packed) or a prompt count (padded), and
each one's loss is weighted by its share of the step's prompts, so the update is the same whatever the
partition. Metrics stay on the device and are reduced once per optimizer step, over every micro-batch
and every rank: one host sync per step.

Folding (engine/iteration/micro_batches.py): with one optimizer step per epoch, the first epoch's
forwards record log pi_t (the batch arrives without it); the KL and the shaped rewards follow per
micro-batch from the algorithm (`Algorithm.rewards`, as collect asks it), and the completed batch is
screened before the first step.

The update counts what it did (`Updated.steps`, `Updated.skipped`); the loop keeps the run's totals.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch

from engine.algorithms.inputs import AlgoBatch
from engine.runtime import parallel

from .batch import Batch
from .micro_batches import folds, micro_batches
from .run import Run

log = logging.getLogger("rebel")


@dataclasses.dataclass(frozen=True)
class Updated:
    """What an update did: its metrics, the batch (completed with log pi_t, the KL and the rewards when
    they were folded into the first epoch), the optimizer steps taken and the steps skipped (non-finite)."""

    metrics: dict
    batch: Batch
    steps: int = 0
    skipped: int = 0


def update(run: Run, batch: Batch) -> Updated:
    """Train on one collected batch. Its metrics: the loss of the first and last step, the algorithm's
    metrics averaged over the last step's micro-batches and ranks, the lr."""
    cfg, d = run.cfg, run.dist
    groups = batch.groups
    per_mb = groups // cfg.train.minibatches
    losses, algo, skipped = [], {}, 0
    for epoch in range(cfg.train.num_epochs):
        order = torch.arange(groups) if epoch == 0 else torch.randperm(groups, generator=run.shuffle_generator)
        for mb in order.to(d.device).split(per_mb):
            run.optimizer.zero_grad(set_to_none=True)
            record = batch.old_logprobs is None and folds(cfg)
            bad, total, sums, batch = _accumulate_gradients(run, batch, mb, record)
            if record and (names := cfg.algorithm.non_finite(batch, functools.partial(parallel.all_reduce, d=d))):
                log.warning("non-finite %s: update skipped", " -> ".join(names))
                run.optimizer.zero_grad(set_to_none=True)
                return Updated(metrics={}, batch=batch, steps=len(losses), skipped=skipped + 1)
            keys = list(sums)
            reduced = parallel.all_reduce(torch.stack([bad, torch.as_tensor(total, device=d.device).float(),
                                                       *(sums[k].float() for k in keys)]), d).tolist()
            if reduced[0] > 0:  # never let a non-finite loss touch the weights
                log.warning("non-finite loss: minibatch skipped")
                skipped += 1
                run.optimizer.zero_grad(set_to_none=True)
                continue
            _step(run)
            losses.append(reduced[1] / (len(mb) * d.world))
            algo = {f"algorithm/{k}": v / d.world for k, v in zip(keys, reduced[2:])}
    metrics = {"loss/first": losses[0] if losses else math.nan, "loss/last": losses[-1] if losses else math.nan,
               "lr": run.scheduler.get_last_lr()[0]}
    return Updated(metrics=algo | metrics, batch=batch, steps=len(losses), skipped=skipped)


def _step(run: Run) -> None:
    """One optimizer and scheduler step (after clipping, when optim.max_grad_norm is set)."""
    if run.cfg.optim.max_grad_norm is not None:
        params = [p for p in run.policy_lp.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, run.cfg.optim.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()


def _accumulate_gradients(run: Run, batch: Batch, mb: torch.Tensor, record: bool):
    """Forward and backward of one minibatch of prompts, by micro-batches. Returns (non-finite loss
    count, sum of micro-batch losses x prompts, the algorithm's metrics weighted by prompt share, all
    on the device; the batch, completed with log pi_t when `record`)."""
    d = run.dist
    total, bad, sums = 0.0, torch.zeros((), device=d.device), {}
    old = torch.zeros(batch.labels.shape, dtype=torch.float32, device=batch.labels.device) if record else None
    for micro in micro_batches(run, batch, mb):
        logp, inputs = micro_batch(run, batch, micro, old)
        if record and not all(torch.isfinite(x).all() for x in (inputs.old_logprobs, inputs.kl, inputs.rewards)
                              if x is not None):
            bad += 1  # folded log pi_t is not finite: the screen after this epoch names it, no step is taken
            (logp.sum() * 0.0).backward()  # a backward all the same: FSDP ranks pair their collectives
            continue
        loss, metrics = run.cfg.algorithm.loss(logp, inputs)  # mean over the micro-batch's prompts
        share = len(micro) / len(mb)
        # Weighted by the micro-batch's share of this rank's minibatch; FSDP2 then averages
        # gradients over ranks: the mean over all ranks' prompts.
        (loss * share).backward()
        bad += (~torch.isfinite(loss)).float()
        total += loss.detach() * len(micro)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * share
    if record:
        kl, rewards = _rewards(run, old, batch.ref_logprobs, batch.scores)
        batch = dataclasses.replace(batch, old_logprobs=old, kl=kl, rewards=rewards)
    return bad, total, sums, batch


def micro_batch(run: Run, batch: Batch, micro: torch.Tensor,
                record: torch.Tensor | None = None) -> tuple[torch.Tensor, AlgoBatch]:
    """The policy's log-probabilities of some prompts' samples and the loss inputs of those rows.
    Samples the loss takes no gradient through (the anchor of REBEL from preferences) are not run
    through the policy: their rows of `logp` are zeros. `record` [kB, N]: log pi_t is folded, this
    forward records it (the loss inputs then derive the KL and rewards from it, as collect does)."""
    cfg = run.cfg
    rows = batch.rows(micro)
    per_prompt = cfg.algorithm.trained_samples
    trained = len(micro) * per_prompt
    logp = run.policy_lp(batch.input_ids[rows[:trained]], batch.attention_mask[rows[:trained]],
                         batch.labels[rows[:trained]], samples=per_prompt)
    if trained < len(rows):
        logp = torch.cat([logp, logp.new_zeros((len(rows) - trained, logp.shape[1]))])

    def take(x, index):
        return None if x is None else x[index]

    # rows of the [2B] tensors of REBEL from preferences (two trained samples per prompt)
    pair_rows = torch.cat([micro, micro + batch.groups])
    reward_rows = rows if batch.anchor_preferences is None else pair_rows
    old, kl, rewards = take(batch.old_logprobs, rows), take(batch.kl, rows), take(batch.rewards, reward_rows)
    if record is not None:  # folded: this forward is log pi_t
        record[rows] = old = logp.detach().float()
        kl, rewards = _rewards(run, old, batch.ref_logprobs[rows], take(batch.scores, rows))
    inputs = AlgoBatch(labels=batch.labels[rows], old_logprobs=old, ref_logprobs=take(batch.ref_logprobs, rows),
                       kl=kl, rewards=rewards, anchor_preferences=take(batch.anchor_preferences, pair_rows))
    return logp, inputs


def _rewards(run: Run, old: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor | None):
    """Folded: the KL and shaped rewards of rows whose log pi_t this update recorded (folding needs every
    sample trained, so there are no anchor preferences here)."""
    return run.cfg.algorithm.rewards(old=old, ref=ref, scores=scores, preferences=None, kl_coef=run.cfg.reward.kl_coef)
