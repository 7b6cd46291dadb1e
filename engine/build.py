"""Everything a run needs, built once from its config: `build(cfg) -> Run`.

The one seam between the config and the loop (`engine/loop.py`): tests and the iteration benchmark
build a run, may swap a part (a checkpointer that writes nothing, say), and hand it to the loop.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from engine import block_attention, data, guard, head, lora, packing, parallel, precision, rewards, rollout, varlen
from engine import config as config_mod
from engine.checkpoint import Checkpointer, write_text_atomically
from engine.generate import Sampler, eos_token_ids
from engine.metrics import MetricsLogger, PhaseTimer, Progress
from engine.tasks import BUILTIN_MODELS


@dataclasses.dataclass(frozen=True)
class Feedback:
    """What scores the responses: a reward (None: none configured, allowed for offline DPO and REBEL
    from preferences) and, for algorithms that need one, a preference model."""

    reward: rewards.RewardFn | None
    prefer: Callable | None = None


@dataclasses.dataclass
class Run:
    """The parts of a run. `policy_lp` is the trained module (the FSDP2 root when sharded): the policy
    behind the fused log-probability head; `inference` generates (the policy itself for one unsharded
    float32 process); `reference_lp` gives log pi_ref (LoRA: the policy with its adapters disabled)."""

    cfg: config_mod.TrainConfig
    dist: parallel.Dist
    precision: precision.Precision
    tokenizer: object
    policy: nn.Module  # the Hugging Face causal LM being trained
    policy_lp: rollout.PolicyLogprobs
    reference_lp: nn.Module
    inference: nn.Module
    sampler: Sampler
    prompts: data.PromptSet
    order: data.PromptOrder
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
    counters: dict = dataclasses.field(default_factory=lambda: {"skipped_batches": 0})
    # optimizer steps taken since the run began (checkpointed; not a metric): 0 at the end means nothing
    # was trained and the run fails (engine/loop.py). None: restored from a checkpoint that predates it.
    optimizer_steps: int | None = 0
    config_changes: list = dataclasses.field(default_factory=list)  # (key, old, new) accepted on resume
    failure: str | None = None  # set by the loop when the run ended without its purpose (exit status 1)
    interrupted: int | None = None  # the signal that stopped the run (SIGTERM / SIGINT), set by the loop
    seconds: dict = dataclasses.field(default_factory=dict)  # the last iteration's and save's durations
    already_finished: bool = False  # the run directory held a finished run: nothing was trained
    lock: guard.RunLock | None = None  # the run directory's lock (main process), released by the loop's finish


def build(cfg: config_mod.TrainConfig) -> Run:
    """Processes, models, sampler, data, feedback, optimizer, checkpointer and logging of a run. The main
    process first takes the run directory's lock (engine/guard.py), before the process group forms:
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
    inference, policy_lp, reference_lp = _wrap_models(cfg, d, prec, policy, reference)
    sampler = Sampler(inference, eos_ids=eos_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompt_set = data.prepare(data.load_rows(cfg.data), tokenizer, cfg.data)
    order = data.PromptOrder(len(prompt_set.prompts), cfg.seed)
    feedback = build_feedback(cfg, d.device)
    steps = cfg.train.num_epochs * cfg.train.minibatches
    opt, sched = make_optimizer(cfg, [p for p in policy_lp.parameters() if p.requires_grad], steps)
    sample_gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + d.rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    return Run(cfg=cfg, dist=d, precision=prec, tokenizer=tokenizer, policy=policy, policy_lp=policy_lp,
               reference_lp=reference_lp, inference=inference, sampler=sampler, prompts=prompt_set, order=order,
               feedback=feedback, optimizer=opt, scheduler=sched, sample_generator=sample_gen,
               shuffle_generator=shuffle_gen, checkpointer=ckpt, resume_from=start,
               metrics=_metrics_logger(cfg, d, start),
               progress=Progress(cfg.optim.iterations, initial=0 if start is None else start + 1,
                                 enabled=cfg.logging.progress and d.is_main
                                 and (start is None or start + 1 < cfg.optim.iterations)),
               timer=PhaseTimer(sync_cuda=d.device.type == "cuda"), config_changes=changes, lock=lock)


class _BarSafeHandler(logging.StreamHandler):
    """stderr through tqdm.write when tqdm is there, so that a record never breaks the progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
        except ImportError:
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: str, d: parallel.Dist) -> None:
    """The engine's records on stderr (main process: INFO, others: WARNING) and in run_dir/train.log (main
    process); warnings of libraries (warnings.warn) go to train.log only, never through the bar. Calling it
    again (another run in the same process) replaces what an earlier call installed."""
    fmt = logging.Formatter("%(asctime)s %(message)s")
    root = logging.getLogger()
    # library warnings: warnings.warn, and transformers' own warning records (deprecations, ...)
    py_warnings = logging.getLogger("py.warnings")
    for logger in (root, py_warnings, logging.getLogger("transformers")):
        for handler in [h for h in logger.handlers if getattr(h, "_rebel", False)]:
            logger.removeHandler(handler)
            handler.close()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
        if d.is_main:
            hf_logging.disable_default_handler()  # its stderr handler: its records join py.warnings' file
            hf_logging.get_logger().addHandler(_ForwardTo(py_warnings))
    except ImportError:
        pass
    root.setLevel(logging.INFO if d.is_main else logging.WARNING)
    handlers = [(_BarSafeHandler(), root)]
    if d.is_main:
        log_file = os.path.join(run_dir, "train.log")
        handlers += [(logging.FileHandler(log_file, encoding="utf-8"), root),
                     (logging.FileHandler(log_file, encoding="utf-8"), py_warnings)]
    for handler, logger in handlers:
        handler._rebel = True
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logging.captureWarnings(True)
    py_warnings.propagate = not d.is_main  # other ranks have no log file: their warnings reach stderr


class _ForwardTo(logging.Handler):
    """Hands records to another logger's handlers (transformers' records -> train.log)."""

    _rebel = True

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target = target

    def emit(self, record):
        for handler in self.target.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


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
    attention = _attention_kwargs(cfg, device)
    if cfg.model.policy.startswith("builtin:"):
        name = cfg.model.policy.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"model.policy: unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        make_tokenizer, make_model = BUILTIN_MODELS[name]
        tokenizer = make_tokenizer()
        policy = make_model(tokenizer, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
        policy = AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32, **attention)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_attention(policy, cfg)
    if cfg.model.lora_rank:
        policy, reference = lora.add_lora(policy, cfg.model), None
    elif cfg.model.reference:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(cfg.model.reference, dtype=torch.float32, **attention)
        set_attention(reference, cfg)
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


def _attention_kwargs(cfg: config_mod.TrainConfig, device) -> dict:
    """from_pretrained's attn_implementation (nothing: the family's default), checked against what this
    machine can train with."""
    name = cfg.model.attn_implementation
    if name == "flash_attention_2" and not varlen.available():
        raise ValueError("model.attn_implementation='flash_attention_2' needs flash-attn and a CUDA device "
                         "(pip install -e '.[flash]'); use 'sdpa' or 'flex_attention' otherwise")
    if name == "flex_attention" and torch.device(device).type != "cuda":
        raise ValueError("model.attn_implementation='flex_attention' needs a CUDA device (PyTorch's flex "
                         "attention has no backward on CPU); use 'sdpa' or 'eager'")
    return {} if name is None else {"attn_implementation": name}


def set_attention(lm: nn.Module, cfg: config_mod.TrainConfig) -> None:
    """model.attn_implementation (None: the one transformers chose for the family), where the engine has
    its packed form switched to it: SDPA and eager -> blockwise per prompt group (engine/block_attention.py),
    flash-attention-2 -> flash-attn varlen (engine/varlen.py). Each is the inner function when nothing is
    packed. A family whose attention does not go through transformers' AttentionInterface keeps its own
    (packed with a dense mask)."""
    current = getattr(lm.config, "_attn_implementation", None)
    name = cfg.model.attn_implementation or current
    own = _engine_attention(lm, name)
    if own is not None:
        try:
            lm.set_attn_implementation(own)
        except (ValueError, NotImplementedError):
            pass
        if getattr(lm.config, "_attn_implementation", None) == own:
            return
    if name and getattr(lm.config, "_attn_implementation", None) != name:
        lm.set_attn_implementation(name)


def _engine_attention(lm: nn.Module, name: str | None) -> str | None:
    """The engine's registered packed form of attention `name`, or None."""
    if name == "flash_attention_2":
        varlen.register()
        return varlen.NAME
    if name in block_attention.NAMES and block_attention.supports(lm, name):
        return block_attention.register(name)
    return None


def packing_mode(lm: nn.Module, cfg: config_mod.TrainConfig) -> tuple[bool, bool]:
    """(packed, shared) for a model's log-prob module: as configured where `packing.incompatibility` finds
    the family exact (checked before sharding), else the padded path with a one-line notice."""
    if not cfg.train.micro_batch_tokens:
        return False, False
    reason = packing.incompatibility(lm)
    if reason is not None:
        logging.getLogger("rebel").warning("packing off for %s: %s; training forwards take the padded path",
                                           lm.config.model_type, reason)
        return False, False
    return True, cfg.train.shared_prefix


def _wrap_models(cfg, d: parallel.Dist, prec: precision.Precision, policy: nn.Module, reference: nn.Module | None):
    """(inference copy, trained log-prob module, reference log-prob module): the generation copy is
    taken before any freezing, checkpointing or sharding; then layers are frozen, checkpointed, sharded."""
    inference = copy.deepcopy(policy).to(prec.compute_dtype) if prec.separate_inference_copy else policy
    parallel.train_only_top_layers(policy, cfg.model.train_top_layers)
    if cfg.model.liger_kernels:
        from engine import liger

        logging.getLogger("rebel").info("liger-kernel: %s", liger.apply(policy))
    packed, shared = packing_mode(policy, cfg)
    policy_lp = rollout.PolicyLogprobs(policy, autocast_dtype=prec.autocast_dtype, packed=packed, shared=shared)
    if cfg.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(policy)
    parallel.shard(policy_lp, policy, d, mp_policy=prec.fsdp_policy())
    if reference is None:  # LoRA: log pi_ref through the policy's own weights, adapters off
        return inference, policy_lp, lora.AdapterDisabled(policy_lp, policy)
    if prec.reference_dtype is not None:  # frozen: held in the compute dtype outright (half the memory)
        reference.to(prec.reference_dtype)
    if cfg.model.reference:  # another checkpoint: its own check
        packed, shared = packing_mode(reference, cfg)
    reference_lp = rollout.PolicyLogprobs(reference, packed=packed, shared=shared)
    parallel.shard(reference_lp, reference, d, mp_policy=prec.fsdp_policy())
    return inference, policy_lp, reference_lp


def build_feedback(cfg: config_mod.TrainConfig, device) -> Feedback:
    algo = cfg.algorithm
    default = cfg.data.prompts if cfg.data.prompts.startswith("builtin:") else None
    needs_reward = not (algo.offline or algo.needs_preferences)
    reward = rewards.build_reward(cfg.reward, default=default, device=device, required=needs_reward)
    prefer = rewards.build_preference(cfg.reward, default=default, device=device) if algo.needs_preferences else None
    return Feedback(reward=reward, prefer=prefer)


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
    return MetricsLogger(cfg.run_dir, tensorboard=cfg.logging.tensorboard, plots=cfg.logging.plots,
                         is_main=d.is_main, resume_from=resume_from)
