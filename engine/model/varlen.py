"""Packed micro-batches on flash-attn's variable-length kernels (docs/design.md, "Packing").

`engine.model.packing` lays a prompt x and its k responses out as one tree-shaped sequence
[x | y_1[:-1] | ... | y_k[:-1]] (several groups per row) and describes its attention with the dense
[T, T] mask `Layout.allowed()`: query q may see key j iff same group, j <= q, and j on the trunk (the
prompt) or on q's own branch. flash-attn takes no such mask, but this tree decomposes exactly into
independent causal attentions, one per *segment*:

    trunk segment of a group:     queries = x,    keys = x             (Lq = Lk = |x|)
    branch segment s of a group:  queries = y_s,  keys = [x | y_s]     (Lq = n_s, Lk = |x| + n_s)

with flash-attn's `causal=True`, which (flash-attn >= 2.1) aligns the causal mask to the bottom-right
corner: local query i of a segment sees local key j iff j <= i + Lk - Lq.

Why this is exactly `Layout.allowed()`:
- trunk segment (Lk = Lq): j <= i, plain causal attention within the prompt. In the packed mask a prompt
  token sees earlier tokens of its own group on the trunk and nothing else (every branch token comes
  after it), the same set.
- branch segment (Lk - Lq = |x|): gathered key j < |x| is trunk token j, always visible (j <= |x| - 1
  <= i + |x|); gathered key j = |x| + m is the branch's own token m, visible iff m <= i. In the packed
  mask a branch token sees the whole trunk of its group (it comes before it), its own branch up to
  itself (branch tokens are contiguous, so packed order is branch order), and no other branch and no
  other group: the same set.
So each query attends to exactly the keys `allowed()` gives it, with the same scores (keys are only
gathered, not changed) and hence the same outputs; K and V reach the kernel through `index_select`,
whose backward sums the gradients of every copy of a trunk key into the trunk token (the k branches'
contributions accumulate, as they do through the dense mask).

Positions: for layouts built by `packing.pack` a gathered key's index within its segment equals its
position id (the trunk holds positions 0..|x|-1, a branch |x|..|x|+n_s-1), and a query's bottom-right
aligned index i + Lk - Lq equals its own position. A sliding window passed to flash-attn as
window_size = (w - 1, 0) therefore keeps exactly the keys with position(q) - position(k) < w, the window
the unshared computation applies (transformers' `sliding_window_overlay`); the caller packs only
micro-batches that fit the window anyway (`packing.fits_window`), where it never binds.

Use: `register()` once, switch the model with `lm.set_attn_implementation(NAME)` (the name must not
contain "flash": transformers treats any such name as a hub kernel to download), then run each packed
forward inside `with active(segments(layout)):` with `attention_mask=None`. With no plan active the
function hands over to transformers' own flash-attention-2 path (generation with a KV cache and a 2-D
padding mask). A recomputation of the forward (activation checkpointing) must run inside `active` too.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch

from . import packing

NAME = "rebel_varlen"

# The varlen kernel, imported from flash_attn on first use; tests put an emulation here.
flash_attn_varlen_func: Callable | None = None

_PLAN = packing.PlanSlot("rebel_varlen_plan")
active, current = _PLAN.active, _PLAN.current  # the plan of the packed forward in progress


@dataclasses.dataclass(frozen=True)
class VarlenPlan:
    """The segments of one packed micro-batch and the key gather that makes each one plain causal.

    Query segment s is packed tokens [starts[s], starts[s] + lengths[s]) (segments tile the packed
    sequence in order, so the kernel's output needs no reordering); its keys are
    kv_index[cu_seqlens_k[s] : cu_seqlens_k[s + 1]]: its group's trunk then its own tokens (a trunk
    segment: the trunk alone)."""

    starts: torch.Tensor  # [S] long, host: packed index of each segment's first token
    lengths: torch.Tensor  # [S] long, host: query tokens of each segment
    trunk: torch.Tensor  # [S] bool, host: the segment is a prompt (branch 0)
    cu_seqlens_q: torch.Tensor  # [S + 1] int32, on the layout's device
    cu_seqlens_k: torch.Tensor  # [S + 1] int32, on the layout's device
    kv_index: torch.Tensor  # [sum Lk] long, on the layout's device: packed index of each gathered key
    max_seqlen_q: int
    max_seqlen_k: int
    tokens: int  # T, the packed length

    def allowed(self, window: int | None = None) -> torch.Tensor:
        """[T, T] bool: the mask the kernel applies (bottom-right causal per segment over the gathered
        keys, and `window` as flash-attn's window_size = (window - 1, 0)), mapped back to packed indices.
        Equals `layout.allowed()` when window is None (the module docstring's argument); for tests."""
        cu_q, cu_k = self.cu_seqlens_q.cpu().long(), self.cu_seqlens_k.cpu().long()
        kv_index = self.kv_index.cpu()
        out = torch.zeros(self.tokens, self.tokens, dtype=torch.bool)
        for s in range(len(self.starts)):
            lq, lk = int(cu_q[s + 1] - cu_q[s]), int(cu_k[s + 1] - cu_k[s])
            i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
            local = j <= i + lk - lq
            if window is not None:
                local &= j >= i + lk - lq - (window - 1)
            rows = torch.arange(int(cu_q[s]), int(cu_q[s + 1]))
            out[rows[:, None], kv_index[cu_k[s] : cu_k[s + 1]][None, :]] = local
        return out


def segments(layout: packing.Layout) -> VarlenPlan:
    """The varlen plan of a packed layout (built on the host from `group` and `branch`, once per
    micro-batch; the kernel's tensors go to the layout's device). Raises ValueError where the layout is
    not a packed tree: a response not preceded by its group's prompt, or a (group, branch) split in two."""
    group, branch = layout.group.cpu(), layout.branch.cpu()
    t = group.numel()
    if t == 0:
        raise ValueError("an empty layout has no segments")
    starts, lengths = _runs(group, branch)
    trunk = branch[starts] == 0
    owner = _trunk_segments(group[starts], branch[starts], trunk)
    prefix = torch.where(trunk, 0, lengths[owner])  # gathered trunk keys before the segment's own
    key_lengths = prefix + lengths
    kv_index = _gather_index(starts, starts[owner], prefix, key_lengths)
    device = layout.input_ids.device

    def cumulative(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.new_zeros(1), x.cumsum(0)]).to(device=device, dtype=torch.int32)

    return VarlenPlan(starts=starts, lengths=lengths, trunk=trunk, cu_seqlens_q=cumulative(lengths),
                      cu_seqlens_k=cumulative(key_lengths), kv_index=kv_index.to(device),
                      max_seqlen_q=int(lengths.max()), max_seqlen_k=int(key_lengths.max()), tokens=t)


def _runs(group: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths) of the maximal runs of equal (group, branch) in packed order."""
    t = group.numel()
    change = torch.ones(t, dtype=torch.bool)
    change[1:] = (group[1:] != group[:-1]) | (branch[1:] != branch[:-1])
    starts = change.nonzero().flatten()
    return starts, torch.diff(starts, append=torch.tensor([t]))


def _trunk_segments(seg_group: torch.Tensor, seg_branch: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
    """[S] the segment index of each segment's trunk: the latest trunk at or before it, which must be
    its own group's; every (group, branch) must form a single run."""
    if not bool(trunk[0]):
        raise ValueError("packed layout: the first tokens are a response, not a prompt")
    trunks = trunk.nonzero().flatten()
    owner = trunks[trunk.long().cumsum(0) - 1]
    if bool((seg_group[owner] != seg_group).any()):
        raise ValueError("packed layout: a response is not preceded by its own group's prompt")
    key = seg_group * (int(seg_branch.max()) + 1) + seg_branch
    if key.unique().numel() != key.numel():
        raise ValueError("packed layout: a prompt or a response is split into non-contiguous pieces")
    return owner


def _gather_index(starts: torch.Tensor, trunk_starts: torch.Tensor, prefix: torch.Tensor,
                  key_lengths: torch.Tensor) -> torch.Tensor:
    """Packed index of every gathered key: for segment s, trunk_starts[s] + j for j < prefix[s], then
    starts[s] + (j - prefix[s]) (its own tokens)."""
    seg = torch.repeat_interleave(torch.arange(len(starts)), key_lengths)
    first = torch.cat([key_lengths.new_zeros(1), key_lengths.cumsum(0)[:-1]])
    j = torch.arange(int(key_lengths.sum())) - first[seg]
    pre = prefix[seg]
    return torch.where(j < pre, trunk_starts[seg] + j, starts[seg] + j - pre)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function (query [1, H, T, D], key/value [1, Hkv, T, D], Hkv dividing H)
    -> ([1, T, H, D], None). With a plan active: one varlen flash-attn call over the plan's segments
    (see the module docstring); `softcap` and `sliding_window` keyword arguments are honoured, attention
    sinks and non-causal attention refused. With none: transformers' flash-attention-2 function."""
    plan = _PLAN.current()
    if plan is None:
        return _delegate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _check(plan, query, attention_mask, kwargs)
    return _packed(plan, module, query, key, value, _kernel_options(plan, scaling, dropout, kwargs)), None


def _check(plan: VarlenPlan, query: torch.Tensor, attention_mask, kwargs: dict) -> None:
    if query.shape[0] != 1 or query.shape[2] != plan.tokens:
        raise ValueError(f"varlen plan of {plan.tokens} tokens, got a query of shape {tuple(query.shape)} "
                         "(expected [1, heads, tokens, head_dim])")
    if attention_mask is not None:
        raise ValueError("with a varlen plan active, pass attention_mask=None: the plan is the mask")
    if kwargs.get("is_causal") is False:
        raise ValueError("a varlen plan is causal: non-causal attention cannot run packed")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the packed varlen path")


def _kernel_options(plan: VarlenPlan, scaling: float | None, dropout: float, kwargs: dict) -> dict:
    """The varlen kernel's keyword arguments: scale, dropout, causal, and the softcap and sliding window
    (a window no shorter than the longest segment never binds, and is left out)."""
    options: dict = {"dropout_p": dropout, "softmax_scale": scaling, "causal": True}
    if kwargs.get("softcap"):
        options["softcap"] = kwargs["softcap"]
    window = kwargs.get("sliding_window")
    if window is not None and window < plan.max_seqlen_k:
        options["window_size"] = (window - 1, 0)
    return options


def _packed(plan: VarlenPlan, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, options: dict) -> torch.Tensor:
    """The varlen call: queries [T, H, D] in packed order, keys/values gathered to [sum Lk, Hkv, D]."""
    head_dim, v_head_dim = query.shape[-1], value.shape[-1]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).index_select(0, plan.kv_index)
    v = value[0].transpose(0, 1).index_select(0, plan.kv_index)
    if v_head_dim != head_dim:  # the kernel needs one head dim (MLA): pad V, crop the output
        v = torch.nn.functional.pad(v, [0, head_dim - v_head_dim])
    target = _target_dtype(query, module)
    if target is not None and target != q.dtype:
        q, k, v = q.to(target), k.to(target), v.to(target)
    out = _kernel()(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
                    **options)
    out = out[0] if isinstance(out, tuple) else out
    return out[None, ..., :v_head_dim].to(query.dtype)


def _target_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype | None:
    """The half dtype transformers' flash path casts float32 inputs to (autocast's, or the weights')."""
    from transformers.integrations.flash_attention import get_target_dtype

    return get_target_dtype(query, module)


def _kernel() -> Callable:
    global flash_attn_varlen_func
    if flash_attn_varlen_func is None:
        flash_attn_varlen_func = importlib.import_module("flash_attn").flash_attn_varlen_func
    return flash_attn_varlen_func


def _delegate(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
              s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' `flash_attention_forward`, but naming "flash_attention_2" as the implementation to
    load (it would otherwise look up the model's configured name, ours, as a hub kernel)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        raise ValueError(f"{NAME}: a {attention_mask.dim()}-D attention mask with no varlen plan active; run "
                         "packed forwards inside varlen.active(varlen.segments(layout)) with attention_mask=None")
    hf = importlib.import_module("transformers.integrations.flash_attention")
    head_dim, v_head_dim = query.shape[-1], value.shape[-1]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if v_head_dim != head_dim:
        v = torch.nn.functional.pad(v, [0, head_dim - v_head_dim])
    out = hf._flash_attention_forward(
        q, k, v, attention_mask, query_length=query.shape[2],
        is_causal=module.is_causal if is_causal is None else is_causal, dropout=dropout, softmax_scale=scaling,
        sliding_window=sliding_window, softcap=softcap, use_top_left_mask=hf._use_top_left_mask,
        target_dtype=hf.get_target_dtype(query, module), attn_implementation="flash_attention_2",
        layer_idx=getattr(module, "layer_idx", None), s_aux=None if s_aux is None else s_aux.to(query.dtype),
        **kwargs)
    return out[..., :v_head_dim], None


def register() -> None:
    """Register `attention` as transformers attention implementation NAME, with flash-attention's mask
    function (no dense mask is built: None for packed forwards, the 2-D padding mask in generation).
    Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def available() -> bool:
    """flash-attn imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("flash_attn")
    except Exception:
        return False
    return True
