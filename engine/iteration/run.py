"""`Run`: the parts of a run as engine/build.py builds them, the one argument of collect, update and the
loop."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from engine.config import TrainConfig
from engine.data.prompts import PromptOrder, PromptSet
from engine.data.rewards import Feedback
from engine.model.generate import Sampler
from engine.model.logprobs import PolicyLogprobs
from engine.runtime.checkpoint import Checkpointer
from engine.runtime.guard import RunLock
from engine.runtime.metrics import MetricsLogger, PhaseTimer, Progress
from engine.runtime.parallel import Dist
from engine.runtime.precision import Precision


@dataclasses.dataclass
class Run:
    """The parts of a run, built once from its config (engine/build.py) and read by the iteration and the
    loop; what changes while the loop runs is the loop's own (`engine.loop.Status`). `policy_lp` is the
    trained module (the FSDP2 root when sharded): the policy behind the fused log-probability head;
    `inference` generates (the policy itself for one unsharded float32 process); `reference_lp` gives
    log pi_ref (LoRA: the policy with its adapters disabled)."""

    cfg: TrainConfig
    dist: Dist
    precision: Precision
    tokenizer: object
    policy: nn.Module  # the Hugging Face causal LM being trained
    policy_lp: PolicyLogprobs
    reference_lp: nn.Module
    inference: nn.Module
    sampler: Sampler
    prompts: PromptSet
    order: PromptOrder
    feedback: Feedback
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sample_generator: torch.Generator  # the sampler's noise, one stream per rank
    shuffle_generator: torch.Generator  # the minibatch order of epochs after the first
    checkpointer: Checkpointer
    resume_from: int | None  # the checkpoint the loop resumes from (None: a fresh run)
    metrics: MetricsLogger
    progress: Progress
    timer: PhaseTimer
    config_changes: list = dataclasses.field(default_factory=list)  # (key, old, new) accepted on resume
    lock: RunLock | None = None  # the run directory's lock (main process), released by the loop's finish
    evaluator: Any = None  # engine.evaluation.Evaluator (built above this folder), None without eval.prompts
