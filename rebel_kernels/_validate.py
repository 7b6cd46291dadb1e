"""Argument checks of every public function (all ops). Every message names the argument and its bad
value. `positive_finite` is public as `rebel_kernels.positive_finite`."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
SAMPLING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # logits of sample_logits


def tensor(name: str, value, *, floating: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype {FLOAT_DTYPES}, got {value.dtype}")


def positive_finite(name: str, value) -> float:
    """`value` as a float if it is a real number, finite and > 0; else TypeError / ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def logit_transforms(logit_scale, softcap) -> tuple[float, float | None]:
    """The LM head's final transforms: logit_scale finite and > 0, softcap None (off) or finite and > 0.
    Returns them as (float, float or None)."""
    logit_scale = positive_finite("logit_scale", logit_scale)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a real number or None (off), got {softcap!r}")
        softcap = positive_finite("softcap", softcap)
    return logit_scale, softcap


def unshard(name: str, value):
    """A DTensor weight must be gathered by the caller: a shard would silently give wrong logits."""
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        return value  # plain: no need to import torch.distributed.tensor (and sympy) to know it
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # torch built without distributed
        return value
    if isinstance(value, DTensor):
        if all(isinstance(p, Replicate) for p in value.placements):
            return value.to_local()
        raise ValueError(
            f"{name} is a DTensor sharded as {value.placements}; pass the gathered weight, e.g. call the "
            f"op inside the FSDP-wrapped module's forward with `self.lm_head.weight`, or use "
            f"`{name}.full_tensor()`"
        )
    return value


def token_inputs(hidden, weight, labels, bias, temperature, ignore_index) -> float:
    """Shape, dtype and device checks shared by both ops. Returns the temperature as a float."""
    tensor("hidden", hidden, floating=True)
    tensor("weight", weight, floating=True)
    tensor("labels", labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's H={weight.shape[1]}, got hidden shape {tuple(hidden.shape)}"
        )
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if labels.numel() == 0:
        raise ValueError(f"empty batch: labels has shape {tuple(labels.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocabulary: shape {tuple(weight.shape)}")
    same_device("weight", weight, hidden)
    same_device("labels", labels, hidden)
    head_bias(bias, weight, hidden)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return positive_finite("temperature", temperature)


def same_device(name: str, value: torch.Tensor, hidden: torch.Tensor) -> None:
    if value.device != hidden.device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")


def head_bias(bias, weight: torch.Tensor, hidden: torch.Tensor) -> None:
    """The optional LM head bias: None, or [V] of hidden's dtype and device."""
    if bias is not None:
        tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
        same_device("bias", bias, hidden)


def generator_on(generator, name: str, value: torch.Tensor) -> None:
    """None, or a torch.Generator on the device of `value` (the tensor called `name`)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        gdev = generator.device
        same = gdev.type == value.device.type and (
            gdev.index is None or value.device.index is None or gdev.index == value.device.index
        )
        if not same:
            raise ValueError(f"generator is on {gdev} but {name} is on {value.device}")


def hidden_sample_inputs(hidden, weight, bias, temperature, generator) -> float:
    """Checks of `sample_from_hidden` (Gumbel-max sampling). Returns the temperature as a float."""
    tensor("hidden", hidden, floating=True)
    tensor("weight", weight, floating=True)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [R, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's H={weight.shape[1]}, got hidden shape {tuple(hidden.shape)}"
        )
    if hidden.shape[0] == 0:
        raise ValueError(f"hidden must have at least one row, got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has an empty vocabulary: shape {tuple(weight.shape)}")
    same_device("weight", weight, hidden)
    head_bias(bias, weight, hidden)
    generator_on(generator, "hidden", hidden)
    return positive_finite("temperature", temperature)


def logits_sample_inputs(logits, temperature, top_k, top_p, generator) -> tuple[float, int, float]:
    """Checks of `sample_logits` (temperature, top-k, top-p). Returns (temperature, top_k, top_p)."""
    tensor("logits", logits)
    if logits.dtype not in SAMPLING_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [R, V], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if rows == 0 or vocab == 0:
        raise ValueError(f"logits must have at least one row and one column, got shape {tuple(logits.shape)}")
    temperature = positive_finite("temperature", temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    if not 0 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [0, {vocab}] (0 = off, {vocab} = vocabulary size), got {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise TypeError(f"top_p must be a real number, got {top_p!r}")
    if not 0 < top_p <= 1:  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    generator_on(generator, "logits", logits)
    return temperature, int(top_k), float(top_p)


def loss_inputs(hidden, labels, old_logprobs, rewards, eta, reduction) -> float:
    """Checks specific to the paired loss (after `token_inputs`). Returns eta as a float."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [2B, T, H], got shape {tuple(hidden.shape)}")
    rows, t = labels.shape
    if rows % 2:
        raise ValueError(f"hidden must have an even number of rows 2B (pairs i, B+i), got {rows}")
    tensor("old_logprobs", old_logprobs, floating=True)
    tensor("rewards", rewards, floating=True)
    if tuple(old_logprobs.shape) not in ((rows, t), (rows,)):
        raise ValueError(
            f"old_logprobs must have shape ({rows}, {t}) or ({rows},), got {tuple(old_logprobs.shape)}"
        )
    if tuple(rewards.shape) != (rows,):
        raise ValueError(f"rewards must have shape ({rows},), got {tuple(rewards.shape)}")
    same_device("old_logprobs", old_logprobs, hidden)
    same_device("rewards", rewards, hidden)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return positive_finite("eta", eta)


# Value checks: they read the data (a device sync), so the ops run them in eager code before any
# kernel, which keeps them active under torch.compile too.
def label_values(labels: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index, got {value}")


def finite_values(name: str, value: torch.Tensor, where: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(value)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite, got {value[bad][0].item()}")
