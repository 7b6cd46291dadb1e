"""The loss benchmark's accounting: rows and FLOPs per (case, provider, mode), percentiles and the
timing summary of a benchmark's rounds, and the bf16 matmul peak measured once per process."""
from __future__ import annotations

import torch

from bench._cases import Case
from bench._providers import ALL_ROW_PROVIDERS


def computed_tokens(case: Case, provider: str) -> int:
    """Rows whose logits the method computes: every position for naive, compile, torch-lce and
    liger (handed all positions with ignore_index, as users call them); the response tokens for
    fused, naive-response and CCE."""
    return case.tokens if provider in ALL_ROW_PROVIDERS else case.valid_tokens


def flops(case: Case, provider: str, mode: str) -> int:
    """fwd: 2*N*H*V (the logits matmul); fwdbwd: 8*N*H*V (fwd + recompute + dh + dW)."""
    per = 2 if mode == "fwd" else 8
    return per * computed_tokens(case, provider) * case.hidden * case.vocab


def flops_valid(case: Case, mode: str) -> int:
    """The same accounting over the response tokens only: the useful work, equal for every provider."""
    return (2 if mode == "fwd" else 8) * case.valid_tokens * case.hidden * case.vocab


def describe(case: Case, provider: str, mode: str) -> dict:
    return dict(
        case=case.name, provider=provider, mode=mode, device=case.device, dtype=case.dtype,
        rows=case.rows, seq=case.seq, N=case.tokens, H=case.hidden, V=case.vocab,
        response_fraction=case.response_fraction, valid_tokens=case.valid_tokens,
        computed_tokens=computed_tokens(case, provider), flop=flops(case, provider, mode),
        flop_valid=flops_valid(case, mode), temperature=case.temperature,
    )


def percentile(data, q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(data)
    if not xs:
        raise ValueError("no data")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def timing_summary(times, flop: int, flop_valid: int | None = None, peak_tflops: float | None = None) -> dict:
    """p20/p50/p80 seconds; TFLOP/s at p50 over the rows computed (tflops) and over the valid
    tokens (tflops_valid); tflops / the bf16 matmul peak measured in this session."""
    p20, p50, p80 = (percentile(times, q) for q in (20, 50, 80))
    out = dict(rounds=len(times), min_s=min(times), p20_s=p20, p50_s=p50, p80_s=p80, tflops=flop / p50 / 1e12)
    if flop_valid is not None:
        out["tflops_valid"] = flop_valid / p50 / 1e12
    if peak_tflops:
        out["peak_fraction"] = out["tflops"] / peak_tflops
        if flop_valid is not None:
            out["peak_fraction_valid"] = out["tflops_valid"] / peak_tflops
    return out


_MATMUL_PEAK: dict = {}


def bf16_matmul_peak_tflops(n: int = 8192, iters: int = 20) -> float | None:
    """Dense bf16 matmul throughput of this GPU, measured once per process: an n^3 matmul timed
    with CUDA events (median of `iters` after warm-up).  None without CUDA."""
    if not torch.cuda.is_available():
        return None
    if "tflops" not in _MATMUL_PEAK:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        _MATMUL_PEAK.update(tflops=2 * n**3 / percentile(times, 50) / 1e12, n=n, iters=iters)
        del a, b, c
        torch.cuda.empty_cache()
    return _MATMUL_PEAK["tflops"]


def matmul_peak_record() -> dict:
    """The environment fields of the bf16 matmul peak, once measured in this process ({} before)."""
    if not _MATMUL_PEAK:
        return {}
    return dict(bf16_matmul_peak_tflops=_MATMUL_PEAK["tflops"],
                bf16_matmul_peak_method=f"{_MATMUL_PEAK['n']}^3 bf16 torch.matmul, median of "
                                        f"{_MATMUL_PEAK['iters']} CUDA-event timings")
