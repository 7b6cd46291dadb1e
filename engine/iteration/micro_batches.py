"""How an iteration's batch is cut for the training forwards: micro-batches (by a token budget when
packed, engine/model/packing.py, else by a prompt count) and whether log pi_t is folded into the first
epoch. The no-grad log pi_t / log pi_ref passes (engine/iteration/collect.py) and the first epoch
(engine/iteration/update.py) walk the same micro-batches, so the first ratio is exactly 0.
"""
from __future__ import annotations

import torch

from engine.model import packing
from engine.runtime import parallel

from .batch import Responses
from .run import Run


def folds(cfg) -> bool:
    """Whether log pi_t comes from the first epoch's forwards instead of a separate no-grad pass: the
    first optimizer step comes after every micro-batch (one step per epoch), the algorithm trains on
    its samples and differentiates all of them."""
    algo = cfg.algorithm
    return (cfg.train.fold_old_logprobs and cfg.train.minibatches == 1 and not algo.offline
            and algo.trained_samples == algo.samples_per_prompt)


def micro_batches(run: Run, batch: Responses, prompts: torch.Tensor) -> list[torch.Tensor]:
    """`prompts` (indices of the batch's prompts, in order) cut into micro-batches: consecutive runs within
    train.micro_batch_tokens packed tokens, or of train.micro_batch_prompts prompts when packing is off.
    Under FSDP every rank runs as many micro-batches as the rank with the most (collectives pair up)."""
    cfg, d = run.cfg.train, run.dist
    if not (cfg.micro_batch_tokens and getattr(run.policy_lp, "packed", False)):
        return list(prompts.split(cfg.micro_batch_prompts))
    tokens = packing.group_tokens(batch.attention_mask, batch.labels, batch.samples, run.policy_lp.shared)
    parts = packing.token_budget_split(prompts, tokens, cfg.micro_batch_tokens)
    if d.sharded:
        count = parallel.all_reduce(torch.tensor(float(len(parts)), device=d.device), d,
                                    op=torch.distributed.ReduceOp.MAX)
        parts = packing.split_to_count(parts, int(count.item()))
    return parts
