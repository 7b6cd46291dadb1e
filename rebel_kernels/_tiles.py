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


# Tiles per (GPU generation, kind) for bf16/fp16, and float32's own GPU entries below.
#
# Sampling runs on few rows (a decode batch), so its vocabulary splits are much smaller than the
# log-probability forward's: V / SPLIT_V programs per row block must fill the GPU on their own
# (V = 50k: ~200 programs; V = 128k: ~500). GPU "sample" entries are untuned first guesses.
#
# Every GPU entry compiles without register spills for sm_90, sm_80 and sm_86 on the default paths,
# in every dtype and constexpr variant the launchers produce (bench/compile_check.py compiles them
# without a GPU; it reports what still spills off those paths, e.g. float32 with TMA). The
# Gumbel sampler, Philox noise beside its accumulator, takes 8 warps (with 4: 255 registers and 0.5 to
# 0.9 KB spilled per thread on sm_90, tens of bytes on sm_80 with bias and softcap), so does the sm80
# forward (4 spilled with bias, softcap and entropy), and the sm90 forward has 3 stages (4: 255
# registers, spills with entropy). Chosen by compiling, not by timing: which spill-free candidate is
# fastest is still to be measured on a GPU.
_TABLE = {
    "interpret": {
        "fwd": TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, split_v=64),
        "bwd": TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, group_m=2),
        "sample": TileConfig(block_m=32, block_n=32, block_k=16, num_warps=1, num_stages=1, split_v=64),
    },
    "sm90": {
        "fwd": TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, split_v=8192),
        "bwd": TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, group_m=8),
        "sample": TileConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=4, split_v=256),
    },
    "sm80": {  # A100 / A6000 (sm_86 has ~100 KB shared memory per block)
        "fwd": TileConfig(block_m=128, block_n=64, block_k=32, num_warps=8, num_stages=3, split_v=8192),
        "bwd": TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2, group_m=8),
        "sample": TileConfig(block_m=64, block_n=64, block_k=32, num_warps=8, num_stages=3, split_v=256),
    },
}
# float32 inputs take exact products (input_precision "ieee"): their dots run on FMA, not on tensor
# cores, with operand fragments held in registers, so they get their own GPU entries: 8 warps, a
# quarter of the bf16 block_k and 64-row blocks on sm_90 (128 x 128 x 32 spilled, and 12-18 KB per
# thread with TMA weight loads), half the bf16 block_k on sm_80.
_FLOAT32 = {
    "sm90": {
        "fwd": TileConfig(block_m=64, block_n=128, block_k=16, num_warps=8, num_stages=3, split_v=8192),
        "bwd": TileConfig(block_m=64, block_n=128, block_k=16, num_warps=8, num_stages=2, group_m=8),
        "sample": TileConfig(block_m=64, block_n=128, block_k=16, num_warps=8, num_stages=3, split_v=256),
    },
    "sm80": {
        "fwd": TileConfig(block_m=128, block_n=64, block_k=16, num_warps=8, num_stages=2, split_v=8192),
        "bwd": TileConfig(block_m=64, block_n=64, block_k=16, num_warps=8, num_stages=2, group_m=8),
        "sample": TileConfig(block_m=64, block_n=64, block_k=16, num_warps=8, num_stages=2, split_v=256),
    },
}
KINDS = ("fwd", "bwd", "sample")


def tile_config_for(kind: str, major: int, dtype: torch.dtype) -> TileConfig:
    """The tiles of launch `kind` for tensors of `dtype` on a CUDA GPU of compute capability `major`.x
    (9 and up: the "sm90" entries, else "sm80"; float32's from _FLOAT32). Needs no GPU:
    bench/compile_check.py compiles each kernel for a target with these tiles."""
    if kind not in KINDS:
        raise ValueError(f"tile kind must be one of {KINDS}, got {kind!r}")
    generation = "sm90" if major >= 9 else "sm80"
    return (_FLOAT32 if dtype == torch.float32 else _TABLE)[generation][kind]


def tile_config(kind: str, device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The tiles of launch `kind` for tensors of `dtype` on `device` (the interpreter's outside CUDA)."""
    if kind not in KINDS:
        raise ValueError(f"tile kind must be one of {KINDS}, got {kind!r}")
    if interpreting() or device.type != "cuda":
        return _TABLE["interpret"][kind]
    major, _ = torch.cuda.get_device_capability(device)
    return tile_config_for(kind, major, dtype)
