"""The reference (the specification) against an independent float64 formula and hand-computed numbers."""
import math

import pytest
import torch
from _inputs import make_batch

from rebel_kernels.reference import (
    reference_logits,
    reference_rebel_loss,
    reference_rebel_loss_from_logprobs,
    reference_token_logprobs,
    sequence_old_logprobs,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def loop_token_logprobs(hidden, weight, bias, labels, temperature, ignore_index):
    """Per token, with Python floats (IEEE double): logits by explicit dot products, then
    lse = m + log(sum exp(z - m)), logp = z[y] - lse, entropy = lse - sum softmax(z) * z."""
    H = hidden.shape[-1]
    hs = hidden.detach().to(torch.float64).reshape(-1, H).tolist()
    ws = weight.detach().to(torch.float64).tolist()
    bs = None if bias is None else bias.detach().to(torch.float64).tolist()
    ys = labels.reshape(-1).tolist()
    logps, ents = [], []
    for h, y in zip(hs, ys):
        if y == ignore_index:
            logps.append(0.0)
            ents.append(0.0)
            continue
        z = []
        for v, w in enumerate(ws):
            acc = 0.0
            for k in range(H):
                acc += h[k] * w[k]
            if bs is not None:
                acc += bs[v]
            z.append(acc / temperature)
        m = max(z)
        lse = m + math.log(sum(math.exp(zv - m) for zv in z))
        logps.append(z[y] - lse)
        ents.append(lse - sum(math.exp(zv - lse) * zv for zv in z))
    shape = labels.shape
    return (
        torch.tensor(logps, dtype=torch.float64).reshape(shape),
        torch.tensor(ents, dtype=torch.float64).reshape(shape),
    )


def _random_case(seed):
    gen = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    lead = [draw(1, 4) for _ in range(draw(1, 3))]
    H, V = draw(1, 9), draw(1, 23)
    ignore_index = [-100, -1][draw(0, 1)]
    hidden = torch.randn(*lead, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 1.5
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if draw(0, 1) else None
    labels = torch.randint(0, V, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < 0.3] = ignore_index
    temperature = 0.5 + 1.5 * float(torch.rand((), generator=gen))
    return hidden, weight, bias, labels, temperature, ignore_index


@pytest.mark.parametrize("draw", range(6))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_logprobs_match_loop_formula(draw, dtype, seed):
    hidden, weight, bias, labels, temperature, ignore_index = _random_case(seed + draw)

    def cast(t):
        return None if t is None else t.to(dtype)

    logp, ent = reference_token_logprobs(
        cast(hidden), cast(weight), labels, bias=cast(bias), temperature=temperature,
        ignore_index=ignore_index, return_entropy=True,
    )
    # Compare against the loops on the very same (rounded) inputs.
    want_logp, want_ent = loop_token_logprobs(cast(hidden), cast(weight), cast(bias), labels, temperature, ignore_index)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    msg = f"seed={seed + draw} shape={tuple(labels.shape)} V={weight.shape[0]} dtype={dtype}"
    assert logp.dtype == dtype and ent.dtype == dtype, msg
    assert logp.shape == labels.shape and ent.shape == labels.shape, msg
    torch.testing.assert_close(logp.double(), want_logp, rtol=tol, atol=tol, msg=msg)
    torch.testing.assert_close(ent.double(), want_ent, rtol=tol, atol=tol, msg=msg)
    ignored = labels == ignore_index
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0), msg
    assert torch.equal(
        logp, reference_token_logprobs(cast(hidden), cast(weight), labels, bias=cast(bias),
                                       temperature=temperature, ignore_index=ignore_index)
    ), msg


def _hand_batch(per_token_old: bool):
    """One pair, T=2, H=1, V=2, weight [[1], [0]]: logits = [h, 0], so with h = ln 3,
    p = [3/4, 1/4], log p(0) = ln(3/4), log p(1) = ln(1/4), d log p(0)/dh = 1/4, d log p(1)/dh = -3/4.

    row 0 (y):  tokens (0, 1), h = (ln3, ln3)  -> log pi(y)  = ln(3/16)
    row 1 (y'): tokens (0, ignored), h = (ln3, 5) -> log pi(y') = ln(3/4)
    old = (-2, -0.5), rewards = (1, 0.25), eta = 2:
    err = ((ln(3/16) + 2) - (ln(3/4) + 0.5)) / 2 - 0.75 = (1.5 - 2 ln 2) / 2 - 0.75 = -ln 2, loss = ln(2)^2.
    """
    hidden = torch.tensor([[[LN3], [LN3]], [[LN3], [5.0]]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 1], [0, -100]])
    if per_token_old:
        old = torch.tensor([[-1.5, -0.5], [-0.5, float("nan")]], dtype=torch.float64)
    else:
        old = torch.tensor([-2.0, -0.5], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.25], dtype=torch.float64)
    return hidden, weight, labels, old, rewards


@pytest.mark.parametrize("per_token_old", [False, True])
def test_rebel_loss_one_pair_by_hand(per_token_old):
    hidden, weight, labels, old, rewards = _hand_batch(per_token_old)
    logp = reference_token_logprobs(hidden, weight, labels)
    want_logp = torch.tensor([[math.log(0.75), math.log(0.25)], [math.log(0.75), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp, want_logp, rtol=1e-14, atol=1e-14)

    loss = reference_rebel_loss(hidden, weight, labels, old, rewards, eta=2.0)
    assert loss.shape == ()
    torch.testing.assert_close(loss, torch.tensor(LN2**2, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    none = reference_rebel_loss(hidden, weight, labels, old, rewards, eta=2.0, reduction="none")
    torch.testing.assert_close(none, torch.tensor([LN2**2], dtype=torch.float64), rtol=1e-14, atol=1e-14)

    # d loss / d err = 2 err = -2 ln 2;  d err / d ratio = +-1/eta = +-1/2.
    g_hidden, g_weight = torch.autograd.grad(loss, [hidden, weight])
    want_hidden = torch.tensor([[[-LN2 / 4], [3 * LN2 / 4]], [[LN2 / 4], [0.0]]], dtype=torch.float64)
    # d log p(y)/d w_v = h (onehot_v - p_v): row 0 sums to (-ln3/2, ln3/2), row 1 to (ln3/4, -ln3/4).
    want_weight = torch.tensor([[3 * LN2 * LN3 / 4], [-3 * LN2 * LN3 / 4]], dtype=torch.float64)
    torch.testing.assert_close(g_hidden, want_hidden, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(g_weight, want_weight, rtol=1e-13, atol=1e-14)


def test_reference_entropy_by_hand():
    hidden, weight, labels, _, _ = _hand_batch(False)
    _, ent = reference_token_logprobs(hidden, weight, labels, return_entropy=True)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    want = torch.tensor([[h, h], [h, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ent, want, rtol=1e-14, atol=1e-14)


def test_reference_temperature_and_bias_by_hand():
    """logits = ([2, 0] + [0, ln 3]) / 2 = [1, ln3/2] -> log p(0) = 1 - log(e + sqrt 3)."""
    hidden = torch.tensor([[2.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, LN3], dtype=torch.float64)
    logp = reference_token_logprobs(hidden, weight, torch.tensor([0]), bias=bias, temperature=2.0)
    want = 1.0 - math.log(math.e + math.sqrt(3.0))
    torch.testing.assert_close(logp, torch.tensor([want], dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_reference_logit_scale_and_softcap_by_hand():
    """pre = [2, 0]; logit_scale 3: u = [6, 0]; softcap 4: [4 tanh(1.5), 0]; T = 2: z = [2 tanh(1.5), 0]."""
    hidden = torch.tensor([[2.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    z0 = 2.0 * math.tanh(1.5)
    logp = reference_token_logprobs(hidden, weight, torch.tensor([0]), temperature=2.0, logit_scale=3.0, softcap=4.0)
    want = z0 - math.log(math.exp(z0) + 1.0)
    torch.testing.assert_close(logp, torch.tensor([want], dtype=torch.float64), rtol=1e-14, atol=1e-14)
    z = reference_logits(hidden, weight, temperature=2.0, logit_scale=3.0)  # no cap: [6, 0] / 2
    torch.testing.assert_close(z, torch.tensor([[3.0, 0.0]], dtype=torch.float64), rtol=0, atol=0)


# transformers' own lines (models/gemma2, cohere, granite: modeling_*.py, *ForCausalLM.forward), written out
HF_FORMULAS = {
    "gemma2_softcap": (dict(softcap=30.0), lambda x: 30.0 * torch.tanh(x / 30.0)),
    "cohere_logit_scale": (dict(logit_scale=0.0625), lambda x: x * 0.0625),
    "granite_logits_scaling": (dict(logit_scale=1 / 8.0), lambda x: x / 8.0),
    "scale_then_softcap": (dict(logit_scale=8.0, softcap=30.0), lambda x: 30.0 * torch.tanh((x * 8.0) / 30.0)),
}


@pytest.mark.parametrize("name", list(HF_FORMULAS))
def test_reference_matches_transformers_formula(name, seed):
    """The reference is transformers' formula, literally: e.g. for Gemma-2 with a temperature T,
    log_softmax((cap * tanh((h @ W.T) / cap)) / T)[labels], and the transform matters at these inputs."""
    kw, head = HF_FORMULAS[name]
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(29, 16, generator=gen, dtype=torch.float64) * (40.0 / 4.0)  # h @ W.T ~ N(0, 40^2)
    y = torch.randint(0, 29, (3, 4), generator=gen)
    y[0, :2] = -100
    T = 0.7
    want = torch.log_softmax(head(h @ w.T) / T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    want = torch.where(y == -100, 0.0, want)
    got = reference_token_logprobs(h, w, y, temperature=T, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference_logits(h, w, temperature=T, **kw), head(h @ w.T) / T, rtol=1e-13, atol=1e-13)
    plain = reference_token_logprobs(h, w, y, temperature=T)
    assert (got - plain).abs().max() > 1.0, "the transform changed nothing at these inputs"


@pytest.mark.parametrize("model", ["gemma2", "cohere", "granite"])
def test_reference_matches_transformers_models(model):
    """Tiny Gemma-2 / Cohere / Granite models from transformers: their logits are reference_logits of
    their last hidden state and LM head with softcap = final_logit_softcapping, logit_scale =
    logit_scale, and logit_scale = 1 / logits_scaling."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model == "gemma2":
        cfg = transformers.Gemma2Config(final_logit_softcapping=3.0, head_dim=8, **common)
        cls, kw = transformers.Gemma2ForCausalLM, dict(softcap=3.0)
    elif model == "cohere":
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
        cls, kw = transformers.CohereForCausalLM, dict(logit_scale=0.25)
    else:
        cfg = transformers.GraniteConfig(logits_scaling=4.0, **common)
        cls, kw = transformers.GraniteForCausalLM, dict(logit_scale=1 / 4.0)
    torch.manual_seed(0)
    m = cls(cfg).double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)  # logits ~10: Gemma's cap of 3 is far from linear
        ids = torch.randint(0, 37, (2, 5))
        out = m(ids, output_hidden_states=True)
        h = out.hidden_states[-1]  # after the final norm: what the LM head sees
        torch.testing.assert_close(reference_logits(h, m.lm_head.weight, bias=m.lm_head.bias, **kw), out.logits,
                                   rtol=1e-10, atol=1e-10)
        assert (out.logits - m.lm_head(h)).abs().max() > 1.0, "the model's transform changed nothing"


@pytest.mark.parametrize(
    "reduction, eta, want",
    [
        ("none", 1.0, [1.0, 4.0]),
        ("sum", 1.0, 5.0),
        ("mean", 1.0, 2.5),
        ("none", 0.5, [2.25, 6.25]),
        ("mean", 0.5, 4.25),
    ],
)
def test_rebel_loss_from_logprobs_two_pairs_by_hand(reduction, eta, want):
    """Pairs are rows (0, 2) and (1, 3), not adjacent rows.

    ratios = sum logp - old = (-3 + 2, -0.5 + 1, -3 + 2.5, -2 + 2) = (-1, 0.5, -0.5, 0)
    pair 0: (-1 - -0.5)/eta - (1 - 0.5);   pair 1: (0.5 - 0)/eta - (0 - 1.5).
    """
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, 0.0], [-1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[1, 1], [1, -100], [1, -100], [1, 1]])
    old = torch.tensor([-2.0, -1.0, -2.5, -2.0], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.5], dtype=torch.float64)
    got = reference_rebel_loss_from_logprobs(logp, labels, old, rewards, eta=eta, reduction=reduction)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)
    # The per-token form of the same old log-probabilities (garbage where ignored) gives the same.
    old_tok = torch.tensor([[-1.0, -1.0], [-1.0, float("nan")], [-2.5, float("inf")], [-1.0, -1.0]],
                           dtype=torch.float64)
    got_tok = reference_rebel_loss_from_logprobs(logp, labels, old_tok, rewards, eta=eta, reduction=reduction)
    torch.testing.assert_close(got_tok, got, rtol=1e-14, atol=1e-14)


def test_sequence_old_logprobs_ignores_garbage():
    labels = torch.tensor([[3, -1, 2], [-1, -1, -1]])
    old = torch.tensor([[-1.0, float("nan"), -2.0], [float("inf"), float("-inf"), 1e30]])
    got = sequence_old_logprobs(old, labels, -1, torch.float64)
    torch.testing.assert_close(got, torch.tensor([-3.0, 0.0], dtype=torch.float64))
    per_seq = torch.tensor([-4.0, -5.0])
    assert torch.equal(sequence_old_logprobs(per_seq, labels, -1, torch.float64), per_seq.double())


@pytest.mark.parametrize("old", ["token", "seq"])
def test_reference_loss_gradcheck(old, seed):
    """Autograd through the reference (float64) agrees with finite differences, garbage old included."""
    b = make_batch(seed, pairs=2, T=3, H=3, V=5, old=old, masked_rows=(3,)).to64()

    def f(hidden, weight, bias):
        return reference_rebel_loss(hidden, weight, b.labels, b.old_logprobs, b.rewards, bias=bias,
                                    eta=0.7, temperature=1.3, reduction="none")

    assert torch.autograd.gradcheck(f, (b.hidden, b.weight, b.bias)), f"seed={seed}"
