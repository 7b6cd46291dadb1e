"""Optional Liger-Kernel layer kernels for the policy body, behind `model.liger_kernels` (default False).

    description = liger.apply(policy)   # an instantiated Hugging Face causal LM, already on its CUDA device

Liger-Kernel's Triton RMSNorm, RoPE and SwiGLU (GeGLU where that is the family's MLP) replace the
Hugging Face ones through the library's own per-family patch, `apply_liger_kernel_to_<family>(model=...)`,
chosen by `config.model_type` from its MODEL_TYPE_TO_APPLY_LIGER_FN. Liger's cross-entropy and
fused-linear-cross-entropy are always switched off: the LM head and the loss are our own fused op.

Off by default until measured: the GPU measurement (step time and peak memory against the plain body, and
the agreement of the token log-probabilities at the engine's tolerances) is still owed.

What the patch does, and so what to keep in mind when calling it:
- On the instance: each existing RMSNorm and MLP module gets Liger's forward bound to it. A deepcopy taken
  afterwards (the generation copy, the reference) keeps it; one taken before does not.
- Process-wide: the family's modeling module gets Liger's classes (every model of that family built later
  in the process, reward models included, is built with them) and Liger's rotary function in place of
  `apply_rotary_pos_emb`. The attention forward looks that name up at call time, so RoPE is covered for
  models instantiated before the call too (all of them, on any device). None of this can be undone.
"""
from __future__ import annotations

import inspect

from torch import nn

_KERNELS = ("rope", "rms_norm", "swiglu", "geglu")  # passed where the family's patch function takes them


def _on_cuda(model: nn.Module) -> bool:
    params = list(model.parameters())
    return bool(params) and all(p.device.type == "cuda" for p in params)


def apply(model: nn.Module) -> str:
    """Patch `model` in place with Liger's layer kernels; returns a one-line description for the log.
    ValueError (naming model.liger_kernels) when liger-kernel is not importable, when the model's family has
    no Liger patch, or when the model is not entirely on a CUDA device (the kernels are Triton GPU kernels)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ValueError(f"model.liger_kernels=True needs liger-kernel (pip install liger-kernel): {e}") from e
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if patch is None:
        raise ValueError(f"model.liger_kernels=True: Liger-Kernel has no patch for model_type {model_type!r}; "
                         f"supported: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
    if not _on_cuda(model):
        raise ValueError("model.liger_kernels=True needs the model on a CUDA device (Liger's kernels are Triton "
                         "GPU kernels); move it there first, or turn the option off")
    params = inspect.signature(patch).parameters
    kwargs = {name: True for name in _KERNELS if name in params}
    kwargs.update({name: False for name in params if "cross_entropy" in name})  # never Liger's head or loss
    patch(model=model, **kwargs)
    name = getattr(patch, "__name__", repr(patch))
    return (f"liger-kernel: {name}({', '.join(k for k, v in kwargs.items() if v)}) on model_type {model_type!r}, "
            "cross-entropy kernels off")
