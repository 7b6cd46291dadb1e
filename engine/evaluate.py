"""Evaluate any weights on a run's held-out prompts, with the run's config (engine/evaluation/).

    python engine/evaluate.py --run_dir runs/default                         # the final export
    python engine/evaluate.py --run_dir runs/default --checkpoint step_00000049
    python engine/evaluate.py --run_dir runs/default --model builtin:tiny-llama   # the starting point
    python engine/evaluate.py --preset tldr_pythia_1b4 --model vwxyzjn/...sft__tldr  # no run needed
    torchrun --nproc_per_node=2 engine/evaluate.py --run_dir runs/default    # the same rows, sharded

The config is the run's config.json (else --preset's), with --section.key value overrides (e.g.
--eval.max_prompts 500). KL is to the run's reference policy (model.reference, else its starting
model.policy). Each evaluation writes its eval.jsonl row and samples table under
RUN_DIR/evaluate/NAME/, appends {"model", **row} to RUN_DIR/evaluate/summary.jsonl, and prints every
row of that file as a table: two commands compare a trained run with its starting point.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

if __package__ in (None, ""):  # `python engine/evaluate.py` / `torchrun engine/evaluate.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import config as config_mod

SUMMARY = "summary.jsonl"
COLUMNS = ("model", "iteration", "score", "reference_score", "win_rate", "preference_win_rate", "judge_win_rate",
           "kl", "response_length", "eos_rate", "prompts")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """Which weights: `kind` final | checkpoint | model, the name of its output folder, the count of
    training iterations behind it (the row's "iteration"), and the checkpoint step or model path."""

    kind: str
    name: str
    completed: int
    step: int | None = None
    path: str | None = None


def parse(argv: list[str]) -> tuple[config_mod.TrainConfig, Target, str]:
    """(config, the weights to evaluate, the output root) from the command line; ValueError on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default=None, help="a run directory: its config.json and weights")
    p.add_argument("--preset", default=None, choices=sorted(config_mod.PRESETS),
                   help="the config when there is no run directory (default: default)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", default=None, help="step_N (or N): a checkpoint of the run")
    which.add_argument("--model", default=None, help="a Hugging Face model directory / hub id, or builtin:NAME")
    p.add_argument("--out", default=None, help="output root (default: RUN_DIR/evaluate)")
    args, rest = p.parse_known_args(argv)
    if len(rest) % 2 or any(not key.startswith("--") for key in rest[::2]):
        raise ValueError(f"overrides come as --section.key value pairs, got {rest}")
    cfg = _config(args)
    cfg = config_mod.apply_overrides(cfg, [(k[2:], v) for k, v in zip(rest[::2], rest[1::2])])
    if cfg.eval.prompts is None:
        raise ValueError("eval.prompts is not set: pass --eval.prompts (and --eval.reference_column) or a preset "
                         "that sets them")
    target = _target(args, cfg)
    out = args.out or os.path.join(args.run_dir or cfg.run_dir, "evaluate")
    return cfg, target, out


def _config(args) -> config_mod.TrainConfig:
    if args.run_dir is None:
        if args.checkpoint:
            raise ValueError("--checkpoint needs --run_dir")
        return config_mod.PRESETS[args.preset or "default"]()
    saved = os.path.join(args.run_dir, "config.json")
    if args.preset is not None or not os.path.exists(saved):
        if args.preset is None:
            raise ValueError(f"--run_dir {args.run_dir!r} has no config.json (not a run directory?); pass --preset")
        return dataclasses.replace(config_mod.PRESETS[args.preset](), run_dir=args.run_dir)
    with open(saved, encoding="utf-8") as f:
        return dataclasses.replace(config_mod.from_json(f.read()), run_dir=args.run_dir)


def _target(args, cfg: config_mod.TrainConfig) -> Target:
    if args.model:
        shown = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", shown).strip("_") or "model"  # hub ids: org_name
        return Target(kind="model", name=name, completed=0, path=args.model)
    if args.checkpoint:
        match = re.fullmatch(r"(?:step_)?(\d+)", args.checkpoint)
        if not match:
            raise ValueError(f"--checkpoint must be step_N or N, got {args.checkpoint!r}")
        step = int(match.group(1))
        return Target(kind="checkpoint", name=f"step_{step:08d}", completed=step + 1, step=step)
    final = os.path.join(cfg.run_dir, "final")
    if args.run_dir is None or not os.path.isdir(final):
        raise ValueError(f"no final export at {final}: pass --run_dir of a finished run, --checkpoint or --model")
    return Target(kind="final", name="final", completed=cfg.optim.iterations, path=final)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, target, out = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"engine/evaluate.py: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        row = evaluate(cfg, target, os.path.join(out, target.name))
    except ValueError as err:
        print(f"engine/evaluate.py: {err}", file=sys.stderr)
        sys.exit(2)
    if row:  # the main process
        rows = append_summary(out, {"model": target.path or target.name, "iteration": target.completed, **row})
        print(table(rows), flush=True)


def evaluate(cfg: config_mod.TrainConfig, target: Target, out_dir: str) -> dict:
    """Load the target's weights as training would run them (FSDP2 under torchrun), evaluate once; the
    row on the main process ({} on the others)."""
    import torch

    from engine.build import wrap_models
    from engine.data.rewards import build_feedback
    from engine.evaluation.evaluator import Evaluator, Models
    from engine.model.generate import Sampler, eos_token_ids
    from engine.runtime import parallel, precision
    from engine.runtime.checkpoint import Checkpointer

    d = parallel.init_distributed()
    torch.manual_seed(cfg.seed)
    model_cfg, (policy, reference, tokenizer) = _load(cfg, target, d.device)
    prec = precision.decide(cfg.model.dtype, d, activation_checkpointing=False)
    inference, policy_lp, reference_lp = wrap_models(model_cfg, d, prec, policy, reference)
    if target.kind == "checkpoint":
        Checkpointer(cfg.run_dir, keep=cfg.checkpoint.keep).load(target.step, model=policy_lp, optimizer=None,
                                                                  scheduler=None)
    sampler = Sampler(inference, eos_ids=eos_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id)
    feedback = build_feedback(cfg, d.device)
    evaluator = Evaluator.build(cfg, tokenizer, d, feedback, run_dir=out_dir)
    models = Models(dist=d, tokenizer=tokenizer, sampler=sampler, inference=inference, policy_lp=policy_lp,
                    reference_lp=reference_lp, feedback=feedback)
    row = evaluator(models, target.completed)
    evaluator.close(plot=False)
    if d.sharded:  # every rank leaves together: none tears its process group down under another's feet
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return row


def _load(cfg: config_mod.TrainConfig, target: Target, device):
    """(the config the models are wrapped with, (policy, reference, tokenizer)). A checkpoint: the run's
    own models (its weights are loaded after wrapping); a model or final export: that model, with the
    run's reference policy (model.reference, else its starting model.policy); a LoRA run's final export
    (an adapter): the starting model with the adapter loaded, the reference being the adapter off."""
    from engine.build import load_models
    from engine.model import lora

    if target.kind == "checkpoint":
        return cfg, load_models(cfg, device)
    if os.path.exists(os.path.join(target.path, "adapter_config.json")):
        if not cfg.model.lora_rank:
            raise ValueError(f"{target.path} holds a LoRA adapter but model.lora_rank is 0 in the config")
        policy, reference, tokenizer = load_models(cfg, device)
        lora.load_adapter(policy, target.path)
        return cfg, (policy, reference, tokenizer)
    model = dataclasses.replace(cfg.model, policy=target.path, reference=cfg.model.reference or cfg.model.policy,
                                lora_rank=0)
    cfg = dataclasses.replace(cfg, model=model)
    return cfg, load_models(cfg, device)


def append_summary(out: str, row: dict) -> list[dict]:
    """Append the row to OUT/summary.jsonl; every row of it."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, SUMMARY)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table of COLUMNS (those any row has)."""
    cols = [c for c in COLUMNS if any(c in row for row in rows)]

    def cell(value) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
