"""engine/model/varlen.py on CPU: flash-attn's varlen kernel replaced by an exact PyTorch emulation."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.model import forward, packing, varlen
from engine.model.attention import attention_implementation
from engine.model.packing import IGNORE

# ----------------------------------------------------------------------------------------------
# the emulated kernel
# ----------------------------------------------------------------------------------------------
CALLS: list[dict] = []


def emulated_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash_attn_varlen_func's semantics: q [Tq, H, D], k/v [Tk, Hkv, D] (query head h reads kv head
    h // (H / Hkv)), segment s = rows cu[s]:cu[s+1]; causal aligned bottom-right (local query i sees
    local key j iff j <= i + Lk - Lq), a left window w keeps j >= i + Lk - Lq - w; softcap tanh-caps
    the scaled scores."""
    assert dropout_p == 0.0 and q.dim() == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    CALLS.append({"window_size": window_size, "softcap": softcap, "causal": causal})
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(cu_q, cu_q[1:]))
    assert max_seqlen_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))
    outs = []
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)  # [H, Lq, D]
        ks, vs = (x[cu_k[s] : cu_k[s + 1]].transpose(0, 1) for x in (k, v))
        reps = q.shape[1] // k.shape[1]
        ks, vs = ks.repeat_interleave(reps, dim=0), vs.repeat_interleave(reps, dim=0)
        lq, lk = qs.shape[1], ks.shape[1]
        scores = qs @ ks.transpose(-1, -2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            keep &= j <= i + lk - lq
        if window_size[0] >= 0:
            keep &= j >= i + lk - lq - window_size[0]
        outs.append((scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    monkeypatch.setattr(varlen, "flash_attn_varlen_func", emulated_varlen)
    CALLS.clear()
    varlen.register()


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------
def make_layout(prompts: list[int], responses: list[list[int]], vocab: int = 128, seed: int = 0) -> packing.Layout:
    """packing.pack of B prompts (lengths `prompts`) with k responses each (responses[i][s]: scored
    labels of sample s of prompt i, 0 allowed), sample-major rows, left-padded prompts."""
    g = torch.Generator().manual_seed(seed)
    b, k = len(prompts), len(responses[0])
    p, n = max(prompts), max(1, max(max(r) for r in responses))
    ids = torch.randint(0, vocab, (k * b, p + n), generator=g)
    mask = torch.zeros(k * b, p + n, dtype=torch.long)
    labels = torch.full((k * b, n), IGNORE)
    for i in range(b):
        for s in range(k):
            row, length = s * b + i, responses[i][s]
            ids[row, :p] = ids[i, :p]
            mask[row, p - prompts[i] : p + length] = 1
            labels[row, :length] = ids[row, p : p + length]
    return packing.pack(ids, mask, labels, samples=k)


def random_layout(k: int, seed: int) -> packing.Layout:
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(2, 5, (), generator=g))
    prompts = torch.randint(1, 7, (b,), generator=g).tolist()
    awkward = torch.tensor([0, 1, 2, 3, 5, 9])
    responses = [awkward[torch.randint(0, len(awkward), (k,), generator=g)].tolist() for _ in range(b)]
    responses[0] = [1] * k  # a group whose branches are all empty (one shared first prediction each)
    responses[-1][0] = max(responses[-1][0], 2)
    return make_layout(prompts, responses, seed=seed)


LAYOUTS = [(k, seed) for k in (1, 2, 4) for seed in range(4)]


@pytest.mark.parametrize(("k", "seed"), LAYOUTS)
def test_plan_mask_is_the_packed_mask(k, seed):
    layout = random_layout(k, seed)
    plan = varlen.segments(layout)
    assert torch.equal(plan.allowed(), layout.allowed())
    assert plan.cu_seqlens_q[-1].item() == layout.tokens and plan.lengths.min() > 0
    assert plan.cu_seqlens_q.dtype == plan.cu_seqlens_k.dtype == torch.int32


def test_segments_of_a_hand_layout():
    # prompt 0: 3 tokens, responses of 4 and 1 labels (bodies 3 and 0); prompt 1: 2 tokens, 2 and 3 labels
    layout = make_layout([3, 2], [[4, 1], [2, 3]])
    plan = varlen.segments(layout)
    # packed: x0 [0:3] | y00 [3:6] | x1 [6:8] | y01 [8:9] | y11 [9:11]   (y10 has an empty body)
    assert plan.starts.tolist() == [0, 3, 6, 8, 9] and plan.lengths.tolist() == [3, 3, 2, 1, 2]
    assert plan.trunk.tolist() == [True, False, True, False, False]
    assert plan.cu_seqlens_k.tolist() == [0, 3, 9, 11, 14, 18]
    assert plan.kv_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 6, 7, 9, 10]
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (3, 6)


def test_segments_refuses_a_broken_tree():
    layout = make_layout([3], [[3, 3]])  # branch [0, 0, 0, 1, 1, 2, 2]
    varlen.segments(_with(layout, branch=torch.tensor([0, 0, 0, 2, 2, 1, 1])))  # branches in any order
    with pytest.raises(ValueError, match="not a prompt"):
        varlen.segments(_with(layout, branch=torch.tensor([1, 1, 0, 0, 0, 2, 2])))
    with pytest.raises(ValueError, match="own group"):
        varlen.segments(_with(layout, group=torch.tensor([0, 0, 0, 1, 1, 1, 1])))
    with pytest.raises(ValueError, match="non-contiguous"):
        varlen.segments(_with(layout, branch=torch.tensor([0, 0, 0, 1, 2, 1, 2])))


def _with(layout, **fields):
    return dataclasses.replace(layout, **fields)


# ----------------------------------------------------------------------------------------------
# the attention function
# ----------------------------------------------------------------------------------------------
def dense(q, k, v, allowed, scale, softcap=None):
    """Reference attention on [1, H, T, D] / [1, Hkv, T, D] with a [T, T] bool mask -> [1, T, H, D]."""
    reps = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(reps, dim=1), v.repeat_interleave(reps, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2)


class _Attn(torch.nn.Module):
    """What transformers' attention modules expose to the function (a config, one Linear, is_causal)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
        self.is_causal = True
        self.layer_idx = 0


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (4, 5.0)])
def test_attention_matches_dense(window, softcap):
    layout = random_layout(2, seed=7)
    t, scale = layout.tokens, 0.3
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, t, 8, generator=g) for h in (4, 2, 2))
    allowed = layout.allowed()
    if window is not None:  # transformers' sliding window over positions: p_q - p_k < window
        pos = layout.position_ids[0]
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    with varlen.active(varlen.segments(layout)):
        out, weights = varlen.attention(_Attn(), q, k, v, None, scaling=scale, sliding_window=window,
                                        softcap=softcap)
    assert weights is None and out.shape == (1, t, 4, 8)
    torch.testing.assert_close(out, dense(q, k, v, allowed, scale, softcap), rtol=1e-5, atol=1e-6)
    assert CALLS[-1]["causal"] and CALLS[-1]["softcap"] == (softcap or 0.0)
    assert CALLS[-1]["window_size"] == ((window - 1, 0) if window else (-1, -1))


def test_attention_refuses_misuse():
    layout = random_layout(2, seed=3)
    q = torch.randn(1, 4, layout.tokens, 8)
    kv = torch.randn(1, 2, layout.tokens, 8)
    with varlen.active(varlen.segments(layout)):
        with pytest.raises(ValueError, match="attention_mask=None"):
            varlen.attention(_Attn(), q, kv, kv, forward.attention_mask(layout, "sdpa", torch.float32))
        with pytest.raises(ValueError, match="tokens"):
            varlen.attention(_Attn(), q[:, :, :-1], kv[:, :, :-1], kv[:, :, :-1], None)
    assert varlen.current() is None
    with pytest.raises(ValueError, match="no varlen plan"):
        varlen.attention(_Attn(), q, kv, kv, forward.attention_mask(layout, "sdpa", torch.float32))


# ----------------------------------------------------------------------------------------------
# a model through transformers
# ----------------------------------------------------------------------------------------------
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def test_switching_a_model():
    lm = tiny_llama()
    varlen.register()  # idempotent
    lm.set_attn_implementation(varlen.NAME)
    assert attention_implementation(lm) == attention_implementation(lm.model) == varlen.NAME
    built = LlamaForCausalLM._from_config(copy.deepcopy(tiny_llama().config), attn_implementation=varlen.NAME)
    assert attention_implementation(built) == varlen.NAME


@pytest.mark.parametrize(("k", "dtype"), [(2, torch.float32), (4, torch.float32), (4, torch.float64)])
def test_model_matches_the_sdpa_mask_path(k, dtype):
    """Hidden states and parameter gradients of a random linear functional equal the 4-D SDPA mask
    path's, to 1e-5 of each tensor's scale in float32 (rounding only: float64 agrees to 1e-12)."""
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    reference = tiny_llama().to(dtype)
    model = copy.deepcopy(reference)
    model.set_attn_implementation(varlen.NAME)
    layout = random_layout(k, seed=11 + k)
    inputs = {"input_ids": layout.input_ids, "position_ids": layout.position_ids, "use_cache": False}
    expected = reference.base_model(attention_mask=forward.attention_mask(layout, "sdpa", dtype),
                                    **inputs).last_hidden_state
    with varlen.active(varlen.segments(layout)):
        hidden = model.base_model(attention_mask=None, **inputs).last_hidden_state
    assert len(CALLS) == 2  # one varlen call per layer: nothing fell back
    assert_scaled_close(hidden, expected, tolerance, "hidden")

    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    (expected * weights).sum().backward()
    (hidden * weights).sum().backward()
    grads = dict(model.base_model.named_parameters())
    for name, p in reference.base_model.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        assert_scaled_close(grads[name].grad, p.grad, tolerance, name)


def assert_scaled_close(actual, expected, tolerance, name):
    """max |actual - expected| <= tolerance * max(1, max |expected|)."""
    error, scale = (actual - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    assert error <= tolerance * scale, f"{name}: max error {error:.3g} at scale {scale:.3g}"


def test_without_a_plan_it_delegates_to_flash_attention_2(monkeypatch):
    from transformers.integrations import flash_attention as hf

    seen = []

    def sentinel(q, k, v, attention_mask, query_length, is_causal, **kwargs):
        seen.append({"shape": tuple(q.shape), "mask": attention_mask, "impl": kwargs["attn_implementation"],
                     "causal": is_causal, "query_length": query_length})
        return torch.zeros_like(q)

    monkeypatch.setattr(hf, "_flash_attention_forward", sentinel)
    model = tiny_llama()
    model.set_attn_implementation(varlen.NAME)
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding: the 2-D mask goes through
    model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(seen) == 2 and not CALLS
    for call in seen:
        assert call["impl"] == "flash_attention_2" and call["causal"] and call["query_length"] == 5
        assert call["shape"] == (2, 5, 4, 8) and torch.equal(call["mask"].long(), mask)


@pytest.mark.cuda
def test_the_real_kernel_matches_dense_attention_on_cuda(monkeypatch):
    """flash-attn's own varlen kernel (not the emulation) on a packed layout, bf16: outputs and q/k/v
    gradients against dense masked attention in float32 (bf16 rounding tolerances)."""
    pytest.importorskip("flash_attn")
    monkeypatch.setattr(varlen, "flash_attn_varlen_func", None)  # _kernel() imports the real one
    cpu = random_layout(2, seed=7)
    layout = _with(cpu, input_ids=cpu.input_ids.cuda(), group=cpu.group.cuda(), branch=cpu.branch.cuda())
    t, scale = layout.tokens, 64 ** -0.5
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, h, t, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (4, 2, 2))
    with varlen.active(varlen.segments(layout)):
        out, _ = varlen.attention(_Attn().cuda(), q, k, v, None, scaling=scale)
    grad = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = dense(q32, k32, v32, layout.allowed(), scale)
    want_grads = torch.autograd.grad(want, (q32, k32, v32), grad.float())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
