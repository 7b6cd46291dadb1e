"""Shapes, inputs, providers and accounting shared by the loss benchmarks.

Two providers compute the same thing:
- "fused": rebel_kernels.fused_rebel_loss / fused_token_logprobs (never holds [tokens, vocab]);
- "naive": what a user writes in plain PyTorch: logits in the input dtype over every position,
  .float(), log_softmax, gather, mask, per-sequence sums, REBEL's squared regression.
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

import torch

PROVIDERS = ("fused", "naive")
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


def _llama3_8b(n_tokens: int, response_fraction: float) -> Case:
    pct = round(100 * response_fraction)
    return Case(f"llama3_8b_N{n_tokens}_r{pct}", "cuda", "bfloat16", 16, n_tokens // 16, 4096, 128256,
                response_fraction, warmup_rounds=3, rounds=10)


CASES = (
    # CPU, quick: exercises the harness in CI.  N = 2*2*64 tokens.
    Case("cpu_tiny_r100", "cpu", "float32", 4, 64, 64, 1000, 1.0, warmup_rounds=1, rounds=10),
    Case("cpu_tiny_r25", "cpu", "float32", 4, 64, 64, 1000, 0.25, warmup_rounds=1, rounds=10, measure_memory=False),
    # CPU acceptance shape: N = 4096 tokens (2B=8, T=512), H=256, V=32000.
    Case("cpu_acceptance", "cpu", "float32", 8, 512, 256, 32000, 1.0, full_only=True, warmup_rounds=1, rounds=7),
    # CUDA: the Llama-3-8B LM head, bf16, 2B = 16 sequences of T = N / 16.
    _llama3_8b(8192, 1.0),
    _llama3_8b(16384, 1.0),
    _llama3_8b(32768, 1.0),
    _llama3_8b(8192, 0.1),  # 10% response tokens: the fused op only computes those
)
CASES_BY_NAME = {c.name: c for c in CASES}


def skip_reason(case: Case) -> str | None:
    """Why `case` does not run on this machine, or None."""
    cuda = torch.cuda.is_available()
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


def naive_rebel_loss(hidden, weight, labels, old_logprobs, rewards, *, eta: float = 1.0,
                     temperature: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """REBEL: mean over pairs (i, B+i) of ((ratio_i - ratio_{B+i}) / eta - (r_i - r_{B+i}))^2."""
    logp = naive_token_logprobs(hidden, weight, labels, temperature=temperature, ignore_index=ignore_index)
    mask = labels != ignore_index
    old = old_logprobs if old_logprobs.dim() == 1 else (old_logprobs.float() * mask).sum(-1)
    ratio = logp.sum(-1) - old  # [2B]
    b = ratio.shape[0] // 2
    err = (ratio[:b] - ratio[b:]) / eta - (rewards[:b] - rewards[b:]).float()  # [B]
    return (err * err).mean()


def fused_ops():
    """(fused_token_logprobs, fused_rebel_loss), or None while rebel_kernels does not export them."""
    try:
        import rebel_kernels
    except ImportError:
        return None
    lp = getattr(rebel_kernels, "fused_token_logprobs", None)
    loss = getattr(rebel_kernels, "fused_rebel_loss", None)
    return None if lp is None or loss is None else (lp, loss)


def provider_ops(provider: str):
    if provider == "naive":
        return naive_token_logprobs, naive_rebel_loss
    if provider == "fused":
        ops = fused_ops()
        if ops is None:
            raise RuntimeError("rebel_kernels.fused_rebel_loss / fused_token_logprobs are not available")
        return ops
    raise ValueError(f"unknown provider {provider!r}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(provider: str, mode: str, inputs: dict, device: str):
    """A no-argument callable running one forward (mode "fwd") or forward+backward ("fwdbwd"),
    synchronizing the device before it returns."""
    logprobs_fn, loss_fn = provider_ops(provider)
    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    old, rew = inputs["old_logprobs"], inputs["rewards"]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                out = logprobs_fn(h, w, y)
            sync(device)
            return out
    elif mode == "fwdbwd":
        def step():
            loss = loss_fn(h, w, y, old, rew)
            grads = torch.autograd.grad(loss, (h, w))
            sync(device)
            return grads
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


# ----------------------------------------------------------------------------------------------
# Accounting


def computed_tokens(case: Case, provider: str) -> int:
    """Tokens whose logits the method computes: naive all positions, fused the response tokens."""
    return case.tokens if provider == "naive" else case.valid_tokens


def flops(case: Case, provider: str, mode: str) -> int:
    """fwd: 2*N*H*V (the logits matmul); fwdbwd: 8*N*H*V (fwd + recompute + dh + dW)."""
    per = 2 if mode == "fwd" else 8
    return per * computed_tokens(case, provider) * case.hidden * case.vocab


def describe(case: Case, provider: str, mode: str) -> dict:
    return dict(
        case=case.name, provider=provider, mode=mode, device=case.device, dtype=case.dtype,
        rows=case.rows, seq=case.seq, N=case.tokens, H=case.hidden, V=case.vocab,
        response_fraction=case.response_fraction, valid_tokens=case.valid_tokens,
        computed_tokens=computed_tokens(case, provider), flop=flops(case, provider, mode),
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


def timing_summary(times, flop: int) -> dict:
    p20, p50, p80 = (percentile(times, q) for q in (20, 50, 80))
    return dict(rounds=len(times), min_s=min(times), p20_s=p20, p50_s=p50, p80_s=p80, tflops=flop / p50 / 1e12)


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


def environment() -> dict:
    """Device, software and commit, for the results file."""
    try:
        import triton  # noqa: PLC0415
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               platform=platform.platform(), python=platform.python_version(),
               torch=torch.__version__, triton=triton_version)
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
        env["device"] = env["gpu"]
    else:
        env["device"] = env["cpu"]
    env.update({k: os.environ[k] for k in ("REBEL_KERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                if k in os.environ})
    commit = _run(["git", "rev-parse", "HEAD"])
    env.update(git_commit=commit, git_dirty=bool(_run(["git", "status", "--porcelain"])) if commit else None)
    now = datetime.datetime.now(datetime.timezone.utc)
    env.update(date=now.strftime("%Y-%m-%d"), datetime_utc=now.isoformat(timespec="seconds"))
    return env
