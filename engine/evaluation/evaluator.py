"""`Evaluator`: one evaluation of the current policy on the held-out prompts.

    refresh the generation copy -> per fixed batch of prompts (heldout.batches; this rank's share):
    sample one response at eval.temperature (the sampler and its caches, noise seeded by eval.seed and the
    batch number) -> log pi and log pi_ref of it (the fused op, no grad) -> score it and the reference
    (reward, missing-EOS penalty), preference model and judge in both orders -> gather the records on the
    main process -> summarize -> eval.jsonl, the samples table, TensorBoard

Every rank runs as many batches, and every batch as many log-prob forwards (FSDP2's collectives pair
up): a rank with fewer batches repeats its last one and drops the result. The batches and their noise do
not depend on the number of processes, so 1 and N processes write the same rows for the same weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch
from torch import nn

from engine.config import TrainConfig
from engine.data import rewards
from engine.data.prompts import left_pad
from engine.data.rewards import Feedback
from engine.iteration.batch import IGNORE, Responses, from_rollout, sequence_logprobs
from engine.model.generate import Sampler
from engine.runtime import parallel

from . import heldout as heldout_mod
from .heldout import HeldOut
from .records import EvalLog
from .scoring import LEFT_OUT, Record, both_orders, summarize

log = logging.getLogger("rebel")


@dataclasses.dataclass(frozen=True)
class Models:
    """What an evaluation runs on: a training run has all of it (`of(run)`); engine/evaluate.py builds
    only this. `reference_lp` gives log pi_ref (LoRA: the policy with its adapters off)."""

    dist: parallel.Dist
    tokenizer: object
    sampler: Sampler
    inference: nn.Module
    policy_lp: nn.Module
    reference_lp: nn.Module
    feedback: Feedback

    @classmethod
    def of(cls, run) -> Models:
        return cls(dist=run.dist, tokenizer=run.tokenizer, sampler=run.sampler, inference=run.inference,
                   policy_lp=run.policy_lp, reference_lp=run.reference_lp, feedback=run.feedback)


class Evaluator:
    """Evaluations of one run's config; `build` returns None when eval.prompts is unset."""

    def __init__(self, cfg: TrainConfig, held_out: HeldOut, records: EvalLog, judge=None):
        self.cfg, self.held_out, self.records, self.judge = cfg, held_out, records, judge
        ev, gen = cfg.eval, cfg.generation
        new_tokens = ev.max_new_tokens or gen.max_new_tokens
        self.sampling = dataclasses.replace(gen, temperature=ev.temperature, samples_per_prompt=1,
                                            max_new_tokens=new_tokens, min_new_tokens=min(gen.min_new_tokens,
                                                                                          new_tokens))
        self.batches = heldout_mod.batches(len(held_out), ev.batch_size)

    @classmethod
    def build(cls, cfg: TrainConfig, tokenizer, dist: parallel.Dist, feedback: Feedback, *, run_dir: str | None = None,
              keep_through: int | None = None, tracker=None) -> Evaluator | None:
        """The evaluator of a run (None without eval.prompts): the held-out set is read and checked and the
        judge imported here, before anything trains. `keep_through`, `tracker`: see records.EvalLog."""
        ev = cfg.eval
        if ev.prompts is None:
            return None
        judge = rewards.import_function(ev.judge, {}, "eval.judge") if ev.judge else None
        if feedback.reward is None and judge is None:
            raise ValueError(f"eval.prompts={ev.prompts!r} but nothing scores the responses: set reward.model or "
                             f"reward.function (the run's reward), or eval.judge")
        held_out = heldout_mod.load(cfg, tokenizer)
        records = EvalLog(run_dir or cfg.run_dir, is_main=dist.is_main, keep_through=keep_through,
                          tensorboard=cfg.logging.tensorboard, logged_samples=ev.logged_samples, tracker=tracker)
        return cls(cfg, held_out, records, judge)

    def due(self, completed: int) -> bool:
        """Whether an evaluation follows the iteration that brings the count of completed ones to `completed`."""
        every = self.cfg.eval.every
        return completed == self.cfg.optim.iterations or bool(every and completed % every == 0)

    @torch.no_grad()
    def __call__(self, models: Models, completed: int) -> dict:
        """Evaluate the current weights (a collective); the row (the main process's; {} on the others)."""
        t0 = time.perf_counter()
        d = models.dist
        parallel.refresh_inference_copy(models.inference, models.policy_lp)
        mine = heldout_mod.shard(self.batches, d.rank, d.world)
        rounds = math.ceil(len(self.batches) / d.world)
        records: list[Record] = []
        for n in range(rounds):
            number = mine[min(n, len(mine) - 1)] if mine else 0  # past its share: repeat, drop the result
            batch_records = self._batch(models, number)
            if n < len(mine):
                records += batch_records
        records = _gather(records, d)
        if not d.is_main:
            return {}
        records.sort(key=lambda r: r.index)
        row = summarize(records) | {"seconds": time.perf_counter() - t0}
        self.records.write(completed, row, records)
        log.info("eval after %d iteration(s): %s", completed,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "prompts"))
        return row

    def _batch(self, models: Models, number: int) -> list[Record]:
        """Sample, score and take the KL of one batch of held-out prompts."""
        d, tok, indices = models.dist, models.tokenizer, self.batches[number]
        prompts = [self.held_out.prompts[i] for i in indices]
        ids, mask = left_pad([self.held_out.prompt_ids[i] for i in indices], tok.pad_token_id, d.device)
        noise = torch.Generator(device=d.device).manual_seed(self.cfg.eval.seed * 1_000_003 + number)
        ro = models.sampler.generate(ids, mask, self.sampling, generator=noise)
        responses = from_rollout(ro, prompts, tok, samples=1)
        kl = self._kl(models, responses)
        references = None if self.held_out.references is None else [self.held_out.references[i] for i in indices]
        scored = self._scores(models.feedback, responses, references, d.device)
        lengths = (responses.labels != IGNORE).sum(-1).tolist()
        return [Record(index=i, prompt=prompts[j], response=responses.responses[j],
                       reference=None if references is None else references[j],
                       kl=kl[j], length=lengths[j], finished=bool(responses.finished[j]),
                       **{key: None if values is None else values[j] for key, values in scored.items()})
                for j, i in enumerate(indices)]

    def _kl(self, models: Models, responses: Responses) -> list[float]:
        """Sequence KL sum_t (log pi - log pi_ref) of each response at the evaluation temperature (1 when
        greedy), through the same number of forwards for every batch (FSDP2)."""
        per_forward = self.cfg.train.micro_batch_prompts
        chunks = list(torch.arange(responses.groups, device=responses.labels.device).split(per_forward))
        chunks += chunks[-1:] * (math.ceil(self.cfg.eval.batch_size / per_forward) - len(chunks))  # same values
        temperature = self.cfg.eval.temperature or 1.0
        with _temperature(temperature, models.policy_lp, models.reference_lp):
            policy = sequence_logprobs(models.policy_lp, responses, chunks)
            reference = sequence_logprobs(models.reference_lp, responses, chunks)
        valid = responses.labels != IGNORE
        return torch.where(valid, policy - reference, 0.0).sum(-1).tolist()

    def _scores(self, feedback: Feedback, responses: Responses, references: list[str] | None, device) -> dict:
        """score, reference_score, preference, judge: a list per key, or None where not configured."""
        prompts, texts, finished = responses.prompts, responses.responses, responses.finished
        out = dict.fromkeys(("score", "reference_score", "preference", "judge"))
        if feedback.reward is not None:
            raw = rewards.score(feedback.reward, prompts, texts, device, if_non_finite=LEFT_OUT)
            out["score"] = rewards.apply_eos_penalty(raw, finished, self.cfg.reward.missing_eos_penalty).tolist()
            if references is not None:
                out["reference_score"] = rewards.score(feedback.reward, prompts, references, device,
                                                       if_non_finite=LEFT_OUT).tolist()
        if references is None:
            return out
        complete = torch.ones_like(finished)  # a reference response is a finished one
        for key, fn, what in (("preference", feedback.prefer, "the preference model"),
                              ("judge", self.judge, "the judge")):
            if fn is not None:
                p = both_orders(fn, prompts, texts, references, what=what, device=device)
                ruled = rewards.apply_eos_rule(p, finished, complete)
                out[key] = torch.where(torch.isfinite(p), ruled, p).tolist()  # a broken judge's NaN stays NaN
        return out

    def close(self, plot: bool = True) -> None:
        """eval.png (main process, unless `plot` is False) and the TensorBoard writer."""
        if plot:
            self.records.plot()
        self.records.close()


@contextlib.contextmanager
def _temperature(value: float, *modules: nn.Module):
    """Log-probabilities at `value` inside the block (PolicyLogprobs divides the logits by .temperature)."""
    targets = [m for m in modules if hasattr(m, "temperature")]
    saved = [m.temperature for m in targets]
    for m in targets:
        m.temperature = value
    try:
        yield
    finally:
        for m, t in zip(targets, saved):
            m.temperature = t


def _gather(records: list[Record], d: parallel.Dist) -> list[Record]:
    """Every rank's records on every rank (all_gather_object)."""
    if not (d.sharded and d.world > 1):
        return records
    parts: list = [None] * d.world
    torch.distributed.all_gather_object(parts, records)
    return [r for part in parts for r in part]

