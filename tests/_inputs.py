"""Shared test helpers: random REBEL batches, float64 copies, gradients and error measures."""
from __future__ import annotations

import dataclasses
import math
import os
import zlib

import torch

from rebel_kernels.reference import reference_token_logprobs, sequence_old_logprobs

# Machine epsilon (spacing of floats at 1.0) of the dtypes under test.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


SEED_BASE = 20240521  # changing it redraws every test's default inputs


def fuzzing() -> bool:
    """REBEL_TEST_FUZZ=1: fresh random seeds instead of the fixed ones."""
    return os.environ.get("REBEL_TEST_FUZZ", "").strip().lower() not in ("", "0", "false", "no")


def seed_mode() -> str:
    """How `new_seed` picks seeds in this process, for the report header."""
    if os.environ.get("REBEL_TEST_SEED"):
        return f"REBEL_TEST_SEED={int(os.environ['REBEL_TEST_SEED'])} (every test)"
    if fuzzing():
        return "fresh from os.urandom (REBEL_TEST_FUZZ=1)"
    return "fixed per test (crc32 of the node id); REBEL_TEST_FUZZ=1 draws fresh ones"


def new_seed(nodeid: str = "") -> int:
    """A 31-bit seed for the test `nodeid` (pytest's node id, e.g. "tests/test_x.py::test_y[float32]").

    Default: fixed, crc32 of the node id started at SEED_BASE, the same on every run and machine (not
    Python's hash(), which PYTHONHASHSEED randomizes). REBEL_TEST_SEED=<int> gives every test that seed
    (replays a failure); REBEL_TEST_FUZZ=1 draws a fresh one from os.urandom on every call.
    """
    fixed = os.environ.get("REBEL_TEST_SEED")
    if fixed:
        return int(fixed)
    if fuzzing():
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    return zlib.crc32(nodeid.encode(), SEED_BASE) & 0x7FFFFFFF


def make_labels(
    gen: torch.Generator, rows: int, T: int, V: int, *, ignore_index: int = -100, masked_rows=()
) -> torch.Tensor:
    """[rows, T] int64 labels laid out like REBEL batches: ignored prompt, >= 1 response token, ignored padding.

    Rows listed in `masked_rows` are fully ignored (a response with no token in the window).
    """
    labels = torch.randint(0, V, (rows, T), generator=gen, dtype=torch.int64)
    for r in range(rows):
        start = int(torch.randint(0, T, (1,), generator=gen))  # first response position
        end = int(torch.randint(start + 1, T + 1, (1,), generator=gen))  # one past the last
        labels[r, :start] = ignore_index
        labels[r, end:] = ignore_index
    for r in masked_rows:
        labels[r] = ignore_index
    return labels


@dataclasses.dataclass
class Batch:
    """One REBEL micro-batch. hidden [2B, T, H], weight [V, H], bias [V] | None, labels [2B, T],
    old_logprobs [2B, T] or [2B], rewards [2B]. hidden, weight and bias are leaves requiring grad."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    ignore_index: int = -100

    @property
    def pairs(self) -> int:
        return self.hidden.shape[0] // 2

    def leaves(self) -> list[torch.Tensor]:
        """The differentiable inputs, in the order hidden, weight[, bias]."""
        out = [self.hidden, self.weight]
        return out if self.bias is None else out + [self.bias]

    def to64(self) -> Batch:
        """Detached float64 copies (fresh leaves requiring grad) for the reference."""

        def leaf(t):
            return None if t is None else t.detach().to(torch.float64).requires_grad_(True)

        return Batch(
            leaf(self.hidden),
            leaf(self.weight),
            leaf(self.bias),
            self.labels,
            self.old_logprobs.detach().to(torch.float64),
            self.rewards.detach().to(torch.float64),
            self.ignore_index,
        )

    def loss_args(self):
        """Positional arguments of fused_rebel_loss / reference_rebel_loss."""
        return self.hidden, self.weight, self.labels, self.old_logprobs, self.rewards


def make_batch(
    seed: int,
    *,
    pairs: int = 2,
    T: int = 5,
    H: int = 16,
    V: int = 67,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    old: str = "token",
    ignore_index: int = -100,
    masked_rows=(),
    garbage: bool = True,
    logit_scale: float = 2.0,
    temperature: float = 1.0,
    eta: float | None = 1.0,
    head: dict | None = None,
    device="cpu",
) -> Batch:
    """A random REBEL batch. Values are drawn in float32 and rounded once to `dtype`.

    Logits h W^T have a standard deviation of about `logit_scale` (the spread of the raw head output,
    not the op's `logit_scale` argument; that one goes in `head`, with `softcap`: the transforms the
    loss will use, for the rewards). With `garbage`, per-token old
    log-probabilities hold NaN / +-inf / 1e30 at ignored positions (which the ops must not read).
    With `eta` (and the `temperature` the loss will use), the rewards are chosen so that each pair's
    error is well conditioned (see `well_conditioned_rewards`); eta=None leaves them N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * (logit_scale / math.sqrt(H))
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    labels = make_labels(gen, rows, T, V, ignore_index=ignore_index, masked_rows=masked_rows)
    valid = labels != ignore_index
    if old == "token":
        old_lp = -torch.rand(rows, T, generator=gen) * 4.0
        if garbage:
            junk = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30])
            pick = torch.randint(0, 4, (rows, T), generator=gen)
            old_lp = torch.where(valid, old_lp, junk[pick])
    elif old == "seq":
        old_lp = -torch.rand(rows, generator=gen) * 4.0 * T
    else:
        raise AssertionError(old)
    rewards = torch.randn(rows, generator=gen)
    if eta is not None:
        rewards = well_conditioned_rewards(
            gen, hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), labels, old_lp,
            temperature=temperature, eta=eta, ignore_index=ignore_index, **(head or {}),
        )

    def leaf(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)

    return Batch(
        leaf(hidden),
        leaf(weight),
        leaf(b),
        labels.to(device),
        old_lp.to(device),
        rewards.to(device),
        ignore_index,
    )


def well_conditioned_rewards(gen, hidden, weight, bias, labels, old_lp, *, temperature, eta, ignore_index,
                             logit_scale=1.0, softcap=None):
    """Rewards [2B] float32 that put each pair's error err_j = ratio diff / eta - reward diff at
    +-(1 + U[0, 1]) * (1 + A_j / eta), where A_j = sum |log p| + sum |old log p| over both responses.

    Float32 sums of the log-probabilities are off by about u * A_j (u = 2^-24), so the computed
    err_j is off by about u * A_j / eta: with |err_j| >= A_j / eta that stays a relative ~u error.
    With rewards drawn independently, err_j lands near 0 by chance now and then, and the relative
    error of err_j^2 and of every gradient (all proportional to err_j) blows up for any float32
    implementation, the reference included.
    """
    rows = labels.shape[0]
    half = rows // 2
    logp = reference_token_logprobs(
        hidden.double(), weight.double(), labels, bias=None if bias is None else bias.double(),
        temperature=temperature, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
    )  # [2B, T]
    valid = labels != ignore_index
    old_seq = sequence_old_logprobs(old_lp, labels, ignore_index, torch.float64)  # [2B]
    if old_lp.dim() == 2:
        old_abs = torch.where(valid, old_lp.double(), 0.0).abs().sum(-1)
    else:
        old_abs = old_seq.abs()
    mag = logp.abs().sum(-1) + old_abs  # [2B]
    ratio = logp.sum(-1) - old_seq  # [2B]
    scale = 1.0 + (mag[:half] + mag[half:]) / eta  # [B]
    sign = torch.where(torch.rand(half, generator=gen) < 0.5, -1.0, 1.0).double()
    err = sign * (1.0 + torch.rand(half, generator=gen).double()) * scale
    rdiff = (ratio[:half] - ratio[half:]) / eta - err  # [B]
    base = torch.randn(half, generator=gen).double()
    return torch.cat([base + rdiff / 2, base - rdiff / 2]).float()


def value_and_grads(out: torch.Tensor, leaves, grad_out: torch.Tensor | None = None):
    """(out, grads of `out` w.r.t. leaves); a non-scalar `out` is contracted with `grad_out`."""
    if out.dim() != 0 and grad_out is None:
        raise AssertionError("non-scalar output needs grad_out")
    grads = torch.autograd.grad(out, leaves, grad_outputs=None if out.dim() == 0 else grad_out)
    return out.detach(), [g.detach() for g in grads]


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """norm(out - ref) / max(norm(ref), floor), computed in float64."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    num = torch.linalg.vector_norm(out64 - ref64).item()
    den = max(torch.linalg.vector_norm(ref64).item(), floor)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def assert_rel(out, ref, tol: float, what: str, seed: int, floor: float = 1e-3):
    """Relative error check. The floor (default 1e-3) makes an all-zero reference (V = 1, where every
    log-probability and gradient is exactly 0) accept absolute errors below ~1e-7, one float32 ulp at 1."""
    err = rel_err(out, ref, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (seed={seed}, REBEL_TEST_SEED={seed} to replay)"


def torch_lowp_token_logprobs(batch: Batch, temperature: float, logit_scale: float = 1.0,
                              softcap: float | None = None) -> torch.Tensor:
    """What plain PyTorch does in the batch's dtype: logits in that dtype (scaled and soft-capped as
    transformers' Cohere / Gemma-2 forwards do), log_softmax, gather."""
    logits = batch.hidden @ batch.weight.T
    if batch.bias is not None:
        logits = logits + batch.bias
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    valid = batch.labels != batch.ignore_index
    safe = torch.where(valid, batch.labels, torch.zeros_like(batch.labels))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def chi2_pvalue(stat: float, dof: int) -> float:
    """P(chi2_dof >= stat) = 1 - P(dof/2, stat/2), the regularized lower incomplete gamma by its series."""
    a, x = dof / 2.0, stat / 2.0
    if x <= 0:
        return 1.0
    term = total = 1.0 / a
    n = 1
    while term > total * 1e-17:
        term *= x / (a + n)
        total += term
        n += 1
    return max(0.0, 1.0 - math.exp(a * math.log(x) - x - math.lgamma(a)) * total)


def assert_samples_follow(tok, lp, x, temperature: float, top_k: int, top_p: float) -> None:
    """n tokens sampled from the one row `x` [1, V] follow softmax(x / T) on the kept set (chi-square,
    p > 1e-4), never leave it, and come with the log-probability of the distribution sampled."""
    from rebel_kernels.reference import reference_kept_mask

    vocab, n = x.shape[1], tok.numel()
    tok = tok.cpu()
    keep = reference_kept_mask(x, temperature, top_k, top_p)[0]
    probs = torch.softmax(torch.where(keep, x[0].double() / temperature, float("-inf")), -1)
    counts = torch.bincount(tok, minlength=vocab).double()
    assert counts[~keep].sum() == 0, "sampled a token outside the kept set"
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    if dof > 0:
        assert chi2_pvalue(stat, dof) > 1e-4, f"chi2 = {stat:.1f} with {dof} dof"
    torch.testing.assert_close(lp.cpu().double(), probs[tok].log(), atol=1e-5, rtol=0)
