"""Packed micro-batches on SDPA or eager attention, one dense block per group (docs/design.md, "Packing").

A packed micro-batch (`engine.model.packing`) holds G groups [x | y_1[:-1] | ... | y_k[:-1]] in one row of T
tokens. No query attends outside its group, so a dense [T, T] mask spends sum_g L_g (T - L_g) of its
score entries on pairs that are always masked: with a few thousand packed tokens, attention costs more
than the unpacked rows did. Here each group's queries, keys and values are gathered into a block of
Lmax = max_g L_g slots, and the model's own attention function (transformers' SDPA, or the family's
eager function with its soft-capping and the like) runs on [G, H, Lmax, D] with the group's tree mask
(query q sees key j iff j <= q and j is on the trunk or on q's branch, `Layout.allowed()` restricted to
the group; a bool mask for SDPA, an additive one for eager):

    cost G * Lmax^2 instead of T^2,  T = sum_g L_g

The outputs of the real slots are scattered back in packed order; padding slots copy a real token of
their group, are never visible to a real query (their rows in the mask are False), and their own
query rows (which see only themselves, so that no row of the softmax is empty) are dropped. The
numbers are the inner function's on the same keys as the dense mask: exact up to the reduction order.

Use: `name = register(inner)` once ("sdpa" or "eager"), `lm.set_attn_implementation(name)`, then each
packed forward inside `with active(plan(layout)):` with attention_mask=None. With no plan active
(generation, padded forwards) the function is the inner one, with transformers' masks for it.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from . import packing

NAMES = {"sdpa": "rebel_sdpa", "eager": "rebel_eager"}  # the inner implementation -> the registered name
NAME = NAMES["sdpa"]

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


def _family_eager(obj: torch.nn.Module):
    """The `eager_attention_forward` of the file that defines a model or attention module's class, or None."""
    return getattr(sys.modules[type(obj).__module__], "eager_attention_forward", None)


def inner_function(inner: str, module: torch.nn.Module):
    """The attention function a block runs: transformers' SDPA, or the eager function of the module's
    family (its own file's `eager_attention_forward`, with the family's soft-cap and scaling)."""
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    function = _family_eager(module)
    if function is None:
        raise ValueError(f"{type(module).__module__} has no eager_attention_forward")
    return function


def supports(lm: torch.nn.Module, inner: str) -> bool:
    """Whether a model can run blockwise with `inner` attention (eager: its family has an eager function)."""
    return inner == "sdpa" or (inner == "eager" and _family_eager(lm) is not None)


def _attention(inner: str):
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """transformers' attention function: query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D],
        None). With a plan active, the inner function blockwise (the module docstring); else the inner
        function itself."""
        function = inner_function(inner, module)
        p = _PLAN.current()
        if p is None:
            return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if query.shape[0] != 1 or query.shape[2] != p.tokens:
            raise ValueError(f"block plan of {p.tokens} tokens, got a query of shape {tuple(query.shape)}")
        g, width = p.slots.shape

        def blocks(x: torch.Tensor) -> torch.Tensor:  # [1, h, T, D] -> [G, h, Lmax, D]
            return x[0][:, p.slots].transpose(0, 1)

        mask = p.mask if inner == "sdpa" else packing.additive(p.mask, query.dtype)
        out, _ = function(module, blocks(query), blocks(key), blocks(value), mask, scaling=scaling, dropout=dropout,
                          **kwargs)  # [G, Lmax, H, D]
        return out.reshape(g * width, *out.shape[2:])[p.real][None], None  # [1, T, H, D], packed order

    return attention


def register(inner: str = "sdpa") -> str:
    """Register the blockwise form of `inner` ("sdpa" or "eager") as a transformers attention
    implementation, with transformers' masks for `inner` (used when no plan is active); its name.
    Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    name = NAMES[inner]
    AttentionInterface.register(name, _attention(inner))
    AttentionMaskInterface.register(name, {"sdpa": sdpa_mask, "eager": eager_mask}[inner])
    return name
