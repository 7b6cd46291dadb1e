"""Which attention a model runs: the one accessor of transformers' (private) attention choice, and the
engine's packed forms switched in at load (blockwise SDPA / eager, flash-attn varlen)."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig

from . import block_attention, varlen


def attention_implementation(lm: nn.Module) -> str | None:
    """The attention implementation transformers runs for a model (its config's private field: read here
    only), or None when the config does not say."""
    return getattr(lm.config, "_attn_implementation", None)


def from_pretrained_kwargs(cfg: ModelConfig, device) -> dict:
    """from_pretrained's attn_implementation (nothing: the family's default), checked against what this
    machine can train with."""
    name = cfg.attn_implementation
    if name == "flash_attention_2" and not varlen.available():
        raise ValueError("model.attn_implementation='flash_attention_2' needs flash-attn and a CUDA device "
                         "(pip install -e '.[flash]'); use 'sdpa' or 'flex_attention' otherwise")
    if name == "flex_attention" and torch.device(device).type != "cuda":
        raise ValueError("model.attn_implementation='flex_attention' needs a CUDA device (PyTorch's flex "
                         "attention has no backward on CPU); use 'sdpa' or 'eager'")
    return {} if name is None else {"attn_implementation": name}


def set_attention(lm: nn.Module, cfg: ModelConfig) -> None:
    """model.attn_implementation (None: the one transformers chose for the family), where the engine has
    its packed form switched to it: SDPA and eager -> blockwise per prompt group (engine/model/block_attention.py),
    flash-attention-2 -> flash-attn varlen (engine/model/varlen.py). Each is the inner function when nothing is
    packed. A family whose attention does not go through transformers' AttentionInterface keeps its own
    (packed with a dense mask)."""
    name = cfg.attn_implementation or attention_implementation(lm)
    own = _engine_attention(lm, name)
    if own is not None:
        try:
            lm.set_attn_implementation(own)
        except (ValueError, NotImplementedError):
            pass
        if attention_implementation(lm) == own:
            return
    if name and attention_implementation(lm) != name:
        lm.set_attn_implementation(name)


def _engine_attention(lm: nn.Module, name: str | None) -> str | None:
    """The engine's registered packed form of attention `name`, or None."""
    if name == "flash_attention_2":
        varlen.register()
        return varlen.NAME
    if name in block_attention.NAMES and block_attention.supports(lm, name):
        return block_attention.register(name)
    return None
