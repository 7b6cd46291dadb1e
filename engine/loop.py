"""The loop, top to bottom: resume, then per iteration

    sync the generation copy -> collect (engine/collect.py: generate, score, log pi_t / log pi_ref,
    shaped reward) -> update (engine/update.py) -> log (engine/metrics.py) -> checkpoint

and at the end plots, the final Hugging Face export and the process group's teardown.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import time

import torch

from engine import config as config_mod
from engine import lora, parallel
from engine.build import Run
from engine.checkpoint import export_hf, rng_state, set_rng_state
from engine.collect import feedback_is_finite, iteration_batch
from engine.update import update

log = logging.getLogger("rebel")


class _Stop:
    """SIGTERM: finish the current iteration, write a checkpoint, exit."""

    requested = False

    @classmethod
    def install(cls):
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))


def run(r: Run) -> dict:
    """Train from the last checkpoint (or from scratch) to `optim.iterations`; returns the last
    iteration's metrics. When every update was skipped (non-finite rewards, preferences or losses) no
    weight changed: no export is written and `r.failure` says so (the command line exits 1)."""
    _Stop.install()
    first = resume(r)
    last = {}
    for it in range(first, r.cfg.optim.iterations):
        last = iteration(r, it)
        final = it == r.cfg.optim.iterations - 1
        every = r.cfg.checkpoint.every
        if _Stop.requested or final or (every and (it + 1) % every == 0):
            save(r, it)
        if _Stop.requested:
            log.warning("SIGTERM: checkpoint written at iteration %d, exiting", it)
            break
    untrained = first < r.cfg.optim.iterations and r.optimizer_steps == 0 and not _Stop.requested
    finish(r, export=not untrained)
    if untrained:
        r.failure = (f"every update was skipped ({r.counters['skipped_batches']} skipped: non-finite rewards, "
                     f"preferences or losses, see the warnings above); nothing was trained and no export was written")
        log.error(r.failure)
    return last


def iteration(r: Run, it: int) -> dict:
    """One iteration: sync, collect, update; its metrics are logged and returned."""
    d = r.dist
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_iter = time.perf_counter()
    with r.timer("sync"):
        parallel.refresh_inference_copy(r.inference, r.policy_lp)
    r.progress.phase("generate")
    batch, stats = iteration_batch(r)
    r.progress.phase("update")
    if feedback_is_finite(batch, d):
        with r.timer("update"):
            stats.update(update(r, batch))
    else:
        log.warning("non-finite reward at iteration %d: update skipped", it)
        r.counters["skipped_batches"] += 1
    stats.update(r.timer.pop())
    stats.update(r.counters)
    stats["time/iteration"] = time.perf_counter() - t_iter
    stats["memory/peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    r.metrics.log(it, stats)
    r.progress.advance(stats)
    return stats


def resume(r: Run) -> int:
    """Load the run's latest checkpoint if there is one; the first iteration to run."""
    if r.resume_from is None:
        return 0
    extra = r.checkpointer.load(r.resume_from, model=r.policy_lp, optimizer=r.optimizer, scheduler=r.scheduler)
    r.order.load_state_dict(extra["order"])
    r.counters.update(extra["counters"])
    r.optimizer_steps = extra.get("optimizer_steps")  # None: a checkpoint of an earlier release
    set_rng_state(extra["rng"], r.sample_generator, r.shuffle_generator)
    if any(key.startswith("optim.") for key, _, _ in r.config_changes):
        _reschedule(r)
    log.info("resumed from iteration %d", r.resume_from)
    return r.resume_from + 1


def _reschedule(r: Run) -> None:
    """An accepted change of optim.* on resume: the restored scheduler follows the new lr and length (its
    base lr was the checkpoint's; its step count is kept)."""
    sched = r.scheduler
    sched.base_lrs = [r.cfg.optim.lr] * len(r.optimizer.param_groups)
    for group, base, factor in zip(r.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)
        group["weight_decay"], group["eps"] = r.cfg.optim.weight_decay, r.cfg.optim.adam_eps


def save(r: Run, it: int) -> None:
    """A resumable checkpoint after iteration `it`: weights, optimizer, scheduler, data position, RNGs."""
    extra = {"order": r.order.state_dict(), "counters": dict(r.counters),
             "rng": rng_state(r.sample_generator, r.shuffle_generator), "iteration": it,
             "optimizer_steps": r.optimizer_steps}
    r.checkpointer.save(it, model=r.policy_lp, optimizer=r.optimizer, scheduler=r.scheduler, extra=extra,
                        config=config_mod.to_json(r.cfg))


def finish(r: Run, export: bool = True) -> None:
    """Plots, the final export (LoRA: the adapter only; not after SIGTERM, nor when `export` is False),
    the process group."""
    r.progress.close()
    if r.dist.is_main and r.cfg.logging.plots:
        r.metrics.plot()
    r.metrics.close()
    if export and r.cfg.checkpoint.export_hf and not _Stop.requested:
        saver = lora.adapter_saver(r.policy) if r.cfg.model.lora_rank else None
        export_hf(r.policy_lp, r.tokenizer, os.path.join(r.cfg.run_dir, "final"), save=saver)
    if r.dist.sharded:
        torch.distributed.destroy_process_group()
