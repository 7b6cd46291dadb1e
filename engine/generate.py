"""Our batched generation loop for Hugging Face causal LMs.

One prefill per prompt; its KV rows are copied into a static cache holding `samples` rows per
prompt (row s * B + i is sample s of prompt i, so with two samples pair i is rows i and B + i, the
layout `fused_rebel_loss` expects). Prompts are left-padded and position ids come from the
attention mask. The decode loop samples on device without host synchronization, except for one
"all rows done?" check every `check_every` steps; on CUDA the decode step is captured as a CUDA
graph (torch.compile, mode "reduce-overhead").

Sampling: plain temperature sampling of models whose logits are `hidden @ lm_head.T (+ bias)` goes
straight from the last hidden state through the Triton Gumbel-max kernel (no logits at all);
top-k / top-p / minimum lengths go through the `rebel_kernels._C` sampling op on the last
position's logits; temperature 0 is greedy. Every path returns the log-probability of the sampled
token under the distribution it was actually drawn from.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from transformers import StaticCache

_CACHE_LENGTH_STEP = 64  # cache lengths are rounded up to this, so varying prompt lengths reuse one cache

# Families whose logits are exactly hidden @ lm_head.weight.T (+ bias): no soft-capping or scaling.
_PLAIN_HEAD_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt_neox", "gpt2", "phi3", "olmo2"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample. temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int = 53
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    samples_per_prompt: int = 2
    check_every: int = 8
    compact_finished: bool = True  # move live rows into a smaller batch bucket once half have finished
    kv_budget_bytes: int = 8 * 2**30  # the static cache of one call never exceeds this

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


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
        self._decode = _decode_step
        device = next(model.parameters()).device
        if use_cuda_graphs and device.type == "cuda":
            self._decode = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=False, dynamic=False)
        self.plain_head = getattr(model.config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES

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

    def _static_cache(self, rows: int, length: int, like) -> StaticCache:
        """The preallocated cache for this shape; head counts, dims and dtype taken from cache `like`."""
        key = (rows, length)
        if key not in self._caches:
            for stale in [k for k in self._caches if k[1] != length]:  # keep one length's buckets only
                del self._caches[stale]
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            k0 = like.layers[0].keys
            cache.early_initialization(
                batch_size=rows,
                num_heads=[layer.keys.shape[1] for layer in like.layers],
                head_dim=[layer.keys.shape[-1] for layer in like.layers],
                dtype=k0.dtype, device=k0.device,
            )
            self._caches[key] = cache
        return self._caches[key]

    def _compacted(self, cache: StaticCache, slots: torch.Tensor) -> StaticCache:
        """A smaller bucket's cache holding the KV rows `slots` of `cache` (same positions)."""
        small = self._static_cache(slots.numel(), cache.layers[0].max_cache_len, cache)
        for dst, src in zip(small.layers, cache.layers):
            dst.keys.copy_(src.keys.index_select(0, slots))
            dst.values.copy_(src.values.index_select(0, slots))
            dst.cumulative_length.copy_(src.cumulative_length)
        return small

    def _generate_chunk(self, input_ids, attention_mask, config: SamplingConfig, generator) -> Rollout:
        device = input_ids.device
        samples = config.samples_per_prompt
        prompts, plen = input_ids.shape
        rows, steps = prompts * samples, config.max_new_tokens
        mask = attention_mask.to(torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens start at 0

        # Prefill once per prompt, then copy its KV rows for every sample (row s * B + i).
        state, prefill_cache = _forward(self.model, self._hidden_path(config, 0), input_ids=input_ids,
                                        attention_mask=mask, position_ids=positions, use_cache=True)
        length = -(-(plen + steps) // _CACHE_LENGTH_STEP) * _CACHE_LENGTH_STEP  # bucketed: reused across calls
        cache = self._static_cache(rows, length, prefill_cache)
        for dst, src in zip(cache.layers, prefill_cache.layers):
            dst.keys.zero_()
            dst.values.zero_()
            dst.keys[:, :, :plen].copy_(src.keys.repeat(samples, 1, 1, 1))
            dst.values[:, :, :plen].copy_(src.values.repeat(samples, 1, 1, 1))
            dst.cumulative_length.fill_(plen)

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
            if t > 0:
                state = self._decode(self.model, tok, next_pos, full_mask, cache, self._hidden_path(config, t))
                next_pos = next_pos + 1
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
                cache = self._compacted(cache, slots)
                tok, next_pos, done = tok[slots], next_pos[slots], done[slots]
                full_mask, slot_rows = full_mask[slots], slot_rows[slots]
        return Rollout(prompt_ids=input_ids.repeat(samples, 1), prompt_mask=attention_mask.repeat(samples, 1),
                       response_ids=tokens, response_mask=alive_mask, logprobs=logprobs,
                       finished=(torch.isin(tokens, eos) & alive_mask).any(-1))

    def _hidden_path(self, config: SamplingConfig, t: int) -> bool:
        """Sample from the last hidden state (Gumbel-max kernel) rather than from logits?"""
        return (self.plain_head and not config.greedy and not config.truncated and t >= config.min_new_tokens)

    def _sample(self, state, config: SamplingConfig, t: int, eos, generator):
        if self._hidden_path(config, t):
            from rebel_kernels import sample_from_hidden

            head = self.model.get_output_embeddings()
            return sample_from_hidden(state, head.weight, bias=head.bias, temperature=config.temperature,
                                      generator=generator)
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
        return out.last_hidden_state[:, -1], out.past_key_values
    out = model(**inputs, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values


def _decode_step(model, tok, pos, full_mask, cache, hidden: bool) -> torch.Tensor:
    """One token for every row: [rows] ids at positions [rows] -> last hidden state or logits [rows, *]."""
    state, _ = _forward(model, hidden, input_ids=tok[:, None], attention_mask=full_mask,
                        position_ids=pos[:, None], past_key_values=cache, use_cache=True)
    return state


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
