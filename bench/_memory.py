"""Peak memory of one call of an op.

CUDA: in process, torch.cuda peak statistics.  op_peak_bytes = peak allocated during the call
minus what was allocated just before it (inputs, parameters); abs_peak_bytes = the peak itself.

CPU: in a fresh Python process (one per measurement), so that nothing the benchmark process
did before (other providers, allocator caches) is counted.  The child runs a warm-up (`WARMUPS`;
by default "torch": one tiny forward + backward of plain PyTorch ops, which loads the thread
pools, the autograd engine and BLAS but nothing of the provider, so what the provider's first call
imports -- torch._dynamo with sympy is ~140 MiB resident -- is counted; "op": one tiny call of the
provider itself, which leaves that out; "none"), builds the inputs, reads its current RSS
from /proc/self/statm (the baseline: inputs allocated, before the first call at this shape), then
runs the op twice, dropping each call's output, and reads its peak RSS:
op_peak_bytes = peak RSS over both calls - the baseline.  Counting from before the first call
(not the growth during the second one) keeps whatever the first call left resident (caches,
heap that was not returned) in the number.  The second, warm call is timed (warm_call_s).
grad_bytes is the size of what one call returns (the gradients of hidden and weight, or the
log-probabilities), which op_peak_bytes includes.

Peak RSS is the kernel's per-process high-water mark (VmHWM in /proc/self/status, reset to the
current RSS just before the op through /proc/self/clear_refs).  getrusage's ru_maxrss reads
the same counter but is never reset, and across fork+exec it inherits the *parent's* peak (a
child of a 1.5 GB pytest process starts with ru_maxrss = 1.5 GB), so it is used only as a
fallback where /proc is missing, and reported alongside as ru_maxrss_bytes.

The child runs with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB (unless the caller's
environment sets it): every block of 1 MiB or more is then mmap'ed and returned to the system
when freed, so RSS follows the live tensors.  With glibc's default, the threshold grows with the
first freed block (up to 32 MiB) and later tiles of that size stay in the heap after free: the
chunked fused path then shows ~3x its live peak as RSS growth (measured: 244 vs 72 MiB for
the CPU acceptance forward), an allocator artefact that depends on call history.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

MMAP_THRESHOLD = 1 << 20  # glibc MALLOC_MMAP_THRESHOLD_ in the measuring child, see above
WARMUPS = ("torch", "op", "none")  # what the measuring child runs before the inputs are built, see above
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm (second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def ru_maxrss_bytes() -> int:
    """getrusage peak RSS (kilobytes on Linux). Inherited across fork+exec: see the module doc."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM), or ru_maxrss where /proc lacks it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_rss_growth(fn) -> dict:
    """Run fn() once in this process and return the RSS growth it caused (see the module doc).
    Call it in a fresh process after the inputs are built and fn's libraries are loaded."""
    gc.collect()
    before = current_rss_bytes()
    maxrss_before = ru_maxrss_bytes()
    hwm_reset = reset_peak_rss()
    out = fn()
    peak = peak_rss_bytes() if hwm_reset else ru_maxrss_bytes()
    del out
    return dict(
        op_peak_bytes=max(0, peak - before), abs_peak_bytes=peak, rss_before_bytes=before,
        ru_maxrss_bytes=ru_maxrss_bytes(), ru_maxrss_before_bytes=maxrss_before,
        peak_source="VmHWM" if hwm_reset else "ru_maxrss",
    )


def measure_cpu_op_memory(case_name: str, provider: str, mode: str, *, warmup: str = "torch",
                          timeout: float = 1800) -> dict:
    """Peak RSS of two calls of (case, provider, mode) above the RSS before the first, measured in a
    fresh Python process (`case_name`: a name in bench/_cases.py, or a JSON object of Case fields)
    after the warm-up `warmup` (one of WARMUPS, see the module doc)."""
    from bench._environment import REPO_ROOT

    if warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, "-m", "bench._memory", case_name, provider, mode, warmup],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rss_two_calls(step) -> dict:
    """Peak RSS over a first and a second call of step() above the RSS before the first (see the
    module doc); the second call is timed.  Call it in a fresh process after the inputs are built."""
    gc.collect()
    before = current_rss_bytes()
    maxrss_before = ru_maxrss_bytes()
    hwm_reset = reset_peak_rss()
    t0 = time.perf_counter()
    out = step()
    first_s = time.perf_counter() - t0
    out_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple | list) else (out,)))
    del out
    t0 = time.perf_counter()
    out = step()
    warm_s = time.perf_counter() - t0
    peak = peak_rss_bytes() if hwm_reset else ru_maxrss_bytes()
    del out
    return dict(
        op_peak_bytes=max(0, peak - before), abs_peak_bytes=peak, rss_before_bytes=before,
        ru_maxrss_bytes=ru_maxrss_bytes(), ru_maxrss_before_bytes=maxrss_before,
        peak_source="VmHWM" if hwm_reset else "ru_maxrss", grad_bytes=out_bytes,
        first_call_s=first_s, warm_call_s=warm_s, calls=2, counted_from="before the first call",
    )


def _child_main(argv) -> None:
    from bench._cases import CASES_BY_NAME, Case, input_bytes, make_inputs
    from bench._providers import make_step

    case_name, provider, mode, warmup = argv
    # A case name, or a JSON object of Case fields (a shape outside bench/_cases.py's CASES).
    case = Case(**json.loads(case_name)) if case_name.startswith("{") else CASES_BY_NAME[case_name]
    grad = mode == "fwdbwd"
    # The tiny case: same dtype and H as the case; 2 rows of 4 positions, a small vocab.
    tiny = dataclasses.replace(case, rows=2, seq=4, vocab=min(case.vocab, 256))
    if warmup == "op":
        make_step(provider, mode, make_inputs(tiny, requires_grad=grad), case.device, temperature=case.temperature)()
    elif warmup == "torch":
        _plain_torch_warmup(make_inputs(tiny, requires_grad=True))
    inputs = make_inputs(case, requires_grad=grad)
    step = make_step(provider, mode, inputs, case.device, temperature=case.temperature)
    result = measure_rss_two_calls(step)
    result["input_bytes"] = input_bytes(inputs)
    result["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    result["torch_num_threads"] = torch.get_num_threads()
    result["warmup"] = warmup
    print(json.dumps(result))


def _plain_torch_warmup(inputs: dict) -> None:
    """One tiny forward + backward of plain PyTorch ops (matmul, log-softmax, gather, backward) on the
    tiny case's inputs: thread pools, BLAS and the autograd engine loaded, nothing of any provider."""
    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    logits = h.reshape(-1, h.shape[-1]) @ w.T
    logits.float().log_softmax(-1).gather(1, y.reshape(-1, 1).clamp(min=0)).sum().backward()


def measure_cuda_op_memory(step) -> dict:
    """Peak CUDA memory of one call of step() above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    del out
    return dict(op_peak_bytes=peak - before, abs_peak_bytes=peak, allocated_before_bytes=before,
                reserved_peak_bytes=reserved, peak_source="torch.cuda.max_memory_allocated")


if __name__ == "__main__":  # python -m bench._memory CASE PROVIDER MODE: the child of measure_cpu_op_memory
    _child_main(sys.argv[1:])
