"""The one tile table of the Triton kernels: TileConfig per (GPU generation, kind of launch).

Kinds: "fwd" and "bwd" (the token log-probability kernels, rebel_kernels/logprobs/triton_kernels.py)
and "sample" (the Gumbel-max sampler, rebel_kernels/gumbel/triton_kernels.py). No triton import
here: the table is plain data, read by the launchers when they run.
"""
from __future__ import annotations

import dataclasses

import torch

from ._backend import interpreting


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_v: int = 0  # forward and sampling: vocabulary columns per split (a multiple of block_n)
    group_m: int = 8  # backward: token blocks that share the L2-resident vocab tiles


# Tiles per (GPU generation, kind). Chosen for bf16/fp16; float32 halves block_k.
#
# Sampling runs on few rows (a decode batch), so its vocabulary splits are much smaller than the
# log-probability forward's: V / SPLIT_V programs per row block must fill the GPU on their own
# (V = 50k: ~200 programs; V = 128k: ~500). GPU "sample" entries are untuned first guesses.
_TABLE = {
    "interpret": {
        "fwd": TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, split_v=64),
        "bwd": TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, group_m=2),
        "sample": TileConfig(block_m=32, block_n=32, block_k=16, num_warps=1, num_stages=1, split_v=64),
    },
    "sm90": {
        "fwd": TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4, split_v=8192),
        "bwd": TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, group_m=8),
        "sample": TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, split_v=256),
    },
    "sm80": {  # A100 / A6000 (sm_86 has ~100 KB shared memory per block)
        "fwd": TileConfig(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=3, split_v=8192),
        "bwd": TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2, group_m=8),
        "sample": TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3, split_v=256),
    },
}
KINDS = ("fwd", "bwd", "sample")


def tile_config(kind: str, device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The tiles of launch `kind` for tensors of `dtype` on `device` (the interpreter's outside CUDA)."""
    if kind not in KINDS:
        raise ValueError(f"tile kind must be one of {KINDS}, got {kind!r}")
    if interpreting() or device.type != "cuda":
        return _TABLE["interpret"][kind]
    major, _ = torch.cuda.get_device_capability(device)
    cfg = _TABLE["sm90" if major >= 9 else "sm80"][kind]
    if dtype == torch.float32:
        cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2, num_stages=max(2, cfg.num_stages - 1))
    return cfg
