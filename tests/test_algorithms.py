"""The comparison algorithms (engine/algorithms) against plain-PyTorch formulas written out loop by loop,
REBEL's first step against RLOO k = 2 (paper section 3.2), the preference variant's reduction to REBEL
(Appendix D.2), and the argument checks. CPU, float64, tiny shapes."""
import pytest
import torch
import torch.nn.functional as F

from engine.algorithms import (
    DPO,
    RLOO,
    IterativeDPO,
    Rebel,
    RebelPreference,
    Reinforce,
    anchor_preferences,
)
from engine.algorithms.inputs import AlgoBatch
from rebel_kernels import fused_token_logprobs

IGN = -100
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def make(k: int, b: int, t: int = 6, *, seed: int = 0, kl_coef: float = 0.05):
    """Random per-token log-probabilities [kB, T] (0 at ignored positions, at least one valid token per
    row), log pi_t / log pi_ref near them, and scores."""
    g = torch.Generator().manual_seed(seed)
    rows = k * b
    lengths = torch.randint(1, t + 1, (rows,), generator=g)
    valid = torch.arange(t)[None, :] < lengths[:, None]
    labels = torch.where(valid, torch.randint(0, 11, (rows, t), generator=g), IGN)
    logp = torch.where(valid, -torch.rand(rows, t, generator=g, dtype=F64) * 3, 0.0)
    old = torch.where(valid, logp - 0.3 * torch.randn(rows, t, generator=g, dtype=F64), 0.0)
    ref = torch.where(valid, old - 0.3 * torch.randn(rows, t, generator=g, dtype=F64), 0.0)
    scores = torch.randn(rows, generator=g, dtype=F64)
    batch = AlgoBatch(labels=labels, old_logprobs=old, ref_logprobs=ref, scores=scores, kl_coef=kl_coef)
    return logp.requires_grad_(), batch


def seq(x, labels):
    return (x * (labels != IGN)).sum(-1)


def reward(batch, row):
    kl = seq(batch.old_logprobs, batch.labels)[row] - seq(batch.ref_logprobs, batch.labels)[row]
    return batch.scores[row] - batch.kl_coef * kl


def check(algo, logp, batch, formula):
    loss, metrics = algo.loss(logp, batch)
    want = formula(logp)
    torch.testing.assert_close(loss, want, **TOL)
    (g,) = torch.autograd.grad(loss, logp)
    (g_want,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g, g_want, **TOL)
    # metrics are detached 0-dim tensors (the loop reduces them once per step, no host sync here)
    assert isinstance(metrics, dict) and all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
                                             for v in metrics.values())
    assert metrics["loss"] == pytest.approx(want.item())
    return g


# ----------------------------------------------------------------------------------------------
# each loss against its formula (values and gradients w.r.t. the log-probabilities)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_reinforce(k):
    b = 4
    logp, batch = make(k, b)

    def formula(lp):
        total = 0
        for row in range(k * b):
            total = total - reward(batch, row) * seq(lp, batch.labels)[row]
        return total / (k * b)

    check(Reinforce(samples_per_prompt=k), logp, batch, formula)


@pytest.mark.parametrize("k", [2, 4])
def test_rloo(k):
    b = 3
    logp, batch = make(k, b, seed=k)

    def formula(lp):
        total = 0
        for i in range(b):
            for s in range(k):
                others = [reward(batch, j * b + i) for j in range(k) if j != s]
                adv = reward(batch, s * b + i) - sum(others) / (k - 1)
                total = total - adv * seq(lp, batch.labels)[s * b + i] / k
        return total / b

    check(RLOO(samples_per_prompt=k), logp, batch, formula)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_rebel(eta):
    b = 5
    logp, batch = make(2, b, seed=3)

    def formula(lp):
        rho = seq(lp, batch.labels) - seq(batch.old_logprobs, batch.labels)
        total = 0
        for i in range(b):
            err = (rho[i] - rho[b + i]) / eta - (reward(batch, i) - reward(batch, b + i))
            total = total + err**2
        return total / b

    check(Rebel(eta=eta), logp, batch, formula)


def test_iterative_dpo():
    b, beta = 6, 0.05
    logp, batch = make(2, b, seed=4)

    def formula(lp):
        rho = seq(lp, batch.labels) - seq(batch.old_logprobs, batch.labels)
        total = 0
        for i in range(b):
            y_wins = reward(batch, i) > reward(batch, b + i)
            c, r = (i, b + i) if y_wins else (b + i, i)
            total = total - F.logsigmoid(beta * (rho[c] - rho[r]))
        return total / b

    check(IterativeDPO(beta=beta), logp, batch, formula)


def test_iterative_dpo_ties_have_zero_weight():
    b = 3
    logp, batch = make(2, b, seed=5, kl_coef=0.0)
    scores = batch.scores.clone()
    scores[b + 1] = scores[1]  # pair 1 is a tie
    batch = AlgoBatch(labels=batch.labels, old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
                      scores=scores, kl_coef=0.0)
    loss, metrics = IterativeDPO().loss(logp, batch)
    (g,) = torch.autograd.grad(loss, logp)
    assert metrics["ties"] == pytest.approx(1 / 3)
    assert torch.all(g[1] == 0) and torch.all(g[b + 1] == 0)
    # the other pairs alone, with the mean still over all three prompts
    keep = torch.tensor([0, 2, b, b + 2])
    sub = AlgoBatch(labels=batch.labels[keep], old_logprobs=batch.old_logprobs[keep],
                    ref_logprobs=batch.ref_logprobs[keep], scores=scores[keep])
    torch.testing.assert_close(loss, IterativeDPO().loss(logp[keep], sub)[0] * 2 / 3, **TOL)


def test_dpo():
    b, beta = 4, 0.1
    logp, batch = make(2, b, seed=6)
    batch = AlgoBatch(labels=batch.labels, ref_logprobs=batch.ref_logprobs)  # offline: no pi_t, no scores

    def formula(lp):
        s, ref = seq(lp, batch.labels), seq(batch.ref_logprobs, batch.labels)
        total = 0
        for i in range(b):
            total = total - F.logsigmoid(beta * ((s[i] - ref[i]) - (s[b + i] - ref[b + i])))
        return total / b

    check(DPO(beta=beta), logp, batch, formula)


def test_dpo_per_sequence_ref_logprobs():
    logp, batch = make(2, 3, seed=7)
    per_seq = AlgoBatch(labels=batch.labels, ref_logprobs=seq(batch.ref_logprobs, batch.labels))
    torch.testing.assert_close(DPO().loss(logp, batch)[0], DPO().loss(logp, per_seq)[0], **TOL)


def test_rebel_preference():
    b, eta = 4, 0.5
    logp, batch = make(3, b, seed=8)
    prefs = torch.rand(2 * b, generator=torch.Generator().manual_seed(1), dtype=F64)
    batch = AlgoBatch(labels=batch.labels, old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
                      kl_coef=batch.kl_coef, anchor_preferences=prefs)

    def formula(lp):
        rho = seq(lp, batch.labels) - seq(batch.old_logprobs, batch.labels)
        kl = seq(batch.old_logprobs, batch.labels) - seq(batch.ref_logprobs, batch.labels)
        total = 0
        for i in range(b):
            l_y, l_y2 = 2 * prefs[i] - 1, 2 * prefs[b + i] - 1  # l(x, y, y''), l(x, y', y'')
            target = (l_y - batch.kl_coef * kl[i]) - (l_y2 - batch.kl_coef * kl[b + i])
            total = total + ((rho[i] - rho[b + i]) / eta - target) ** 2
        return total / b

    g = check(RebelPreference(eta=eta), logp, batch, formula)
    assert torch.all(g[2 * b:] == 0)  # the anchor y'' only sets the targets


# ----------------------------------------------------------------------------------------------
# paper section 3.2: REBEL's first step is RLOO k = 2's gradient direction
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_rebel_first_step_is_rloo_k2_direction(eta):
    """A tiny softmax policy: token logits (feat[x] + pos[t]) @ W.T over V = 7 tokens, parameters feat, pos
    and W, responses of 1..4 tokens. At theta = theta_t (log pi_theta = log pi_t), with
    S = log pi_theta(y|x), D_i = r(y_i) - r(y'_i) and the mean over B prompts:
        grad REBEL = (1/B) sum_i 2 * (0/eta - D_i) * (1/eta) * (grad S(y_i) - grad S(y'_i))
                   = -(2 / (eta B)) sum_i D_i (grad S(y_i) - grad S(y'_i)),
        grad RLOO  = -(1/B) sum_i (1/2) [D_i grad S(y_i) + (-D_i) grad S(y'_i)]
                   = -(1 / (2B)) sum_i D_i (grad S(y_i) - grad S(y'_i)),
    so grad REBEL = (4 / eta) * grad RLOO k=2: same direction (REBEL then preconditions, NPG-like)."""
    g = torch.Generator().manual_seed(11)
    b, t, h, v = 6, 4, 5, 7
    feat = torch.randn(b, h, generator=g, dtype=F64, requires_grad=True)
    pos = torch.randn(t, h, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=F64, requires_grad=True)
    params = [feat, pos, weight]
    lengths = torch.randint(1, t + 1, (2 * b,), generator=g)
    labels = torch.where(torch.arange(t)[None] < lengths[:, None], torch.randint(0, v, (2 * b, t), generator=g), IGN)

    def logprobs():
        hidden = (feat[:, None, :] + pos[None]).repeat(2, 1, 1)  # [2B, T, H], both samples of prompt i
        return fused_token_logprobs(hidden, weight, labels)

    old = logprobs().detach()  # theta = theta_t
    ref = old - 0.2 * torch.randn(old.shape, generator=g, dtype=F64) * (labels != IGN)
    batch = AlgoBatch(labels=labels, old_logprobs=old, ref_logprobs=ref,
                      scores=torch.randn(2 * b, generator=g, dtype=F64), kl_coef=0.05)

    def grad(algo):
        return torch.cat([x.flatten() for x in torch.autograd.grad(algo.loss(logprobs(), batch)[0], params)])

    g_rebel, g_rloo = grad(Rebel(eta=eta)), grad(RLOO(samples_per_prompt=2))
    assert g_rloo.norm() > 1e-3
    assert F.cosine_similarity(g_rebel, g_rloo, dim=0) > 0.999
    torch.testing.assert_close(g_rebel, (4 / eta) * g_rloo, **TOL)


# ----------------------------------------------------------------------------------------------
# Appendix D.2: the preference variant reduces to REBEL when l comes from a reward
# ----------------------------------------------------------------------------------------------
def test_rebel_preference_reduces_to_rebel():
    """P(y > y' | x) = (1 + r(y) - r(y')) / 2 (a probability for rewards in [0, 1)) gives
    l(x, y, y'') = 2P - 1 = r(y) - r(y''), hence l(x, y, y'') - l(x, y', y'') = r(y) - r(y'): the
    preference regression is REBEL's on (y, y') whatever the anchor y''. Same kl_coef on both sides."""
    b = 5
    logp, batch = make(3, b, seed=9)
    g = torch.Generator().manual_seed(2)
    texts = [f"response {j}" for j in range(3 * b)]
    score_of = {text: s for text, s in zip(texts, torch.rand(3 * b, generator=g, dtype=F64) * 0.95)}
    prompts = [f"prompt {i}" for i in range(b)]

    def prefer(xs, ys, ys2):
        assert len(xs) == len(ys) == len(ys2) == 2 * b and xs[:b] == xs[b:] == prompts
        return torch.stack([(1 + score_of[y] - score_of[y2]) / 2 for y, y2 in zip(ys, ys2)])

    prefs = anchor_preferences(prefer, prompts, texts)
    assert prefs.shape == (2 * b,) and bool(((prefs > 0) & (prefs < 1)).all())
    pref_batch = AlgoBatch(labels=batch.labels, old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
                           kl_coef=batch.kl_coef, anchor_preferences=prefs)
    pair = slice(0, 2 * b)
    rebel_batch = AlgoBatch(labels=batch.labels[pair], old_logprobs=batch.old_logprobs[pair],
                            ref_logprobs=batch.ref_logprobs[pair], kl_coef=batch.kl_coef,
                            scores=torch.stack([score_of[y] for y in texts[:2 * b]]))
    for eta in (1.0, 0.5):
        loss_p, _ = RebelPreference(eta=eta).loss(logp, pref_batch)
        loss_r, _ = Rebel(eta=eta).loss(logp[pair], rebel_batch)
        torch.testing.assert_close(loss_p, loss_r, **TOL)
        (g_p,) = torch.autograd.grad(loss_p, logp)
        (g_r,) = torch.autograd.grad(loss_r, logp)
        torch.testing.assert_close(g_p[pair], g_r[pair], **TOL)
        assert torch.all(g_p[2 * b:] == 0) and torch.all(g_r[2 * b:] == 0)


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
def _replace(batch, **kw):
    fields = dict(labels=batch.labels, old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
                  scores=batch.scores, kl_coef=batch.kl_coef, anchor_preferences=batch.anchor_preferences)
    return AlgoBatch(**{**fields, **kw})


def test_bad_inputs_name_the_argument():
    logp, batch = make(2, 3)  # 6 rows
    with pytest.raises(ValueError, match="logprobs.*samples_per_prompt=4"):
        RLOO(samples_per_prompt=4).loss(logp, batch)
    with pytest.raises(ValueError, match="logprobs.*samples_per_prompt=3"):
        RebelPreference().loss(logp[:4], _replace(batch, labels=batch.labels[:4]))
    with pytest.raises(ValueError, match="labels"):
        Rebel().loss(logp, _replace(batch, labels=batch.labels[:, :-1]))
    with pytest.raises(ValueError, match="old_logprobs"):
        Rebel().loss(logp, _replace(batch, old_logprobs=batch.old_logprobs[:, :-1]))
    with pytest.raises(ValueError, match="scores"):
        RLOO().loss(logp, _replace(batch, scores=batch.scores[:-2]))
    with pytest.raises(ValueError, match="ref_logprobs"):
        DPO().loss(logp, _replace(batch, ref_logprobs=None))
    with pytest.raises(ValueError, match="scores"):
        IterativeDPO().loss(logp, _replace(batch, scores=None))
    with pytest.raises(ValueError, match="logprobs"):
        Reinforce().loss(logp[0], batch)
    lp3, b3 = make(3, 2)
    with pytest.raises(ValueError, match="anchor_preferences"):
        RebelPreference().loss(lp3, b3)  # missing
    with pytest.raises(ValueError, match="anchor_preferences"):
        RebelPreference().loss(lp3, _replace(b3, anchor_preferences=torch.full((4,), 1.5, dtype=F64)))
    with pytest.raises(ValueError, match="anchor_preferences"):
        RebelPreference().loss(lp3, _replace(b3, anchor_preferences=torch.full((6,), 0.5, dtype=F64)))
    with pytest.raises(ValueError, match="responses"):
        anchor_preferences(lambda *a: None, ["x"], ["a", "b"])


@pytest.mark.parametrize("make_algo, name", [
    (lambda: Rebel(samples_per_prompt=4), "samples_per_prompt"),
    (lambda: RLOO(samples_per_prompt=1), "samples_per_prompt"),
    (lambda: Reinforce(samples_per_prompt=0), "samples_per_prompt"),
    (lambda: IterativeDPO(samples_per_prompt=3), "samples_per_prompt"),
    (lambda: DPO(beta=0.0), "beta"),
    (lambda: IterativeDPO(beta=float("nan")), "beta"),
    (lambda: Rebel(eta=-1.0), "eta"),
    (lambda: RebelPreference(samples_per_prompt=2), "samples_per_prompt"),
    (lambda: AlgoBatch(labels=torch.zeros(2, 2, dtype=torch.long), kl_coef=-0.1), "kl_coef"),
])
def test_bad_settings(make_algo, name):
    with pytest.raises(ValueError, match=name):
        make_algo()


def test_float32_logprobs():
    """The loop's dtype: float32 log-probabilities, float32 batch fields."""
    logp, batch = make(4, 3, seed=12)
    lp32 = logp.detach().float().requires_grad_()
    b32 = AlgoBatch(labels=batch.labels, old_logprobs=batch.old_logprobs.float(),
                    ref_logprobs=batch.ref_logprobs.float(), scores=batch.scores.float(), kl_coef=batch.kl_coef)
    loss32, _ = RLOO(samples_per_prompt=4).loss(lp32, b32)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), RLOO(samples_per_prompt=4).loss(logp, batch)[0], rtol=1e-5, atol=1e-5)
