"""What one iteration asks of one process, in tokens: the generation's chunks and cache, the packed
micro-batches the training passes forward (shared prefix, token budget), and how many passes there are.

Lengths: the prompt's mean (`plan.prompt_tokens`; 0: known for the built-in prompt sets, else
`data.max_prompt_tokens`, the worst case), the longest prompt of a batch (left padding: `data.max_prompt_tokens`;
a built-in set's lengths are uniform on [lo, hi], whose largest of n draws is lo + (hi - lo) n / (n + 1)
on average), the response's mean (`plan.response_tokens`;
0: `generation.max_new_tokens`). Generation always runs `max_new_tokens` decode steps (the loop stops
when every row has finished, which the longest row decides).
"""
from __future__ import annotations

import dataclasses
import math

from engine.config import TrainConfig

# The built-in prompt sets (engine/data/tasks.py): prompt tokens uniform on [lo, hi], one per character.
BUILTIN_PROMPTS = {"builtin:counting": (2, 5), "builtin:counting_preferences": (2, 5),
                   "builtin:counting_long": (64, 256)}
CACHE_LENGTH_STEP = 64  # engine/model/generate.py rounds cache lengths up to this


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    world: int
    generates: bool  # the iteration samples (offline algorithms sample only to monitor, with a reward)
    prompts: int  # prompts per process
    samples: int  # k: responses generated per prompt
    trained_samples: int  # responses per prompt the loss differentiates
    prompt_mean: float
    prompt_max: int
    response: float  # mean response tokens, EOS included
    new_tokens: int  # decode steps
    gen_chunks: int  # generation calls of at most the KV budget
    gen_chunk_prompts: int
    cache_length: int
    group_tokens: float  # packed tokens of one prompt and its samples in a training forward
    group_scored: float  # response tokens of a group whose log-probabilities are taken
    group_keys: float  # sum over a group's tokens of the keys each attends to (attention FLOPs)
    micro_batches: int  # per optimizer step, per process
    micro_batch_groups: int
    minibatches: int
    epochs: int
    folded: bool  # log pi_t from the first epoch's forward (no separate pass)
    packed: bool

    @property
    def average_groups(self) -> float:
        """Groups in the average micro-batch (the last of a step may be smaller than the others)."""
        return self.prompts / self.minibatches / self.micro_batches

    @property
    def micro_batch_tokens(self) -> float:
        return self.micro_batch_groups * self.group_tokens

    @property
    def micro_batch_scored(self) -> float:
        return self.micro_batch_groups * self.group_scored

    @property
    def forwarded_tokens(self) -> float:
        """Token positions every training pass of the iteration puts through the body (log pi_ref, log pi_t
        unless folded, each epoch): what bench/_iteration.py counts with hooks."""
        return (1 + (not self.folded) + self.epochs) * self.prompts * self.group_tokens

    @property
    def iteration_tokens(self) -> float:
        """Prompt + response tokens of every sample this process generates (the peers' token count)."""
        return self.prompts * self.samples * (self.prompt_mean + self.response)


def folds(cfg: TrainConfig) -> bool:
    """engine/iteration/micro_batches.py `folds` (a test keeps the two equal): log pi_t is taken by the
    first epoch's forwards when each epoch is one optimizer step and the loss trains on every sample."""
    algo = cfg.algorithm
    return (cfg.train.fold_old_logprobs and cfg.train.minibatches == 1 and not algo.offline
            and algo.trained_samples == algo.samples_per_prompt)


def lengths(cfg: TrainConfig, batch: int) -> tuple[float, int, float]:
    """(mean prompt, longest prompt of a batch of `batch` prompts, mean response) tokens."""
    lo, hi = BUILTIN_PROMPTS.get(cfg.data.prompts, (cfg.data.max_prompt_tokens, cfg.data.max_prompt_tokens))
    hi = min(hi, cfg.data.max_prompt_tokens)
    mean, longest = (lo + hi) / 2, round(lo + (hi - lo) * batch / (batch + 1))
    if cfg.plan.prompt_tokens:
        mean = cfg.plan.prompt_tokens
    response = cfg.plan.response_tokens or cfg.generation.max_new_tokens
    return float(min(mean, longest)), int(longest), float(min(response, cfg.generation.max_new_tokens))


def workload(cfg: TrainConfig, *, world: int, kv_bytes_per_token: int) -> Workload:
    """One process's share of an iteration of `cfg` on `world` processes."""
    if cfg.train.prompts_per_iteration % (world * cfg.train.minibatches):
        raise ValueError(f"train.prompts_per_iteration={cfg.train.prompts_per_iteration} must be divisible by "
                         f"plan.gpus x train.minibatches = {world * cfg.train.minibatches}")
    prompts = cfg.train.prompts_per_iteration // world
    algo, gen = cfg.algorithm, cfg.generation
    hybrid = cfg.data.partner_column is not None
    k = 1 if hybrid else gen.samples_per_prompt
    mean, longest, response = lengths(cfg, prompts)
    chunks, per_chunk, length = _generation_chunks(prompts, k, longest, gen, kv_bytes_per_token)
    packed, shared = cfg.train.micro_batch_tokens > 0, cfg.train.shared_prefix
    trained = algo.trained_samples
    group, keys = _group(mean, longest, response, trained, packed=packed, shared=shared)
    per_step = prompts // cfg.train.minibatches
    if packed:  # a group is never split; at least one group per micro-batch
        mb_groups = min(per_step, max(1, int(cfg.train.micro_batch_tokens // group)))
    else:
        mb_groups = min(per_step, cfg.train.micro_batch_prompts)
    monitored = bool(cfg.reward.model or cfg.reward.function) or cfg.data.prompts.startswith("builtin:")
    return Workload(world=world, generates=not algo.offline or monitored, prompts=prompts,
                    samples=gen.samples_per_prompt, trained_samples=trained,
                    prompt_mean=mean, prompt_max=longest, response=response, new_tokens=gen.max_new_tokens,
                    gen_chunks=chunks, gen_chunk_prompts=per_chunk, cache_length=length, group_tokens=group,
                    group_scored=trained * response, group_keys=keys, micro_batches=math.ceil(per_step / mb_groups),
                    micro_batch_groups=mb_groups, minibatches=cfg.train.minibatches, epochs=cfg.train.num_epochs,
                    folded=folds(cfg), packed=packed)


def _generation_chunks(prompts: int, k: int, longest: int, gen, kv_bytes_per_token: int) -> tuple[int, int, int]:
    """(chunks, prompts per chunk, cache length): engine/model/generate.py `Sampler._prompts_per_chunk`."""
    per_prompt = k * kv_bytes_per_token * (longest + gen.max_new_tokens)
    fit = max(1, gen.kv_budget_bytes // per_prompt)
    chunks = 1 if fit >= prompts else math.ceil(prompts / fit)
    length = -(-(longest + gen.max_new_tokens) // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
    return chunks, math.ceil(prompts / chunks), length


def _group(prompt: float, longest: int, response: float, k: int, *, packed: bool, shared: bool) -> tuple[float, float]:
    """(tokens forwarded, attention keys summed over them) of one prompt and its k trained samples.

    Shared prefix: [x | y_1[:-1] | ... | y_k[:-1]], the prompt's token i attends to i keys and a response's
    token j to the prompt and its own j; unshared packing: k sequences [x | y_s[:-1]]; padded rows: k rows of
    the longest prompt + the response, causal over the row (scores of padding included)."""
    r = max(response - 1, 0.0)
    trunk = prompt * (prompt + 1) / 2
    branch = r * prompt + r * (r + 1) / 2
    if packed and shared:
        return prompt + k * r, trunk + k * branch
    if packed:
        return k * (prompt + r), k * (trunk + branch)
    row = longest + response
    return k * row, k * row * (row + 1) / 2
