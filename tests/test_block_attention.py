"""Blockwise SDPA for packed micro-batches (engine/model/block_attention.py): the plan's per-group blocks apply
exactly the packed tree mask; a tiny GQA Llama switched to it gives the dense-mask SDPA hidden states
and gradients (1e-5, float32); activation checkpointing recomputes under the forward's plan; with no
plan it is transformers' SDPA; the engine switches SDPA models to it."""
import copy
import dataclasses

import pytest
import torch
import transformers as hf

from engine.model import block_attention, forward, packing
from engine.model.attention import attention_implementation
from engine.model.logprobs import PolicyLogprobs
from engine.runtime import parallel

IGNORE = packing.IGNORE


def _batch(seed: int, prompts=(5, 1, 9), responses=((4, 1), (2, 3), (6, 2)), vocab=128):
    """Sample-major left-padded rows (row s * B + i: sample s of prompt i), responses as labels."""
    g = torch.Generator().manual_seed(seed)
    b, k = len(prompts), len(responses[0])
    p, n = max(prompts), max(max(r) for r in responses)
    ids = torch.randint(1, vocab, (k * b, p + n), generator=g)
    mask = torch.zeros(k * b, p + n, dtype=torch.long)
    labels = torch.full((k * b, n), IGNORE)
    for s in range(k):
        for i in range(b):
            row = s * b + i
            ids[row, :p] = ids[i, :p]
            mask[row, p - prompts[i] : p + responses[i][s]] = 1
            labels[row, : responses[i][s]] = ids[row, p : p + responses[i][s]]
    return ids, mask, labels


def _dense_from_plan(p: block_attention.BlockPlan) -> torch.Tensor:
    """The [T, T] mask the blocks apply between real tokens, in packed indices."""
    out = torch.zeros(p.tokens, p.tokens, dtype=torch.bool)
    g, width = p.slots.shape
    real = p.real.view(g, width)
    for group in range(g):
        idx = p.slots[group][real[group]]
        keep = real[group]
        out[idx[:, None], idx[None, :]] = p.mask[group, 0][keep][:, keep]
    return out


def test_blocks_apply_the_packed_tree_mask():
    for seed, samples in ((0, 2), (1, 1)):
        ids, mask, labels = _batch(seed)
        layout = packing.pack(ids, mask, labels, samples)
        p = block_attention.plan(layout)
        assert torch.equal(_dense_from_plan(p), layout.allowed())
        assert int(p.real.sum()) == layout.tokens
        assert p.mask.any(-1).all()  # no empty softmax row, padding slots included


def _llama():
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(hf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                              max_position_embeddings=64)).eval()


def _hidden_and_grads(lm, layout, checkpointed=False):
    lm = copy.deepcopy(lm)
    if checkpointed:
        parallel.apply_activation_checkpointing(lm, context_fn=forward.checkpoint_contexts)
    hidden = forward.body(lm, layout, torch.float32)
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    (hidden * probe).sum().backward()
    return hidden.detach(), {n.replace("._checkpoint_wrapped_module", ""): q.grad
                             for n, q in lm.named_parameters() if q.grad is not None}


def _assert_grads_close(a: dict, b: dict, rel: float):
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).norm() <= rel * b[name].norm() + 1e-7, name


@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_blockwise_attention_equals_the_dense_mask_values_and_gradients(inner):
    lm = _llama()
    lm.set_attn_implementation(inner)
    layout = packing.pack(*_batch(2), samples=2)
    dense_h, dense_g = _hidden_and_grads(lm, layout)
    blocked = copy.deepcopy(lm)
    blocked.set_attn_implementation(block_attention.register(inner))
    block_h, block_g = _hidden_and_grads(blocked, layout)
    torch.testing.assert_close(block_h, dense_h, rtol=1e-5, atol=1e-5)
    _assert_grads_close(block_g, dense_g, 1e-5)


def test_blockwise_eager_keeps_the_familys_soft_capped_attention():
    """Gemma-2's eager attention soft-caps its scores: blockwise packed equals padded rows."""
    torch.manual_seed(0)
    lm = hf.Gemma2ForCausalLM(hf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              vocab_size=128, sliding_window=64, attn_logit_softcapping=2.0,
                                              query_pre_attn_scalar=8)).eval()
    with torch.no_grad():  # scores of O(10), where the cap of 2 bites; logits of O(5)
        for layer in lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
        lm.lm_head.weight.mul_(5.0 / lm.lm_head.weight.norm(dim=1).mean())
    assert attention_implementation(lm) == "eager"
    packed_lm = copy.deepcopy(lm)
    packed_lm.set_attn_implementation(block_attention.register("eager"))
    ids, mask, labels = _batch(6)
    padded = PolicyLogprobs(lm, temperature=1.0)(ids, mask, labels)
    packed = PolicyLogprobs(packed_lm, packed=True, shared=True, temperature=1.0)(ids, mask, labels, samples=2)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    uncapped = copy.deepcopy(packed_lm)
    uncapped.config.attn_logit_softcapping = None
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    other = PolicyLogprobs(uncapped, packed=True, shared=True, temperature=1.0)(ids, mask, labels, samples=2)
    assert (other - padded).abs().max() > 1e-3  # the cap matters here: the family's function ran


def test_activation_checkpointing_recomputes_under_the_forwards_plan():
    block_attention.register()
    lm = _llama()
    lm.set_attn_implementation(block_attention.NAME)
    layout = packing.pack(*_batch(3), samples=2)
    plain_h, plain_g = _hidden_and_grads(lm, layout)
    ckpt_h, ckpt_g = _hidden_and_grads(lm, layout, checkpointed=True)
    torch.testing.assert_close(ckpt_h, plain_h, rtol=0, atol=0)
    _assert_grads_close(ckpt_g, plain_g, 1e-6)


def test_without_a_plan_it_is_transformers_sdpa():
    block_attention.register()
    lm = _llama()
    switched = copy.deepcopy(lm)
    switched.set_attn_implementation(block_attention.NAME)
    ids, mask, _ = _batch(4)
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask).logits
        got = switched(input_ids=ids, attention_mask=mask).logits
    assert block_attention.current() is None
    assert torch.equal(got, want)


@pytest.mark.parametrize("device, dtype, tolerance", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.float32, 1e-4, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, 3e-2, marks=pytest.mark.cuda),
])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(device, dtype, tolerance):
    """The training forward (PolicyLogprobs) packed on blockwise SDPA against padded rows: per-token
    log-probabilities and every parameter's gradient of their sum (on CUDA: SDPA's fused kernels)."""
    block_attention.register()
    lm = _llama().to(device=device, dtype=dtype)
    packed_lm = copy.deepcopy(lm)
    packed_lm.set_attn_implementation(block_attention.NAME)
    ids, mask, labels = (x.to(device) for x in _batch(5))
    padded = PolicyLogprobs(lm, temperature=0.7)(ids, mask, labels)
    packed = PolicyLogprobs(packed_lm, packed=True, shared=True, temperature=0.7)(ids, mask, labels, samples=2)
    torch.testing.assert_close(packed, padded, rtol=tolerance, atol=tolerance)
    padded.sum().backward()
    packed.sum().backward()
    for (name, p), q in zip(packed_lm.named_parameters(), lm.parameters()):
        assert (p.grad.float() - q.grad.float()).norm() <= tolerance * q.grad.float().norm() + 1e-6, name


def test_the_engine_runs_sdpa_models_blockwise_and_refuses_what_cannot_train_here(tmp_path):
    from engine import config as C
    from engine.build import build

    cfg = C.TrainConfig(run_dir=str(tmp_path / "run"), logging=C.LoggingConfig(tensorboard=False, plots=False,
                                                                               progress=False))
    run = build(cfg)
    assert attention_implementation(run.policy) == block_attention.NAME
    assert run.policy_lp.packed and run.policy_lp.shared and run.reference_lp.packed
    run.lock.release()
    for name, match in (("flex_attention", "needs a CUDA device"), ("flash_attention_2", "needs flash-attn")):
        if torch.cuda.is_available():
            break
        bad = dataclasses.replace(cfg, run_dir=str(tmp_path / name),
                                  model=dataclasses.replace(cfg.model, attn_implementation=name))
        with pytest.raises(ValueError, match=match):
            build(bad)
