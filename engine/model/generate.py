"""Our batched generation loop for Hugging Face causal LMs.

One prefill per prompt (into transformers' DynamicCache); its KV rows are loaded into a static cache
holding `samples` rows per prompt (row s * B + i is sample s of prompt i, so with two samples pair i is
rows i and B + i, the layout `fused_rebel_loss` expects) through the cache's own `update`, so that every
layer keeps its bookkeeping: full layers, sliding-window layers (prompts shorter or longer than the
window) and hybrids of both. A layout without a static path here (linear attention, indexed or shared
layers, ...) decodes in the prefill's DynamicCache instead, with a one-line notice. Prompts are
left-padded and position ids come from the attention mask. The decode loop samples on device without
host synchronization, except for one "all rows done?" check every `check_every` steps; on CUDA the
decode step of an all-full-attention static cache is captured as a CUDA graph (torch.compile, mode
"reduce-overhead"); sliding layers keep a Python-side length, so their steps run eagerly.

Sampling: plain temperature sampling goes straight from the last hidden state through the Gumbel-max
kernel `sample_from_hidden` with the model's head (`engine/model/head.py`: bias, logit scale, soft-cap), no
logits at all; top-k / top-p / minimum lengths go through the `rebel_kernels._C` sampling op on the
last position's logits; temperature 0 is greedy. Every path returns the log-probability of the sampled
token under the distribution it was actually drawn from.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math

import torch
from torch import nn
from transformers import DynamicLayer, StaticCache, StaticLayer, StaticSlidingWindowLayer
from transformers.cache_utils import DynamicSlidingWindowLayer

from engine.config import SamplingConfig

from .head import Head, model_type

_CACHE_LENGTH_STEP = 64  # cache lengths are rounded up to this, so varying prompt lengths reuse one cache
_STATIC_LAYERS = (StaticLayer, StaticSlidingWindowLayer)  # the layouts loaded and compacted through `update`
_DYNAMIC_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # the prefill's layers: keys hold the last tokens


@dataclasses.dataclass
class Rollout:
    """Rows are ordered sample-major: row s * B + i is sample s of prompt i."""

    prompt_ids: torch.Tensor  # [S*B, P] left-padded
    prompt_mask: torch.Tensor  # [S*B, P]
    response_ids: torch.Tensor  # [S*B, N], pad_token_id after the first EOS
    response_mask: torch.Tensor  # [S*B, N] bool, True up to and including the first EOS
    logprobs: torch.Tensor  # [S*B, N] float32, sampler's log-probabilities, 0 where masked
    finished: torch.Tensor  # [S*B] bool, the response emitted an EOS

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)


def eos_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """The full EOS set: generation_config.eos_token_id (int or list), config's, the tokenizer's."""
    ids: list[int] = []
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(model.config, "eos_token_id", None),
               getattr(tokenizer, "eos_token_id", None)]
    for value in sources:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("the model declares no eos_token_id; pass eos_ids explicitly")
    return ids


class Sampler:
    """Holds an eval-mode model and its static KV cache, reused across calls of the same shape."""

    def __init__(self, model: nn.Module, *, eos_ids: list[int], pad_token_id: int, use_cuda_graphs: bool = True):
        if not eos_ids:
            raise ValueError(f"eos_ids must name at least one token, got {eos_ids!r}")
        self.model = model.eval()
        self.eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self.pad_token_id = int(pad_token_id)
        self._caches: dict[tuple[int, int], StaticCache] = {}  # (rows, length) -> static cache, reused
        self._compiled = None
        device = next(model.parameters()).device
        if use_cuda_graphs and device.type == "cuda":
            self._compiled = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=False, dynamic=False)
        try:  # sample from the hidden state with the head's description (engine/model/head.py), else from logits
            Head.from_model(model)
            self.hidden_head = True
        except ValueError:
            self.hidden_head = False
        self._cache_kwarg = _cache_kwarg(model)
        self._static_layout: bool | None = None  # decided at the first prefill
        self.compactions = 0  # times live rows were moved into a smaller batch (all calls)

    # -- public -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SamplingConfig,
                 generator: torch.Generator | None = None) -> Rollout:
        """Sample `config.samples_per_prompt` responses for each left-padded prompt."""
        _check_prompts(input_ids, attention_mask)
        chunk = self._prompts_per_chunk(input_ids.shape, config)
        parts = [self._generate_chunk(input_ids[i : i + chunk], attention_mask[i : i + chunk], config, generator)
                 for i in range(0, input_ids.shape[0], chunk)]
        return parts[0] if len(parts) == 1 else _interleave_chunks(parts, config.samples_per_prompt)

    # -- internals ----------------------------------------------------------------------------
    def _kv_bytes_per_row(self, length: int) -> int:
        cfg = self.model.config.get_text_config(decoder=True)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * heads * head_dim * length * elem

    def _prompts_per_chunk(self, shape, config: SamplingConfig) -> int:
        prompts, plen = shape
        per_prompt = config.samples_per_prompt * self._kv_bytes_per_row(plen + config.max_new_tokens)
        fit = max(1, config.kv_budget_bytes // per_prompt)
        if fit >= prompts:
            return prompts
        chunks = math.ceil(prompts / fit)  # equal chunks, so the cache shape is reused
        return math.ceil(prompts / chunks)

    def _static_cache(self, rows: int, length: int) -> StaticCache:
        """The preallocated cache for this shape (its layers take head counts, dims and dtype from their
        first `update`), reused across calls."""
        key = (rows, length)
        if key not in self._caches:
            for stale in [k for k in self._caches if k[1] != length]:  # keep one length's buckets only
                del self._caches[stale]
            self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        return self._caches[key]

    def _uses_static(self, prefill, length: int) -> bool:
        """Whether this model's layout decodes in a StaticCache (decided once, with a notice if not)."""
        if self._static_layout is None:
            static = StaticCache(config=self.model.config, max_cache_len=length)
            ok = (all(type(layer) in _DYNAMIC_LAYERS for layer in getattr(prefill, "layers", [None]))
                  and all(type(layer) in _STATIC_LAYERS for layer in static.layers)
                  and len(static.layers) == len(prefill.layers))
            if not ok:
                kinds = ", ".join(sorted({type(x).__name__ for x in getattr(prefill, "layers", [])}))
                logging.getLogger("rebel").warning(
                    "generation: %s's cache layout (%s) has no static-cache path; decoding in a DynamicCache (slower)",
                    model_type(self.model), kinds)
            self._static_layout = ok
        return self._static_layout

    def _decode_cache(self, prefill, prompts: int, samples: int, length: int, seen: int):
        """The cache the decode loop runs in, holding row s * B + i = prompt i's prefill (`seen` tokens)."""
        rows = prompts * samples
        select = torch.arange(rows, device=_device(self.model)) % prompts
        if not self._uses_static(prefill, length):
            prefill.reorder_cache(select)  # an index_select of the rows, defined for every layer kind
            return prefill
        cache = self._static_cache(rows, length)
        _load_rows(cache, prefill, select, seen)
        return cache

    def _compacted(self, cache, slots: torch.Tensor, length: int, seen: int):
        """A smaller bucket's cache holding the KV rows `slots` of `cache` (same positions)."""
        self.compactions += 1
        if not isinstance(cache, StaticCache):
            cache.reorder_cache(slots)
            return cache
        small = self._static_cache(slots.numel(), length)
        _load_rows(small, cache, slots, seen)
        return small

    def _generate_chunk(self, input_ids, attention_mask, config: SamplingConfig, generator) -> Rollout:
        device = input_ids.device
        samples = config.samples_per_prompt
        prompts, plen = input_ids.shape
        rows, steps = prompts * samples, config.max_new_tokens
        mask = attention_mask.to(torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens start at 0

        # Prefill once per prompt, then load its KV rows for every sample (row s * B + i).
        state, prefill_cache = _forward(self.model, self._hidden_path(config, 0), input_ids=input_ids,
                                        attention_mask=mask, position_ids=positions, use_cache=True)
        length = -(-(plen + steps) // _CACHE_LENGTH_STEP) * _CACHE_LENGTH_STEP  # bucketed: reused across calls
        seen = plen  # tokens in the cache
        cache = self._decode_cache(prefill_cache, prompts, samples, length, seen)
        static = isinstance(cache, StaticCache)
        decode = (self._compiled if self._compiled is not None and static
                  and all(type(layer) is StaticLayer for layer in cache.layers) else _decode_step)

        full_mask = torch.ones(rows, length, dtype=torch.long, device=device)  # causality hides the future
        full_mask[:, :plen] = mask.repeat(samples, 1)
        next_pos = positions[:, -1].repeat(samples) + 1  # [rows]
        eos = self.eos_ids.to(device)
        tokens = torch.full((rows, steps), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        alive_mask = torch.zeros(rows, steps, dtype=torch.bool, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)

        state = state.repeat(samples, 1)
        slot_rows = torch.arange(rows, device=device)  # the output row each decoding slot writes
        tok = None  # the previous step's tokens, fed to the decode step from t = 1 on
        for t in range(steps):
            if t > 0:  # a static cache sees the whole mask (its length); a dynamic one the tokens so far
                step_mask = full_mask if static else full_mask[:, : seen + 1]
                state = decode(self.model, tok, next_pos, step_mask, cache, self._hidden_path(config, t),
                               self._cache_kwarg)
                next_pos, seen = next_pos + 1, seen + 1
            tok, lp = self._sample(state, config, t, eos, generator)
            tok = torch.where(done, self.pad_token_id, tok)
            tokens[slot_rows, t] = tok
            logprobs[slot_rows, t] = torch.where(done, 0.0, lp)
            alive_mask[slot_rows, t] = ~done
            done = done | torch.isin(tok, eos)
            if (t + 1) % config.check_every:
                continue
            alive = int((~done).sum())  # the one host synchronization, every check_every steps
            if alive == 0:
                break
            bucket = 1 << (alive - 1).bit_length()  # power-of-two batch buckets
            if config.compact_finished and bucket <= done.numel() // 2:
                # Move the live rows (topped up with finished ones, whose writes are no-ops) into a
                # smaller cache, so the remaining steps cost what the live rows need.
                slots = torch.cat([(~done).nonzero().squeeze(1), done.nonzero().squeeze(1)])[:bucket]
                cache = self._compacted(cache, slots, length, seen)
                tok, next_pos, done = tok[slots], next_pos[slots], done[slots]
                full_mask, slot_rows = full_mask[slots], slot_rows[slots]
        return Rollout(prompt_ids=input_ids.repeat(samples, 1), prompt_mask=attention_mask.repeat(samples, 1),
                       response_ids=tokens, response_mask=alive_mask, logprobs=logprobs,
                       finished=(torch.isin(tokens, eos) & alive_mask).any(-1))

    def _hidden_path(self, config: SamplingConfig, t: int) -> bool:
        """Sample from the last hidden state (Gumbel-max kernel) rather than from logits?"""
        return (self.hidden_head and not config.greedy and not config.truncated and t >= config.min_new_tokens)

    def _sample(self, state, config: SamplingConfig, t: int, eos, generator):
        if self._hidden_path(config, t):
            from rebel_kernels import sample_from_hidden

            head = Head.from_model(self.model)
            return sample_from_hidden(state, head.weight, temperature=config.temperature, generator=generator,
                                      **head.op_kwargs)
        logits = state.float()
        if t < config.min_new_tokens:
            logits = logits.index_fill(-1, eos, float("-inf"))  # no EOS before min_new_tokens
        if config.greedy:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
        from rebel_kernels import sample_logits

        return sample_logits(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                             generator=generator)


def _forward(model, hidden: bool, **inputs):
    """The last position's final hidden state (through the base model: no logits at all) or its
    logits (through the LM head, last position only), and the cache."""
    if hidden:
        out = model.base_model(**inputs)
        return out.last_hidden_state[:, -1], _output_cache(out)
    out = model(**inputs, logits_to_keep=1)
    return out.logits[:, -1], _output_cache(out)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output_cache(out):
    return out["cache"] if "cache" in out else out.past_key_values  # `cache` since transformers 5.x's rename


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name of the cache argument: `cache`, or `past_key_values` before transformers' rename."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode_step(model, tok, pos, full_mask, cache, hidden: bool, cache_kwarg: str = "cache") -> torch.Tensor:
    """One token for every row: [rows] ids at positions [rows] -> last hidden state or logits [rows, *]."""
    state, _ = _forward(model, hidden, input_ids=tok[:, None], attention_mask=full_mask,
                        position_ids=pos[:, None], use_cache=True, **{cache_kwarg: cache})
    return state


def _layer_contents(layer, seen: int):
    """A cache layer's stored keys and values, oldest first: a static layer's first min(seen, its length)
    positions (a full sliding layer is kept in order by its update), a dynamic layer's whole tensors."""
    if isinstance(layer, StaticLayer):
        n = min(seen, layer.max_cache_len)
        return layer.keys[:, :, :n], layer.values[:, :, :n]
    return layer.keys, layer.values


def _load_rows(dst: StaticCache, src, rows: torch.Tensor, seen: int) -> None:
    """Reset `dst` and fill it with the rows `rows` of `src` (a cache that has seen `seen` tokens) through
    transformers' own `update`, so each layer keeps its bookkeeping (a sliding layer's length and window).
    Tokens a sliding layer no longer stores enter as zeros: they lie outside every later query's window."""
    dst.reset()
    for i, layer in enumerate(src.layers):
        keys, values = (x.index_select(0, rows) for x in _layer_contents(layer, seen))
        missing = seen - keys.shape[-2]
        if missing:
            keys, values = (torch.nn.functional.pad(x, (0, 0, missing, 0)) for x in (keys, values))
        dst.update(keys, values, i)


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a 2-D int64 tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt batch: input_ids shape {tuple(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be 1 for every prompt")


def _interleave_chunks(parts: list[Rollout], samples: int) -> Rollout:
    """Concatenate per-chunk rollouts so that row s * B + i is sample s of prompt i overall."""
    def merge(name):
        per_sample = [torch.cat([getattr(p, name).chunk(samples)[s] for p in parts]) for s in range(samples)]
        return torch.cat(per_sample)

    width = max(p.response_ids.shape[1] for p in parts)
    for p in parts:  # chunks may stop at different lengths only if max_new_tokens differ: never here
        assert p.response_ids.shape[1] == width
    return Rollout(**{f.name: merge(f.name) for f in dataclasses.fields(Rollout)})
