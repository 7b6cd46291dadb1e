"""The devices a run is planned for: datasheet peaks, the measured-efficiency factors, the links, and the
CPU, whose rates are measured on the spot (a matmul and a copy, about 0.2 s).

Link speeds used (per GPU, per direction, nominal; collectives reach `comm_efficiency` of them):
- H100 / H200 SXM: NVLink 4, 450 GB/s within a node; between nodes one 400 Gb/s NDR InfiniBand NIC per
  GPU (a DGX H100/H200), 50 GB/s.
- A100 SXM: NVLink 3, 300 GB/s; one 200 Gb/s HDR NIC per GPU (a DGX A100), 25 GB/s.
- RTX A6000: PCIe 4.0 x16, 32 GB/s within a node (no NVSwitch); 100 Gb/s Ethernet per node shared by
  its GPUs, 12.5 GB/s / 8 per GPU.
`efficiency` is the fraction of the datasheet bf16 peak a large dense matmul reaches (H100/H200: 790 of
989 TFLOP/s, measured; A100, A6000: assumed until a GPU session measures them); bench/gpu_session.py's
iteration part records predicted beside measured so that a lend refits them (bench/plan_check.py).
bench/perf_model.py (the op's kernel model) reads this table.
"""
from __future__ import annotations

import dataclasses
import os
import time

GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Device:
    name: str
    bf16_tflops: float  # dense, datasheet (CPU: measured float32 matmul rate)
    hbm_tbs: float  # datasheet memory bandwidth (CPU: measured copy rate)
    atomic_tbs: float = 0.0  # float32 atomic read-modify-write throughput into HBM (estimate; the op's model)
    efficiency: float = 0.80  # large-matmul fraction of bf16_tflops (measured for H100/H200, else assumed)
    # the fraction of that matmul rate a model's passes reach (smaller and odd shapes, attention, the op's
    # tiles), training / log-prob passes and the sampler's prefill and decode steps: fitted on the CPU
    # (bench/plan_check.py --fit), 1 on GPUs until a GPU session refits them (--refit)
    pass_efficiency: float = 1.0
    generation_efficiency: float = 1.0
    launch_us: float = 5.0  # per kernel launch, host + device (the op's model)
    fp32_tflops: float = 0.0  # non-tensor-core float32 (a model.dtype float32 run on GPU)
    memory_gib: float = 0.0  # what the device has (nvidia-smi's total)
    link_gbs: float = 0.0  # intra-node bandwidth per GPU, per direction (GB/s)
    network_gbs: float = 0.0  # inter-node bandwidth per GPU, per direction (GB/s)
    comm_efficiency: float = 0.80  # fraction of the link a ring all-gather / reduce-scatter reaches (assumed)
    runtime_gib: float = 1.0  # what the process holds besides tensors: CUDA context, NCCL buffers (assumed)
    # fixed costs (microseconds) of the calls a phase makes, besides its FLOPs and bytes (OVERHEADS):
    layer_us: float = 60.0  # one decoder layer's forward call (launches, Python); a backward counts 2
    pass_us: float = 2000.0  # one micro-batch pass outside the layers (packing, the head op, the loss); bwd 2
    decode_step_us: float = 30.0  # one decode step (CUDA graph replay, sampling, bookkeeping)
    step_us: float = 1000.0  # one optimizer step's Python (AdamW over the parameter list, the scheduler)
    cuda: bool = True

    @property
    def matmul_tflops(self) -> float:
        """The measured matmul peak: what "% of peak" is measured against."""
        return self.bf16_tflops * self.efficiency

    def flops_per_s(self, dtype_bytes: int, *, generation: bool = False) -> float:
        """A model pass's FLOP/s in the compute dtype (2: bf16 tensor cores, 4: float32)."""
        peak = self.fp32_tflops * self.efficiency if (dtype_bytes == 4 and self.cuda) else self.matmul_tflops
        return peak * 1e12 * (self.generation_efficiency if generation else self.pass_efficiency)


DEVICES = {
    # H100 SXM: 989 nominal, ~790 measured on 8192^3 bf16 (docs/design.md section 6); atomics 2.5-5 TB/s.
    "h100": Device(name="H100 SXM", bf16_tflops=989.0, hbm_tbs=3.35, atomic_tbs=3.5, efficiency=0.80,
                   fp32_tflops=67.0, memory_gib=79.6, link_gbs=450.0, network_gbs=50.0),
    # H200: H100's compute, 4.8 TB/s; 769-798 TFLOP/s measured here on 8192^3 bf16 (device KINDS.md).
    "h200": Device(name="H200", bf16_tflops=989.0, hbm_tbs=4.8, atomic_tbs=5.0, efficiency=0.80, fp32_tflops=67.0,
                   memory_gib=140.4, link_gbs=450.0, network_gbs=50.0),
    # A100 SXM 80 GB: 312 dense bf16, 2.04 TB/s, NVLink 3; efficiency assumed.
    "a100": Device(name="A100 SXM 80GB", bf16_tflops=312.0, hbm_tbs=2.039, atomic_tbs=2.0, efficiency=0.80,
                   fp32_tflops=19.5, memory_gib=80.0, link_gbs=300.0, network_gbs=25.0),
    # RTX A6000: 155 dense bf16 (tensor cores, fp32 accumulate), 768 GB/s; efficiency not yet measured.
    "a6000": Device(name="RTX A6000", bf16_tflops=155.0, hbm_tbs=0.768, atomic_tbs=0.8, efficiency=0.80,
                    fp32_tflops=38.7, memory_gib=48.0, link_gbs=32.0, network_gbs=12.5 / 8),
}
KINDS = (*DEVICES, "cpu")
OVERHEADS = ("layer_us", "pass_us", "decode_step_us", "step_us")  # the order of timing.Phase.calls

# The CPU's fixed costs (OVERHEADS) and the fractions of its measured matmul rate the model's passes and the
# sampler reach, fitted by `python -m bench.plan_check --fit` on the 2-core AMD EPYC of the README (one
# thread; least squares over the phases of its four cases), and the resident memory of a process that has
# imported torch, transformers and the engine and built a run (the default case's peak RSS).
CPU_OVERHEADS_US = {"layer_us": 0.0, "pass_us": 8000.0, "decode_step_us": 500.0, "step_us": 0.0}
CPU_EFFICIENCY = {"pass_efficiency": 0.65, "generation_efficiency": 0.26}
CPU_RUNTIME_GIB = 0.43


def device(kind: str, *, threads: int | None = None) -> Device:
    """The device of a kind (see KINDS); "cpu" is measured now with `threads` torch threads."""
    if kind == "cpu":
        return measure_cpu(threads)
    if kind not in DEVICES:
        raise ValueError(f"plan.device: unknown device kind {kind!r}; known: {', '.join(KINDS)}")
    return DEVICES[kind]


def kind_of(name: str) -> str:
    """The kind of a device name as torch reports it ("NVIDIA H100 80GB HBM3" -> "h100"); "cpu" if none."""
    lowered = name.lower()
    return next((kind for kind in DEVICES if kind in lowered), "cpu")


def measure_cpu(threads: int | None = None) -> Device:
    """This CPU: float32 matmul FLOP/s (1024^3, best of 3) and copy bandwidth (64 MiB, best of 3) with
    `threads` torch threads (None: torch's current setting); its memory is the machine's RAM."""
    import torch

    saved = torch.get_num_threads()
    threads = threads or saved
    torch.set_num_threads(threads)
    try:
        a = torch.randn(1024, 1024)
        flops = 2 * 1024**3 / _best_of(lambda: a @ a)
        src = torch.empty(16 * 2**20)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() * 4 / _best_of(lambda: dst.copy_(src))  # read + write
    finally:
        torch.set_num_threads(saved)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Device(name=f"CPU ({threads} thread{'s' * (threads > 1)}, measured)",
                  bf16_tflops=flops / 1e12, hbm_tbs=bandwidth / 1e12, efficiency=1.0, memory_gib=ram,
                  link_gbs=bandwidth / 1e9 / 2, network_gbs=1.25, runtime_gib=CPU_RUNTIME_GIB, cuda=False,
                  **CPU_OVERHEADS_US, **CPU_EFFICIENCY)


def _best_of(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
