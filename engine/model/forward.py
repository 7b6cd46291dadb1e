"""The transformer body's forward for training, packed or padded (docs/design.md, "Packing").

A packed micro-batch (engine/model/packing.py: the layout) reaches the body with its attention in the
form the model's attention implementation takes: the engine's own functions (blockwise SDPA or eager,
engine/model/block_attention.py; flash-attn varlen, engine/model/varlen.py) read a plan and get no mask,
transformers' get the mask (a 4-D bool mask for SDPA, an additive float mask for eager, a flex-attention
BlockMask). The padded path is the unpacked computation. `checkpoint_contexts` makes a checkpointed
layer recompute under the plan of its forward; `incompatibility` finds, at load, the families whose
packed forward is not exact.
"""
from __future__ import annotations

import contextlib

import torch

from . import block_attention, packing, varlen
from .attention import attention_implementation


def body(lm, layout: packing.Layout, dtype: torch.dtype) -> torch.Tensor:
    """The transformer body's last hidden states [1, T, H] of a packed layout, under the model's attention
    implementation: the engine's own (blockwise SDPA or eager, `engine/model/block_attention.py`; flash-attn varlen,
    `engine/model/varlen.py`) take a plan and no mask, transformers' take the mask (`attention_mask`)."""
    implementation = attention_implementation(lm) or "eager"
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
    plans = ((block_attention, block_attention.current()), (varlen, varlen.current()))

    @contextlib.contextmanager
    def recompute():
        with contextlib.ExitStack() as stack:
            for module, plan in plans:
                if plan is not None:
                    stack.enter_context(module.active(plan))
            yield

    return contextlib.nullcontext(), recompute()


def attention_mask(layout: packing.Layout, implementation: str, dtype: torch.dtype):
    """The packed mask for transformers' `attention_mask` argument: a 4-D [1, 1, T, T] bool mask for
    SDPA (True: attend), a BlockMask for flex attention, an additive float mask (0 / dtype min) for eager
    and any other implementation that adds the mask to the scores."""
    if implementation == "flex_attention":
        return block_mask(layout)
    allowed = layout.allowed()[None, None]
    return allowed if implementation == "sdpa" else packing.additive(allowed, dtype)


def block_mask(layout: packing.Layout):
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
    total = min(8, packing.sliding_window(lm.config) or 8)  # every probe sequence within the window
    prompts = (max(1, total // 2), max(1, total // 2 - 1))
    responses = (max(1, total - total // 2), max(1, total // 2))
    device = lm.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    vocab = lm.get_input_embeddings().weight.shape[0]
    p, n = max(prompts), max(responses)
    ids = torch.randint(0, vocab, (4, p + n), generator=g)
    mask = torch.zeros(4, p + n, dtype=torch.long)
    labels = torch.full((4, n), packing.IGNORE)
    for row in range(4):  # rows s * 2 + i: sample s of prompt i; the second sample one token shorter
        i, s = row % 2, row // 2
        length, resp = prompts[i], max(1, responses[i] - s)
        ids[row, :p] = ids[i, :p]
        mask[row, p - length : p + resp] = 1
        labels[row, :resp] = ids[row, p : p + resp]
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    layout = packing.pack(ids, mask, labels, samples=2)
    packed = body(lm, layout, lm.get_input_embeddings().weight.dtype)[0, layout.source]
    padded = padded_body(lm, ids, mask, n)[layout.rows, layout.cols]
    packed, padded = packed.float(), padded.float()
    return ((packed - padded).norm(dim=-1) / padded.norm(dim=-1).clamp_min(1e-12)).max().item()
