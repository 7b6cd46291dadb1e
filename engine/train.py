"""REBEL training, end to end.

    python engine/train.py                                  # the embedded default, one CPU process
    torchrun --nproc_per_node=2 engine/train.py             # the same on 2 processes (FSDP2 over gloo/NCCL)
    torchrun --nproc_per_node=8 engine/train.py --preset tldr_pythia_2b8 --optim.lr 3e-6

One iteration: refresh the inference copy -> generate k responses per prompt (k = 2 for REBEL) -> cut
at EOS, apply the missing-EOS penalty, score -> no-grad log pi_t and log pi_ref -> r = score - kl_coef * KL
-> num_epochs passes of minibatches of the algorithm's loss (REBEL by default) -> metrics -> checkpoint.
REBEL from preferences asks a preference model instead of scoring; offline DPO trains on the dataset's
chosen/rejected pairs (and samples only to monitor the policy); with LoRA, log pi_ref is the policy with
its adapters disabled.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import time
from typing import Callable

if __package__ in (None, ""):  # `python engine/train.py` / `torchrun engine/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from engine import config as config_mod
from engine import data, lora, parallel, rewards, rollout
from engine.checkpoint import Checkpointer, export_hf, rng_state, set_rng_state
from engine.generate import Sampler, eos_token_ids
from engine.metrics import MetricsLogger, PhaseTimer, Progress
from engine.tasks import BUILTIN_MODELS
from engine.algorithms import AlgoBatch, anchor_preferences

log = logging.getLogger("rebel")


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> config_mod.TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(config_mod.PRESETS))
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2:
        parser.error(f"overrides come as --section.key value pairs, got {rest}")
    pairs = []
    for key, value in zip(rest[::2], rest[1::2]):
        if not key.startswith("--"):
            parser.error(f"expected --section.key, got {key!r}")
        pairs.append((key[2:], value))
    return config_mod.apply_overrides(config_mod.PRESETS[args.preset](), pairs)


def load_models(cfg: config_mod.TrainConfig, device):
    """(policy, reference, tokenizer), through from_pretrained, or the built-in tiny model."""
    if cfg.model.policy.startswith("builtin:"):
        name = cfg.model.policy.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"model.policy: unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        make_tokenizer, make_model = BUILTIN_MODELS[name]
        tokenizer = make_tokenizer()
        policy = make_model(tokenizer, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)
        policy = AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.model.lora_rank:  # the reference is the policy with its adapter disabled: no second copy
        policy, reference = lora.add_lora(policy, cfg.model), None
    elif cfg.model.reference:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        reference = AutoModelForCausalLM.from_pretrained(cfg.model.reference, dtype=torch.float32)
    else:
        reference = copy.deepcopy(policy)
    # REBEL regresses onto exact log-ratios: no dropout anywhere (eval mode throughout).
    policy.eval().to(device)
    if reference is not None:
        reference.eval().requires_grad_(False).to(device)
    return policy, reference, tokenizer


def make_optimizer(cfg: config_mod.TrainConfig, params, steps_per_iteration: int):
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.adam_eps)
    total = cfg.optim.iterations * steps_per_iteration
    warmup = cfg.optim.warmup_iterations * steps_per_iteration

    def factor(step: int) -> float:  # linear warmup, then linear decay to 0 over the run
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------------------------
# one iteration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Feedback:
    """What scores the responses: a reward (None: none configured, allowed for offline DPO and REBEL
    from preferences) and, for algorithms that need one, a preference model."""

    reward: rewards.RewardFn | None
    prefer: Callable | None = None


def build_feedback(cfg: config_mod.TrainConfig, device) -> Feedback:
    algo = cfg.algorithm
    default = cfg.data.prompts if cfg.data.prompts.startswith("builtin:") else None
    needs_reward = not (algo.offline or algo.needs_preferences)
    reward = rewards.build_reward(cfg.reward, default=default, device=device, required=needs_reward)
    prefer = rewards.build_preference(cfg.reward, default=default, device=device) if algo.needs_preferences else None
    return Feedback(reward=reward, prefer=prefer)


def collect(cfg, d, sampler, prompt_set, chosen, tokenizer, feedback, policy_lp, reference_lp, gen, timer):
    """Generate, score and compute log pi_t / log pi_ref for this rank's prompts `chosen`."""
    ids, mask = data.left_pad([prompt_set.prompt_ids[i] for i in chosen], tokenizer.pad_token_id, d.device)
    hybrid = prompt_set.partners is not None  # y' from the dataset: sample one response per prompt
    gen_cfg = dataclasses.replace(cfg.generation, samples_per_prompt=1) if hybrid else cfg.generation
    with timer("generate"):
        t0 = time.perf_counter()
        ro = sampler.generate(ids, mask, gen_cfg, generator=gen)
        gen_s = time.perf_counter() - t0
    if hybrid:
        partners = [prompt_set.partners[i] for i in chosen]
        ro = rollout.with_offline_partners(ro, partners, tokenizer, sampler.eos_ids.tolist())
    k = cfg.generation.samples_per_prompt
    texts = [prompt_set.prompts[i] for i in chosen] * k
    batch = rollout.from_rollout(ro, texts, tokenizer, samples=k)
    if hybrid:
        batch.sampled[batch.groups:] = False
    with timer("score"):
        if feedback.reward is not None:
            raw = rewards.score(feedback.reward, batch.prompts, batch.responses, d.device)
            batch.scores = rollout.apply_eos_penalty(raw, batch.finished, cfg.reward.missing_eos_penalty)
        if feedback.prefer is not None:
            batch.anchor_preferences = _anchor_preferences(feedback.prefer, batch, d.device)
    with timer("logprobs"):
        kw = dict(micro_pairs=cfg.rebel.micro_batch_pairs, temperature=cfg.generation.temperature)
        batch.old_logprobs = rollout.sequence_logprobs(policy_lp, batch, **kw)
        batch.ref_logprobs = rollout.sequence_logprobs(reference_lp, batch, **kw)
    kl = rollout.sequence_kl(batch.old_logprobs, batch.ref_logprobs)
    if batch.scores is not None:  # r = score - kl_coef * (log pi_t - log pi_ref), sequence level
        batch.rewards = batch.scores - cfg.rebel.kl_coef * kl
    return batch, _rollout_stats(batch, kl, gen_s, d)


def _anchor_preferences(prefer, batch: rollout.Batch, device) -> torch.Tensor:
    """REBEL from preferences: [2B] P(y_s > y'' | x) for s = 0, 1 against the anchor sample y'' (rows
    2B..3B-1), one preference-model call, with the missing-EOS rule applied."""
    b = batch.groups
    checked = functools.partial(rewards.preferences, prefer, device=device)  # count and range checked
    prefs = anchor_preferences(checked, batch.prompts[:b], batch.responses)
    ruled = rollout.apply_eos_rule(prefs, batch.finished[: 2 * b], batch.finished[2 * b :].repeat(2))
    return torch.where(torch.isfinite(prefs), ruled, prefs)  # a broken model's NaN still skips the update


def _rollout_stats(batch: rollout.Batch, kl: torch.Tensor, gen_s: float, d) -> dict:
    valid = batch.labels != rollout.IGNORE
    gap = (batch.sampler_logprobs - batch.old_logprobs).abs()[valid & batch.sampled[:, None]]
    stats = {
        "kl/mean": _global_mean_std(kl, d)[0],
        "eos_rate": _global_mean_std(batch.finished.float(), d)[0],
        "response_length/mean": _global_mean_std(valid.sum(-1).float(), d)[0],
        "generation/tokens_per_s": parallel.all_reduce(
            torch.tensor(valid.sum().item() / max(gen_s, 1e-9), device=d.device), d).item(),
        "logprob_gap/mean_abs": _global_mean_std(gap, d)[0],
    }
    stats["truncation_rate"] = 1 - stats["eos_rate"]
    if batch.rewards is not None:
        stats["reward/mean"], stats["reward/std"] = _global_mean_std(batch.rewards, d)
        stats["score/mean"] = _global_mean_std(batch.scores, d)[0]
    if batch.anchor_preferences is not None:
        stats["preference/mean"] = _global_mean_std(batch.anchor_preferences, d)[0]
    return stats


def collect_preference_pairs(cfg, d, prompt_set, chosen, tokenizer, eos_ids, reference_lp, timer) -> rollout.Batch:
    """Offline algorithms (DPO): this rank's prompts with the dataset's chosen (rows 0..B-1) and
    rejected (rows B..2B-1) responses, and their log pi_ref; nothing is sampled or scored."""
    ids, mask = data.left_pad([prompt_set.prompt_ids[i] for i in chosen], tokenizer.pad_token_id, d.device)
    texts = {role: [prompt_set.responses[role][i] for i in chosen] for role in ("chosen", "rejected")}
    ro = rollout.preference_pairs(ids, mask, texts["chosen"], texts["rejected"], tokenizer, eos_ids,
                                  cfg.generation.max_new_tokens)
    batch = rollout.from_rollout(ro, [prompt_set.prompts[i] for i in chosen] * 2, tokenizer, samples=2)
    batch.sampled[:] = False
    with timer("logprobs"):
        batch.ref_logprobs = rollout.sequence_logprobs(reference_lp, batch, micro_pairs=cfg.rebel.micro_batch_pairs,
                                                       temperature=cfg.generation.temperature)
    return batch


def feedback_is_finite(batch: rollout.Batch, d) -> bool:
    """No NaN/inf in the scores or preferences of any rank's batch."""
    bad = torch.zeros((), device=batch.labels.device)
    for x in (batch.scores, batch.anchor_preferences):
        if x is not None:
            bad = bad + (~torch.isfinite(x)).any().float()
    return parallel.all_reduce(bad, d).item() == 0


def _global_mean_std(x: torch.Tensor, d) -> tuple[float, float]:
    """Mean and standard deviation of x over all ranks' elements."""
    x = x.detach().double().reshape(-1)
    sums = parallel.all_reduce(torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), dtype=x.dtype,
                                                                                 device=x.device)]), d)
    n = max(sums[2].item(), 1.0)
    mean = sums[0].item() / n
    var = max(sums[1].item() / n - mean * mean, 0.0) * n / max(n - 1, 1.0)
    return mean, var**0.5


def update(cfg, d, policy_lp, batch, opt, sched, train_gen, counters) -> dict:
    """num_epochs passes of minibatch AdamW steps on the algorithm's loss (REBEL by default); all
    samples of a prompt stay in one micro-batch (the REBEL loss couples a pair)."""
    groups = batch.groups
    per_mb = groups // cfg.rebel.minibatches
    losses, extra = [], {}
    params = [p for p in policy_lp.parameters() if p.requires_grad]
    for epoch in range(cfg.rebel.num_epochs):
        order = torch.arange(groups) if epoch == 0 else torch.randperm(groups, generator=train_gen)
        for mb in order.to(d.device).split(per_mb):
            opt.zero_grad(set_to_none=True)
            total, bad = 0.0, torch.zeros((), device=d.device)
            for micro in mb.split(cfg.rebel.micro_batch_pairs):
                logp, inputs = _micro_batch(cfg, policy_lp, batch, micro)
                loss, extra = cfg.algorithm.loss(logp, inputs)  # mean over the micro-batch's prompts
                # Weighted by the micro-batch's share of this rank's minibatch; FSDP2 then averages
                # gradients over ranks: the mean over all ranks' prompts.
                (loss * (len(micro) / len(mb))).backward()
                bad += (~torch.isfinite(loss)).float()
                total += loss.detach() * len(micro)
            bad = parallel.all_reduce(bad, d)
            if bad.item() > 0:  # never let a non-finite loss touch the weights
                log.warning("non-finite loss: minibatch skipped")
                counters["skipped_batches"] += 1
                opt.zero_grad(set_to_none=True)
                continue
            if cfg.optim.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(parallel.all_reduce(torch.as_tensor(total, device=d.device).float(), d).item()
                          / (len(mb) * d.world))
    out = {f"algorithm/{key}": value for key, value in extra.items() if isinstance(value, (int, float))}
    out.update({"loss/first": losses[0] if losses else math.nan, "loss/last": losses[-1] if losses else math.nan,
                "lr": sched.get_last_lr()[0]})
    return out


def _micro_batch(cfg, policy_lp, batch: rollout.Batch, micro: torch.Tensor) -> tuple[torch.Tensor, AlgoBatch]:
    """The policy's log-probabilities of some prompts' samples and the loss inputs of those rows.
    Samples the loss takes no gradient through (the anchor of REBEL from preferences) are not run
    through the policy: their rows of `logp` are zeros."""
    rows = batch.rows(micro)
    trained = len(micro) * cfg.algorithm.trained_samples
    logp = policy_lp(batch.input_ids[rows[:trained]], batch.attention_mask[rows[:trained]],
                     batch.labels[rows[:trained]], cfg.generation.temperature)
    if trained < len(rows):
        logp = torch.cat([logp, logp.new_zeros((len(rows) - trained, logp.shape[1]))])

    def take(x, index):
        return None if x is None else x[index]

    pair_rows = torch.cat([micro, micro + batch.groups])  # rows of the [2B] anchor preferences
    inputs = AlgoBatch(labels=batch.labels[rows], old_logprobs=take(batch.old_logprobs, rows),
                       ref_logprobs=take(batch.ref_logprobs, rows), scores=take(batch.scores, rows),
                       anchor_preferences=take(batch.anchor_preferences, pair_rows), kl_coef=cfg.rebel.kl_coef)
    return logp, inputs


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
class _Stop:
    """SIGTERM: finish the current iteration, write a checkpoint, exit."""

    requested = False

    @classmethod
    def install(cls):
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))


def train(cfg: config_mod.TrainConfig) -> dict:
    d = parallel.init_distributed()
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING, format="%(asctime)s %(message)s")
    if cfg.rebel.prompts_per_iteration % (d.world * cfg.rebel.minibatches):
        raise ValueError(f"rebel.prompts_per_iteration={cfg.rebel.prompts_per_iteration} must be divisible by "
                         f"world size x rebel.minibatches = {d.world * cfg.rebel.minibatches}")
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.run_dir, exist_ok=True)
    if d.is_main:
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            f.write(config_mod.to_json(cfg))
    _Stop.install()

    policy, reference, tokenizer = load_models(cfg, d.device)
    compute_dtype = getattr(torch, cfg.model.dtype)
    # generation runs on a plain, unsharded, unwrapped model; one unsharded float32 process shares the policy
    separate = d.sharded or compute_dtype != torch.float32 or cfg.model.activation_checkpointing
    inference = copy.deepcopy(policy).to(compute_dtype) if separate else policy
    parallel.train_only_top_layers(policy, cfg.model.train_top_layers)
    # one unsharded GPU process with a bf16 compute dtype: autocast (sharded runs: FSDP2 mixed precision)
    autocast = compute_dtype if (not d.sharded and d.device.type == "cuda" and compute_dtype != torch.float32) else None
    policy_lp = rollout.PolicyLogprobs(policy, autocast_dtype=autocast)
    parallel.shard(policy_lp, policy, d, compute_dtype=compute_dtype, checkpointing=cfg.model.activation_checkpointing)
    if reference is None:  # LoRA: log pi_ref through the policy's own weights, adapters off
        reference_lp = lora.AdapterDisabled(policy_lp, policy)
    else:
        if autocast:  # frozen: held in the compute dtype outright (half the memory)
            reference.to(autocast)
        reference_lp = rollout.PolicyLogprobs(reference)
        parallel.shard(reference_lp, reference, d, compute_dtype=compute_dtype, checkpointing=False)
    sampler = Sampler(inference, eos_ids=eos_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)

    prompt_set = data.prepare(data.load_rows(cfg.data), tokenizer, cfg.data)
    order = data.PromptOrder(len(prompt_set.prompts), cfg.seed)
    feedback = build_feedback(cfg, d.device)
    steps = cfg.rebel.num_epochs * cfg.rebel.minibatches
    opt, sched = make_optimizer(cfg, [p for p in policy_lp.parameters() if p.requires_grad], steps)
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + d.rank)
    train_gen = torch.Generator().manual_seed(cfg.seed)
    counters = {"skipped_batches": 0}

    ckpt = Checkpointer(cfg.run_dir, keep=cfg.checkpoint.keep)
    start = ckpt.latest()
    if start is not None:
        extra = ckpt.load(start, model=policy_lp, optimizer=opt, scheduler=sched)
        order.load_state_dict(extra["order"])
        counters.update(extra["counters"])
        set_rng_state(extra["rng"], gen, train_gen)
        log.info("resumed from iteration %d", start)
    else:  # a fresh run in a reused directory starts clean metrics
        for stale in ("metrics.jsonl",):
            if d.is_main and os.path.exists(os.path.join(cfg.run_dir, stale)):
                os.remove(os.path.join(cfg.run_dir, stale))
    first = 0 if start is None else start + 1
    metrics = MetricsLogger(cfg.run_dir, tensorboard=cfg.logging.tensorboard, plots=cfg.logging.plots,
                            is_main=d.is_main, resume_from=start)
    progress = Progress(cfg.optim.iterations, initial=first, enabled=cfg.logging.progress and d.is_main)
    timer = PhaseTimer(sync_cuda=d.device.type == "cuda")

    def save(iteration: int):
        extra = {"order": order.state_dict(), "counters": dict(counters), "rng": rng_state(gen, train_gen),
                 "iteration": iteration}
        ckpt.save(iteration, model=policy_lp, optimizer=opt, scheduler=sched, extra=extra)

    last = {}
    for it in range(first, cfg.optim.iterations):
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_iter = time.perf_counter()
        with timer("sync"):
            parallel.refresh_inference_copy(inference, policy_lp)
        progress.phase("generate")
        batch, stats = _iteration_batch(cfg, d, sampler, prompt_set, order, tokenizer, feedback, policy_lp,
                                        reference_lp, gen, timer)
        progress.phase("update")
        if feedback_is_finite(batch, d):
            with timer("update"):
                stats.update(update(cfg, d, policy_lp, batch, opt, sched, train_gen, counters))
        else:
            log.warning("non-finite reward at iteration %d: update skipped", it)
            counters["skipped_batches"] += 1
        stats.update(timer.pop())
        stats.update(counters)
        stats["time/iteration"] = time.perf_counter() - t_iter
        stats["memory/peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda"
                                    else _rss_gib())
        metrics.log(it, stats)
        progress.advance(stats)
        last = stats
        final = it == cfg.optim.iterations - 1
        if _Stop.requested or final or (cfg.checkpoint.every and (it + 1) % cfg.checkpoint.every == 0):
            save(it)
        if _Stop.requested:
            log.warning("SIGTERM: checkpoint written at iteration %d, exiting", it)
            break
    progress.close()
    if d.is_main and cfg.logging.plots:
        metrics.plot()
    metrics.close()
    if cfg.checkpoint.export_hf and not _Stop.requested:  # LoRA: the adapter only
        save = lora.adapter_saver(policy) if cfg.model.lora_rank else None
        export_hf(policy_lp, tokenizer, os.path.join(cfg.run_dir, "final"), save=save)
    if d.sharded:
        torch.distributed.destroy_process_group()
    return last


def _iteration_batch(cfg, d, sampler, prompt_set, order, tokenizer, feedback, policy_lp, reference_lp, gen, timer):
    """This rank's training batch and the iteration's rollout metrics. On-policy algorithms train on
    what they sample; offline ones train on dataset pairs and sample only to monitor the policy (when
    a reward is configured, e.g. the built-in task's)."""
    chosen = order.take(cfg.rebel.prompts_per_iteration)[d.rank :: d.world]
    batch, stats = None, {}
    if not cfg.algorithm.offline or feedback.reward is not None:
        batch, stats = collect(cfg, d, sampler, prompt_set, chosen, tokenizer, feedback, policy_lp, reference_lp,
                               gen, timer)
    if cfg.algorithm.offline:
        batch = collect_preference_pairs(cfg, d, prompt_set, chosen, tokenizer, sampler.eos_ids.tolist(),
                                         reference_lp, timer)
    return batch, stats


def _rss_gib() -> float:
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    train(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
