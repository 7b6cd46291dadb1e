"""Shared-prefix, padding-free packing of training forwards (docs/design.md, "Packing").

A prompt x and its k responses y_1..y_k go through the model as ONE packed sequence

    [ x | y_1[:-1] | ... | y_k[:-1] ]        positions 0..|x|-1, then |x|..|x|+|y_s|-2 for every y_s

in which every response attends to the prompt and to itself only (a tree of k branches on one trunk),
and several such groups are packed into one row with no padding anywhere. The hidden state that predicts
label j of y_s is the last prompt token's (j = 0, shared by all k branches) or y_s's token j - 1's, so a
response's last token is never forwarded. Each token sees exactly the keys, at exactly the positions, it
sees in the unshared left-padded computation: per-token log-probabilities and every gradient are the
same (the prompt's activations receive the gradients of all k branches through the attention and the
shared first prediction, as the k copies would).

With sharing off each (prompt, response) pair is its own group: padding-free packing only.

The attention mask this needs is handed to transformers in the form its attention implementation takes:
a 4-D boolean mask for SDPA, an additive float mask for eager attention, a flex-attention BlockMask.
Families that cannot take it are found at load by `incompatibility` (a packed forward compared with the
padded one) and keep the padded path.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Layout:
    """One packed micro-batch. T packed tokens, M scored labels, output [R, N] (the padded rows' shape)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T] the positions the tokens have in the unshared computation
    group: torch.Tensor  # [T] which (prompt, responses) group a token belongs to
    branch: torch.Tensor  # [T] 0: the prompt (trunk), s + 1: response s
    source: torch.Tensor  # [M] packed index of the hidden state predicting each scored label
    rows: torch.Tensor  # [M] row of each scored label in the [R, N] output
    cols: torch.Tensor  # [M] its column
    labels: torch.Tensor  # [M]
    shape: tuple[int, int]  # (R, N)
    longest: int  # the longest unshared sequence (prompt + response) in the micro-batch

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def allowed(self) -> torch.Tensor:
        """[T, T] bool: query q may attend to key k (same group, k <= q, k on the trunk or on q's branch)."""
        q, k = self.group[:, None], self.group[None, :]
        idx = torch.arange(self.tokens, device=self.group.device)
        causal = idx[None, :] <= idx[:, None]
        on_path = (self.branch[None, :] == 0) | (self.branch[None, :] == self.branch[:, None])
        return (q == k) & causal & on_path

    def scatter(self, scored: torch.Tensor) -> torch.Tensor:
        """[M] per-label values -> [R, N] rows (0 at ignored positions), differentiable."""
        out = scored.new_zeros(self.shape)
        return out.index_put((self.rows, self.cols), scored)


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """[R] scored labels per row; they must form a prefix of the row (IGNORE only after the first EOS)."""
    valid = labels != IGNORE
    n = valid.sum(-1)
    prefix = torch.arange(labels.shape[1], device=labels.device)[None] < n[:, None]
    if not torch.equal(prefix, valid):
        raise ValueError("labels must be scored up to a row's end and IGNORE after it (a prefix of the row)")
    return n


def group_tokens(attention_mask: torch.Tensor, labels: torch.Tensor, samples: int, shared: bool) -> list[int]:
    """Packed tokens of each prompt's k samples [B], for rows laid out sample-major (row s * B + i); with
    `shared` False every sample carries its own copy of the prompt."""
    prompt = attention_mask[:, : attention_mask.shape[1] - labels.shape[1]].sum(-1)
    inputs = (response_lengths(labels) - 1).clamp_min(0)
    b = labels.shape[0] // samples
    if not shared:  # every sample its own copy of the prompt
        return (prompt + inputs).view(samples, b).sum(0).tolist()
    return (prompt[:b] + inputs.view(samples, b).sum(0)).tolist()


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, samples: int) -> Layout:
    """The packed layout of R = samples * B left-padded rows [R, P + N] (sample-major: row s * B + i is
    sample s of prompt i, all samples of a prompt with the same prompt tokens), labels [R, N]. `samples`
    1: no sharing (each row its own group)."""
    r, n_cols = labels.shape
    if r % samples:
        raise ValueError(f"rows ({r}) must be a multiple of samples ({samples})")
    device = input_ids.device  # built on the host (many small pieces), moved once
    input_ids, attention_mask, labels = input_ids.cpu(), attention_mask.cpu(), labels.cpu()
    b, p, dev = r // samples, input_ids.shape[1] - n_cols, input_ids.device
    lengths = response_lengths(labels).tolist()
    prompt_mask = attention_mask[:, :p].bool()
    prompt_lens = prompt_mask.sum(-1).tolist()
    ids, pos, grp, br, src, rows, cols = [], [], [], [], [], [], []
    at = 0
    for i in range(b):
        members = [s * b + i for s in range(samples)]
        prompt = input_ids[i, :p][prompt_mask[i]]
        if samples > 1 and any(not torch.equal(input_ids[m, :p][prompt_mask[m]], prompt) for m in members[1:]):
            raise ValueError(f"the samples of prompt {i} do not share its prompt tokens: cannot share the prefix")
        length = prompt.shape[0]
        if length == 0:
            raise ValueError(f"prompt {i} has no tokens")
        ids.append(prompt)
        pos.append(torch.arange(length, device=dev))
        grp.append(torch.full((length,), i, device=dev))
        br.append(torch.zeros(length, dtype=torch.long, device=dev))
        last_prompt = at + length - 1
        at += length
        for s, row in enumerate(members):
            n = lengths[row]
            if n == 0:
                continue
            body = input_ids[row, p : p + n - 1]  # the response's tokens that predict its labels 1..n-1
            ids.append(body)
            pos.append(torch.arange(length, length + n - 1, device=dev))
            grp.append(torch.full((n - 1,), i, device=dev))
            br.append(torch.full((n - 1,), s + 1, device=dev))
            src.append(torch.cat([torch.tensor([last_prompt], device=dev), torch.arange(at, at + n - 1, device=dev)]))
            rows.append(torch.full((n,), row, device=dev))
            cols.append(torch.arange(n, device=dev))
            at += n - 1
    cat = torch.cat
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    rows_t, cols_t = (cat(rows), cat(cols)) if rows else (empty, empty)
    longest = max(prompt_lens[i % b] + lengths[i] for i in range(r))
    def to(x):
        return x.to(device, non_blocking=True)

    return Layout(input_ids=to(cat(ids)[None]), position_ids=to(cat(pos)[None]), group=to(cat(grp)),
                  branch=to(cat(br)), source=to(cat(src) if src else empty), rows=to(rows_t), cols=to(cols_t),
                  labels=to(labels[rows_t, cols_t]), shape=(r, n_cols), longest=longest)


class PlanSlot:
    """A context-local slot for the plan of the packed forward in progress (the engine's attention
    functions read it; threads and asyncio tasks each see their own)."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar = contextvars.ContextVar(name, default=None)

    def current(self):
        """The active plan, or None."""
        return self._var.get()

    @contextlib.contextmanager
    def active(self, plan):
        """Within the block, packed forwards run with `plan`."""
        token = self._var.set(plan)
        try:
            yield plan
        finally:
            self._var.reset(token)


# ----------------------------------------------------------------------------------------------
# the mask, in the form each attention implementation takes
# ----------------------------------------------------------------------------------------------
def body(lm, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """The transformer body's last hidden states [1, T, H] of a packed layout, under the model's attention
    implementation: the engine's own (blockwise SDPA or eager, `engine/block_attention.py`; flash-attn varlen,
    `engine/varlen.py`) take a plan and no mask, transformers' take the mask (`attention_mask`)."""
    from engine import block_attention, varlen

    implementation = getattr(lm.config, "_attn_implementation", None) or "eager"
    mask, context = None, contextlib.nullcontext()
    if implementation in block_attention.NAMES.values():
        context = block_attention.active(block_attention.plan(layout))
    elif implementation == varlen.NAME:
        context = varlen.active(varlen.segments(layout))
    else:
        mask = attention_mask(layout, implementation, dtype)
    with context:
        return lm.base_model(input_ids=layout.input_ids, attention_mask=mask, position_ids=layout.position_ids,
                             use_cache=False).last_hidden_state


def padded_body(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: int) -> torch.Tensor:
    """The unpacked computation: left-padded rows [R, P + N] through the body, position ids from the mask;
    the hidden states [R, N, H] that predict the last `responses` = N positions (the one at P - 1 predicts
    the first response token)."""
    start = input_ids.shape[1] - responses
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           use_cache=False).last_hidden_state
    return hidden[:, start - 1 : start - 1 + responses]


def checkpoint_contexts():
    """`context_fn` of activation checkpointing: a layer's recompute in the backward runs under the packed
    attention plan that was active at its forward (without it, the recompute would attend causally over
    the whole packed row)."""
    from engine import block_attention, varlen

    plans = ((block_attention, block_attention.current()), (varlen, varlen.current()))

    @contextlib.contextmanager
    def recompute():
        with contextlib.ExitStack() as stack:
            for module, plan in plans:
                if plan is not None:
                    stack.enter_context(module.active(plan))
            yield

    return contextlib.nullcontext(), recompute()


def attention_mask(layout: Layout, implementation: str, dtype: torch.dtype):
    """The packed mask for transformers' `attention_mask` argument: a 4-D [1, 1, T, T] bool mask for
    SDPA (True: attend), a BlockMask for flex attention, an additive float mask (0 / dtype min) for eager
    and any other implementation that adds the mask to the scores."""
    if implementation == "flex_attention":
        return block_mask(layout)
    allowed = layout.allowed()[None, None]
    return allowed if implementation == "sdpa" else additive(allowed, dtype)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attend) as the additive mask eager attention takes: 0 / the dtype's minimum."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def block_mask(layout: Layout):
    """The same mask as a flex-attention BlockMask (blocks with no allowed pair are skipped by the kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask

    group, branch = layout.group, layout.branch

    def mask_mod(b, h, q, k):
        return (group[q] == group[k]) & (k <= q) & ((branch[k] == 0) | (branch[k] == branch[q]))

    t = layout.tokens
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=layout.input_ids.device)


# ----------------------------------------------------------------------------------------------
# where packing is exact
# ----------------------------------------------------------------------------------------------
def sliding_window(config) -> int | None:
    """The attention window of the model's sliding layers (None: every layer attends to everything). A
    packed mask does not carry the window: packing is exact only for sequences that fit in it."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def fits_window(layout: Layout, window: int | None) -> bool:
    """Every unshared sequence (prompt + response) of the micro-batch is within the window."""
    return window is None or layout.longest <= window


def token_budget_split(order: torch.Tensor, tokens: list[int], budget: int) -> list[torch.Tensor]:
    """Consecutive runs of `order` (prompt indices) whose groups' packed tokens sum to at most `budget`
    (a group longer than the budget goes alone). Every sample of a prompt stays in its micro-batch."""
    parts, current, used = [], [], 0
    for i in order.tolist():
        if current and used + tokens[i] > budget:
            parts.append(current)
            current, used = [], 0
        current.append(i)
        used += tokens[i]
    if current:
        parts.append(current)
    return [torch.tensor(part, dtype=order.dtype, device=order.device) for part in parts]


def split_to_count(parts: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """At least `count` micro-batches: the largest ones halved until there are (FSDP ranks must run the
    same number of forwards and backwards). Needs count <= the number of prompts."""
    parts = list(parts)
    while len(parts) < count:
        j = max(range(len(parts)), key=lambda i: len(parts[i]))
        if len(parts[j]) < 2:
            raise ValueError(f"cannot split {sum(map(len, parts))} prompts into {count} micro-batches")
        half = len(parts[j]) // 2
        parts[j: j + 1] = [parts[j][:half], parts[j][half:]]
    return parts


_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def incompatibility(lm) -> str | None:
    """Why a causal LM cannot run packed, or None. Structural reasons first (sequence mixers other than
    attention, ALiBi biases built from a 2-D mask), then a probe: a packed forward of random tokens
    (two prompts, two responses each, within any sliding window) must give the padded forward's last
    hidden states (relative error 1e-4 in float32, 3e-2 in lower precision)."""
    config = lm.config
    kinds = set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYERS
    if kinds:
        return f"layers of type {sorted(kinds)} mix tokens outside attention"
    if getattr(config, "alibi", False) or config.model_type in ("bloom", "mpt"):
        return "ALiBi attention biases are built from a padding mask"
    try:
        error = _probe_error(lm)
    except Exception as exc:
        return f"a packed forward failed ({type(exc).__name__}: {exc})"
    dtype = lm.get_input_embeddings().weight.dtype
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    if not error <= tolerance:
        return f"a packed forward differs from the padded one (relative error {error:.2e} > {tolerance:g})"
    return None


@torch.no_grad()
def _probe_error(lm) -> float:
    total = min(8, sliding_window(lm.config) or 8)  # every probe sequence within the window
    prompts = (max(1, total // 2), max(1, total // 2 - 1))
    responses = (max(1, total - total // 2), max(1, total // 2))
    device = lm.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    vocab = lm.get_input_embeddings().weight.shape[0]
    p, n = max(prompts), max(responses)
    ids = torch.randint(0, vocab, (4, p + n), generator=g)
    mask = torch.zeros(4, p + n, dtype=torch.long)
    labels = torch.full((4, n), IGNORE)
    for row in range(4):  # rows s * 2 + i: sample s of prompt i; the second sample one token shorter
        i, s = row % 2, row // 2
        length, resp = prompts[i], max(1, responses[i] - s)
        ids[row, :p] = ids[i, :p]
        mask[row, p - length : p + resp] = 1
        labels[row, :resp] = ids[row, p : p + resp]
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    layout = pack(ids, mask, labels, samples=2)
    packed = body(lm, layout, lm.get_input_embeddings().weight.dtype)[0, layout.source]
    padded = padded_body(lm, ids, mask, n)[layout.rows, layout.cols]
    packed, padded = packed.float(), padded.float()
    return ((packed - padded).norm(dim=-1) / padded.norm(dim=-1).clamp_min(1e-12)).max().item()
