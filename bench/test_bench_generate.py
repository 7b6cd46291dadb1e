"""engine/model/generate.py vs Hugging Face generate: tokens/s and decode-step memory bandwidth.

    python -m pytest bench/test_bench_generate.py -q                 # CPU: a tiny Llama, quick
    REBEL_BENCH_SAVE=1 python -m pytest bench/test_bench_generate.py # + bench/results/<device>_<date>_generate.json

On CUDA: random-weight Pythia-1.4B and Llama-3.2-1B configs in bf16, 64 to 512 rows, 53 and 256
new tokens. Both generators produce exactly max_new_tokens per row (the EOS id is one the model
cannot emit), so tokens/s compare the same work. The decode step's floor is one read of all
weights plus the KV cache per step; achieved bandwidth = those bytes / measured step time, next to
the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.config import SamplingConfig
from engine.model.generate import Sampler


@dataclasses.dataclass(frozen=True)
class GenCase:
    name: str
    model: str  # "tiny-llama" | "pythia-1.4b" | "llama-3.2-1b"
    prompts: int  # rows = 2 * prompts
    prompt_len: int
    new_tokens: int
    cuda: bool


CASES = [GenCase("cpu-tiny", "tiny-llama", 8, 24, 16, cuda=False)] + [
    GenCase(f"{m}-rows{2 * b}-new{n}", m, b, 128, n, cuda=True)
    for m in ("pythia-1.4b", "llama-3.2-1b") for b in (32, 128, 256) for n in (53, 256)
]


def build_model(name: str, device, dtype):
    torch.manual_seed(0)
    if name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    elif name == "pythia-1.4b":
        cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                            num_attention_heads=16, rotary_pct=0.25, max_position_embeddings=2048)
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                          tie_word_embeddings=True, max_position_embeddings=4096)
        model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _assert_every_row_full(out, provider: str, rows: int, case: GenCase) -> None:
    """Every one of the `rows` generated rows holds exactly case.new_tokens new tokens."""
    if provider == "ours":
        lengths = out.response_mask.sum(-1)
    else:  # HF generate: prompt + new tokens per row, padded to the longest
        lengths = torch.full((out.shape[0],), out.shape[1] - case.prompt_len, device=out.device)
    assert lengths.shape == (rows,), f"{provider}: {lengths.shape[0]} rows, expected {rows}"
    assert bool((lengths == case.new_tokens).all()), f"{provider}: new tokens per row {lengths.tolist()}"


@pytest.mark.parametrize("provider", ["ours", "hf-dynamic", pytest.param("hf-static-compile", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.cuda) if c.cuda else c for c in CASES],
                         ids=lambda c: c.name)
def test_bench_generate(benchmark, bench_rows, case: GenCase, provider: str):
    on_cuda = torch.cuda.is_available()
    if case.cuda != on_cuda:
        pytest.skip("CUDA shape, no CUDA device" if case.cuda else "CPU shape, running on CUDA")
    if provider == "hf-static-compile" and not on_cuda:
        pytest.skip("HF static cache + compile is a GPU configuration")
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    model = build_model(case.model, device, dtype)
    vocab = model.config.vocab_size
    never = vocab  # an id outside the vocabulary: no row stops early
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(2, vocab, (case.prompts, case.prompt_len), device=device, generator=g)
    mask = torch.ones_like(ids)
    mask[: case.prompts // 2, : case.prompt_len // 4] = 0  # half the prompts left-padded
    rows = 2 * case.prompts
    cfg = SamplingConfig(max_new_tokens=case.new_tokens, temperature=0.7, samples_per_prompt=2)

    if provider == "ours":
        sampler = Sampler(model, eos_ids=[never], pad_token_id=0)
        step = functools.partial(sampler.generate, ids, mask, cfg, generator=g)
    else:
        kw = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=case.new_tokens,
                  min_new_tokens=case.new_tokens, eos_token_id=never, pad_token_id=0)
        if provider == "hf-static-compile":
            kw.update(cache_implementation="static", compile_config=None)
        rep_ids, rep_mask = ids.repeat(2, 1), mask.repeat(2, 1)
        step = functools.partial(model.generate, rep_ids, attention_mask=rep_mask, **kw)

    def timed():
        out = step()
        _sync(device)
        return out

    out = timed()  # warm-up: compilation, graph capture, cache allocation
    _assert_every_row_full(out, provider, rows, case)  # tokens/s counts rows x new_tokens: none may stop early
    rounds = 3 if on_cuda else 2
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    times = list(getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "data", None) or [])
    if not times:
        return
    p50 = sorted(times)[len(times) // 2]
    new_tokens = rows * case.new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_row_bytes = Sampler(model, eos_ids=[never], pad_token_id=0)._kv_bytes_per_row(1)
    avg_len = case.prompt_len + case.new_tokens / 2
    step_bytes = weight_bytes + rows * kv_row_bytes * avg_len  # per decode step: all weights + the KV cache
    step_s = p50 / case.new_tokens
    row = dict(suite="generate", case=case.name, model=case.model, provider=provider, rows=rows,
               prompt_len=case.prompt_len, new_tokens=case.new_tokens, dtype=str(dtype).replace("torch.", ""),
               p50_s=p50, min_s=min(times), tokens_per_s=new_tokens / p50, step_ms=1e3 * step_s,
               step_bytes=step_bytes, achieved_bytes_per_s=step_bytes / step_s,
               copy_bytes_per_s=copy_bandwidth(device))
    benchmark.extra_info.update(row)
    bench_rows.append(row)
