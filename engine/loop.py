"""The loop, top to bottom: resume, then per iteration

    sync the generation copy -> collect (engine/iteration/collect.py: generate, score, log pi_t /
    log pi_ref, the algorithm's shaped reward) -> update (engine/iteration/update.py) -> evaluate when
    due (engine/evaluation/: every eval.every iterations and after the last; the starting policy before
    the first) -> log (engine/runtime/metrics.py) -> checkpoint

and at the end plots, the final Hugging Face export and the process group's teardown.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import resource
import signal
import time

import torch

from engine import config as config_mod
from engine.evaluation.evaluator import Models
from engine.iteration.collect import iteration_batch, rollout_stats
from engine.iteration.run import Run
from engine.iteration.update import update
from engine.model import lora
from engine.runtime import parallel
from engine.runtime.checkpoint import export_hf, rng_state, set_rng_state
from engine.runtime.metrics import read_metrics

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


@dataclasses.dataclass
class Status:
    """What the loop changes while it runs (the parts it runs on are the `Run`, built once)."""

    counters: dict = dataclasses.field(default_factory=lambda: {"skipped_batches": 0})  # checkpointed
    # optimizer steps taken since the run began (checkpointed; not a metric): 0 at the end means nothing
    # was trained and the run fails. None: restored from a checkpoint that predates it.
    optimizer_steps: int | None = 0
    seconds: dict = dataclasses.field(default_factory=dict)  # the last iteration's and save's durations
    last: dict = dataclasses.field(default_factory=dict)  # the last iteration's metrics
    already_finished: bool = False  # the run directory held a finished run: nothing was trained
    interrupted: int | None = None  # the signal that stopped the run (SIGTERM / SIGINT)
    failure: str | None = None  # why the run ended without its purpose (the command line exits 1)


def train(run: Run) -> Status:
    """Train from the last checkpoint (or from scratch) to `optim.iterations`. When every update was
    skipped (non-finite rewards, preferences or losses) no weight changed: no export is written and
    `status.failure` says so (the command line exits 1). After SIGTERM / SIGINT, `status.interrupted`
    holds the signal number (the command line exits 128 + it)."""
    status = Status()
    _Stop.install()
    first = resume(run, status)
    status.already_finished = first >= run.cfg.optim.iterations
    if status.already_finished:
        log.info("%s already finished (iteration %d of %d): nothing to do", run.cfg.run_dir, first,
                 run.cfg.optim.iterations)
    if run.evaluator is not None and first == 0 and run.cfg.eval.before_training and not _Stop.requested(run.dist):
        run.progress.phase("eval")
        run.evaluator(Models.of(run), 0)  # the starting policy's row
    saved = _iterations(run, status, first)
    interrupted = _Stop.requested(run.dist)
    _Stop.uninstall()
    if interrupted:
        status.interrupted = int(_Stop.signum or signal.SIGTERM)
        log.warning("interrupted by signal %d: checkpoint of iteration %s on disk, exiting without the final export",
                    status.interrupted, saved)
    untrained = first < run.cfg.optim.iterations and status.optimizer_steps == 0 and not interrupted
    exported = os.path.isdir(os.path.join(run.cfg.run_dir, "final"))
    finish(run, export=not (untrained or interrupted or (status.already_finished and exported)))
    if untrained:
        status.failure = (f"every update was skipped ({status.counters['skipped_batches']} skipped: non-finite "
                          f"rewards, preferences or losses, see the warnings above); nothing was trained and no "
                          f"export was written")
        log.error(status.failure)
    return status


def _iterations(run: Run, status: Status, first: int) -> int | None:
    """Iterations `first`.. with their checkpoints, until the last one or a signal; the last saved one."""
    saved = run.resume_from
    for it in range(first, run.cfg.optim.iterations):
        if it == first and _Stop.requested(run.dist):  # signalled while building or resuming
            break
        start = _resume_point(run, status)
        try:
            status.last = iteration(run, status, it)
        except _Abandon:
            run.timer.pop()
            log.warning("signal %s: iteration %d abandoned (it would not finish within checkpoint.stop_grace_s=%s)",
                        _Stop.signum, it, run.cfg.checkpoint.stop_grace_s)
            if it > 0 and saved != it - 1:
                save(run, status, it - 1, extra=start)
                saved = it - 1
            break
        final = it == run.cfg.optim.iterations - 1
        every = run.cfg.checkpoint.every
        stop = _Stop.requested(run.dist)
        if stop or final or (every and (it + 1) % every == 0):
            t_save = time.perf_counter()
            save(run, status, it)
            saved, status.seconds["save"] = it, time.perf_counter() - t_save
        if stop:
            break
    return saved


def summary(run: Run, status: Status) -> str:
    """What the run did, for the end of the command line's output (main process)."""
    try:
        rows = read_metrics(run.cfg.run_dir)
    except (FileNotFoundError, ValueError):
        rows = []
    total = run.cfg.optim.iterations
    if status.already_finished:
        head = f"run already finished: {total} of {total} iterations"
    elif status.interrupted:
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
    final = os.path.join(run.cfg.run_dir, "final")
    lines.append(f"  export: {os.path.abspath(final)}" if os.path.isdir(final) and not status.interrupted
                 else "  export: none")
    lines.append(f"  checkpoints: {os.path.abspath(run.checkpointer.root)}")
    return "\n".join(lines)


def _resume_point(run: Run, status: Status) -> dict:
    """What a checkpoint of the previous iteration holds besides the weights: taken before an iteration
    draws from the prompt order or any RNG, so that an abandoned iteration leaves no trace."""
    return {"order": run.order.state_dict(), "counters": dict(status.counters),
            "rng": rng_state(run.sample_generator, run.shuffle_generator), "optimizer_steps": status.optimizer_steps}


def _check_stop(run: Run, status: Status, t_iter: float) -> None:
    """Before the update: abandon the iteration if a signal came and it would not finish in the grace."""
    if not _Stop.requested(run.dist):
        return
    grace = run.cfg.checkpoint.stop_grace_s
    since = time.monotonic() - _Stop.at if _Stop.signum is not None else 0.0
    previous = status.seconds.get("iteration")
    left = None if previous is None else previous - (time.perf_counter() - t_iter) + status.seconds.get("save", 0.0)
    abandon = float(left is None or since + left > grace)
    if run.dist.sharded:  # every rank decides alike
        abandon = parallel.all_reduce(torch.tensor(abandon, device=run.dist.device), run.dist,
                                      op=torch.distributed.ReduceOp.MAX).item()
    if abandon:
        raise _Abandon


def iteration(run: Run, status: Status, it: int) -> dict:
    """One iteration: sync, collect, update; its metrics are logged and returned."""
    d = run.dist
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_iter = time.perf_counter()
    with run.timer("sync"):
        parallel.refresh_inference_copy(run.inference, run.policy_lp)
    run.progress.phase("generate")
    collected = iteration_batch(run)
    run.progress.phase("update")
    _check_stop(run, status, t_iter)
    batch, stats = collected.batch, {}
    bad = run.cfg.algorithm.non_finite(batch, functools.partial(parallel.all_reduce, d=d))
    if not bad:
        with run.timer("update"):
            updated = update(run, batch)
        stats, batch = updated.metrics, updated.batch  # completed with log pi_t when it was folded
        _count(status, steps=updated.steps, skipped=updated.skipped)
    else:
        log.warning("non-finite %s at iteration %d: update skipped", " -> ".join(bad), it)
        _count(status, steps=0, skipped=1)
    if collected.generate_s is not None:
        stats |= rollout_stats(collected.monitor or batch, collected.generate_s, d, run.cfg.reward.kl_coef)
    if run.evaluator is not None and run.evaluator.due(it + 1):
        run.progress.phase("eval")
        with run.timer("eval"):  # before this iteration's checkpoint: see engine/evaluation/records.py
            run.evaluator(Models.of(run), it + 1)
    stats.update(run.timer.pop())
    stats.update(status.counters)
    stats["time/iteration"] = status.seconds["iteration"] = time.perf_counter() - t_iter
    stats["memory/peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    run.metrics.log(it, stats)
    run.progress.advance(stats)
    return stats


def _count(status: Status, *, steps: int, skipped: int) -> None:
    status.counters["skipped_batches"] += skipped
    if status.optimizer_steps is not None:
        status.optimizer_steps += steps


def resume(run: Run, status: Status) -> int:
    """Load the run's latest checkpoint if there is one; the first iteration to run."""
    if run.resume_from is None:
        return 0
    extra = run.checkpointer.load(run.resume_from, model=run.policy_lp, optimizer=run.optimizer,
                                  scheduler=run.scheduler)
    run.order.load_state_dict(extra["order"])
    status.counters.update(extra["counters"])
    status.optimizer_steps = extra.get("optimizer_steps")  # None: a checkpoint of an earlier release
    set_rng_state(extra["rng"], run.sample_generator, run.shuffle_generator)
    if any(key.startswith("optim.") for key, _, _ in run.config_changes):
        _reschedule(run)
    log.info("resumed from iteration %d", run.resume_from)
    return run.resume_from + 1


def _reschedule(run: Run) -> None:
    """An accepted change of optim.* on resume: the restored scheduler follows the new lr and length (its
    base lr was the checkpoint's; its step count is kept)."""
    sched = run.scheduler
    sched.base_lrs = [run.cfg.optim.lr] * len(run.optimizer.param_groups)
    for group, base, factor in zip(run.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)
        group["weight_decay"], group["eps"] = run.cfg.optim.weight_decay, run.cfg.optim.adam_eps


def save(run: Run, status: Status, it: int, extra: dict | None = None) -> None:
    """A resumable checkpoint after iteration `it`: weights, optimizer, scheduler, data position, RNGs
    (`extra`: those of an earlier moment, see _resume_point; default: now)."""
    extra = {**(extra or _resume_point(run, status)), "iteration": it}
    run.checkpointer.save(it, model=run.policy_lp, optimizer=run.optimizer, scheduler=run.scheduler, extra=extra,
                          config=config_mod.to_json(run.cfg))


def finish(run: Run, export: bool = True) -> None:
    """Plots, the final export (LoRA: the adapter only; not after SIGTERM, nor when `export` is False),
    the process group."""
    run.progress.close()
    if run.dist.is_main and run.cfg.logging.plots:
        run.metrics.plot()
    if run.evaluator is not None:
        run.evaluator.close(plot=run.cfg.logging.plots)
    run.metrics.close()
    if export and run.cfg.checkpoint.export_hf:
        saver = lora.adapter_saver(run.policy) if run.cfg.model.lora_rank else None
        export_hf(run.policy_lp, run.tokenizer, os.path.join(run.cfg.run_dir, "final"), save=saver)
    if run.dist.sharded:
        torch.distributed.destroy_process_group()
    if run.lock is not None:
        run.lock.release()
