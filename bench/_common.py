"""Shapes, inputs, providers and accounting shared by the loss benchmarks.

Every provider computes the same per-token log-probabilities (float32 [2B, T], 0 at ignored
positions) and the same REBEL loss on top (`rebel_loss_from_logprobs`, the naive epilogue):
- "fused": rebel_kernels.fused_rebel_loss / fused_token_logprobs (never holds [tokens, vocab]);
- "naive": what a user writes in plain PyTorch: logits in the input dtype over every position,
  .float(), log_softmax, gather, mask, per-sequence sums, REBEL's squared regression;
- "naive-response": the same over the response positions only (valid rows gathered first);
- "compile": torch.compile(fullgraph=True, dynamic=False) of the naive functions (on CPU only
  the tiny shape: inductor compiles a C++ kernel per shape);
- "torch-lce": torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (the
  chunked path), reduction="none"; its "options ignored" fall-back-to-materializing warning is an
  error; log-probs = -CE;
- "liger": Liger-Kernel's fused linear cross entropy, reduction="none", float32 accumulation
  where the installed version takes accum_dtype (CUDA only);
- "liger-scaled": Liger-Kernel's fused linear *scaled* cross entropy (per-token NLL with a
  temperature argument; Liger dispatches it to a CuTe-DSL kernel on sm90 and to its chunked
  PyTorch fallback elsewhere, CPU included: the row's "impl" says which);
- "cce", "cce_exact": Cut Cross-Entropy's linear_cross_entropy, impl "cce" / "cce_exact",
  reduction="none" (CUDA only).
Peers without a temperature argument (torch-lce, liger, cce*) get hidden / T (and would get
bias / T), computed inside the timed call.  Peers that are not installed, or that need CUDA on a
CPU machine, are skipped with the reason (`provider_skip_reason`), never replaced by something
else; each provider is checked against rebel_kernels.reference (values and gradients) before
it is timed (`check_provider`).
Two modes: "fwd" (no-grad token log-probabilities) and "fwdbwd" (loss forward + backward wrt
hidden and weight).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import subprocess
import warnings

import torch
import torch.nn.functional as F

PROVIDERS = ("fused", "naive", "naive-response", "compile", "torch-lce", "liger", "liger-scaled", "cce", "cce_exact")
CUDA_ONLY = frozenset({"liger", "cce", "cce_exact"})
# Providers whose matmul covers every position (ignored ones included); the others compute the
# response rows only (CCE drops ignored targets before its kernels).
ALL_ROW_PROVIDERS = frozenset({"naive", "compile", "torch-lce", "liger", "liger-scaled"})
MODES = ("fwd", "fwdbwd")
IGNORE_INDEX = -100
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def full_run() -> bool:
    """REBEL_BENCH_FULL=1 turns on the big CPU shape (and the CPU shapes on a CUDA machine)."""
    return os.environ.get("REBEL_BENCH_FULL", "0") == "1"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    device: str  # "cpu" | "cuda"
    dtype: str  # torch dtype name: "float32", "bfloat16"
    rows: int  # 2B sequences (B pairs)
    seq: int  # T positions per sequence
    hidden: int  # H
    vocab: int  # V
    response_fraction: float  # share of positions that are response tokens (labels != -100)
    full_only: bool = False  # only with REBEL_BENCH_FULL=1
    measure_memory: bool = True  # False: skip the peak-memory probe (a fresh process on CPU)
    warmup_rounds: int = 1
    rounds: int = 5
    temperature: float = 1.0
    compile_ok: bool = True  # False: skip the "compile" provider (one inductor build per shape)
    model: str = ""  # key of MODELS for the real-config shapes

    @property
    def tokens(self) -> int:
        """N = 2B * T: every position, which the naive provider computes logits for."""
        return self.rows * self.seq

    @property
    def response_len(self) -> int:
        return max(1, min(self.seq, round(self.response_fraction * self.seq)))

    @property
    def valid_tokens(self) -> int:
        """Response tokens, the only ones the fused provider computes."""
        return self.rows * self.response_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# LM heads of real configs (hidden size H, vocabulary V); random weights.
MODELS = {
    "llama3_8b": (4096, 128256),
    "qwen2_5_7b": (3584, 152064),
    "pythia_2_8b": (2560, 50304),
    "gemma2_2b": (2304, 256000),
}
CUDA_TOKENS = (2048, 8192, 32768)
CUDA_RESPONSE_FRACTIONS = (1.0, 0.5, 0.1)
CUDA_TEMPERATURE = 0.7  # != 1, so that the h / T the temperature-less peers need is timed


def _cuda_case(model: str, n_tokens: int, response_fraction: float, dtype: str = "bfloat16") -> Case:
    """REBEL-shaped batch: 2B = 16 sequences of T = N / 16 positions, the last
    response_fraction * T of each being response tokens."""
    h, v = MODELS[model]
    pct = round(100 * response_fraction)
    suffix = "" if dtype == "bfloat16" else "_fp32"
    # torch.compile builds one graph per shape (tens of seconds each on a GPU): Llama-3-8B only,
    # every N at 100% response tokens and N = 8192 at 10%.
    compile_ok = model == "llama3_8b" and dtype == "bfloat16" and (response_fraction == 1.0 or
                                                                   (n_tokens == 8192 and response_fraction == 0.1))
    return Case(f"{model}_N{n_tokens}_r{pct}{suffix}", "cuda", dtype, 16, n_tokens // 16, h, v,
                response_fraction, warmup_rounds=3, rounds=10, temperature=CUDA_TEMPERATURE,
                compile_ok=compile_ok, model=model)


CASES = (
    # CPU, quick: exercises the harness in CI.  N = 2*2*64 tokens.
    Case("cpu_tiny_r100", "cpu", "float32", 4, 64, 64, 1000, 1.0, warmup_rounds=1, rounds=10, compile_ok=False),
    Case("cpu_tiny_r25", "cpu", "float32", 4, 64, 64, 1000, 0.25, warmup_rounds=1, rounds=10, measure_memory=False,
         temperature=0.7),
    # CPU acceptance shape: N = 4096 tokens (2B=8, T=512), H=256, V=32000.
    Case("cpu_acceptance", "cpu", "float32", 8, 512, 256, 32000, 1.0, full_only=True, warmup_rounds=1, rounds=7,
         compile_ok=False),
    # CUDA, bf16: four LM heads x N in {2k, 8k, 32k} x 100/50/10% response tokens.
    *(_cuda_case(m, n, f) for m in MODELS for n in CUDA_TOKENS for f in CUDA_RESPONSE_FRACTIONS),
    # float32 spot check.
    _cuda_case("llama3_8b", 8192, 0.5, dtype="float32"),
)
CASES_BY_NAME = {c.name: c for c in CASES}


def selected_models() -> set[str] | None:
    """REBEL_BENCH_MODELS=llama3_8b,gemma2_2b restricts the CUDA shapes to those LM heads."""
    raw = os.environ.get("REBEL_BENCH_MODELS", "").strip()
    return {m.strip() for m in raw.split(",") if m.strip()} or None


def skip_reason(case: Case) -> str | None:
    """Why `case` does not run on this machine, or None."""
    cuda = torch.cuda.is_available()
    models = selected_models()
    if case.model and models is not None and case.model not in models:
        return f"{case.model} not in REBEL_BENCH_MODELS={os.environ['REBEL_BENCH_MODELS']}"
    if case.device == "cuda" and not cuda:
        return "CUDA shape, no CUDA device"
    if case.full_only and not full_run():
        return "big shape: set REBEL_BENCH_FULL=1"
    if case.device == "cpu" and cuda and not full_run():
        return "CPU shape on a CUDA machine: set REBEL_BENCH_FULL=1"
    return None


# ----------------------------------------------------------------------------------------------
# Inputs


def make_inputs(case: Case, *, requires_grad: bool, seed: int = 0) -> dict:
    """hidden [2B, T, H], weight [V, H] in case.dtype; labels [2B, T] with the last
    response_len positions of each row being response tokens; per-token old_logprobs [2B, T]
    (float32); rewards [2B] (float32)."""
    dev, dt = torch.device(case.device), case.torch_dtype
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    rows, seq, h, v = case.rows, case.seq, case.hidden, case.vocab
    hidden = torch.randn(rows, seq, h, device=dev, dtype=dt, generator=g)
    weight = torch.randn(v, h, device=dev, dtype=dt, generator=g).mul_(h**-0.5)  # logits ~ N(0, 1)
    labels = torch.randint(0, v, (rows, seq), device=dev, generator=g)
    labels[:, : seq - case.response_len] = IGNORE_INDEX  # prompt positions
    old_logprobs = torch.rand(rows, seq, device=dev, generator=g).mul_(-4.0)
    rewards = torch.randn(rows, device=dev, generator=g)
    hidden.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    return dict(hidden=hidden, weight=weight, labels=labels, old_logprobs=old_logprobs, rewards=rewards)


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


# ----------------------------------------------------------------------------------------------
# Providers


def naive_token_logprobs(hidden, weight, labels, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """Plain PyTorch, as users write it: materialized logits over every position."""
    logits = hidden @ weight.T  # [2B, T, V] in the input dtype
    logits = logits.float()  # [2B, T, V] float32
    if temperature != 1.0:
        logits = logits / temperature
    logsm = torch.log_softmax(logits, dim=-1)  # [2B, T, V]
    mask = labels != ignore_index
    logp = logsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [2B, T]
    return logp * mask


def naive_response_token_logprobs(hidden, weight, labels, *, temperature: float = 1.0,
                                  ignore_index: int = IGNORE_INDEX):
    """Plain PyTorch over the response positions only: gather the valid rows, then the same."""
    flat = labels.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)  # [n_valid] (a host sync on CUDA)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)  # [n_valid, H]
    logits = (h @ weight.T).float()  # [n_valid, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, flat.index_select(0, idx).unsqueeze(-1)).squeeze(-1)
    return logp.new_zeros(flat.shape).index_copy(0, idx, logp).reshape(labels.shape)


def rebel_loss_from_logprobs(logp, labels, old_logprobs, rewards, *, eta: float = 1.0,
                             ignore_index: int = IGNORE_INDEX):
    """The naive epilogue every non-fused provider shares: per-sequence sums, then REBEL's
    mean over pairs (i, B+i) of ((ratio_i - ratio_{B+i}) / eta - (r_i - r_{B+i}))^2."""
    mask = labels != ignore_index
    old = old_logprobs if old_logprobs.dim() == 1 else (old_logprobs.float() * mask).sum(-1)
    ratio = logp.sum(-1) - old  # [2B]
    b = ratio.shape[0] // 2
    err = (ratio[:b] - ratio[b:]) / eta - (rewards[:b] - rewards[b:]).float()  # [B]
    return (err * err).mean()


def naive_rebel_loss(hidden, weight, labels, old_logprobs, rewards, *, eta: float = 1.0,
                     temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """REBEL on naive_token_logprobs."""
    logp = naive_token_logprobs(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index)
    return rebel_loss_from_logprobs(logp, labels, old_logprobs, rewards, eta=eta, ignore_index=ignore_index)


def _scaled(hidden, temperature: float):
    """hidden / T for peers without a temperature argument: (h / T) @ W.T = (h @ W.T) / T."""
    return hidden if temperature == 1.0 else hidden / temperature


def _from_ce(ce, labels):
    """Per-token log-probabilities from a peer's per-token cross entropy (0 at ignored tokens)."""
    return ce.float().neg().reshape(labels.shape)


TORCH_LCE_FALLBACK = r"linear_cross_entropy: ``options`` ignored"


def torch_lce_token_logprobs(hidden, weight, labels, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """-torch.nn.functional.linear_cross_entropy(reduction="none") on the chunked path.  Its
    warning that it ignores `options` and materializes the logits is raised as an error."""
    h = _scaled(hidden, temperature).reshape(-1, hidden.shape[-1])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=TORCH_LCE_FALLBACK)
        ce = F.linear_cross_entropy(h, weight, labels.reshape(-1), reduction="none", ignore_index=ignore_index,
                                    options=torch.nn.LinearCrossEntropyOptions())
    return _from_ce(ce, labels)


def liger_token_logprobs(hidden, weight, labels, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """-Liger-Kernel fused linear cross entropy, reduction="none", float32 accumulation."""
    import inspect  # noqa: PLC0415

    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: PLC0415

    kw = dict(ignore_index=ignore_index, reduction="none")
    if "accum_dtype" in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        kw["accum_dtype"] = torch.float32
    h = _scaled(hidden, temperature).reshape(-1, hidden.shape[-1])
    out = liger_fused_linear_cross_entropy(h, weight, labels.reshape(-1), **kw)
    out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return _from_ce(out, labels)


def _liger_scaled_function():
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import (  # noqa: PLC0415
        LigerFusedLinearScaledCrossEntropyFunction,
    )

    return LigerFusedLinearScaledCrossEntropyFunction


def liger_scaled_impl(device: str) -> str | None:
    """Which implementation Liger's fused scaled cross entropy dispatches to on `device`."""
    try:
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import _resolve_implementation  # noqa: PLC0415

        return _resolve_implementation(torch.empty(0, device=device).device).__name__
    except Exception as exc:  # noqa: BLE001 - private helper, informational only
        return f"unknown ({type(exc).__name__})"


def liger_scaled_token_logprobs(hidden, weight, labels, *, temperature: float = 1.0,
                                ignore_index: int = IGNORE_INDEX):
    """-Liger-Kernel fused linear scaled cross entropy: takes the temperature itself."""
    out = _liger_scaled_function().apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                         float(temperature), ignore_index)
    return _from_ce(out[0] if isinstance(out, tuple) else out, labels)


def _cce_token_logprobs(impl: str):
    def fn(hidden, weight, labels, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
        from cut_cross_entropy import linear_cross_entropy  # noqa: PLC0415

        h = _scaled(hidden, temperature).reshape(-1, hidden.shape[-1])
        ce = linear_cross_entropy(h, weight, labels.reshape(-1), ignore_index=ignore_index, reduction="none",
                                  impl=impl)
        return _from_ce(ce, labels)

    fn.__name__ = f"cce_{impl}_token_logprobs"
    return fn


def fused_ops():
    """(fused_token_logprobs, fused_rebel_loss), or None while rebel_kernels does not export them."""
    try:
        import rebel_kernels
    except ImportError:
        return None
    lp = getattr(rebel_kernels, "fused_token_logprobs", None)
    loss = getattr(rebel_kernels, "fused_rebel_loss", None)
    return None if lp is None or loss is None else (lp, loss)


def _loss_on(logprobs_fn):
    def loss_fn(hidden, weight, labels, old_logprobs, rewards, *, eta: float = 1.0, temperature: float = 1.0,
                ignore_index: int = IGNORE_INDEX):
        logp = logprobs_fn(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index)
        return rebel_loss_from_logprobs(logp, labels, old_logprobs, rewards, eta=eta, ignore_index=ignore_index)

    loss_fn.__name__ = f"rebel_loss_on_{logprobs_fn.__name__}"
    return loss_fn


_PEER_LOGPROBS = {
    "naive-response": naive_response_token_logprobs,
    "torch-lce": torch_lce_token_logprobs,
    "liger": liger_token_logprobs,
    "liger-scaled": liger_scaled_token_logprobs,
    "cce": _cce_token_logprobs("cce"),
    "cce_exact": _cce_token_logprobs("cce_exact"),
}


def provider_skip_reason(provider: str, device: str) -> str | None:
    """Why `provider` cannot run on `device` here (not installed, CUDA only, ...), or None."""
    if provider == "fused":
        return None if fused_ops() is not None else "rebel_kernels.fused_rebel_loss is not available"
    if provider in ("naive", "naive-response", "compile"):
        return None
    if provider == "torch-lce":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no chunked torch.nn.functional.linear_cross_entropy"
        return None
    if provider in CUDA_ONLY and device != "cuda":
        return f"{provider}: CUDA-only Triton kernels, no CUDA device"
    module = "cut_cross_entropy" if provider.startswith("cce") else "liger_kernel"
    try:
        __import__(module)
    except ImportError as exc:
        return f"{provider}: {module} is not installed ({exc})"
    try:
        if provider == "liger-scaled":
            _liger_scaled_function()
        if provider == "cce_exact":
            from cut_cross_entropy import LinearCrossEntropyImpl  # noqa: PLC0415

            if not hasattr(LinearCrossEntropyImpl, "CCE_EXACT"):
                return (f"cce_exact: cut-cross-entropy {peer_versions()['cut-cross-entropy']} has no cce_exact "
                        f"impl (it has {[i.name.lower() for i in LinearCrossEntropyImpl]})")
    except ImportError as exc:
        return f"{provider}: this {module} lacks it ({exc})"
    return None


def provider_ops(provider: str):
    """(token_logprobs_fn, rebel_loss_fn), both taking (hidden, weight, labels[, old, rewards],
    *, temperature=...)."""
    if provider == "naive":
        return naive_token_logprobs, naive_rebel_loss
    if provider == "fused":
        ops = fused_ops()
        if ops is None:
            raise RuntimeError("rebel_kernels.fused_rebel_loss / fused_token_logprobs are not available")
        return ops
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache per shape: no silent fall-back to eager at the recompile limit
        return (torch.compile(naive_token_logprobs, fullgraph=True, dynamic=False),
                torch.compile(naive_rebel_loss, fullgraph=True, dynamic=False))
    if provider in _PEER_LOGPROBS:
        fn = _PEER_LOGPROBS[provider]
        return fn, _loss_on(fn)
    raise ValueError(f"unknown provider {provider!r}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(provider: str, mode: str, inputs: dict, device: str, *, temperature: float = 1.0):
    """A no-argument callable running one forward (mode "fwd") or forward+backward ("fwdbwd"),
    synchronizing the device before it returns."""
    logprobs_fn, loss_fn = provider_ops(provider)
    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    old, rew = inputs["old_logprobs"], inputs["rewards"]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                out = logprobs_fn(h, w, y, temperature=temperature)
            sync(device)
            return out
    elif mode == "fwdbwd":
        def step():
            loss = loss_fn(h, w, y, old, rew, temperature=temperature)
            grads = torch.autograd.grad(loss, (h, w))
            sync(device)
            return grads
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


# ----------------------------------------------------------------------------------------------
# Correctness, before timing


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CHECK_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}  # relative norm error vs the reference
CHECK_TOL_CUDA_FP32 = 5e-3  # TF32 matmuls in the peers' Triton kernels


def check_provider(provider: str, device: str, dtype: str = "float32", *, seed: int = 3) -> dict:
    """Per-token log-probabilities (no grad), the REBEL loss and its gradients wrt hidden and weight
    of `provider` against rebel_kernels.reference, on a small batch in `dtype` with T = 0.7 and
    half the positions ignored.  Relative (norm) errors; ok when all are within CHECK_TOL."""
    from rebel_kernels.reference import reference_rebel_loss, reference_token_logprobs  # noqa: PLC0415

    case = Case("check", device, dtype, 4, 24, 64, 1000, 0.5)
    x = make_inputs(case, requires_grad=True, seed=seed)
    args, tail, temp = (x["hidden"], x["weight"], x["labels"]), (x["old_logprobs"], x["rewards"]), 0.7
    logprobs_fn, loss_fn = provider_ops(provider)
    with torch.no_grad():
        lp = logprobs_fn(*args, temperature=temp)
    loss = loss_fn(*args, *tail, temperature=temp)
    grads = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
    ref = [t.detach().requires_grad_() for t in (x["hidden"].double(), x["weight"].double())]
    ref_lp = reference_token_logprobs(*ref, x["labels"], temperature=temp)
    ref_loss = reference_rebel_loss(*ref, x["labels"], *tail, temperature=temp)
    ref_grads = torch.autograd.grad(ref_loss, ref)
    errs = dict(logprobs=_rel(lp, ref_lp), loss=_rel(loss, ref_loss),
                grad_hidden=_rel(grads[0], ref_grads[0]), grad_weight=_rel(grads[1], ref_grads[1]))
    tol = CHECK_TOL_CUDA_FP32 if (device == "cuda" and dtype == "float32") else CHECK_TOL[dtype]
    ignored = x["labels"] == IGNORE_INDEX
    zero_ignored = bool((lp[ignored] == 0).all())
    return dict(ok=all(e <= tol for e in errs.values()) and zero_ignored and lp.shape == x["labels"].shape,
                fwd_ok=errs["logprobs"] <= tol and zero_ignored, tol=tol, zero_at_ignored=zero_ignored,
                dtype=dtype, **{f"rel_err_{k}": v for k, v in errs.items()})


# ----------------------------------------------------------------------------------------------
# Accounting


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


# ----------------------------------------------------------------------------------------------
# Environment


def _run(cmd) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def peer_versions() -> dict:
    """Installed versions of the peer libraries (None: not installed)."""
    from importlib import metadata  # noqa: PLC0415

    out = {}
    for dist in ("liger-kernel", "cut-cross-entropy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment() -> dict:
    """Device, software and commit, for the results file."""
    try:
        import triton  # noqa: PLC0415
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               platform=platform.platform(), python=platform.python_version(),
               torch=torch.__version__, triton=triton_version, peers=peer_versions())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
        env["device"] = env["gpu"]
    else:
        env["device"] = env["cpu"]
    if _MATMUL_PEAK:
        env.update(bf16_matmul_peak_tflops=_MATMUL_PEAK["tflops"],
                   bf16_matmul_peak_method=f"{_MATMUL_PEAK['n']}^3 bf16 torch.matmul, median of "
                                           f"{_MATMUL_PEAK['iters']} CUDA-event timings")
    env.update({k: os.environ[k] for k in ("REBEL_KERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                if k in os.environ})
    commit = _run(["git", "rev-parse", "HEAD"])
    env.update(git_commit=commit, git_dirty=bool(_run(["git", "status", "--porcelain"])) if commit else None)
    now = datetime.datetime.now(datetime.timezone.utc)
    env.update(date=now.strftime("%Y-%m-%d"), datetime_utc=now.isoformat(timespec="seconds"))
    return env
