"""Everything a run needs, built once from its config: `build(cfg) -> Run` (engine/iteration/run.py).

The one seam between the config and the loop (`engine/loop.py`): tests and the iteration benchmark
build a run, may swap a part (a checkpointer that writes nothing, say), and hand it to the loop.
"""
from __future__ import annotations

import copy
import json
import logging
import os

import torch
from torch import nn

from engine import config as config_mod
from engine.data import prompts
from engine.data.rewards import build_feedback
from engine.data.tasks import BUILTIN_MODELS
from engine.evaluation.evaluator import Evaluator
from engine.iteration.run import Run
from engine.model import attention, forward, head, lora
from engine.model.generate import Sampler, eos_token_ids
from engine.model.logprobs import PolicyLogprobs
from engine.runtime import guard, parallel, precision
from engine.runtime.checkpoint import Checkpointer, write_text_atomically
from engine.runtime.logs import setup_logging
from engine.runtime.metrics import MetricsLogger, PhaseTimer, Progress


def build(cfg: config_mod.TrainConfig) -> Run:
    """Processes, models, sampler, data, feedback, optimizer, checkpointer and logging of a run. The main
    process first takes the run directory's lock (engine/runtime/guard.py), before the process group forms:
    a second run in a busy directory fails at once, naming the holder."""
    lock = guard.RunLock.acquire(cfg.run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _build(cfg, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(cfg: config_mod.TrainConfig, lock: guard.RunLock | None) -> Run:
    d = parallel.init_distributed()
    if cfg.train.prompts_per_iteration % (d.world * cfg.train.minibatches):
        raise ValueError(f"train.prompts_per_iteration={cfg.train.prompts_per_iteration} must be divisible by "
                         f"world size x train.minibatches = {d.world * cfg.train.minibatches}")
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    setup_logging(cfg.run_dir, d)
    ckpt = Checkpointer(cfg.run_dir, keep=cfg.checkpoint.keep)
    start = ckpt.latest_verified()  # the newest checkpoint whose files match its manifest
    changes = check_resume_config(cfg, ckpt, start)  # before anything is loaded or written
    if d.is_main:
        write_text_atomically(os.path.join(cfg.run_dir, "config.json"), config_mod.to_json(cfg))
    prec = precision.decide(cfg.model.dtype, d, activation_checkpointing=cfg.model.activation_checkpointing)
    policy, reference, tokenizer = load_models(cfg, d.device)
    inference, policy_lp, reference_lp = wrap_models(cfg, d, prec, policy, reference)
    sampler = Sampler(inference, eos_ids=eos_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompt_set = prompts.prepare(prompts.load_rows(cfg.data), tokenizer, cfg.data)
    order = prompts.PromptOrder(len(prompt_set.prompts), cfg.seed)
    feedback = build_feedback(cfg, d.device)
    steps = cfg.train.num_epochs * cfg.train.minibatches
    opt, sched = make_optimizer(cfg, [p for p in policy_lp.parameters() if p.requires_grad], steps)
    sample_gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + d.rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    metrics = _metrics_logger(cfg, d, start)
    evaluator = Evaluator.build(cfg, tokenizer, d, feedback, keep_through=None if start is None else start + 1,
                                tracker=metrics.tracker)
    return Run(cfg=cfg, dist=d, precision=prec, tokenizer=tokenizer, policy=policy, policy_lp=policy_lp,
               reference_lp=reference_lp, inference=inference, sampler=sampler, prompts=prompt_set, order=order,
               feedback=feedback, optimizer=opt, scheduler=sched, sample_generator=sample_gen,
               shuffle_generator=shuffle_gen, checkpointer=ckpt, resume_from=start,
               metrics=metrics,
               progress=Progress(cfg.optim.iterations, initial=0 if start is None else start + 1,
                                 enabled=cfg.logging.progress and d.is_main
                                 and (start is None or start + 1 < cfg.optim.iterations)),
               timer=PhaseTimer(sync_cuda=d.device.type == "cuda"), config_changes=changes, lock=lock,
               evaluator=evaluator)


class ConfigChanged(ValueError):
    """A resume whose config differs from the checkpoint's in fields that change the trajectory."""


def check_resume_config(cfg: config_mod.TrainConfig, ckpt: Checkpointer, start: int | None) -> list[tuple]:
    """The trajectory fields that differ from the checkpoint the run resumes from: an error listing them
    (old -> new) unless checkpoint.allow_config_change; then a warning, and the list."""
    saved = None if start is None else ckpt.saved_config(start)
    if saved is None:
        return []
    changes = config_mod.trajectory_changes(saved, cfg)
    if not changes:
        return []
    listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
    where = os.path.join(ckpt.root, f"step_{start:08d}")
    if not cfg.checkpoint.allow_config_change:
        raise ConfigChanged(f"{cfg.run_dir} resumes from {where}, whose config differs in fields that change the "
                            f"training trajectory:\n{listed}\nto continue with the new values pass "
                            f"--checkpoint.allow_config_change true; to start afresh use a new --run_dir")
    logging.getLogger("rebel").warning("resuming from %s with a changed config (checkpoint.allow_config_change):\n%s",
                                       where, listed)
    return changes


def load_models(cfg: config_mod.TrainConfig, device):
    """(policy, reference, tokenizer), through from_pretrained, or the built-in tiny model. With LoRA
    the reference is None: log pi_ref is the policy with its adapters disabled (no second copy)."""
    policy, tokenizer = _load_lm(cfg, "policy", device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.model.lora_rank:
        policy, reference = lora.add_lora(policy, cfg.model), None
    elif cfg.model.reference:
        reference, _ = _load_lm(cfg, "reference", device)
    else:
        reference = copy.deepcopy(policy)
    # REBEL regresses onto exact log-ratios: no dropout anywhere (eval mode throughout).
    policy.eval().to(device)
    if reference is not None:
        reference.eval().requires_grad_(False).to(device)
    for lm in (policy, reference):  # the LM head's description reproduces the model's own logits, or we stop
        if lm is not None:
            head.check_against_model(lm)
    return policy, reference, tokenizer


def _load_lm(cfg: config_mod.TrainConfig, key: str, device):
    """(float32 causal LM, tokenizer) of model.`key` (policy or reference): a Hugging Face path / hub id
    through from_pretrained, or builtin:NAME (random weights seeded by cfg.seed), with the configured
    attention."""
    spec = getattr(cfg.model, key)
    loading = attention.from_pretrained_kwargs(cfg.model, device)  # checks the attention on this machine too
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"model.{key}: unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        make_tokenizer, make_model = BUILTIN_MODELS[name]
        tokenizer = make_tokenizer()
        lm = make_model(tokenizer, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec)
        lm = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, **loading)
    attention.set_attention(lm, cfg.model)
    return lm, tokenizer


def packing_mode(lm: nn.Module, cfg: config_mod.TrainConfig) -> tuple[bool, bool]:
    """(packed, shared) for a model's log-prob module: as configured where `forward.incompatibility` finds
    the family exact (checked before sharding), else the padded path with a one-line notice."""
    if not cfg.train.micro_batch_tokens:
        return False, False
    reason = forward.incompatibility(lm)
    if reason is not None:
        logging.getLogger("rebel").warning("packing off for %s: %s; training forwards take the padded path",
                                           lm.config.model_type, reason)
        return False, False
    return True, cfg.train.shared_prefix


def wrap_models(cfg, d: parallel.Dist, prec: precision.Precision, policy: nn.Module, reference: nn.Module | None):
    """(inference copy, trained log-prob module, reference log-prob module): the generation copy is
    taken before any freezing, checkpointing or sharding; then layers are frozen, checkpointed, sharded."""
    inference = copy.deepcopy(policy).to(prec.compute_dtype) if prec.separate_inference_copy else policy
    parallel.train_only_top_layers(policy, cfg.model.train_top_layers)
    if cfg.model.liger_kernels:
        from engine.model import liger

        logging.getLogger("rebel").info("liger-kernel: %s", liger.apply(policy))
    packed, shared = packing_mode(policy, cfg)
    temperature = cfg.generation.temperature
    policy_lp = PolicyLogprobs(policy, autocast_dtype=prec.autocast_dtype, temperature=temperature, packed=packed,
                               shared=shared)
    if cfg.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(policy, context_fn=forward.checkpoint_contexts)
    parallel.shard(policy_lp, policy, d, mp_policy=prec.fsdp_policy())
    if reference is None:  # LoRA: log pi_ref through the policy's own weights, adapters off
        return inference, policy_lp, lora.AdapterDisabled(policy_lp, policy)
    if prec.reference_dtype is not None:  # frozen: held in the compute dtype outright (half the memory)
        reference.to(prec.reference_dtype)
    if cfg.model.reference:  # another checkpoint: its own check
        packed, shared = packing_mode(reference, cfg)
    reference_lp = PolicyLogprobs(reference, temperature=temperature, packed=packed, shared=shared)
    parallel.shard(reference_lp, reference, d, mp_policy=prec.fsdp_policy())
    return inference, policy_lp, reference_lp


def make_optimizer(cfg: config_mod.TrainConfig, params, steps_per_iteration: int):
    """AdamW and a LambdaLR: linear warm-up over optim.warmup_iterations, then linear decay to 0."""
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.adam_eps)
    total = cfg.optim.iterations * steps_per_iteration
    warmup = cfg.optim.warmup_iterations * steps_per_iteration

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _metrics_logger(cfg: config_mod.TrainConfig, d: parallel.Dist, resume_from: int | None) -> MetricsLogger:
    """The run's metrics.jsonl (+ TensorBoard); a fresh run in a reused directory starts clean metrics."""
    stale = os.path.join(cfg.run_dir, "metrics.jsonl")
    if resume_from is None and d.is_main and os.path.exists(stale):
        os.remove(stale)
    tracker = None
    if cfg.logging.wandb and d.is_main:
        from engine.runtime.tracking import WandbTracker

        tracker = WandbTracker(cfg.run_dir, project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                               config=json.loads(config_mod.to_json(cfg)), resume=resume_from is not None)
    return MetricsLogger(cfg.run_dir, tensorboard=cfg.logging.tensorboard, plots=cfg.logging.plots,
                         is_main=d.is_main, resume_from=resume_from, tracker=tracker)
