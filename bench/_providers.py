"""The loss benchmark's providers: one function pair per method, checked before it is timed.

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

import warnings

import torch
import torch.nn.functional as F

from bench._cases import IGNORE_INDEX, Case, make_inputs
from bench._environment import peer_versions

PROVIDERS = ("fused", "naive", "naive-response", "compile", "torch-lce", "liger", "liger-scaled", "cce", "cce_exact")
OURS = ("fused", "naive", "naive-response", "compile")  # this project's code: a mismatch or an error fails
CUDA_ONLY = frozenset({"liger", "cce", "cce_exact"})
# Providers whose matmul covers every position (ignored ones included); the others compute the
# response rows only (CCE drops ignored targets before its kernels).
ALL_ROW_PROVIDERS = frozenset({"naive", "compile", "torch-lce", "liger", "liger-scaled"})
MODES = ("fwd", "fwdbwd")


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


def naive_rebel_loss(hidden, weight, labels, old_logprobs, rewards, *, temperature: float = 1.0,
                     ignore_index: int = IGNORE_INDEX):
    """REBEL on naive_token_logprobs (eta = 1, fused_rebel_loss's default: see `provider_ops`)."""
    logp = naive_token_logprobs(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index)
    return rebel_loss_from_logprobs(logp, labels, old_logprobs, rewards, ignore_index=ignore_index)


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
    import inspect

    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    kw = dict(ignore_index=ignore_index, reduction="none")
    if "accum_dtype" in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        kw["accum_dtype"] = torch.float32
    h = _scaled(hidden, temperature).reshape(-1, hidden.shape[-1])
    out = liger_fused_linear_cross_entropy(h, weight, labels.reshape(-1), **kw)
    out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
    return _from_ce(out, labels)


def _liger_scaled_function():
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import (
        LigerFusedLinearScaledCrossEntropyFunction,
    )

    return LigerFusedLinearScaledCrossEntropyFunction


def liger_scaled_impl(device: str) -> str | None:
    """Which implementation Liger's fused scaled cross entropy dispatches to on `device`."""
    try:
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import _resolve_implementation

        return _resolve_implementation(torch.empty(0, device=device).device).__name__
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def liger_scaled_token_logprobs(hidden, weight, labels, *, temperature: float = 1.0,
                                ignore_index: int = IGNORE_INDEX):
    """-Liger-Kernel fused linear scaled cross entropy: takes the temperature itself."""
    out = _liger_scaled_function().apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                         float(temperature), ignore_index)
    return _from_ce(out[0] if isinstance(out, tuple) else out, labels)


def _cce_token_logprobs(impl: str):
    def fn(hidden, weight, labels, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
        from cut_cross_entropy import linear_cross_entropy

        h = _scaled(hidden, temperature).reshape(-1, hidden.shape[-1])
        ce = linear_cross_entropy(h, weight, labels.reshape(-1), ignore_index=ignore_index, reduction="none",
                                  impl=impl)
        return _from_ce(ce, labels)

    fn.__name__ = f"cce_{impl}_token_logprobs"
    return fn


def fused_ops():
    """(fused_token_logprobs, fused_rebel_loss): this project's ops (failing to import them is an error,
    never a skip)."""
    from rebel_kernels import fused_rebel_loss, fused_token_logprobs

    return fused_token_logprobs, fused_rebel_loss


def _loss_on(logprobs_fn):
    def loss_fn(hidden, weight, labels, old_logprobs, rewards, *, temperature: float = 1.0,
                ignore_index: int = IGNORE_INDEX):
        logp = logprobs_fn(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index)
        return rebel_loss_from_logprobs(logp, labels, old_logprobs, rewards, ignore_index=ignore_index)

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
    if provider in OURS:
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
            from cut_cross_entropy import LinearCrossEntropyImpl

            if not hasattr(LinearCrossEntropyImpl, "CCE_EXACT"):
                return (f"cce_exact: cut-cross-entropy {peer_versions()['cut-cross-entropy']} has no cce_exact "
                        f"impl (it has {[i.name.lower() for i in LinearCrossEntropyImpl]})")
    except ImportError as exc:
        return f"{provider}: this {module} lacks it ({exc})"
    return None


def provider_ops(provider: str):
    """(token_logprobs_fn, rebel_loss_fn), both taking (hidden, weight, labels[, old, rewards],
    *, temperature=...). Every loss is REBEL's at eta = 1 (fused_rebel_loss's default): the step size
    does not change what a provider costs, so the peers' losses take no eta."""
    if provider == "naive":
        return naive_token_logprobs, naive_rebel_loss
    if provider == "fused":
        return fused_ops()
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
    from rebel_kernels.reference import reference_rebel_loss, reference_token_logprobs

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
