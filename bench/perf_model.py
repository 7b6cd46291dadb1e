"""A performance model of the fused op: FLOPs, HBM bytes, atomic bytes and launches of each kernel at a
shape, and the time it predicts on a device from datasheet peaks and one measured-efficiency factor.

    python -m bench.perf_model                       # the table of the README (old vs new backward)
    python -m bench.perf_model --tokens 16384 --model llama3_8b --device h100

Each kernel's time is a roofline: max(FLOPs / (peak x efficiency), HBM bytes / bandwidth, atomic bytes /
atomic throughput) plus its launches. `efficiency` is the fraction of the datasheet bf16 peak a large
dense matmul reaches on the device (H100/H200: 790 of 989 TFLOP/s, measured; A6000: assumed 0.8 until
measured); "% of matmul peak" is the op's useful FLOPs over its time, against that measured peak.
The HBM traffic of a tiled matmul counts each operand once per tile row / column group (GROUP_M
supergrouping keeps about `L2_REUSE` tiles of the other operand in L2): an estimate, to be replaced by
measurement, that decides whether a kernel sits near the ridge, not its FLOP time.

Kernels modelled (rebel_kernels/logprobs/triton_kernels.py):
- forward: the split-vocab partial kernel (logits tile on chip, online log-sum-exp) and its combine;
- backward "atomic" (the first design): one program per (token block, vocab tile) recomputes the
  logits tile and adds [BLOCK_M, H] float32 blocks into d hidden and d weight with atomics;
- backward "gemm" (the redesign): per chunk, a kernel recomputes the logits tile and stores d logits
  (dz, rounded once to the compute dtype), then two dense GEMMs. Deterministic: no atomics. The
  [N, V] walk is the op's own plan (rebel_kernels/logprobs/plan.py): token blocks x vocab chunks
  within a 256 MiB working budget, the pair with the least float32 accumulator traffic (d hidden per
  vocab chunk, d weight per token block); split="tokens" or "vocab" forces one orientation.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

from engine.plan.devices import DEVICES as ALL_DEVICES
from engine.plan.devices import Device
from rebel_kernels.logprobs import plan as plan_mod

L2_REUSE = 8  # tiles of the other operand served from L2 per HBM read (GROUP_M supergrouping)
MIB = 2**20


# The datasheet figures and measured-efficiency factors live with the run planner (engine/plan/devices.py),
# which models a whole iteration on the same devices; this model covers the op's kernels.
DEVICES = {kind: dev for kind, dev in ALL_DEVICES.items() if kind in ("h100", "h200", "a6000")}


MODELS = {  # LM head shapes (H, V)
    "llama3_8b": (4096, 128256),
    "qwen2_5_7b": (3584, 152064),
    "gemma2_2b": (2304, 256000),
    "pythia_2_8b": (2560, 50304),
}


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    split_v: int = 8192  # forward: vocab columns per partial program


SM90 = Tiles()


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    hbm_bytes: float
    atomic_bytes: float = 0.0
    launches: int = 1

    def seconds(self, dev: Device) -> float:
        compute = self.flops / (dev.bf16_tflops * dev.efficiency * 1e12)
        memory = self.hbm_bytes / (dev.hbm_tbs * 1e12)
        atomics = self.atomic_bytes / (dev.atomic_tbs * 1e12)
        return max(compute, memory, atomics) + self.launches * dev.launch_us * 1e-6


def _matmul_bytes(m: int, n: int, k: int, in_bytes: int, out_bytes: float, bm: int, bn: int) -> float:
    """HBM traffic of an [m, k] x [k, n] tiled matmul: each operand re-read once per L2 group of the
    other's tiles, the output written once (out_bytes per element; 2x for read-modify-write)."""
    a = m * k * in_bytes * math.ceil(n / (bn * L2_REUSE))
    b = n * k * in_bytes * math.ceil(m / (bm * L2_REUSE))
    return a + b + m * n * out_bytes


def forward(n: int, h: int, v: int, dtype_bytes: int = 2, tiles: Tiles = SM90) -> list[Kernel]:
    splits = math.ceil(v / tiles.split_v)
    partial = Kernel("fwd partial (logits tile + online LSE)", 2.0 * n * h * v,
                     _matmul_bytes(n, v, h, dtype_bytes, 0, tiles.block_m, tiles.block_n) + n * splits * 12)
    combine = Kernel("fwd combine", 0.0, n * splits * 12 + n * 8)
    return [partial, combine]


def backward_atomic(n: int, h: int, v: int, dtype_bytes: int = 2, tiles: Tiles = SM90) -> list[Kernel]:
    """Each of the (N / BLOCK_M) x (V / BLOCK_N) programs adds a [BLOCK_M, H] float32 block into d hidden
    and another into d weight: 2 * programs * BLOCK_M * H * 4 bytes of atomic read-modify-write."""
    programs = math.ceil(n / tiles.block_m) * math.ceil(v / tiles.block_n)
    atomic = 2.0 * programs * tiles.block_m * h * 4
    reads = _matmul_bytes(n, v, h, dtype_bytes, 0, tiles.block_m, tiles.block_n)
    return [Kernel("bwd atomic (recompute + dz + atomics)", 6.0 * n * h * v, reads, atomic_bytes=atomic)]


def gemm_plan(n: int, h: int, v: int, dtype_bytes: int = 2, dz_budget: int = plan_mod.BUDGET_BYTES,
              split: str = "auto", tiles: Tiles = SM90) -> plan_mod.GemmPlan:
    """The op's own plan (rebel_kernels/logprobs/plan.py): token blocks x vocab chunks, every row a
    response token (no gather)."""
    planner = plan_mod.Planner(block_m=tiles.block_m, block_n=tiles.block_n, budget=dz_budget)
    return planner.plan(n, v, h, dtype_bytes, gather=False, split=split)


def backward_gemm(n: int, h: int, v: int, dtype_bytes: int = 2, tiles: Tiles = SM90,
                  dz_budget: int = plan_mod.BUDGET_BYTES, split: str = "auto") -> list[Kernel]:
    walk = gemm_plan(n, h, v, dtype_bytes, dz_budget, split, tiles=tiles)
    blocks, vchunks = walk.chunks(n, v)
    launches = blocks * vchunks
    bm, bn = tiles.block_m, tiles.block_n
    dz = Kernel("bwd dz (recompute logits, store dz)", 2.0 * n * h * v,
                _matmul_bytes(n, v, h, dtype_bytes, dtype_bytes, bm, bn), launches=launches)
    dh_out = 8 if vchunks > 1 else 4  # the block's float32 accumulator: read + written per chunk, or written
    dw_out = 8 if blocks > 1 else 4  # the float32 d weight: read + written per block, or written once
    dh = blocks * vchunks * _matmul_bytes(walk.tokens, h, walk.vocab, dtype_bytes, dh_out, bm, bn)
    dw = blocks * vchunks * _matmul_bytes(walk.vocab, h, walk.tokens, dtype_bytes, dw_out, bm, bn)
    return [dz, Kernel("bwd d hidden GEMM", 2.0 * n * h * v, dh, launches=launches),
            Kernel("bwd d weight GEMM", 2.0 * n * h * v, dw, launches=launches)]


def gemm_memory_bytes(n: int, h: int, v: int, dtype_bytes: int = 2, dz_budget: int = plan_mod.BUDGET_BYTES,
                      split: str = "auto") -> dict:
    """Op memory of the backward beyond the inputs: d hidden, d weight (float32), what the plan holds
    within its budget (dz, the block's float32 d hidden and its cast, d-bias partials), the lse."""
    walk = gemm_plan(n, h, v, dtype_bytes, dz_budget, split)
    return {"d_hidden": n * h * dtype_bytes, "d_weight_fp32": v * h * 4,
            "budgeted": walk.memory_bytes(h, dtype_bytes, gather=False), "lse": n * 4}


def predict(kernels: list[Kernel], dev: Device, useful_flops: float) -> dict:
    t = sum(k.seconds(dev) for k in kernels)
    return {"ms": t * 1e3, "tflops": useful_flops / t / 1e12, "fraction_of_matmul_peak": useful_flops / t / 1e12
            / dev.matmul_tflops, "atomic_gb": sum(k.atomic_bytes for k in kernels) / 1e9,
            "hbm_gb": sum(k.hbm_bytes for k in kernels) / 1e9, "launches": sum(k.launches for k in kernels)}


def backward_table(n: int, model: str, device: str, dtype_bytes: int = 2) -> dict:
    """Old (atomic) vs new (gemm) backward at one shape: predicted time, TFLOP/s, fraction of peak."""
    h, v = MODELS[model]
    dev = DEVICES[device]
    useful = 6.0 * n * h * v  # recompute + d hidden + d weight
    atomic_lo = dataclasses.replace(dev, atomic_tbs=2.5)
    return {"tokens": n, "model": model, "device": dev.name, "floor_ms": useful / (dev.matmul_tflops * 1e12) * 1e3,
            "atomic": predict(backward_atomic(n, h, v, dtype_bytes), dev, useful),
            "atomic_slow_atomics": predict(backward_atomic(n, h, v, dtype_bytes), atomic_lo, useful),
            "gemm_tokens": predict(backward_gemm(n, h, v, dtype_bytes, split="tokens"), dev, useful),
            "gemm": predict(backward_gemm(n, h, v, dtype_bytes), dev, useful),
            "gemm_plan": dataclasses.asdict(gemm_plan(n, h, v, dtype_bytes)),
            "gemm_memory_mib": {k: b / MIB for k, b in gemm_memory_bytes(n, h, v, dtype_bytes).items()}}


def readme_rows(devices=("h100", "h200", "a6000"), tokens=(2048, 8192, 16384, 32768)) -> list[dict]:
    rows = []
    for device in devices:
        for model in MODELS:
            for n in tokens:
                rows.append(backward_table(n, model, device))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192, 16384, 32768])
    p.add_argument("--model", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", nargs="*", default=["h100", "h200", "a6000"], choices=list(DEVICES))
    a = p.parse_args(argv)
    print("| device | head | N | floor ms | atomic ms (% peak) | atomic GB | gemm by tokens ms (% peak) "
          "| gemm ms (% peak) | token block x vocab chunk | extra MiB over dh + dW |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for device in a.device:
        for model in a.model:
            for n in a.tokens:
                r = backward_table(n, model, device)
                at, gt, ge = r["atomic"], r["gemm_tokens"], r["gemm"]
                mem = r["gemm_memory_mib"]
                extra = mem["budgeted"] + mem["lse"]
                plan = r["gemm_plan"]
                print(f"| {r['device']} | {model} | {n} | {r['floor_ms']:.1f} | {at['ms']:.1f} "
                      f"({100 * at['fraction_of_matmul_peak']:.0f}%) | {at['atomic_gb']:.0f} | {gt['ms']:.1f} "
                      f"({100 * gt['fraction_of_matmul_peak']:.0f}%) | {ge['ms']:.1f} "
                      f"({100 * ge['fraction_of_matmul_peak']:.0f}%) | {plan['tokens']} x {plan['vocab']} "
                      f"| {extra:.0f} |")


if __name__ == "__main__":
    main()
