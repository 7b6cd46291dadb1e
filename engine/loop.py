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
from engine.collect import iteration_batch, non_finite_quantities, rollout_stats
from engine.update import update

log = logging.getLogger("rebel")


class _Stop:
    """SIGTERM / SIGINT: a checkpoint on disk within checkpoint.stop_grace_s, then exit 128 + signal.

    The current iteration is finished when it and its checkpoint are expected to fit in the grace (from
    the previous iteration's times); otherwise it is abandoned before its first optimizer step (the
    weights are untouched up to there) and the last completed iteration is checkpointed. Once the update
    has begun the iteration is finished. A second signal kills the process at once (the checkpoint on
    disk is always complete: atomic rename)."""

    signum: int | None = None
    at = 0.0
    previous: dict = {}

    @classmethod
    def install(cls):
        cls.signum, cls.at = None, 0.0
        for sig in (signal.SIGTERM, signal.SIGINT):
            cls.previous[sig] = signal.signal(sig, cls._handle)

    @classmethod
    def uninstall(cls):
        for sig, handler in cls.previous.items():
            signal.signal(sig, handler)
        cls.previous = {}

    @classmethod
    def _handle(cls, signum, frame):
        cls.signum, cls.at = signum, time.monotonic()
        signal.signal(signum, signal.SIG_DFL)  # a second one is not caught

    @classmethod
    def requested(cls, d: parallel.Dist) -> bool:
        """Whether any rank was signalled (a collective under torchrun: every rank decides alike)."""
        if not d.sharded:
            return cls.signum is not None
        flag = torch.tensor(float(cls.signum is not None), device=d.device)
        return parallel.all_reduce(flag, d, op=torch.distributed.ReduceOp.MAX).item() > 0


class _Abandon(Exception):
    """Raised before the update when the interrupted iteration cannot finish within the grace."""


def run(r: Run) -> dict:
    """Train from the last checkpoint (or from scratch) to `optim.iterations`; returns the last
    iteration's metrics. When every update was skipped (non-finite rewards, preferences or losses) no
    weight changed: no export is written and `r.failure` says so (the command line exits 1). After
    SIGTERM / SIGINT, `r.interrupted` holds the signal number (the command line exits 128 + it)."""
    _Stop.install()
    first = resume(r)
    last, saved = {}, r.resume_from
    r.already_finished = first >= r.cfg.optim.iterations
    if r.already_finished:
        log.info("%s already finished (iteration %d of %d): nothing to do", r.cfg.run_dir, first,
                 r.cfg.optim.iterations)
    for it in range(first, r.cfg.optim.iterations):
        if it == first and _Stop.requested(r.dist):  # signalled while building or resuming
            break
        start = _resume_point(r)
        try:
            last = iteration(r, it)
        except _Abandon:
            r.timer.pop()
            log.warning("signal %s: iteration %d abandoned (it would not finish within checkpoint.stop_grace_s=%s)",
                        _Stop.signum, it, r.cfg.checkpoint.stop_grace_s)
            if it > 0 and saved != it - 1:
                save(r, it - 1, extra=start)
                saved = it - 1
            break
        final = it == r.cfg.optim.iterations - 1
        every = r.cfg.checkpoint.every
        stop = _Stop.requested(r.dist)
        if stop or final or (every and (it + 1) % every == 0):
            t_save = time.perf_counter()
            save(r, it)
            saved, r.seconds["save"] = it, time.perf_counter() - t_save
        if stop:
            break
    interrupted = _Stop.requested(r.dist)
    _Stop.uninstall()
    if interrupted:
        r.interrupted = int(_Stop.signum or signal.SIGTERM)
        log.warning("interrupted by signal %d: checkpoint of iteration %s on disk, exiting without the final export",
                    r.interrupted, saved)
    untrained = first < r.cfg.optim.iterations and r.optimizer_steps == 0 and not interrupted
    exported = os.path.isdir(os.path.join(r.cfg.run_dir, "final"))
    finish(r, export=not (untrained or interrupted or (r.already_finished and exported)))
    if untrained:
        r.failure = (f"every update was skipped ({r.counters['skipped_batches']} skipped: non-finite rewards, "
                     f"preferences or losses, see the warnings above); nothing was trained and no export was written")
        log.error(r.failure)
    return last


def summary(r: Run) -> str:
    """What the run did, for the end of the command line's output (main process)."""
    from engine.metrics import read_metrics

    try:
        rows = read_metrics(r.cfg.run_dir)
    except (FileNotFoundError, ValueError):
        rows = []
    total = r.cfg.optim.iterations
    if r.already_finished:
        head = f"run already finished: {total} of {total} iterations"
    elif r.interrupted:
        head = f"run interrupted after {len(rows)} of {total} iterations (resume with the same command)"
    else:
        head = f"run finished: {len(rows)} of {total} iterations"
    lines = [head]

    def span(key):
        values = [row.get(key) for row in rows if row.get(key) is not None]
        return f"{values[0]:.4g} -> {values[-1]:.4g}" if values else None

    for key, label in (("reward/mean", "reward"), ("score/mean", "score"), ("kl/mean", "KL")):
        if span(key):
            lines.append(f"  {label}: {span(key)} (first -> last iteration)")
    if rows and rows[-1].get("skipped_batches"):
        lines.append(f"  skipped updates: {rows[-1]['skipped_batches']}")
    final = os.path.join(r.cfg.run_dir, "final")
    lines.append(f"  export: {os.path.abspath(final)}" if os.path.isdir(final) and not r.interrupted
                 else "  export: none")
    lines.append(f"  checkpoints: {os.path.abspath(r.checkpointer.root)}")
    return "\n".join(lines)


def _resume_point(r: Run) -> dict:
    """What a checkpoint of the previous iteration holds besides the weights: taken before an iteration
    draws from the prompt order or any RNG, so that an abandoned iteration leaves no trace."""
    return {"order": r.order.state_dict(), "counters": dict(r.counters),
            "rng": rng_state(r.sample_generator, r.shuffle_generator), "optimizer_steps": r.optimizer_steps}


def _check_stop(r: Run, t_iter: float) -> None:
    """Before the update: abandon the iteration if a signal came and it would not finish in the grace."""
    if not _Stop.requested(r.dist):
        return
    grace = r.cfg.checkpoint.stop_grace_s
    since = time.monotonic() - _Stop.at if _Stop.signum is not None else 0.0
    previous = r.seconds.get("iteration")
    left = None if previous is None else previous - (time.perf_counter() - t_iter) + r.seconds.get("save", 0.0)
    abandon = float(left is None or since + left > grace)
    if r.dist.sharded:  # every rank decides alike
        abandon = parallel.all_reduce(torch.tensor(abandon, device=r.dist.device), r.dist,
                                      op=torch.distributed.ReduceOp.MAX).item()
    if abandon:
        raise _Abandon


def iteration(r: Run, it: int) -> dict:
    """One iteration: sync, collect, update; its metrics are logged and returned."""
    d = r.dist
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_iter = time.perf_counter()
    with r.timer("sync"):
        parallel.refresh_inference_copy(r.inference, r.policy_lp)
    r.progress.phase("generate")
    collected = iteration_batch(r)
    r.progress.phase("update")
    _check_stop(r, t_iter)
    batch, stats = collected.batch, {}
    bad = non_finite_quantities(batch, d)
    if not bad:
        with r.timer("update"):
            stats, batch = update(r, batch)  # completed with log pi_t when it was folded into the update
    else:
        log.warning("non-finite %s at iteration %d: update skipped", " -> ".join(bad), it)
        r.counters["skipped_batches"] += 1
    if collected.generate_s is not None:
        stats |= rollout_stats(collected.monitor or batch, collected.generate_s, d, r.cfg.reward.kl_coef)
    stats.update(r.timer.pop())
    stats.update(r.counters)
    stats["time/iteration"] = r.seconds["iteration"] = time.perf_counter() - t_iter
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


def save(r: Run, it: int, extra: dict | None = None) -> None:
    """A resumable checkpoint after iteration `it`: weights, optimizer, scheduler, data position, RNGs
    (`extra`: those of an earlier moment, see _resume_point; default: now)."""
    extra = {**(extra or _resume_point(r)), "iteration": it}
    r.checkpointer.save(it, model=r.policy_lp, optimizer=r.optimizer, scheduler=r.scheduler, extra=extra,
                        config=config_mod.to_json(r.cfg))


def finish(r: Run, export: bool = True) -> None:
    """Plots, the final export (LoRA: the adapter only; not after SIGTERM, nor when `export` is False),
    the process group."""
    r.progress.close()
    if r.dist.is_main and r.cfg.logging.plots:
        r.metrics.plot()
    r.metrics.close()
    if export and r.cfg.checkpoint.export_hf:
        saver = lora.adapter_saver(r.policy) if r.cfg.model.lora_rank else None
        export_hf(r.policy_lp, r.tokenizer, os.path.join(r.cfg.run_dir, "final"), save=saver)
    if r.dist.sharded:
        torch.distributed.destroy_process_group()
    if r.lock is not None:
        r.lock.release()
