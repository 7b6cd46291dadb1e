"""Every dtype decision of a run, made once from `model.dtype` and the process layout.

- Trained parameters, their gradients and the optimizer state are float32 (master weights).
- Sharded runs on GPU with a bf16 compute dtype: FSDP2's MixedPrecisionPolicy (params gathered in bf16,
  gradients reduced in float32).
- One unsharded GPU process with a bf16 compute dtype: the policy's forward runs under torch.autocast
  and the frozen reference is held in bf16 outright.
- Generation runs on a separate copy in the compute dtype, except for one unsharded float32 process
  (without activation checkpointing), which generates with the trained module itself.
- On CPU, training computes in float32 whatever `model.dtype` says (only the generation copy follows it).
"""
from __future__ import annotations

import dataclasses

import torch

from .parallel import Dist


@dataclasses.dataclass(frozen=True)
class Precision:
    compute_dtype: torch.dtype  # model.dtype
    autocast_dtype: torch.dtype | None  # the policy's forward under torch.autocast (one unsharded GPU process)
    fsdp_param_dtype: torch.dtype | None  # FSDP2 MixedPrecisionPolicy param dtype (sharded GPU runs)
    separate_inference_copy: bool  # generate on a copy (in compute_dtype) rather than the trained module

    @property
    def reference_dtype(self) -> torch.dtype | None:
        """The frozen reference's parameter dtype when it differs from float32 (None: keep float32)."""
        return self.autocast_dtype

    def fsdp_policy(self):
        """FSDP2's MixedPrecisionPolicy, or None (full precision)."""
        if self.fsdp_param_dtype is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.fsdp_param_dtype, reduce_dtype=torch.float32)


def decide(dtype: str, d: Dist, *, activation_checkpointing: bool) -> Precision:
    """The run's precision from the configured compute dtype name ("float32" | "bfloat16")."""
    compute = getattr(torch, dtype)
    low = compute != torch.float32
    gpu = d.device.type == "cuda"
    return Precision(
        compute_dtype=compute,
        autocast_dtype=compute if (low and gpu and not d.sharded) else None,
        fsdp_param_dtype=compute if (low and gpu and d.sharded) else None,
        separate_inference_copy=d.sharded or low or activation_checkpointing,
    )
