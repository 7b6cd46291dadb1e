"""The native sampling op rebel_kernels._C (torch.ops.rebel_kernels.sample_logits) against its
sort-based float64 specification, its distribution (chi-square), reproducibility, compile, and every
bad input. CPU always; CUDA cases when the extension was built with CUDA and a GPU is present."""
from __future__ import annotations

import math
import os

import pytest
import torch
from _inputs import assert_samples_follow, chi2_pvalue

import rebel_kernels  # noqa: F401  (defines the Python custom ops of the same namespace first)
from rebel_kernels.topk_topp import reference_kept_mask, reference_sample_logits, sample_logits

if os.environ.get("REBEL_KERNELS_REQUIRE_EXT", "0") not in ("", "0"):
    import rebel_kernels._C as _C  # CI: a failed build of the extension fails the suite, never skips it
else:
    _C = pytest.importorskip("rebel_kernels._C",
                             reason="native extension not built (pip install --no-build-isolation -e .)")
op = torch.ops.rebel_kernels.sample_logits

NO_CUDA_BUILD = pytest.mark.skipif(not _C.cuda_built, reason="the extension was built without CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA_BUILD])]  # deselected without a GPU
# The CPU kernel sums in float64 like the reference: its tokens must match exactly. The CUDA kernel's
# exponentials are float32, so a uniform within ~1e-7 of a boundary may pick the neighbour.
MAX_MISMATCH = {"cpu": 0.0, "cuda": 0.002}
LOGPROB_TOL = {"cpu": 1e-5, "cuda": 1e-4}
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 0, 1.0),  # temperature only
    (1.0, 1, 1.0), (1.0, 5, 1.0), (0.7, 50, 1.0),  # top-k
    (1.0, 0, 0.9), (0.7, 0, 0.5), (2.0, 0, 0.05),  # top-p
    (0.7, 50, 0.9), (1.3, 5, 0.6), (1.0, 20, 0.999),  # both
]


def _logits(gen, rows, vocab, dtype=torch.float32, *, kind="randn"):
    if kind == "ties":  # few distinct values: ties at the top-k and top-p thresholds
        x = torch.randint(-3, 3, (rows, vocab), generator=gen).float()
    else:
        x = torch.randn(rows, vocab, generator=gen) * 3
    if vocab > 4:
        x[0, : vocab // 4] = float("-inf")  # masked entries (e.g. EOS before min_new_tokens)
    return x.to(dtype)


def _check_against_reference(x, u, temperature, top_k, top_p, device):
    tok, lp = op(x.to(device), u.to(device), temperature, top_k, top_p)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and tok.shape == lp.shape == u.shape
    tok, lp = tok.cpu(), lp.cpu()
    ref_tok, ref_lp = reference_sample_logits(x, u, temperature, top_k, top_p)
    same = tok == ref_tok
    assert (~same).float().mean().item() <= MAX_MISMATCH[device], (
        f"{int((~same).sum())}/{len(same)} tokens differ from the reference, rows {(~same).nonzero()[:5, 0].tolist()}")
    torch.testing.assert_close(lp[same], ref_lp[same], atol=LOGPROB_TOL[device], rtol=0)
    # every token is in the kept set; its log-probability is log_softmax(x / T) restricted to that set
    keep = reference_kept_mask(x, temperature, top_k, top_p)
    assert keep.gather(1, tok[:, None]).all()
    z = torch.where(keep, x.double() / temperature, float("-inf"))
    recomputed = torch.log_softmax(z, -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), recomputed, atol=LOGPROB_TOL[device], rtol=0)
    return tok, lp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
@pytest.mark.parametrize("vocab", [1, 2, 97, 1009])  # V = 1, primes
def test_matches_reference(device, vocab, temperature, top_k, top_p, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _logits(gen, 300, vocab)
    _check_against_reference(x, torch.rand(300, generator=gen), temperature, min(top_k, vocab), top_p, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (0.7, 40, 0.8)])
def test_large_vocab(device, temperature, top_k, top_p, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _logits(gen, 24, 50304)
    _check_against_reference(x, torch.rand(24, generator=gen), temperature, top_k, top_p, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 7, 1.0), (1.0, 0, 0.9), (0.7, 30, 0.7)])
def test_low_precision(device, dtype, temperature, top_k, top_p, seed):
    """bf16/fp16 logits are read as float32 (they tie a lot: bf16 has 8 bits of mantissa)."""
    gen = torch.Generator().manual_seed(seed)
    x = _logits(gen, 200, 3001, dtype)
    _check_against_reference(x, torch.rand(200, generator=gen), temperature, top_k, top_p, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (1.0, 0, 0.7), (1.0, 9, 0.6), (0.3, 3, 0.5),
                                                     (1.0, 1, 1.0), (1.0, 30, 0.95)])
def test_ties(device, temperature, top_k, top_p, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _logits(gen, 1000, 40, kind="ties")
    _check_against_reference(x, torch.rand(1000, generator=gen), temperature, top_k, top_p, device)


def test_tie_rules_by_hand():
    """top-k keeps exactly k, the lower indices of a tie; top-p keeps every entry tied at its cut."""
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 1.0]])
    keep = reference_kept_mask(x, 1.0, 3, 1.0)
    assert keep.tolist() == [[False, True, True, True, False, False]]
    # the top two (value 2) hold 2 / (2 + 3/e + 1/e^2) ~ 0.62 of the mass: p = 0.5 keeps exactly them,
    # p = 0.65 must reach into the value-1 entries and keeps all three of them
    assert reference_kept_mask(x, 1.0, 0, 0.5).tolist() == [[False, True, False, True, False, False]]
    assert reference_kept_mask(x, 1.0, 0, 0.65).tolist() == [[False, True, True, True, True, True]]
    # after top-k = 4 the top two hold 2 / (2 + 2/e) ~ 0.73: p = 0.8 keeps the top-k set, and not
    # index 5, tied with the kept value-1 entries but cut by top-k
    assert reference_kept_mask(x, 1.0, 4, 0.8).tolist() == [[False, True, True, True, True, False]]
    rows = 4000
    u = torch.rand(rows, generator=torch.Generator().manual_seed(0))
    for k, p, kept in [(3, 1.0, {1, 2, 3}), (0, 0.5, {1, 3}), (0, 0.65, {1, 2, 3, 4, 5}), (4, 0.8, {1, 2, 3, 4}),
                        (4, 0.7, {1, 3})]:
        tok, _ = op(x.expand(rows, -1), u, 1.0, k, p)
        assert set(tok.tolist()) == kept, (k, p)


def test_chi2_pvalue_helper():
    # known quantiles: chi2(1) >= 3.841 has p = 0.05, chi2(10) >= 29.588 has p = 0.001
    assert abs(chi2_pvalue(3.841459, 1) - 0.05) < 1e-5
    assert abs(chi2_pvalue(29.5883, 10) - 0.001) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (1.0, 4, 1.0), (1.2, 0, 0.8), (1.0, 6, 0.9)])
def test_distribution_chi_square(device, temperature, top_k, top_p):
    """20000 samples of one row follow softmax(x / T) on the kept set, renormalized.

    Fixed seeds, so the test is deterministic; with a fresh seed it would fail with probability
    1e-4 (the p-value threshold) if the sampler were exact, and a sampler off by a few percent on
    any token gives p-values below 1e-10 at this sample size.
    """
    gen = torch.Generator().manual_seed(1234)
    vocab, n = 10, 20000
    x = torch.randn(1, vocab, generator=gen)
    tok, lp = op(x.expand(n, -1).to(device), torch.rand(n, generator=gen).to(device), temperature, top_k, top_p)
    assert_samples_follow(tok, lp, x, temperature, top_k, top_p)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_generator_reproduces(device):
    x = torch.randn(64, 500, device=device)
    runs = [sample_logits(x, temperature=0.7, top_k=40, top_p=0.9, generator=torch.Generator(device).manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    other = sample_logits(x, temperature=0.7, top_k=40, top_p=0.9, generator=torch.Generator(device).manual_seed(8))
    assert not torch.equal(runs[0][0], other[0])
    # the wrapper is the op applied to torch.rand(R) from the same generator
    u = torch.rand(64, generator=torch.Generator(device).manual_seed(7), device=device)
    assert torch.equal(op(x, u, 0.7, 40, 0.9)[0], runs[0][0])


def test_rows_are_independent():
    """A row's token depends on its logits and its uniform only (not on the batch around it)."""
    gen = torch.Generator().manual_seed(3)
    x, u = torch.randn(50, 300, generator=gen), torch.rand(50, generator=gen)
    tok, lp = op(x, u, 0.9, 10, 0.8)
    tok5, lp5 = op(x[5:6], u[5:6], 0.9, 10, 0.8)
    assert tok5.item() == tok[5].item() and lp5.item() == lp[5].item()


def test_noncontiguous_logits():
    gen = torch.Generator().manual_seed(4)
    x, u = torch.randn(300, 40, generator=gen).t(), torch.rand(40, generator=gen)  # [40, 300], strided
    assert torch.equal(op(x, u, 1.0, 7, 0.9)[0], op(x.contiguous(), u, 1.0, 7, 0.9)[0])


def test_coexists_with_python_ops_of_the_namespace():
    """rebel_kernels' Python custom ops and the C++ op share the `rebel_kernels` namespace."""
    from rebel_kernels import fused_token_logprobs

    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 3, 8, generator=gen), torch.randn(11, 8, generator=gen)
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    logp = fused_token_logprobs(hidden, weight, labels)
    torch.testing.assert_close(logp, torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[..., None])[..., 0])
    for name in ("token_logprobs", "token_logprobs_backward", "pair_loss", "sample_logits"):
        assert hasattr(torch.ops.rebel_kernels, name)
    tok, _ = sample_logits(torch.randn(2, 11, generator=gen), generator=gen)
    assert tok.shape == (2,)


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(6)
    x, u = torch.randn(8, 100, generator=gen), torch.rand(8, generator=gen)
    torch.library.opcheck(op.default, (x, u, 0.7, 5, 0.9))
    compiled = torch.compile(lambda x, u: op(x, u, 0.7, 5, 0.9), fullgraph=True)
    assert torch.equal(compiled(x, u)[0], op(x, u, 0.7, 5, 0.9)[0])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=11), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_p=None), TypeError, "top_p"),
    (dict(generator=0), TypeError, "generator"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sample_logits(torch.randn(3, 10), **kwargs)


@pytest.mark.parametrize("logits,error,match", [
    ([[1.0, 2.0]], TypeError, "logits must be a torch.Tensor"),
    (torch.randn(3, 10, dtype=torch.float64), TypeError, "logits must be float32"),
    (torch.randint(0, 5, (3, 10)), TypeError, "logits must be float32"),
    (torch.randn(10), ValueError, r"logits must be 2-D"),
    (torch.randn(2, 3, 10), ValueError, r"logits must be 2-D"),
    (torch.randn(0, 10), ValueError, "at least one row"),
    (torch.randn(3, 0), ValueError, "at least one row and one column"),
])
def test_bad_logits(logits, error, match):
    with pytest.raises(error, match=match):
        sample_logits(logits)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(10), torch.rand(1), 1.0, 0, 1.0), r"logits must be 2-D \[R, V\], got shape \[10\]"),
    ((torch.randn(3, 10, dtype=torch.float64), torch.rand(3), 1.0, 0, 1.0),
     "logits must be float32, float16 or bfloat16, got Double"),
    ((torch.randn(3, 10), torch.rand(4), 1.0, 0, 1.0), r"uniform must have shape \[3\]"),
    ((torch.randn(3, 10), torch.rand(3, dtype=torch.float64), 1.0, 0, 1.0), "uniform must be float32"),
    ((torch.randn(3, 10), torch.rand(3), -1.0, 0, 1.0), "temperature must be finite and > 0, got -1"),
    ((torch.randn(3, 10), torch.rand(3), 1.0, 11, 1.0), r"top_k must be in \[0, 10\].*got 11"),
    ((torch.randn(3, 10), torch.rand(3), 1.0, -2, 1.0), "top_k must be in .*got -2"),
    ((torch.randn(3, 10), torch.rand(3), 1.0, 0, 0.0), r"top_p must be in \(0, 1\].*got 0"),
    ((torch.randn(3, 10), torch.rand(3), 1.0, 0, float("nan")), "top_p must be in"),
])
def test_op_checks(args, match):
    """The binding file's TORCH_CHECKs, reached by calling torch.ops directly (RuntimeError)."""
    with pytest.raises(RuntimeError, match=match):
        op(*args)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_bad_logit_values_raise_on_cpu(fill):
    x = torch.randn(4, 10)
    x[2, 3] = fill
    with pytest.raises(RuntimeError, match="logits row 2"):
        op(x, torch.rand(4), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="logits row 1"):
        op(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]), torch.rand(2), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"uniform\[0\] must be in \[0, 1\)"):
        op(torch.randn(2, 10), torch.tensor([1.0, 0.5]), 1.0, 0, 1.0)


@pytest.mark.cuda
@NO_CUDA_BUILD
def test_cuda_bad_rows_and_devices():
    x = torch.randn(3, 10, device="cuda")
    x[1, 4] = float("nan")
    tok, lp = op(x, torch.rand(3, device="cuda"), 1.0, 0, 1.0)
    assert tok[1].item() == -1 and math.isnan(lp[1].item()) and (tok[[0, 2]] >= 0).all()
    with pytest.raises(RuntimeError, match="uniform is on cpu but logits is on cuda"):
        op(x, torch.rand(3), 1.0, 0, 1.0)
    with pytest.raises(ValueError, match="generator is on cpu but logits is on cuda"):
        sample_logits(x, generator=torch.Generator())


def test_missing_extension_message(monkeypatch):
    import rebel_kernels.topk_topp.ops as sampling

    monkeypatch.setattr(sampling, "_C", None)
    monkeypatch.setattr(sampling, "IMPORT_ERROR", ImportError("No module named 'rebel_kernels._C'"))
    monkeypatch.setattr(sampling, "_WARNED", False)  # without the extension: the PyTorch fallback, warned once
    x = torch.randn(2, 5)
    with pytest.warns(RuntimeWarning, match=r"pip install --no-build-isolation -e \."):
        tok, _ = sample_logits(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok, op(x, torch.rand(2, generator=torch.Generator().manual_seed(0)), 1.0, 0, 1.0)[0])


def test_wrapper_compiles():
    """The public function compiles without a graph break (the op's fake is registered). Inductor
    draws torch.rand from its own stream unless told to fall back to eager's, as here."""
    from torch._inductor import config

    x = torch.randn(4, 64)
    fn = torch.compile(lambda x: sample_logits(x, temperature=0.7, top_k=8, top_p=0.9), fullgraph=True)
    torch.manual_seed(11)
    with config.patch(fallback_random=True):
        tok, lp = fn(x)
    torch.manual_seed(11)
    ref_tok, ref_lp = reference_sample_logits(x, torch.rand(4), 0.7, 8, 0.9)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
