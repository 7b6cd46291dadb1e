"""The update: `num_epochs` passes over an iteration's batch, each `minibatches` AdamW steps on the
algorithm's loss (REBEL by default). All samples of a prompt stay in one micro-batch (the REBEL loss
couples a pair). Metrics stay on the device and are reduced once per optimizer step, over every
micro-batch and every rank: one host sync per step.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from engine import parallel, rollout
from engine.algorithms import AlgoBatch

if TYPE_CHECKING:
    from engine.build import Run

log = logging.getLogger("rebel")


def update(run: Run, batch: rollout.Batch) -> dict:
    """Train on one collected batch; returns the update's metrics (loss of the first and last step,
    the algorithm's metrics averaged over the last step's micro-batches and ranks, the lr)."""
    cfg, d = run.cfg, run.dist
    groups = batch.groups
    per_mb = groups // cfg.train.minibatches
    losses, algo = [], {}
    params = [p for p in run.policy_lp.parameters() if p.requires_grad]
    for epoch in range(cfg.train.num_epochs):
        order = torch.arange(groups) if epoch == 0 else torch.randperm(groups, generator=run.shuffle_generator)
        for mb in order.to(d.device).split(per_mb):
            run.optimizer.zero_grad(set_to_none=True)
            bad, total, sums = _accumulate_gradients(run, batch, mb)
            keys = list(sums)
            reduced = parallel.all_reduce(torch.stack([bad, torch.as_tensor(total, device=d.device).float(),
                                                       *(sums[k].float() for k in keys)]), d).tolist()
            if reduced[0] > 0:  # never let a non-finite loss touch the weights
                log.warning("non-finite loss: minibatch skipped")
                run.counters["skipped_batches"] += 1
                run.optimizer.zero_grad(set_to_none=True)
                continue
            if cfg.optim.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            if run.optimizer_steps is not None:
                run.optimizer_steps += 1
            losses.append(reduced[1] / (len(mb) * d.world))
            algo = {f"algorithm/{k}": v / d.world for k, v in zip(keys, reduced[2:])}
    return algo | {"loss/first": losses[0] if losses else math.nan, "loss/last": losses[-1] if losses else math.nan,
                   "lr": run.scheduler.get_last_lr()[0]}


def _accumulate_gradients(run: Run, batch: rollout.Batch, mb: torch.Tensor):
    """Forward and backward of one minibatch of prompts, by micro-batches. Returns (non-finite loss
    count, sum of micro-batch losses x prompts, the algorithm's metrics weighted by prompt share), all
    on the device."""
    d = run.dist
    total, bad, sums = 0.0, torch.zeros((), device=d.device), {}
    for micro in mb.split(run.cfg.train.micro_batch_prompts):
        logp, inputs = micro_batch(run, batch, micro)
        loss, metrics = run.cfg.algorithm.loss(logp, inputs)  # mean over the micro-batch's prompts
        share = len(micro) / len(mb)
        # Weighted by the micro-batch's share of this rank's minibatch; FSDP2 then averages
        # gradients over ranks: the mean over all ranks' prompts.
        (loss * share).backward()
        bad += (~torch.isfinite(loss)).float()
        total += loss.detach() * len(micro)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() * share
    return bad, total, sums


def micro_batch(run: Run, batch: rollout.Batch, micro: torch.Tensor) -> tuple[torch.Tensor, AlgoBatch]:
    """The policy's log-probabilities of some prompts' samples and the loss inputs of those rows.
    Samples the loss takes no gradient through (the anchor of REBEL from preferences) are not run
    through the policy: their rows of `logp` are zeros."""
    cfg = run.cfg
    rows = batch.rows(micro)
    trained = len(micro) * cfg.algorithm.trained_samples
    logp = run.policy_lp(batch.input_ids[rows[:trained]], batch.attention_mask[rows[:trained]],
                         batch.labels[rows[:trained]], cfg.generation.temperature)
    if trained < len(rows):
        logp = torch.cat([logp, logp.new_zeros((len(rows) - trained, logp.shape[1]))])

    def take(x, index):
        return None if x is None else x[index]

    # rows of the [2B] tensors of REBEL from preferences (two trained samples per prompt)
    pair_rows = torch.cat([micro, micro + batch.groups])
    reward_rows = rows if batch.anchor_preferences is None else pair_rows
    inputs = AlgoBatch(labels=batch.labels[rows], old_logprobs=take(batch.old_logprobs, rows),
                       ref_logprobs=take(batch.ref_logprobs, rows), kl=take(batch.kl, rows),
                       rewards=take(batch.rewards, reward_rows),
                       anchor_preferences=take(batch.anchor_preferences, pair_rows))
    return logp, inputs
