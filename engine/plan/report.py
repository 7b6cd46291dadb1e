"""What the user reads: the plan's table (`--plan`), its one line beside the run directory, and the
refusal of a config predicted not to fit, naming the parts and the keys that would make it fit."""
from __future__ import annotations

import dataclasses

from engine.config import TrainConfig

from .devices import GIB
from .run_plan import Plan, plan_run

PHASES = ("generate", "score", "logprobs", "update", "sync")


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _links(plan: Plan) -> str:
    if plan.world == 1:
        return "one process, no collectives"
    dev = plan.device
    where = (f"{plan.nodes} nodes x {plan.gpus_per_node}; network {plan.cfg.plan.network_gbs or dev.network_gbs:g} GB/s"
             f" per GPU" if plan.nodes > 1 else "one node")
    return (f"{where}; link {plan.cfg.plan.link_gbs or dev.link_gbs:g} GB/s per GPU; collectives at "
            f"{plan.links.bus_bytes_s / 1e9:.0f} GB/s ({dev.comm_efficiency:.0%} of the slowest link)")


def render(plan: Plan, name: str = "") -> str:
    """The table: memory per device by part and the two peaks, time per phase and what bounds it."""
    w, dev = plan.work, plan.device
    lines = [f"plan{f' of {name}' if name else ''}: {plan.world} x {dev.name} ({_links(plan)})",
             f"  model {plan.cfg.model.policy}: {plan.arch.params() / 1e9:.3g} B parameters; per process "
             f"{w.prompts} prompts x {w.samples} samples; assumed lengths: prompt {w.prompt_mean:g} tokens "
             f"(longest {w.prompt_max}), response {w.response:g} (plan.prompt_tokens / plan.response_tokens)",
             "", f"  {'memory per device (state sharded over ' + str(plan.world) + ')':<52} {'GiB':>8}"]
    for title, parts in (("", plan.persistent), ("generation: ", plan.generation), ("training: ", plan.training)):
        lines += [f"  {title + part:<52} {_gib(b):>8}" for part, b in parts.items() if b]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [f"  {'peak, generation':<52} {_gib(plan.peak('generation')):>8}",
              f"  {'peak, training':<52} {_gib(plan.peak('training')):>8}",
              f"  {'device memory':<52} {plan.memory_gib:>8.2f}  {verdict}",
              "", f"  {'time per iteration':<52} {'s':>8}  bound"]
    for phase in PHASES:
        p = plan.phases[phase]
        if p.seconds:
            lines.append(f"  {phase:<52} {p.seconds:>8.3g}  {p.bound}")
    name_, bound = plan.bottleneck
    share = plan.phases[name_].seconds / plan.iteration_s
    lines += [f"  {'iteration':<52} {plan.iteration_s:>8.3g}",
              f"  {'tokens/s per GPU (prompt + response of all samples)':<52} {plan.tokens_per_s_per_gpu:>8.4g}",
              f"  bottleneck: {name_} ({share:.0%} of the iteration), {bound}"]
    if not plan.fits:
        lines += ["", "  what would change the peak:", *_fixes(plan)]
    return "\n".join(lines)


def _fixes(plan: Plan) -> list[str]:
    return [f"    {key}: peak {_gib(peak)} GiB{' (fits)' if peak <= plan.memory_gib * GIB else ''}"
            for key, peak in remedies(plan)]


def one_line(plan: Plan) -> str:
    name, bound = plan.bottleneck
    return (f"plan: {plan.world} x {plan.device.name}: peak {_gib(plan.peak_bytes)} of {plan.memory_gib:.2f} GiB per "
            f"device ({'fits' if plan.fits else 'does not fit'}), {plan.iteration_s:.3g} s an iteration "
            f"({plan.tokens_per_s_per_gpu:.4g} tokens/s per GPU), bottleneck {name} ({bound}); "
            f"python engine/train.py --plan for the table")


def refusal(plan: Plan) -> str:
    """Why the config does not fit (the largest parts of the binding peak) and what would make it fit."""
    phase = "training" if plan.peak("training") >= plan.peak("generation") else "generation"
    parts = {**plan.persistent, **getattr(plan, phase)}
    largest = sorted(parts.items(), key=lambda kv: -kv[1])[:4]
    listed = ", ".join(f"{part} {_gib(b)} GiB" for part, b in largest)
    return (f"predicted peak {_gib(plan.peak_bytes)} GiB per device in {phase} exceeds the {plan.memory_gib:.2f} GiB "
            f"of a {plan.device.name}; largest parts: {listed}\nwhat would change it:\n" + "\n".join(_fixes(plan))
            + "\n(--plan.refuse false starts anyway)")


def remedies(plan: Plan) -> list[tuple[str, float]]:
    """(the override, the peak it predicts) for each key that lowers the peak."""
    cfg, out = plan.cfg, []
    for key, fixed in _candidates(cfg, plan.world):
        try:
            other = plan_run(fixed, dev=plan.device, world=plan.world if "gpus" not in key else None,
                             gpus_per_node=plan.gpus_per_node)
        except ValueError:
            continue
        if other.peak_bytes < plan.peak_bytes:
            out.append((key, other.peak_bytes))
    return out


def _candidates(cfg: TrainConfig, world: int):
    """(--key value, the config with it) worth trying."""
    rep = dataclasses.replace
    tokens = cfg.train.micro_batch_tokens
    for smaller in (tokens // 2, tokens // 4, tokens // 8):
        if smaller >= 256:
            yield f"--train.micro_batch_tokens {smaller}", rep(cfg, train=rep(cfg.train, micro_batch_tokens=smaller))
    if not cfg.model.activation_checkpointing:
        yield "--model.activation_checkpointing true", rep(cfg, model=rep(cfg.model, activation_checkpointing=True))
    if not (cfg.model.lora_rank or cfg.model.train_top_layers or cfg.model.reference):
        yield "--model.lora_rank 16", rep(cfg, model=rep(cfg.model, lora_rank=16, lora_alpha=32.0))
    for more in (2 * world, 4 * world):
        if cfg.train.prompts_per_iteration % (more * cfg.train.minibatches) == 0:
            yield f"{more} processes (--plan.gpus {more})", rep(cfg, plan=rep(cfg.plan, gpus=more))
    yield (f"--generation.kv_budget_bytes {cfg.generation.kv_budget_bytes // 4}",
           rep(cfg, generation=rep(cfg.generation, kv_budget_bytes=cfg.generation.kv_budget_bytes // 4)))
