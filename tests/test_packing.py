"""Shared-prefix, padding-free packing (engine/model/packing.py) gives the padded computation's numbers.

Proven here, in float32 with explicit tolerances (log-probs: |diff| <= 1e-5, plus 1e-6 * |log p| for the
family models, whose log-probs reach -75; gradients: per parameter ||g - g_ref|| <= 1e-5 * ||g_ref|| + 1e-7,
written `rel 1e-5` below):
- every family of tests/test_families.py that `forward.incompatibility` accepts gives the same per-token
  log-probs and the same gradients (REBEL loss, k = 2; a random linear functional, k = 4) packed with a
  shared prefix, packed unshared and padded; ALiBi / conv families are refused; a micro-batch longer than a
  sliding window falls back to the padded path (bitwise), one within the window takes the packed path;
- `pack` (a hand-built layout and its mask written out), `group_tokens`, `token_budget_split`, `split_to_count`;
- through the engine (build -> collect -> update): REBEL, folded log pi_t, RLOO k = 4, DPO and token-budget
  micro-batches give the padded path's log pi_t / log pi_ref (1e-5), completed batch (1e-6) and gradients;
- flex attention's BlockMask is the dense mask, and a flex-attention model's packed forward is SDPA's
  (its gradients only where FlexAttention has a backward: not on CPU, skipped with torch's message).
"""
import copy
import dataclasses
import logging

import pytest
import torch
import transformers as hf
from _models import left_pad
from test_families import _HYBRID, _LLAMA, FAMILIES, PAD, PROMPTS, VOCAB, _ids, tiny
from test_train import _with, small_cfg

from engine import build
from engine import config as C
from engine.algorithms import DPO, RLOO, RebelPreference
from engine.iteration import collect, micro_batches
from engine.iteration.batch import sequence_logprobs
from engine.iteration.update import update
from engine.model import attention as model_attention
from engine.model import block_attention, forward, packing
from engine.model.logprobs import PolicyLogprobs
from engine.model.packing import IGNORE
from rebel_kernels import rebel_loss_from_logprobs

ATOL = 1e-5  # per-token log-probabilities, float32 (the bound): |diff| <= 1e-5
# The families' heads (logits of O(5), T = 0.7) give log-probs down to -75, where 1e-5 is about one float32
# ulp (7.6e-6): there |diff| <= 1e-5 + 1e-6 * |log p| (observed: at most 9.5e-6, all within 1e-5 alone).
FAMILY_LP = dict(rtol=1e-6, atol=ATOL)
REL, FLOOR = 1e-5, 1e-7  # gradients, per parameter: ||g - g_ref|| <= REL * ||g_ref|| + FLOOR
T = 0.7
N = 6  # response width
# sample-major rows (row s * B + i: sample s of prompt i), lengths from 0 to N; PROMPTS[0] + N = 15 tokens
LENGTHS = {2: [6, 3, 5, 1, 1, 6, 2, 4], 4: [6, 3, 5, 1, 1, 6, 2, 4, 2, 1, 6, 3, 4, 2, 0, 6]}
LONGEST = len(PROMPTS[0]) + N
INCOMPATIBLE = {"falcon_alibi": "ALiBi", "bloom": "ALiBi", "lfm2_conv_hybrid": "conv"}


def shared_batch(k, seed=1):
    """k samples of each of PROMPTS (the same prompt tokens), random responses of LENGTHS[k]."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(PROMPTS)
    ids, mask = ids.repeat(k, 1), mask.repeat(k, 1)
    resp = torch.randint(6, VOCAB, (ids.shape[0], N), generator=g)
    live = torch.arange(N)[None] < torch.tensor(LENGTHS[k])[:, None]
    labels = torch.where(live, resp, IGNORE)
    return torch.cat([ids, torch.where(live, resp, PAD)], 1), torch.cat([mask, live.long()], 1), labels


def _objective(k, labels, seed=2):
    """k = 2: the REBEL loss with random log pi_t and rewards; k = 4: a random linear functional."""
    g = torch.Generator().manual_seed(seed)
    valid = labels != IGNORE
    if k == 2:
        old = torch.where(valid, -3 * torch.rand(labels.shape, generator=g).to(labels.device), 0.0)
        rewards = torch.randn(labels.shape[0], generator=g).to(labels.device)
        return lambda logp: rebel_loss_from_logprobs(logp, labels, old, rewards, eta=0.5)
    weights = torch.where(valid, torch.randn(labels.shape, generator=g).to(labels.device), 0.0)
    return lambda logp: (logp * weights).sum()


def _logp_and_grads(module, batch, k, objective):
    ids, mask, labels = batch
    params = [p for p in module.parameters() if p.requires_grad]
    logp = module(ids, mask, labels, samples=k)
    grads = torch.autograd.grad(objective(logp), params, allow_unused=True)
    return logp.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_grads_close(got, want, names, what=""):
    assert len(got) == len(want) == len(names)
    total = sum(w.norm() ** 2 for w in want) ** 0.5
    assert total > 1e-3, f"{what}: no gradient to compare"
    for name, a, b in zip(names, got, want):
        err, scale = (a - b).norm().item(), b.norm().item()
        assert err <= REL * scale + FLOOR, f"{what} {name}: ||diff|| {err:.3e} vs ||grad|| {scale:.3e}"


@pytest.fixture
def packed_calls(monkeypatch):
    """Records the forwards that took the packed path and the kind of mask (or blockwise-SDPA plan) each one
    handed to the model."""
    calls = []
    real_packed, real_mask = PolicyLogprobs._packed, forward.attention_mask

    def spy_packed(self, layout):
        calls.append("packed")
        return real_packed(self, layout)

    def spy_mask(layout, implementation, dtype):
        mask = real_mask(layout, implementation, dtype)
        calls.append(type(mask).__name__ if not torch.is_tensor(mask) else str(mask.dtype))
        return mask

    def spy_plan(layout):
        calls.append("BlockPlan")
        return real_plan(layout)

    real_plan = block_attention.plan
    monkeypatch.setattr(PolicyLogprobs, "_packed", spy_packed)
    monkeypatch.setattr(forward, "attention_mask", spy_mask)
    monkeypatch.setattr(block_attention, "plan", spy_plan)
    return calls


# what a packed forward hands each attention implementation
_MASK_KIND = {"sdpa": "torch.bool", "eager": "torch.float32", "flex_attention": "BlockMask",
              **{name: "BlockPlan" for name in block_attention.NAMES.values()}}


def _three_ways(model, k, packed_calls):
    """(padded, shared, unshared) log-probs and gradients of one model on shared_batch(k)."""
    batch = shared_batch(k)
    objective = _objective(k, batch[2])
    padded = _logp_and_grads(PolicyLogprobs(model, temperature=T), batch, k, objective)
    assert not packed_calls
    shared = _logp_and_grads(PolicyLogprobs(model, packed=True, shared=True, temperature=T), batch, k, objective)
    unshared = _logp_and_grads(PolicyLogprobs(model, packed=True, shared=False, temperature=T), batch, k, objective)
    return padded, shared, unshared


def _assert_packed_equals_padded(model, k, packed_calls, what):
    padded, shared, unshared = _three_ways(model, k, packed_calls)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert padded[0].abs().max() > 1.0  # real log-probs, not zeros
    for label, (logp, grads) in (("shared", shared), ("unshared", unshared)):
        torch.testing.assert_close(logp, padded[0], **FAMILY_LP,
                                   msg=lambda m, label=label: f"{what} {label}: {m}")
        assert_grads_close(grads, padded[1], names, f"{what} {label}")
    return padded, shared, unshared


# ----------------------------------------------------------------------------------------------
# 1. every family
# ----------------------------------------------------------------------------------------------
_engine_models: dict = {}


def _as_built(model, key):
    """A copy switched to the attention the engine trains with (model_attention.set_attention, the family's default
    implementation: SDPA families run blockwise SDPA, engine/model/block_attention.py, when packed)."""
    if key not in _engine_models:
        _engine_models[key] = copy.deepcopy(model)
        model_attention.set_attention(_engine_models[key], C.default().model)
    return _engine_models[key]


@pytest.mark.parametrize("attention", ["loaded", "engine"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_packed_shared_unshared_and_padded_agree(family, k, attention, packed_calls):
    """Compatible families: log-probs within 1e-5 and gradients within rel 1e-5, three ways; a sliding
    window shorter than the batch's sequences: the packed module IS the padded one (bitwise). `loaded`:
    transformers' implementation with the packed mask; `engine`: as build switches it."""
    model = tiny(family) if attention == "loaded" else _as_built(tiny(family), family)
    reason = forward.incompatibility(model)
    if family in INCOMPATIBLE:
        assert reason is not None and INCOMPATIBLE[family] in reason, (family, reason)
        return
    assert reason is None, f"{family}: {reason}"
    packed_calls.clear()  # the probe's packed forward
    window = packing.sliding_window(model.config)
    if window is not None and window < LONGEST:  # falls back: exactly the padded computation
        padded, shared, unshared = _three_ways(model, k, packed_calls)
        assert not packed_calls, f"{family}: a micro-batch longer than the window took the packed path"
        for logp, grads in (shared, unshared):
            assert torch.equal(logp, padded[0])
            assert all(torch.equal(a, b) for a, b in zip(grads, padded[1]))
        return
    _assert_packed_equals_padded(model, k, packed_calls, f"{family} ({attention})")
    assert packed_calls.count("packed") == 2, packed_calls  # shared and unshared both packed
    assert set(packed_calls) - {"packed"} == {_MASK_KIND[model_attention.attention_implementation(model)]}


def test_the_window_fallback_is_announced_once(caplog):
    model = tiny("mistral_window_4")
    module = PolicyLogprobs(model, packed=True, shared=True, temperature=T)
    ids, mask, labels = shared_batch(2)
    with caplog.at_level(logging.INFO, logger="rebel"), torch.no_grad():
        module(ids, mask, labels, samples=2)
        module(ids, mask, labels, samples=2)
    notices = [r.getMessage() for r in caplog.records if "sliding window" in r.getMessage()]
    assert len(notices) == 1 and f"{LONGEST} tokens" in notices[0] and "(4)" in notices[0]


def _scaled(model):
    """tests/test_families.tiny's treatment: eval, head scaled to logits of O(5), nonzero head bias."""
    model = model.eval()
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(5.0 / head.weight.norm(dim=1).mean())
        if head.bias is not None:
            head.bias.normal_(0.0, 1.0)
    return model


def _wide(family, window=64):
    """Sliding-window families with a window longer than every sequence of shared_batch."""
    torch.manual_seed(0)
    if family == "mistral":
        model = hf.MistralForCausalLM(hf.MistralConfig(**_LLAMA, sliding_window=window, **_ids()))
    elif family == "gemma2":
        model = hf.Gemma2ForCausalLM(hf.Gemma2Config(**_LLAMA, head_dim=8, sliding_window=window,
                                                     final_logit_softcapping=3.0, **_ids()))
    elif family == "gemma3":
        model = hf.Gemma3ForCausalLM(hf.Gemma3TextConfig(**_LLAMA, head_dim=8, sliding_window=window,
                                                         layer_types=_HYBRID, final_logit_softcapping=3.0, **_ids()))
    elif family == "cohere2":
        model = hf.Cohere2ForCausalLM(hf.Cohere2Config(**_LLAMA, logit_scale=2.0, sliding_window=window,
                                                       layer_types=_HYBRID, **_ids()))
    elif family == "phi3":
        model = hf.Phi3ForCausalLM(hf.Phi3Config(**_LLAMA, sliding_window=window, **_ids()))
    elif family == "llama_eager":
        model = hf.LlamaForCausalLM(hf.LlamaConfig(**_LLAMA, **_ids()))
        model.set_attn_implementation("eager")
    else:
        raise ValueError(family)
    return _scaled(model)


@pytest.mark.parametrize("attention", ["loaded", "engine"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "cohere2", "phi3", "llama_eager",
                                    "mistral_window_exact"])
def test_sliding_window_longer_than_the_batch_takes_the_packed_path(family, k, attention, packed_calls):
    """Windows of 64 (and one exactly the longest sequence, 15): packed, within 1e-5 / rel 1e-5. gemma2
    runs eager attention (the additive float mask), as does an eager Llama; `engine`: as build switches it
    (SDPA -> blockwise SDPA)."""
    model = _wide("mistral", LONGEST) if family == "mistral_window_exact" else _wide(family)
    if attention == "engine":
        model_attention.set_attention(model, C.default().model)
    assert forward.incompatibility(model) is None
    packed_calls.clear()  # the probe's packed forward
    window = packing.sliding_window(model.config)
    assert (window is None) == (family == "llama_eager")
    layout = packing.pack(*shared_batch(k), samples=k)
    assert layout.longest == LONGEST and packing.fits_window(layout, window)
    _assert_packed_equals_padded(model, k, packed_calls, f"{family} ({attention})")
    assert packed_calls.count("packed") == 2, packed_calls
    inner = "eager" if family in ("gemma2", "llama_eager") else "sdpa"
    implementation = inner if attention == "loaded" else block_attention.NAMES[inner]
    assert model_attention.attention_implementation(model) == implementation
    assert set(packed_calls) - {"packed"} == {_MASK_KIND[implementation]}


def test_one_token_past_the_window_falls_back(packed_calls):
    model = _wide("mistral", LONGEST - 1)
    ids, mask, labels = shared_batch(2)
    with torch.no_grad():
        got = PolicyLogprobs(model, packed=True, shared=True, temperature=T)(ids, mask, labels, samples=2)
        want = PolicyLogprobs(model, temperature=T)(ids, mask, labels, samples=2)
    assert not packed_calls and torch.equal(got, want)


def test_build_keeps_incompatible_families_padded(caplog):
    cfg = C.default()
    assert build.packing_mode(tiny("llama"), cfg) == (True, True)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_tokens=0, shared_prefix=False))
    assert build.packing_mode(tiny("llama"), off) == (False, False)
    with caplog.at_level(logging.WARNING, logger="rebel"):
        for family in INCOMPATIBLE:
            assert build.packing_mode(tiny(family), cfg) == (False, False), family
    assert len([r for r in caplog.records if "packing off" in r.getMessage()]) == len(INCOMPATIBLE)


# ----------------------------------------------------------------------------------------------
# 2. the layout
# ----------------------------------------------------------------------------------------------
def _hand_built():
    """Prompts [1, 7, 8] and [1, 9] (left-padded to 3), k = 2: responses [20, 21, 22], [30], [40, 41], []."""
    ids = torch.tensor([[1, 7, 8, 20, 21, 22], [0, 1, 9, 30, 0, 0], [1, 7, 8, 40, 41, 0], [0, 1, 9, 0, 0, 0]])
    labels = torch.tensor([[20, 21, 22], [30, IGNORE, IGNORE], [40, 41, IGNORE], [IGNORE] * 3])
    mask = torch.cat([(ids[:, :3] != 0).long(), (labels != IGNORE).long()], 1)
    return ids, mask, labels


def test_pack_lays_out_a_prompt_once_with_its_branches():
    ids, mask, labels = _hand_built()
    layout = packing.pack(ids, mask, labels, samples=2)
    # group 0: prompt 1 7 8, branch 1: 20 21 (22 is never forwarded), branch 2: 40; group 1: prompt 1 9 only
    assert layout.input_ids.tolist() == [[1, 7, 8, 20, 21, 40, 1, 9]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1]]
    assert layout.group.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert layout.branch.tolist() == [0, 0, 0, 1, 1, 2, 0, 0]
    assert layout.source.tolist() == [2, 3, 4, 2, 5, 7]  # the last prompt token predicts every first label
    assert layout.rows.tolist() == [0, 0, 0, 2, 2, 1] and layout.cols.tolist() == [0, 1, 2, 0, 1, 0]
    assert layout.labels.tolist() == [20, 21, 22, 40, 41, 30]
    assert layout.shape == (4, 3) and layout.longest == 6 and layout.tokens == 8
    expected = torch.tensor([
        # 1  7  8 20 21 40  1  9   (keys)
        [1, 0, 0, 0, 0, 0, 0, 0],  # 1
        [1, 1, 0, 0, 0, 0, 0, 0],  # 7
        [1, 1, 1, 0, 0, 0, 0, 0],  # 8
        [1, 1, 1, 1, 0, 0, 0, 0],  # 20 (branch 1)
        [1, 1, 1, 1, 1, 0, 0, 0],  # 21 (branch 1)
        [1, 1, 1, 0, 0, 1, 0, 0],  # 40 (branch 2: the prompt and itself, not branch 1)
        [0, 0, 0, 0, 0, 0, 1, 0],  # 1 (group 1)
        [0, 0, 0, 0, 0, 0, 1, 1],  # 9
    ], dtype=torch.bool)
    assert torch.equal(layout.allowed(), expected)
    assert torch.equal(forward.attention_mask(layout, "sdpa", torch.float32), expected[None, None])
    additive = forward.attention_mask(layout, "eager", torch.float32)
    assert additive.dtype == torch.float32 and additive.shape == (1, 1, 8, 8)
    assert torch.equal(additive[0, 0] == 0, expected) and (additive[0, 0][~expected] == torch.finfo().min).all()
    # scatter: back to the [R, N] rows, zeros where nothing is scored (the empty row included)
    out = layout.scatter(torch.arange(1.0, 7.0))
    assert out.tolist() == [[1, 2, 3], [6, 0, 0], [4, 5, 0], [0, 0, 0]]


def test_pack_unshared_gives_every_row_its_own_group():
    ids, mask, labels = _hand_built()
    layout = packing.pack(ids, mask, labels, samples=1)
    assert layout.input_ids.tolist() == [[1, 7, 8, 20, 21, 1, 9, 1, 7, 8, 40, 1, 9]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 0, 1]]
    assert layout.group.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert layout.source.tolist() == [2, 3, 4, 6, 9, 10]
    assert layout.rows.tolist() == [0, 0, 0, 1, 2, 2]
    allowed = layout.allowed()
    assert not allowed[5:7, :5].any() and not allowed[7:, :7].any()  # no group sees another


def test_pack_refuses_samples_that_do_not_share_their_prompt():
    ids, mask, labels = _hand_built()
    other = ids.clone()
    other[2, 1] = 6  # sample 1 of prompt 0 has another prompt
    with pytest.raises(ValueError, match="prompt 0 do not share"):
        packing.pack(other, mask, labels, samples=2)
    packing.pack(other, mask, labels, samples=1)  # unshared: fine
    with pytest.raises(ValueError, match="multiple of samples"):
        packing.pack(ids, mask, labels, samples=3)
    holes = labels.clone()
    holes[0, 1] = IGNORE  # a scored label after an ignored one
    with pytest.raises(ValueError, match="prefix of the row"):
        packing.pack(ids, mask, holes, samples=2)


def test_group_tokens_count_the_packed_tokens():
    ids, mask, labels = _hand_built()
    assert packing.group_tokens(mask, labels, samples=2, shared=True) == [6, 2]
    assert packing.group_tokens(mask, labels, samples=2, shared=False) == [5 + 4, 2 + 2]  # a prompt copy per sample
    for k in (2, 4):
        ids, mask, labels = shared_batch(k)
        for shared in (True, False):
            tokens = packing.group_tokens(mask, labels, samples=k, shared=shared)
            assert sum(tokens) == packing.pack(ids, mask, labels, samples=k if shared else 1).tokens


def test_token_budget_split_hand_example():
    parts = packing.token_budget_split(torch.arange(6), [5, 2, 4, 2, 9, 1], budget=7)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4], [5]]  # 9 > 7 goes alone
    parts = packing.token_budget_split(torch.tensor([3, 0, 5]), [5, 2, 4, 2, 9, 1], budget=100)
    assert [p.tolist() for p in parts] == [[3, 0, 5]]


@pytest.mark.parametrize("budget", [1, 5, 12, 30, 1000])
def test_token_budget_split_properties(budget):
    g = torch.Generator().manual_seed(budget)
    tokens = torch.randint(1, 20, (40,), generator=g).tolist()
    order = torch.randperm(40, generator=g)
    parts = packing.token_budget_split(order, tokens, budget)
    assert torch.equal(torch.cat(parts), order)  # order kept, every prompt once, whole groups
    for i, part in enumerate(parts):
        used = sum(tokens[j] for j in part.tolist())
        assert used <= budget or len(part) == 1
        if i + 1 < len(parts):  # greedy: the next group did not fit
            assert used + tokens[parts[i + 1][0].item()] > budget


def test_split_to_count_halves_the_largest():
    parts = [torch.tensor([0, 1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    assert [p.tolist() for p in packing.split_to_count(parts, 2)] == [[0, 1, 2, 3], [4], [5, 6]]
    assert [p.tolist() for p in packing.split_to_count(parts, 4)] == [[0, 1], [2, 3], [4], [5, 6]]
    assert [p.tolist() for p in packing.split_to_count(parts, 5)] == [[0], [1], [2, 3], [4], [5, 6]]
    assert [p.tolist() for p in packing.split_to_count(parts, 7)] == [[0], [1], [2], [3], [4], [5], [6]]
    with pytest.raises(ValueError, match="cannot split 7 prompts into 8"):
        packing.split_to_count(parts, 8)


def test_an_empty_response_row_and_a_one_token_response():
    """Rows with 0 and 1 scored labels: zeros where nothing is scored, the prompt's last hidden state only."""
    model = tiny("llama")
    ids, mask, labels = _hand_built()
    with torch.no_grad():
        got = PolicyLogprobs(model, packed=True, shared=True, temperature=T)(ids, mask, labels, samples=2)
        want = PolicyLogprobs(model, temperature=T)(ids, mask, labels, samples=2)
    torch.testing.assert_close(got, want, **FAMILY_LP)
    assert (got[3] == 0).all() and (got[1, 1:] == 0).all() and (got[1, 0] < 0).all()


# ----------------------------------------------------------------------------------------------
# 3. through the engine
# ----------------------------------------------------------------------------------------------
def _train(cfg, **fields):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))


OFF = dict(micro_batch_tokens=0, shared_prefix=False, fold_old_logprobs=False)


def _cfg(run_dir, algorithm=None, **train):
    """test_train's small config (8 prompts, one epoch); another algorithm on the same counting task."""
    cfg = small_cfg(run_dir, optim=C.OptimConfig(iterations=1, lr=1e-2))
    if algorithm is not None:
        base = C.counting_with(algorithm, epochs=1)
        cfg = dataclasses.replace(cfg, algorithm=base.algorithm, data=base.data, generation=base.generation)
    return _train(cfg, num_epochs=1, **train)


def _variant(run, **train):
    """The run with other train settings, its own copy of the policy (an update moves the weights) and
    log-prob modules packed as the settings say, over the same (already built) models."""
    cfg = _train(run.cfg, **train)
    packed, shared = bool(cfg.train.micro_batch_tokens), cfg.train.shared_prefix
    policy_lp = copy.deepcopy(run.policy_lp)
    policy_lp.packed, policy_lp.shared = packed, shared
    reference_lp = PolicyLogprobs(run.reference_lp.lm, temperature=run.reference_lp.temperature, packed=packed,
                                  shared=shared)
    return _with(dataclasses.replace(run, cfg=cfg, policy_lp=policy_lp, reference_lp=reference_lp), cfg)


def _step(run, batch):
    """One update (one epoch, one step); the gradients it accumulated, by name."""
    updated = update(run, batch)
    grads = {n: p.grad.clone() for n, p in run.policy_lp.named_parameters() if p.requires_grad}
    return updated.metrics, updated.batch, grads


def _rewards(cfg, old, ref, scores):
    """The KL and shaped rewards the algorithm derives from log pi_t, as collect and the folded update ask."""
    return cfg.algorithm.rewards(old=old, ref=ref, scores=scores, preferences=None, kl_coef=cfg.reward.kl_coef)


def _assert_same_step(got, want, what):
    names = list(want)
    assert list(got) == names
    assert_grads_close([got[n] for n in names], [want[n] for n in names], names, what)


def _unfolded(batch):
    """The batch as collect hands it over when log pi_t is folded into the update."""
    return dataclasses.replace(batch, old_logprobs=None, kl=None, rewards=None)


@pytest.mark.parametrize("attention", [None, "eager"])
def test_rebel_step_packed_equals_padded(attention, tmp_path):
    """(a) The same sampled responses: log pi_t and log pi_ref of the packed modules (built with packing
    on) within 1e-5 of the padded ones, and one REBEL step's accumulated gradients within rel 1e-5; with
    the family's attention (the built-in Llama: SDPA) and with eager attention, both packed blockwise."""
    def cfg(name, **train):
        c = _cfg(tmp_path / name, **train)
        return dataclasses.replace(c, model=dataclasses.replace(c.model, attn_implementation=attention))

    off, on = build.build(cfg("off", **OFF)), build.build(cfg("on"))
    assert (off.policy_lp.packed, on.policy_lp.packed, on.policy_lp.shared, on.reference_lp.packed) == (
        False, True, True, True)
    assert model_attention.attention_implementation(on.policy) == block_attention.NAMES[attention or "sdpa"]
    for a, b in zip(off.policy.parameters(), on.policy.parameters()):
        assert torch.equal(a, b)
    batch, _ = collect.collect(off, off.order.take(8))
    valid = batch.labels != IGNORE
    assert batch.old_logprobs is not None and len(set(valid.sum(-1).tolist())) > 2  # various lengths
    old = sequence_logprobs(on.policy_lp, batch, collect._micro_batches(on, batch))
    ref = sequence_logprobs(on.reference_lp, batch, collect._micro_batches(on, batch))
    torch.testing.assert_close(old, batch.old_logprobs, rtol=0, atol=ATOL)
    torch.testing.assert_close(ref, batch.ref_logprobs, rtol=0, atol=ATOL)
    assert (old[~valid] == 0).all()
    want_metrics, _, want = _step(_with(dataclasses.replace(off, policy_lp=copy.deepcopy(off.policy_lp)), off.cfg),
                                  batch)
    got_metrics, done, got = _step(_with(on, on.cfg), dataclasses.replace(_unfolded(batch), ref_logprobs=ref))
    _assert_same_step(got, want, "REBEL packed vs padded")
    assert got_metrics["loss/first"] == pytest.approx(want_metrics["loss/first"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(done.old_logprobs, batch.old_logprobs, rtol=0, atol=ATOL)


def test_folded_old_logprobs_complete_the_batch(tmp_path):
    """(b) Folded: collect leaves log pi_t, the KL and the rewards out; the update's first epoch records
    them, equal (1e-6) to the unfolded packed path's (and within 1e-5 of the padded path's), the first ratio
    is exactly 0 (loss/first = mean((r_i - r_{B+i})^2)) and the gradients are the unfolded step's."""
    run = build.build(_cfg(tmp_path / "on"))
    assert micro_batches.folds(run.cfg)
    batch, _ = collect.collect(run, run.order.take(8))
    assert batch.old_logprobs is None and batch.kl is None and batch.rewards is None
    assert batch.ref_logprobs is not None and batch.scores is not None
    # what an unfolded packed collect records
    old = sequence_logprobs(run.policy_lp, batch, collect._micro_batches(run, batch))
    kl, rewards = _rewards(run.cfg, old, batch.ref_logprobs, batch.scores)
    unfolded = dataclasses.replace(batch, old_logprobs=old, kl=kl, rewards=rewards)
    metrics, done, grads = _step(_variant(run), batch)
    for name in ("old_logprobs", "kl", "rewards"):
        torch.testing.assert_close(getattr(done, name), getattr(unfolded, name), rtol=0, atol=1e-6, msg=name)
    b = batch.groups
    first = ((done.rewards[:b] - done.rewards[b:]) ** 2).mean().item()
    assert first > 0 and metrics["loss/first"] == pytest.approx(first, rel=1e-6)
    no_fold = _variant(run, fold_old_logprobs=False)
    assert not micro_batches.folds(no_fold.cfg)
    metrics_unfolded, same, want = _step(no_fold, unfolded)
    assert same is unfolded  # nothing to complete
    assert metrics["loss/first"] == pytest.approx(metrics_unfolded["loss/first"], rel=1e-6)
    _assert_same_step(grads, want, "folded vs unfolded")
    for key, value in metrics_unfolded.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # two epochs: the second (shuffled) epoch trains on the completed batch, as on the collected one
    two = [_step(_variant(run, num_epochs=2, **fold), b) for fold, b in (({}, batch),
                                                                          ({"fold_old_logprobs": False}, unfolded))]
    assert two[0][0]["loss/last"] == pytest.approx(two[1][0]["loss/last"], rel=1e-5)
    _assert_same_step(two[0][2], two[1][2], "second epoch, folded vs unfolded")
    padded = _variant(run, **OFF)
    padded_old = sequence_logprobs(padded.policy_lp, batch, collect._micro_batches(padded, batch))
    torch.testing.assert_close(done.old_logprobs, padded_old, rtol=0, atol=ATOL)
    _, _, padded_grads = _step(padded, dataclasses.replace(unfolded, old_logprobs=padded_old))
    _assert_same_step(grads, padded_grads, "folded packed vs padded")


@pytest.mark.parametrize("algorithm", [RLOO(samples_per_prompt=4), DPO(), RebelPreference()],
                         ids=["rloo4", "dpo", "rebel_preference"])
def test_other_algorithms_packed_equal_padded(algorithm, tmp_path):
    """(c) RLOO with k = 4 shared samples (folded), offline DPO (chosen / rejected sharing the prompt) and
    REBEL from preferences (3 samples, 2 trained: not folded, the anchor only in the reference pass): the
    packed path's log pi_ref within 1e-5 and its step's gradients within rel 1e-5 of the padded path."""
    off = build.build(_cfg(tmp_path / "off", algorithm, **OFF))
    chosen = off.order.take(8)
    if algorithm.offline:
        batch = collect.collect_preference_pairs(off, chosen)
        assert batch.old_logprobs is None
    else:
        batch, _ = collect.collect(off, chosen)
    assert batch.samples == algorithm.samples_per_prompt
    on = _variant(off, micro_batch_tokens=8192, shared_prefix=True, fold_old_logprobs=True)
    assert micro_batches.folds(on.cfg) == isinstance(algorithm, RLOO)
    ref = sequence_logprobs(on.reference_lp, batch, collect._micro_batches(on, batch))
    torch.testing.assert_close(ref, batch.ref_logprobs, rtol=0, atol=ATOL)
    _, _, want = _step(_variant(off), batch)
    if algorithm.offline:
        packed_batch = dataclasses.replace(batch, ref_logprobs=ref)
    elif micro_batches.folds(on.cfg):
        packed_batch = dataclasses.replace(_unfolded(batch), ref_logprobs=ref)
    else:  # what collect records on the packed run: log pi_t, the KL and the preference rewards
        old = sequence_logprobs(on.policy_lp, batch, collect._micro_batches(on, batch))
        torch.testing.assert_close(old, batch.old_logprobs, rtol=0, atol=ATOL)
        kl, rewards = on.cfg.algorithm.rewards(old=old, ref=ref, scores=batch.scores,
                                               preferences=batch.anchor_preferences, kl_coef=on.cfg.reward.kl_coef)
        packed_batch = dataclasses.replace(batch, old_logprobs=old, ref_logprobs=ref, kl=kl, rewards=rewards)
    _, done, got = _step(on, packed_batch)
    _assert_same_step(got, want, type(algorithm).__name__)
    if micro_batches.folds(on.cfg):
        torch.testing.assert_close(done.old_logprobs, batch.old_logprobs, rtol=0, atol=ATOL)
        torch.testing.assert_close(done.rewards, batch.rewards, rtol=0, atol=ATOL)


def test_a_small_token_budget_splits_without_changing_the_step(tmp_path):
    """(d) A budget of ~2 prompts' tokens: several micro-batches within it, the same gradients (rel 1e-5)
    as one micro-batch and as the padded path; a budget of 1 token: one prompt per micro-batch."""
    run = build.build(_cfg(tmp_path / "on"))
    batch, _ = collect.collect(run, run.order.take(8))
    budget = 2 * max(packing.group_tokens(batch.attention_mask, batch.labels, batch.samples, shared=True))
    prompts = torch.arange(batch.groups)
    steps = {}
    for name, train in {"one": dict(micro_batch_tokens=10**6), "budget": dict(micro_batch_tokens=budget),
                        "single": dict(micro_batch_tokens=1), "padded": OFF}.items():
        variant = _variant(run, **train)
        parts = micro_batches.micro_batches(variant, batch, prompts)
        if name == "one":
            assert len(parts) == 1
        elif name == "budget":
            assert 1 < len(parts) < batch.groups
            assert all(_packed_tokens(batch, p, shared=True) <= budget for p in parts)
        elif name == "single":
            assert [p.tolist() for p in parts] == [[i] for i in range(batch.groups)]
        if name == "padded":  # the padded path records log pi_t in collect, as an unfolded run does
            old = sequence_logprobs(variant.policy_lp, batch, collect._micro_batches(variant, batch))
            kl, rewards = _rewards(variant.cfg, old, batch.ref_logprobs, batch.scores)
            steps[name] = _step(variant, dataclasses.replace(batch, old_logprobs=old, kl=kl, rewards=rewards))
        else:
            steps[name] = _step(variant, batch)
    for name in ("budget", "single", "padded"):
        _assert_same_step(steps[name][2], steps["one"][2], f"{name} vs one micro-batch")
        assert steps[name][0]["loss/first"] == pytest.approx(steps["one"][0]["loss/first"], rel=1e-5)
        for field in ("old_logprobs", "rewards"):
            torch.testing.assert_close(getattr(steps[name][1], field), getattr(steps["one"][1], field), rtol=0,
                                       atol=ATOL)


def _packed_tokens(batch, prompts, shared):
    rows = batch.rows(prompts)
    return packing.pack(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows],
                        batch.samples if shared else 1).tokens


def test_unshared_packing_respects_the_token_budget(tmp_path):
    run = build.build(_cfg(tmp_path / "on"))
    batch, _ = collect.collect(run, run.order.take(8))
    prompts = torch.arange(batch.groups)
    per_prompt = [_packed_tokens(batch, p[None], shared=False) for p in prompts]
    budget = 2 * max(per_prompt)
    parts = micro_batches.micro_batches(_variant(run, micro_batch_tokens=budget, shared_prefix=False), batch, prompts)
    assert torch.equal(torch.cat(parts), prompts)
    used = [_packed_tokens(batch, p, shared=False) for p in parts]
    assert all(n <= budget for n in used), f"budget {budget}, packed tokens per micro-batch {used}"


# ----------------------------------------------------------------------------------------------
# 4. flex attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_block_mask_is_the_dense_mask():
    """forward.block_mask's mask_mod evaluates to Layout.allowed(), and torch's (unfused, eager) flex
    attention under it gives SDPA's output under the boolean mask."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    for layout in (packing.pack(*_hand_built(), samples=2), packing.pack(*shared_batch(4), samples=4)):
        block = forward.block_mask(layout)
        dense = flex.create_mask(block.mask_mod, None, None, layout.tokens, layout.tokens, device="cpu")
        assert torch.equal(dense[0, 0], layout.allowed())
        q, k, v = torch.randn(3, 1, 2, layout.tokens, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
        got = flex.flex_attention(q, k, v, block_mask=block)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=layout.allowed())
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def _flex_llama(monkeypatch):
    """A tiny Mistral (window 64) and its copy on transformers' flex-attention path. transformers compiles
    flex attention on its first call (~15 s on one CPU thread): with `monkeypatch` its wrapper is replaced
    by torch's eager (unfused) flex_attention."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import transformers.integrations.flex_attention as hf_flex

    if monkeypatch is not None:
        monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                            lambda query, key, value, training=False, **kwargs: flex.flex_attention(
                                query, key, value, **kwargs))
    model = _wide("mistral", 64)  # a window (64) longer than every sequence, as for the SDPA variants
    flexed = copy.deepcopy(model)
    flexed.set_attn_implementation("flex_attention")
    assert model_attention.attention_implementation(flexed) == "flex_attention"
    return model, flexed


# On CPU torch's eager flex attention runs the forward (it has no backward there); on CUDA transformers'
# compiled flex attention runs forward and backward as in training (the GPU session's `pytest -m cuda`).
FLEX_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("where", FLEX_DEVICES)
def test_flex_attention_packed_forward_equals_sdpa(monkeypatch, packed_calls, where):
    model, flexed = _flex_llama(monkeypatch if where == "cpu" else None)
    model, flexed = model.to(where), flexed.to(where)
    assert forward.incompatibility(flexed) is None  # the probe runs the BlockMask
    for k in (2, 4):
        batch = [x.to(where) for x in shared_batch(k)]
        with torch.no_grad():
            want = PolicyLogprobs(model, packed=True, shared=True, temperature=T)(*batch, samples=k)
            padded = PolicyLogprobs(model, temperature=T)(*batch, samples=k)
            packed_calls.clear()
            got = PolicyLogprobs(flexed, packed=True, shared=True, temperature=T)(*batch, samples=k)
        assert packed_calls == ["packed", "BlockMask"]
        torch.testing.assert_close(got, want, **FAMILY_LP)
        torch.testing.assert_close(got, padded, **FAMILY_LP)


@pytest.mark.cuda
def test_flex_attention_packed_gradients_equal_sdpa(packed_calls):
    """transformers' compiled flex attention differentiates on CUDA only (torch refuses its backward on
    CPU, hence the model.attn_implementation check at load): packed gradients equal SDPA's padded ones."""
    model, flexed = _flex_llama(None)
    model, flexed = model.cuda(), flexed.cuda()
    batch = [x.cuda() for x in shared_batch(2)]
    objective = _objective(2, batch[2])
    got = _logp_and_grads(PolicyLogprobs(flexed, packed=True, shared=True, temperature=T), batch, 2, objective)
    want = _logp_and_grads(PolicyLogprobs(model, temperature=T), batch, 2, objective)
    torch.testing.assert_close(got[0], want[0], **FAMILY_LP)
    assert_grads_close(got[1], want[1], [n for n, _ in model.named_parameters()], "flex attention")
