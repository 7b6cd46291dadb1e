"""The loss benchmark's shapes and inputs: Case, the LM heads of real configs (MODELS), the CPU
and CUDA shapes (CASES), why a shape does not run here (skip_reason) and its random inputs
(make_inputs).

REBEL_BENCH_FULL=1 turns on the big CPU shape (and the CPU shapes on a CUDA machine);
REBEL_BENCH_MODELS=llama3_8b,gemma2_2b restricts the CUDA shapes to those LM heads.
"""
from __future__ import annotations

import dataclasses
import os

import torch

IGNORE_INDEX = -100


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
    # A real head scaled to CPU: Llama-3-8B's vocabulary, H = 2048, N = 2048 tokens (2B=4, T=512).
    Case("cpu_head", "cpu", "float32", 4, 512, 2048, 128256, 1.0, full_only=True, warmup_rounds=1, rounds=3,
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
