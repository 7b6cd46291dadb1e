"""REBEL training, end to end: parse, build, run.

    python engine/train.py                                  # the embedded default, one CPU process
    torchrun --nproc_per_node=2 engine/train.py             # the same on 2 processes (FSDP2 over gloo/NCCL)
    torchrun --nproc_per_node=8 engine/train.py --preset tldr_pythia_2b8 --optim.lr 3e-6

One iteration (engine/loop.py): refresh the generation copy -> generate k responses per prompt (k = 2
for REBEL) -> cut at EOS, apply the missing-EOS penalty, score -> no-grad log pi_t and log pi_ref ->
r = score - kl_coef * KL (engine/iteration/collect.py) -> num_epochs passes of minibatches of the
algorithm's loss (engine/iteration/update.py) -> metrics -> checkpoint. REBEL from preferences asks a
preference model instead of scoring; offline DPO trains on the dataset's chosen/rejected pairs (and
samples only to monitor the policy); with LoRA, log pi_ref is the policy with its adapters disabled.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # `python engine/train.py` / `torchrun engine/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import config as config_mod
from engine import loop
from engine import plan as planner
from engine.build import ConfigChanged, build
from engine.runtime import guard
from engine.runtime.checkpoint import CheckpointError, NonFiniteWeights


def parse_args(argv: list[str]) -> config_mod.TrainConfig:
    return _parse(argv)[0]


def _parse(argv: list[str]) -> tuple[config_mod.TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (--section.key value; defaults of --preset default):\n" + config_mod.help_text())
    parser.add_argument("--preset", default="default", choices=sorted(config_mod.PRESETS))
    parser.add_argument("--plan", action="store_true",
                        help="print the run's predicted memory per device and time per phase and exit, loading no "
                             "model (--plan.gpus N --plan.device h100|h200|a100|a6000|cpu: see plan.* below)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: $REBEL_THREADS, else $OMP_NUM_THREADS when set "
                             "outside torchrun, else the usable cores / processes on this machine)")
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2:
        parser.error(f"overrides come as --section.key value pairs, got {rest}")
    pairs = []
    for key, value in zip(rest[::2], rest[1::2]):
        if not key.startswith("--"):
            parser.error(f"expected --section.key, got {key!r}")
        pairs.append((key[2:], value))
    return config_mod.apply_overrides(config_mod.PRESETS[args.preset](), pairs), args


def threads_per_process(requested: int | None = None) -> tuple[int, str]:
    """(threads, where the number comes from): --threads, $REBEL_THREADS, $OMP_NUM_THREADS set by the user
    (torchrun sets it to 1 itself, so it is not read under torchrun), else usable cores / local processes."""
    if requested is not None:
        return max(1, requested), "--threads"
    if os.environ.get("REBEL_THREADS"):
        return max(1, int(os.environ["REBEL_THREADS"])), "$REBEL_THREADS"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if os.environ.get("OMP_NUM_THREADS") and "LOCAL_WORLD_SIZE" not in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "$OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local), f"{cores} cores / {local} local process(es)"


def train(cfg: config_mod.TrainConfig) -> dict:
    """Build the run and train it; the last iteration's metrics."""
    return loop.train(build(cfg)).last


def print_plan(cfg: config_mod.TrainConfig, preset: str) -> int:
    """`--plan`: the table (engine/plan/), exit status 0; a config that cannot be planned: the reason, 2."""
    try:
        print(planner.render(planner.plan_run(cfg), preset), flush=True)
    except ValueError as err:
        print(f"engine/train.py: plan error: {err}", file=sys.stderr)
        return 2
    return 0


def check_plan(cfg: config_mod.TrainConfig, main_process: bool) -> None:
    """A normal start: the one-line prediction for this launch's processes; a config predicted not to fit
    stops here (exit 2, on every rank), before any model is loaded, unless --plan.refuse false."""
    try:
        predicted = planner.plan_run(cfg, world=int(os.environ.get("WORLD_SIZE", "1")),
                                     gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError as err:
        if main_process:
            print(f"plan: not available ({err})", flush=True)
        return
    if main_process:
        print(planner.one_line(predicted), flush=True)
    if not predicted.fits and cfg.plan.refuse:
        if main_process:
            print(f"engine/train.py: {planner.refusal(predicted)}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The command line: a config error is one line and exit status 2; a run that trained nothing
    (every update skipped) exits 1; SIGTERM / SIGINT exit 128 + the signal after a checkpoint."""
    try:
        cfg, args = _parse(sys.argv[1:] if argv is None else argv)
        threads, source = threads_per_process(args.threads)
        if cfg.logging.wandb:
            from engine.runtime.tracking import require_wandb

            require_wandb()
    except ValueError as err:
        print(f"engine/train.py: config error: {err}", file=sys.stderr)
        sys.exit(2)
    import torch

    torch.set_num_threads(threads)
    if args.plan:
        sys.exit(print_plan(cfg, args.preset))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print(f"run directory: {os.path.abspath(cfg.run_dir)}\nthreads per process: {threads} ({source})",
              flush=True)
    check_plan(cfg, main_process)
    guard.watch_parent(hard_exit_s=cfg.checkpoint.stop_grace_s + 30)  # under torchrun: exit with the launcher
    try:
        run = build(cfg)
    except (ConfigChanged, guard.RunDirectoryBusy) as err:
        print(f"engine/train.py: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"engine/train.py: {err}", file=sys.stderr)
        sys.exit(1)
    try:
        status = loop.train(run)
    except NonFiniteWeights as err:
        print(f"engine/train.py: {err}", file=sys.stderr)
        sys.exit(1)
    if main_process:
        print(loop.summary(run, status), flush=True)
    if status.interrupted:
        print(f"engine/train.py: interrupted by signal {status.interrupted}; resume with the same command",
              file=sys.stderr)
        sys.exit(128 + status.interrupted)
    if status.failure:
        print(f"engine/train.py: {status.failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
