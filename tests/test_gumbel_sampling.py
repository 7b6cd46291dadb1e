"""Gumbel-max sampling from hidden states (rebel_kernels.gumbel), both backends.

Under TRITON_INTERPRET=1 (set by conftest.py without CUDA) the Triton kernels run on CPU tensors.
Tile sizes there: BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, vocabulary splits of 64 columns, so V=131
spans 3 splits with a partial last tile, and H=40 a partial last K block.
"""
import math

import pytest
import torch

from rebel_kernels import _alloc
from rebel_kernels._tiles import TileConfig
from rebel_kernels.gumbel import reference_gumbel_sample, sample_from_hidden
from rebel_kernels.gumbel import torch_impl as gs  # the torch path (its chunk sizes are monkeypatched)
from rebel_kernels.gumbel import triton_kernels as gt  # the Triton launchers
from rebel_kernels.gumbel.reference import reference_gumbel_sample_from_hidden
from rebel_kernels.reference import reference_logits

# The LM head's final transforms under test: name -> (spread of h W^T for make_head, the op's kwargs).
# The spreads make them matter: raw logits of spread 40 against Gemma-2/3's softcap of 30, logit_scale 8
# then the cap, and Granite-like 1/16 on raw logits of spread 32.
HEADS = {
    "plain": (2.0, {}),
    "softcap30": (40.0, dict(softcap=30.0)),
    "scale8_softcap30": (4.0, dict(logit_scale=8.0, softcap=30.0)),
    "scale1_16": (32.0, dict(logit_scale=0.0625)),
}


def make_head(seed, R, H, V, *, dtype=torch.float32, bias=True, logit_scale=2.0):
    """hidden [R, H], weight [V, H], bias [V] | None, drawn in float32 and rounded once to dtype."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, H, generator=g)
    w = torch.randn(V, H, generator=g) * (logit_scale / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def logits64(h, w, b, temperature, **head):
    """z = softcap_fn(logit_scale * (h W^T + b)) / T (z = (h W^T + b) / T without `head`) in float64
    from the (possibly low-precision) inputs, by `reference_logits`.  -> [R, V]"""
    return reference_logits(h.double(), w.double(), bias=None if b is None else b.double(), temperature=temperature,
                            **head)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------
def test_reference_gumbel_sample_by_hand():
    z = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [5.0, -1.0, 0.0]], dtype=torch.float64)
    # G = -log(-log U): U = exp(-1) gives G = 0, U = exp(-exp(-3)) gives G = 3, U = 0 gives G = -inf.
    e1, e3 = math.exp(-1.0), math.exp(-math.exp(-3.0))
    u = torch.tensor([[e3, e1, e1], [e1, e1, e1], [0.0, e1, e1]], dtype=torch.float64)
    tokens, logp = reference_gumbel_sample(z, u)
    # row 0: scores 3, 1, 2 -> 0; row 1: three-way tie -> smallest index 0; row 2: -inf, -1, 0 -> 2
    assert tokens.tolist() == [0, 0, 2]
    expect = torch.log_softmax(z, -1)[torch.arange(3), tokens]
    torch.testing.assert_close(logp, expect, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# log-probabilities
# ----------------------------------------------------------------------------------------------
SHAPES = [  # R, H, V, bias
    (3, 16, 1, True),     # V = 1: every log-probability is exactly 0
    (5, 24, 131, False),  # V prime > split > tile, several splits, partial last tile
    (40, 40, 67, True),   # two row blocks, H not a multiple of BLOCK_K
    (1, 8, 200, True),    # one row, H < BLOCK_K
]


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("R,H,V,bias", SHAPES)
def test_logprobs_match_log_softmax(backend, seed, R, H, V, bias, temperature, head):
    spread, head_kw = HEADS[head]
    h, w, b = make_head(seed, R, H, V, bias=bias, logit_scale=spread)
    with _alloc.poisoned():  # an output element the kernels forget to write reads NaN / -1
        tokens, logp = sample_from_hidden(h, w, bias=b, temperature=temperature, generator=gen(seed), **head_kw)
    assert tokens.dtype == torch.int64 and tokens.shape == (R,)
    assert logp.dtype == torch.float32 and logp.shape == (R,)
    assert bool(((tokens >= 0) & (tokens < V)).all()), f"tokens out of [0, {V}): {tokens} (seed={seed})"
    ref = torch.log_softmax(logits64(h, w, b, temperature, **head_kw), -1)[torch.arange(R), tokens]
    err = (logp.double() - ref).abs().max().item()
    assert err <= 1e-5, f"logprob error {err:.2e} > 1e-5 (seed={seed}, REBEL_TEST_SEED={seed} to replay)"
    if head_kw and V > 1:  # the transform matters here: the untransformed log-probabilities are far off
        plain = torch.log_softmax(logits64(h, w, b, temperature), -1)[torch.arange(R), tokens]
        assert (logp.double() - plain).abs().max().item() > 1e-2, f"{head} changed nothing (seed={seed})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, seed, dtype):
    R, H, V = 9, 40, 131
    h, w, b = make_head(seed, R, H, V, dtype=dtype)
    tokens, logp = sample_from_hidden(h, w, bias=b, temperature=0.7, generator=gen(seed))
    assert logp.dtype == torch.float32
    assert bool(((tokens >= 0) & (tokens < V)).all())
    # The float64 recomputation uses the same rounded inputs: the kernels' only errors are float32
    # products and sums (and the bf16 product is exact in float32).
    ref = torch.log_softmax(logits64(h, w, b, 0.7), -1)[torch.arange(R), tokens]
    err = (logp.double() - ref).abs().max().item()
    assert err <= 1e-3, f"{dtype} logprob error {err:.2e} > 1e-3 (seed={seed})"


# ----------------------------------------------------------------------------------------------
# exact argmax logic against the reference with the same uniforms
# ----------------------------------------------------------------------------------------------
def torch_path_uniforms(generator, R, V):
    """Replays the uniforms the torch path draws: one torch.rand per (row chunk, vocab chunk)."""
    u = torch.empty(R, V)
    for r0 in range(0, R, gs.TORCH_ROW_CHUNK):
        n = min(gs.TORCH_ROW_CHUNK, R - r0)
        for v0 in range(0, V, gs.TORCH_VOCAB_CHUNK):
            c = min(gs.TORCH_VOCAB_CHUNK, V - v0)
            u[r0 : r0 + n, v0 : v0 + c] = torch.rand((n, c), generator=generator)
    return u


def check_against_reference(tokens, logp, z, u, margin=1e-4):
    """tokens attain max(z + G) up to `margin` (the float32 error of the kernels' z), and equal the
    reference wherever the best score leads the runner-up by more than `margin`."""
    score = z - torch.log(-torch.log(u.double()))
    ref_tok, ref_logp = reference_gumbel_sample(z, u.double())
    top2 = score.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    assert clear.float().mean() > 0.9  # the comparison below is not vacuous
    got = score.gather(1, tokens[:, None])[:, 0]
    assert bool((got >= top2[:, 0] - margin).all())
    assert torch.equal(tokens[clear], ref_tok[clear]), (tokens, ref_tok)
    lp_ref = torch.log_softmax(z, -1).gather(1, tokens[:, None])[:, 0]
    assert (logp.double() - lp_ref).abs().max().item() <= 1e-5
    assert (ref_logp[clear] - lp_ref[clear]).abs().max().item() == 0.0


CONFIGS = [
    None,  # the interpreter default: 64-column splits of 32-column tiles
    TileConfig(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, split_v=32),  # 5 splits
]


def check_head_reference(h, w, b, T, head_kw, u, tokens):
    """reference_gumbel_sample_from_hidden (the spec from the hidden state) picks the same tokens as
    reference_gumbel_sample on logits64 wherever the result is clear."""
    ref_tok, _ = reference_gumbel_sample_from_hidden(h.double(), w.double(), u.double(), bias=b.double(),
                                                      temperature=T, **head_kw)
    ref_tok2, _ = reference_gumbel_sample(logits64(h, w, b, T, **head_kw), u.double())
    assert torch.equal(ref_tok, ref_tok2)
    assert (ref_tok == tokens).float().mean() > 0.9


@pytest.mark.parametrize("head", ["plain", "scale8_softcap30"])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "split32"])
def test_triton_argmax_matches_reference(monkeypatch, seed, config, head):
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "triton")
    R, H, V, T = 19, 40, 131, 0.8
    spread, head_kw = HEADS[head]
    h, w, b = make_head(seed, R, H, V, logit_scale=spread)
    seed_t = gt.draw_seed(gen(seed), h.device)
    tokens, logp = gt.gumbel_sample_triton(h, w, b, T, seed_t, config=config, **head_kw)
    u = gt.kernel_uniforms(seed_t, R, V)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    check_against_reference(tokens, logp, logits64(h, w, b, T, **head_kw), u)
    check_head_reference(h, w, b, T, head_kw, u, tokens)
    # the public function draws the same seed from the same generator state
    tok2, _ = sample_from_hidden(h, w, bias=b, temperature=T, generator=gen(seed), **head_kw)
    if config is None:
        assert torch.equal(tok2, tokens)


@pytest.mark.parametrize("head", ["plain", "scale8_softcap30"])
def test_torch_argmax_matches_reference(monkeypatch, seed, head):
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(gs, "TORCH_ROW_CHUNK", 8)     # row chunks 8, 8, 3
    monkeypatch.setattr(gs, "TORCH_VOCAB_CHUNK", 32)  # vocab chunks 4 x 32 + 3
    R, H, V, T = 19, 40, 131, 0.8
    spread, head_kw = HEADS[head]
    h, w, b = make_head(seed, R, H, V, logit_scale=spread)
    tokens, logp = sample_from_hidden(h, w, bias=b, temperature=T, generator=gen(seed), **head_kw)
    u = torch_path_uniforms(gen(seed), R, V)
    check_against_reference(tokens, logp, logits64(h, w, b, T, **head_kw), u)
    check_head_reference(h, w, b, T, head_kw, u, tokens)


def tie_head(dups, R=6, H=24, V=131, dtype=torch.float32):
    """Small integers, so every logit is exact in float32: the rows `dups` of weight are all 3 and
    hidden is >= 0 with a positive sum, so they share the largest logit 3 * sum(h) exactly."""
    g = gen(7)
    h = torch.randint(0, 4, (R, H), generator=g).float()
    h[:, 0] = 1.0
    w = torch.randint(-3, 3, (V, H), generator=g).float()  # entries in [-3, 2]
    w[list(dups)] = 3.0
    return h.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dups,expect", [
    ((70, 130, 45, 40), 40),  # same tile (40, 45), other splits (70, 130): the smallest index wins
    ((100, 64), 64),          # first column of a split vs a later tile of that split
    ((31, 32), 31),           # across a tile boundary within a split
])
def test_ties_go_to_the_smaller_index(backend, monkeypatch, dups, expect):
    monkeypatch.setattr(gs, "TORCH_VOCAB_CHUNK", 32)
    h, w = tie_head(dups)
    if backend == "triton":
        tokens, logp = gt.gumbel_sample_triton(h, w, None, 1.0, None, add_noise=False)
    else:
        tokens, logp = gs.gumbel_sample_torch(h, w, None, 1.0, None, add_noise=False)
    assert tokens.tolist() == [expect] * h.shape[0]
    ref = torch.log_softmax(logits64(h, w, None, 1.0), -1)[:, expect]
    assert (logp.double() - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------
# distribution: chi-square goodness of fit
# ----------------------------------------------------------------------------------------------
def chi2_sf_even_df(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with an even number of degrees of freedom df = 2k:
    exp(-x/2) * sum_{i<k} (x/2)^i / i!  (the Poisson(x/2) probability of fewer than k events)."""
    assert df % 2 == 0 and df > 0
    half = x / 2.0
    return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# (V, temperature, bias, data seed, sampling seed). V odd: df = V - 1 is even (closed-form tail).
CHI2_CASES = [(9, 1.0, True, 11, 101), (7, 0.7, False, 12, 202)]
N_SAMPLES = 4000
P_MIN = 1e-6


def chi2_head(V, temperature, bias, data_seed, spread=1.2, H=8):
    """One hidden vector whose logits are designed: z = (linspace(-spread, spread, V) shuffled + b) / T.
    Returns (h [H], w [V, H], b [V] | None, z [V] float64)."""
    g = gen(data_seed)
    w = torch.randn(V, H, generator=g)
    w[:, 0] = torch.linspace(-spread, spread, V)[torch.randperm(V, generator=g)]
    h = torch.zeros(H)
    h[0] = 1.0  # h . w_v = w[v, 0] exactly
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    return h, w, b, logits64(h[None], w, b, temperature)[0]


def check_fit(tokens, logp, z):
    """Pearson's chi-square of the token counts against softmax(z) (df = V - 1, even), its power
    against a temperature off by a factor 1.4, and the returned log-probabilities."""
    V = z.numel()
    probs = torch.softmax(z, 0)
    assert float(probs.min()) * tokens.numel() >= 40
    counts = torch.bincount(tokens, minlength=V)
    assert counts.numel() == V
    p_value = chi2_sf_even_df(chi2_stat(counts, probs), V - 1)
    expected = [round(x, 1) for x in (probs * tokens.numel()).tolist()]
    assert p_value > P_MIN, f"chi-square p={p_value:.2e}: counts {counts.tolist()} vs expected {expected}"
    for factor in (0.7, 1.4):  # power: the same samples reject a temperature off by 1.4x
        p_wrong = chi2_sf_even_df(chi2_stat(counts, torch.softmax(z * factor, 0)), V - 1)
        assert p_wrong < P_MIN, f"no power against a temperature off by {factor}: p={p_wrong:.2e}"
    assert (logp.double() - torch.log_softmax(z, 0)[tokens]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("V,temperature,bias,data_seed,sample_seed", CHI2_CASES)
def test_chi_square_goodness_of_fit(backend, V, temperature, bias, data_seed, sample_seed):
    """N_SAMPLES rows of one hidden vector in one call: rows get independent noise, so their tokens
    are N_SAMPLES i.i.d. draws, compared with softmax(z) by Pearson's chi-square (df = V - 1).

    The seeds are fixed, so the test is deterministic. We reject at p < 1e-6 (a statistic above
    38.3 for df = 6, 42.7 for df = 8): a correct sampler fails this for about one seed pair in a
    million, so a failure is a bug, not bad luck. `check_fit` also asserts that the same counts
    reject a sampler whose temperature is off by a factor 1.4, so the test keeps its power: for
    these cases the noncentrality N * sum_v (p_v - q_v)^2 / q_v of such a bug is >= 130, the
    statistic's mean then ~3x the critical value. Every expected count is >= 40, where the
    chi-square law of Pearson's statistic is accurate.
    """
    h, w, b, z = chi2_head(V, temperature, bias, data_seed)
    hidden = h.expand(N_SAMPLES, h.numel())  # stride-0 rows: one vector, N_SAMPLES independent samples
    tokens, logp = sample_from_hidden(hidden, w, bias=b, temperature=temperature, generator=gen(sample_seed))
    check_fit(tokens, logp, z)


# (logit_scale, softcap, raw spread): raw logits linspace(-spread, spread) become z in about [-1.5, 1.5]
# (scale 0.5 then cap 1.6: 1.6 tanh(3 / 1.6) = 1.53, far from linear) or [-1.5, 1.5] (scale 1/4): the
# counts must follow softmax(z) and reject softmax of the untransformed logits (in [-6, 6]).
CHI2_HEADS = {"scale0.5_softcap1.6": (0.5, 1.6, 6.0), "scale1_4": (0.25, None, 6.0)}


@pytest.mark.parametrize("head", list(CHI2_HEADS))
def test_chi_square_with_head_transforms(backend, head):
    """`test_chi_square_goodness_of_fit` (same thresholds and power check) through the logit scale and
    the softcap, on V = 9 at T = 1 without bias."""
    logit_scale, softcap, spread = CHI2_HEADS[head]
    h, w, _, raw = chi2_head(9, 1.0, False, data_seed=14, spread=spread)
    z = logits64(h[None], w, None, 1.0, logit_scale=logit_scale, softcap=softcap)[0]
    tokens, logp = sample_from_hidden(h.expand(N_SAMPLES, h.numel()), w, temperature=1.0, generator=gen(404),
                                      logit_scale=logit_scale, softcap=softcap)
    check_fit(tokens, logp, z)
    counts = torch.bincount(tokens, minlength=9)
    p_plain = chi2_sf_even_df(chi2_stat(counts, torch.softmax(raw, 0)), 8)
    assert p_plain < P_MIN, f"the counts do not reject the untransformed logits: p={p_plain:.2e}"


def test_chi_square_across_vocab_splits(monkeypatch):
    """The same test on V = 41 cut into three 16-column splits (df = 40, p < 1e-6 is a statistic
    above 97.7; the 1.4x-temperature bug has noncentrality >= 200), so the Gumbel-max winner
    crosses tiles and splits and goes through the combine kernel."""
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "triton")
    V, T, n = 41, 0.9, 8000
    h, w, b, z = chi2_head(V, T, True, data_seed=13, spread=1.0)
    cfg = TileConfig(block_m=64, block_n=16, block_k=16, num_warps=1, num_stages=1, split_v=16)
    seed_t = gt.draw_seed(gen(303), h.device)
    tokens, logp = gt.gumbel_sample_triton(h.expand(n, h.numel()), w, b, T, seed_t, config=cfg)
    check_fit(tokens, logp, z)


# ----------------------------------------------------------------------------------------------
# determinism and seeds
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_samples(backend):
    R, H, V = 256, 16, 50
    h, w, b = make_head(3, R, H, V, logit_scale=0.5)  # near-uniform: independent draws rarely agree
    t1, l1 = sample_from_hidden(h, w, bias=b, generator=gen(42))
    t2, l2 = sample_from_hidden(h, w, bias=b, generator=gen(42))
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    t3, _ = sample_from_hidden(h, w, bias=b, generator=gen(43))
    assert int((t1 != t3).sum()) > R // 2, "different seeds should give different samples"
    g = gen(42)
    t4, _ = sample_from_hidden(h, w, bias=b, generator=g)
    t5, _ = sample_from_hidden(h, w, bias=b, generator=g)  # the generator advanced
    assert torch.equal(t4, t1)
    assert int((t4 != t5).sum()) > R // 2
    # generator=None uses (and advances) the default generator, which torch.manual_seed resets
    torch.manual_seed(5)
    t6, _ = sample_from_hidden(h, w, bias=b)
    torch.manual_seed(5)
    t7, _ = sample_from_hidden(h, w, bias=b)
    assert torch.equal(t6, t7)


def test_triton_rows_do_not_depend_on_the_batch(monkeypatch):
    """The noise of (row, v) is tl.rand(seed, row * V + v): a prefix of the rows samples the same
    tokens alone as in the full batch (same generator state)."""
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "triton")
    h, w, b = make_head(4, 40, 24, 131)
    full, lp_full = sample_from_hidden(h, w, bias=b, generator=gen(9))
    part, lp_part = sample_from_hidden(h[:7], w, bias=b, generator=gen(9))
    assert torch.equal(full[:7], part)
    torch.testing.assert_close(lp_full[:7], lp_part, rtol=0, atol=1e-6)


def test_strided_inputs(backend):
    """A column-sliced hidden and a transposed-storage weight give the same result as contiguous ones."""
    h, w, b = make_head(5, 10, 24, 67)
    h_wide = torch.cat([h, torch.randn(10, 8)], 1)[:, :24]  # row stride 32
    w_t = w.T.contiguous().T  # column-major storage
    t1, l1 = sample_from_hidden(h, w, bias=b, generator=gen(1))
    t2, l2 = sample_from_hidden(h_wide, w_t, bias=b, generator=gen(1))
    assert torch.equal(t1, t2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)


def test_float64_inputs_use_the_torch_path(monkeypatch):
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "auto")
    h, w, b = make_head(6, 4, 8, 13, dtype=torch.float64)
    tokens, logp = sample_from_hidden(h, w, bias=b, generator=gen(0))
    assert logp.dtype == torch.float64
    ref = torch.log_softmax(logits64(h, w, b, 1.0), -1)[torch.arange(4), tokens]
    assert (logp - ref).abs().max().item() <= 1e-12


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
def valid_args():
    h, w, b = make_head(1, 3, 8, 11)
    return dict(hidden=h, weight=w, bias=b, temperature=1.0, generator=gen(0))


def call(args):
    args = dict(args)
    return sample_from_hidden(args.pop("hidden"), args.pop("weight"), **args)


NAN, INF = float("nan"), float("inf")
BAD = [  # (id, changes, exception, message fragment)
    ("hidden-list", dict(hidden=[[1.0] * 8]), TypeError, "hidden must be a torch.Tensor"),
    ("hidden-int", dict(hidden=torch.ones(3, 8, dtype=torch.int64)), TypeError, "hidden must have a floating dtype"),
    ("hidden-3d", dict(hidden=torch.randn(1, 3, 8)), ValueError, "hidden must be 2-D"),
    ("hidden-0rows", dict(hidden=torch.randn(0, 8)), ValueError, "hidden must have at least one row"),
    ("hidden-H", dict(hidden=torch.randn(3, 9)), ValueError, "hidden's last dim must equal weight's H=8"),
    ("weight-none", dict(weight=None), TypeError, "weight must be a torch.Tensor"),
    ("weight-1d", dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    ("weight-dtype", dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "weight dtype torch.float64"),
    ("weight-V0", dict(weight=torch.randn(0, 8), bias=None), ValueError, "weight has an empty vocabulary"),
    ("weight-meta", dict(weight=torch.randn(11, 8, device="meta")), ValueError, "weight is on meta"),
    ("bias-shape", dict(bias=torch.randn(12)), ValueError, r"bias must have shape \(11,\)"),
    ("bias-dtype", dict(bias=torch.randn(11, dtype=torch.float16)), TypeError, "bias dtype torch.float16"),
    ("bias-int", dict(bias=torch.ones(11, dtype=torch.int32)), TypeError, "bias must have a floating dtype"),
    ("temp-0", dict(temperature=0.0), ValueError, "temperature must be finite and > 0, got 0.0"),
    ("temp-neg", dict(temperature=-0.7), ValueError, "temperature must be finite and > 0, got -0.7"),
    ("temp-nan", dict(temperature=NAN), ValueError, "temperature must be finite and > 0, got nan"),
    ("temp-inf", dict(temperature=INF), ValueError, "temperature must be finite and > 0, got inf"),
    ("temp-str", dict(temperature="0.7"), TypeError, "temperature must be a real number, got '0.7'"),
    ("temp-bool", dict(temperature=True), TypeError, "temperature must be a real number, got True"),
    ("generator-int", dict(generator=5), TypeError, "generator must be a torch.Generator or None, got int"),
    ("logit_scale-0", dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0, got 0.0"),
    ("logit_scale-neg", dict(logit_scale=-2.0), ValueError, "logit_scale must be finite and > 0, got -2.0"),
    ("logit_scale-inf", dict(logit_scale=INF), ValueError, "logit_scale must be finite and > 0, got inf"),
    ("logit_scale-none", dict(logit_scale=None), TypeError, "logit_scale must be a real number, got None"),
    ("softcap-0", dict(softcap=0.0), ValueError, "softcap must be finite and > 0, got 0.0"),
    ("softcap-nan", dict(softcap=NAN), ValueError, "softcap must be finite and > 0, got nan"),
    ("softcap-str", dict(softcap="30"), TypeError, r"softcap must be a real number or None \(off\), got '30'"),
    ("softcap-bool", dict(softcap=True), TypeError, r"softcap must be a real number or None \(off\), got True"),
]


@pytest.mark.parametrize("changes,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(changes, exc, match):
    with pytest.raises(exc, match=match):
        call(dict(valid_args(), **changes))


def test_generator_on_another_device_raises():
    args = valid_args()
    h, w = args["hidden"].to("meta"), args["weight"].to("meta")
    with pytest.raises(ValueError, match="generator is on cpu but hidden is on meta"):
        sample_from_hidden(h, w, generator=gen(0))


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="REBEL_KERNELS_BACKEND must be one of"):
        call(valid_args())
