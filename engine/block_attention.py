"""Packed micro-batches on PyTorch SDPA, one dense block per group (docs/design.md, "Packing").

A packed micro-batch (`engine.packing`) holds G groups [x | y_1[:-1] | ... | y_k[:-1]] in one row of T
tokens. No query attends outside its group, so a dense [T, T] mask spends sum_g L_g (T - L_g) of its
score entries on pairs that are always masked: with a few thousand packed tokens, attention costs more
than the unpacked rows did. Here each group's queries, keys and values are gathered into a block of
Lmax = max_g L_g slots, and SDPA runs on [G, H, Lmax, D] with the group's own tree mask (query q sees
key j iff j <= q and j is on the trunk or on q's branch, `Layout.allowed()` restricted to the group):

    cost G * Lmax^2 instead of T^2,  T = sum_g L_g

The outputs of the real slots are scattered back in packed order; padding slots copy a real token of
their group, are never visible to a real query (their rows in the mask are False), and their own
query rows (which see only themselves, so that no row of the softmax is empty) are dropped. The
numbers are SDPA's on the same keys as the dense mask: exact up to the reduction order.

Use: `register()` once, `lm.set_attn_implementation(NAME)` for a model that runs SDPA, then each packed
forward inside `with active(plan(layout)):` with attention_mask=None. With no plan active (generation,
padded forwards) the function is transformers' own SDPA attention, with its masks.
"""
from __future__ import annotations

import dataclasses

import torch

from engine import packing

NAME = "rebel_sdpa"

_PLAN = packing.PlanSlot("rebel_sdpa_plan")
active, current = _PLAN.active, _PLAN.current  # the plan of the packed forward in progress


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Where each group's tokens sit in its block, and the blocks' masks."""

    slots: torch.Tensor  # [G, Lmax] packed index of each slot (padding: the group's last token)
    real: torch.Tensor  # [G * Lmax] bool: the slot holds its own token (in packed order when flattened)
    mask: torch.Tensor  # [G, 1, Lmax, Lmax] bool: query slot may attend to key slot
    tokens: int  # T


def plan(layout) -> BlockPlan:
    """The block plan of a `packing.Layout` (groups are contiguous runs of `layout.group`)."""
    group, branch, device = layout.group, layout.branch, layout.group.device
    t = group.numel()
    change = torch.ones(t, dtype=torch.bool, device=device)
    change[1:] = group[1:] != group[:-1]
    starts = change.nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([t], device=device))
    width = int(lengths.max())
    j = torch.arange(width, device=device)
    real = j[None] < lengths[:, None]  # [G, Lmax]
    slots = starts[:, None] + torch.minimum(j[None], lengths[:, None] - 1)
    b = branch[slots]
    tree = (j[None, None, :] <= j[None, :, None]) & ((b[:, None, :] == 0) | (b[:, None, :] == b[:, :, None]))
    mask = (tree & real[:, None, :]) | (~real[:, :, None] & torch.eye(width, dtype=torch.bool, device=device))
    return BlockPlan(slots=slots, real=real.flatten(), mask=mask[:, None], tokens=t)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D],
    None). With a plan active, blockwise SDPA (the module docstring); else transformers' SDPA."""
    p = _PLAN.current()
    if p is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != p.tokens:
        raise ValueError(f"block plan of {p.tokens} tokens, got a query of shape {tuple(query.shape)}")
    g, width = p.slots.shape
    heads, groups_of_heads = query.shape[1], query.shape[1] // key.shape[1]

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [1, h, T, D] -> [G, h, Lmax, D]
        return x[0][:, p.slots].transpose(0, 1)

    k, v = blocks(key), blocks(value)
    if groups_of_heads > 1:  # grouped-query attention: kv head i serves query heads i * n .. i * n + n - 1
        k, v = k.repeat_interleave(groups_of_heads, 1), v.repeat_interleave(groups_of_heads, 1)
    out = torch.nn.functional.scaled_dot_product_attention(blocks(query), k, v, attn_mask=p.mask, scale=scaling,
                                                           dropout_p=dropout if module.training else 0.0)
    out = out.transpose(1, 2).reshape(g * width, heads, -1)[p.real]  # [T, H, D], packed order
    return out[None], None


def register() -> None:
    """Register `attention` as transformers attention implementation NAME, with SDPA's masks (used when no
    plan is active). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
