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
# masks
# ----------------------------------------------------------------------------------------------
def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attend) as the additive mask eager attention takes: 0 / the dtype's minimum."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


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
