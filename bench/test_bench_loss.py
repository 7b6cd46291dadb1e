"""fused_rebel_loss / fused_token_logprobs vs naive PyTorch, torch.compile, torch's
linear_cross_entropy, Liger-Kernel and Cut Cross-Entropy: time (pytest-benchmark) and peak memory.

    python -m pytest bench/ -q                                   # CPU: tiny shapes, quick
    REBEL_BENCH_MODELS=llama3_8b python -m pytest bench/ -q      # CUDA: one LM head's shapes only
    REBEL_BENCH_FULL=1 python -m pytest bench/ -q -m slow        # CPU acceptance shape
    REBEL_BENCH_SAVE=1 python -m pytest bench/                   # + bench/results/<device>_<date>_loss.json
    python -m bench.report [--plots]                             # markdown tables (+ PNG plots)

Each benchmark's numbers are in benchmark.extra_info (pytest-benchmark's own --benchmark-json
carries them too) and in the rows the session saves.  See bench/_cases.py for the shapes,
bench/_providers.py for the providers, bench/_accounting.py for the FLOP accounting and
bench/_memory.py for how memory is measured.
"""
from __future__ import annotations

import gc

import pytest
import torch

from bench._accounting import bf16_matmul_peak_tflops, describe, timing_summary
from bench._cases import CASES, Case, input_bytes, make_inputs, skip_reason
from bench._memory import measure_cpu_op_memory, measure_cuda_op_memory
from bench._providers import (
    MODES,
    OURS,
    PROVIDERS,
    check_provider,
    fused_ops,
    liger_scaled_impl,
    make_step,
    naive_rebel_loss,
    naive_token_logprobs,
    provider_skip_reason,
)


def _case_params():
    return [pytest.param(c, id=c.name, marks=([pytest.mark.slow] if c.full_only else [])
                         + ([pytest.mark.cuda] if c.device == "cuda" else [])) for c in CASES]


def _benchmark_times(benchmark) -> list[float]:
    """Per-round seconds of the last pedantic run; [] with --benchmark-disable."""
    meta = getattr(benchmark, "stats", None)
    stats = getattr(meta, "stats", None)
    return list(getattr(stats, "data", None) or [])


def _fused_backend(hidden) -> str | None:
    """'triton' or 'torch': what rebel_kernels picks for this input (None if that is not knowable)."""
    try:
        from rebel_kernels._backend import resolve

        return resolve(hidden)
    except Exception:
        return None


def _oom_errors():
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else (RuntimeError,)


_CHECKS: dict = {}


def _checked(provider: str, device: str, dtype: str) -> dict:
    """check_provider once per (provider, device, dtype) and session; a peer's exception is
    recorded as the check's error, ours propagate."""
    key = (provider, device, dtype)
    if key not in _CHECKS:
        try:
            _CHECKS[key] = check_provider(provider, device, dtype)
        except Exception as exc:
            if provider in OURS:
                raise
            _CHECKS[key] = dict(ok=False, fwd_ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                                if str(exc) else type(exc).__name__)
    return _CHECKS[key]


def _record_and_skip(benchmark, bench_rows, info: dict, status: str, reason: str):
    info.update(status=status, reason=reason)
    benchmark.extra_info.update(info)
    bench_rows.append(info)
    pytest.skip(reason)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", _case_params())
def test_loss(benchmark, bench_rows, request, case: Case, provider: str, mode: str):
    reason = skip_reason(case) or provider_skip_reason(provider, case.device)
    if reason:
        pytest.skip(reason)
    if provider == "compile" and not case.compile_ok:
        pytest.skip(f"compile: not on {case.name} (one inductor build per shape: cpu_tiny_r25 on CPU; "
                    "on CUDA Llama-3-8B at 100% response tokens and N=8192 at 10%)")
    benchmark.group = f"{case.name}-{mode}"
    info = describe(case, provider, mode)
    info["test"] = request.node.name

    # Same numbers as the reference first (small batch, this device and dtype), or no timing.
    check = _checked(provider, case.device, case.dtype if case.device == "cuda" else "float32")
    info["check"] = check
    good = check.get("fwd_ok" if mode == "fwd" else "ok")
    if not good:
        msg = f"{provider} {mode} on {case.device}/{case.dtype} does not match the reference: {check}"
        assert provider not in OURS, msg
        _record_and_skip(benchmark, bench_rows, info, "error" if "error" in check else "incorrect", msg)

    peak_tflops = bf16_matmul_peak_tflops() if case.device == "cuda" else None
    inputs = make_inputs(case, requires_grad=mode == "fwdbwd")
    info["input_bytes"] = input_bytes(inputs)
    if provider == "fused":
        info["backend"] = _fused_backend(inputs["hidden"])
    elif provider == "liger-scaled":
        info["impl"] = liger_scaled_impl(case.device)
    step = make_step(provider, mode, inputs, case.device, temperature=case.temperature)
    failure = None
    try:
        step()  # first call: compilation / autotuning stays out of every measurement
        if case.device == "cuda" and case.measure_memory:
            info.update(measure_cuda_op_memory(step))
    except _oom_errors() as exc:
        if case.device != "cuda" or "out of memory" not in str(exc).lower():
            raise
        failure = ("oom", f"{provider} {mode} {case.name}: CUDA out of memory ({str(exc).splitlines()[0]})")
    except Exception as exc:
        if provider in OURS:
            raise
        failure = ("error", f"{provider} {mode} {case.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                   if str(exc) else type(exc).__name__)
    if failure is not None:  # outside `except`: the traceback's tensors are gone now
        del inputs, step
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _record_and_skip(benchmark, bench_rows, info, *failure)
    if case.device == "cpu" and case.measure_memory:
        info.update(measure_cpu_op_memory(case.name, provider, mode))

    benchmark.pedantic(step, rounds=case.rounds, warmup_rounds=case.warmup_rounds, iterations=1)
    times = _benchmark_times(benchmark)
    info["status"] = "ok" if times else "not-timed"
    if times:
        info.update(timing_summary(times, info["flop"], info["flop_valid"], peak_tflops))
    if peak_tflops:
        info["bf16_matmul_peak_tflops"] = peak_tflops
    benchmark.extra_info.update(info)
    bench_rows.append(info)


# ----------------------------------------------------------------------------------------------
# The two providers must compute the same thing, or the comparison means nothing.


def _tiny_inputs(response_fraction: float, requires_grad: bool):
    case = Case("check", "cpu", "float32", 4, 16, 32, 300, response_fraction)
    return make_inputs(case, requires_grad=requires_grad, seed=1)


@pytest.mark.parametrize("response_fraction", [1.0, 0.25])
def test_naive_matches_reference(response_fraction):
    from rebel_kernels.reference import reference_rebel_loss, reference_token_logprobs

    x = _tiny_inputs(response_fraction, requires_grad=True)
    args = (x["hidden"], x["weight"], x["labels"])
    torch.testing.assert_close(naive_token_logprobs(*args), reference_token_logprobs(*args))
    loss = naive_rebel_loss(*args, x["old_logprobs"], x["rewards"])
    ref = reference_rebel_loss(*args, x["old_logprobs"], x["rewards"])
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
    g_ref = torch.autograd.grad(ref, (x["hidden"], x["weight"]))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("response_fraction", [1.0, 0.25])
def test_fused_matches_naive(response_fraction):
    fused_logprobs, fused_loss = fused_ops()
    x = _tiny_inputs(response_fraction, requires_grad=True)
    args = (x["hidden"], x["weight"], x["labels"])
    with torch.no_grad():
        torch.testing.assert_close(fused_logprobs(*args), naive_token_logprobs(*args), rtol=1e-4, atol=1e-4)
    loss = fused_loss(*args, x["old_logprobs"], x["rewards"])
    ref = naive_rebel_loss(*args, x["old_logprobs"], x["rewards"])
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
    g_ref = torch.autograd.grad(ref, (x["hidden"], x["weight"]))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_matches_reference(provider):
    """Every provider the machine can run, against rebel_kernels.reference: per-token
    log-probabilities, the REBEL loss and both gradients (CUDA in bf16 where there is one, CPU in
    float32); T = 0.7 and half the positions ignored."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = provider_skip_reason(provider, device)
    if reason:
        pytest.skip(reason)
    dtype = "bfloat16" if device == "cuda" else "float32"
    check = _checked(provider, device, dtype)
    if provider not in OURS and not check["ok"]:
        pytest.xfail(f"peer {provider} does not match the reference here (recorded, not timed): {check}")
    assert check["ok"], check
