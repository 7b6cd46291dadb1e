"""rebel_kernels without its optional parts: triton not installed (the package imports and every op
runs on the torch backend), and the native extension rebel_kernels._C not built (sample_logits runs
its PyTorch fallback, warning once, with the native op's results)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from _inputs import assert_samples_follow

import rebel_kernels
from rebel_kernels.topk_topp import ops as topk_ops
from rebel_kernels.topk_topp import reference_kept_mask, reference_sample_logits, sample_logits
from rebel_kernels.topk_topp.torch_impl import sample_logits_torch

NATIVE = topk_ops._C  # the extension as imported (None where it is not built)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: `hide` names modules made unimportable before rebel_kernels is imported
# (sys.modules[name] = None makes `import name` raise ImportError).
SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    for name in sys.argv[1:]:
        sys.modules[name] = None
    import torch
    import rebel_kernels as rk
    from rebel_kernels import _backend
    from rebel_kernels.topk_topp import ops

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (4, 5), generator=g)
    labels[:, :2] = -100
    logp = rk.fused_token_logprobs(hidden, weight, labels)
    ref = rk.reference.reference_token_logprobs(hidden, weight, labels)
    assert torch.allclose(logp, ref, atol=1e-5), (logp, ref)
    loss = rk.fused_rebel_loss(hidden, weight, labels, logp.detach() * 0.9, torch.randn(4, generator=g))
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(weight.grad).all()
    tokens, lp = rk.sample_from_hidden(hidden[:, -1].detach(), weight.detach(), temperature=0.7, generator=g)
    assert tokens.shape == (4,) and bool(((tokens >= 0) & (tokens < 37)).all())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            tok, lp = rk.sample_logits(torch.randn(6, 50, generator=g), temperature=0.8, top_k=10, top_p=0.9,
                                       generator=g)
            assert tok.shape == (6,) and lp.dtype == torch.float32
    fallback_warnings = [str(w.message) for w in caught if "rebel_kernels._C" in str(w.message)]
    try:
        import os
        os.environ["REBEL_KERNELS_BACKEND"] = "triton"
        rk.fused_token_logprobs(hidden, weight, labels)
        forced = "no error"
    except ValueError as e:
        forced = str(e)
    print(json.dumps(dict(
        triton_available=_backend.triton_available(),
        triton_loaded=sys.modules.get("triton") is not None,
        triton_modules=sorted(m for m in sys.modules if m.startswith("rebel_kernels") and "triton" in m),
        native=ops.native_available(),
        fallback_warnings=fallback_warnings,
        forced=forced,
    )))
""")


def run_hidden(*hide: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "REBEL_KERNELS_BACKEND")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, *hide], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_triton():
    """`import rebel_kernels` and every op on CPU tensors work where triton cannot be imported; no
    Triton kernel module is loaded, and forcing the Triton backend is a clear ValueError."""
    got = run_hidden("triton")
    assert got["triton_available"] is False and got["triton_loaded"] is False
    assert got["triton_modules"] == [], got["triton_modules"]
    assert "triton is not importable" in got["forced"]
    assert got["fallback_warnings"] == [] or not got["native"]


def test_without_triton_or_extension():
    got = run_hidden("triton", "rebel_kernels._C")
    assert got["native"] is False and got["triton_loaded"] is False
    assert len(got["fallback_warnings"]) == 1, got["fallback_warnings"]  # once, for three calls
    msg = got["fallback_warnings"][0]
    assert "slower" in msg and "pip install --no-build-isolation -e ." in msg


# ----------------------------------------------------------------------------------------------
# the PyTorch fallback of sample_logits, in process
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_extension(monkeypatch):
    """sample_logits as it runs where rebel_kernels._C is not built."""
    monkeypatch.setattr(topk_ops, "_C", None)
    monkeypatch.setattr(topk_ops, "IMPORT_ERROR", ImportError("No module named 'rebel_kernels._C'"))
    monkeypatch.setattr(topk_ops, "_WARNED", True)  # the warning itself is tested above and below


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.5), (0.7, 50, 0.9), (1.3, 5, 0.6)]


def test_public_names():
    for name in ("FusedRebelLoss", "fused_rebel_loss", "fused_token_logprobs", "rebel_loss_from_logprobs",
                 "reference", "sample_from_hidden", "sample_logits", "positive_finite"):
        assert name in rebel_kernels.__all__ and hasattr(rebel_kernels, name)
    for name in ("reference_token_logprobs", "reference_rebel_loss", "reference_rebel_loss_from_logprobs",
                 "sequence_old_logprobs", "reference_gumbel_sample", "reference_kept_mask", "reference_sample_logits"):
        assert hasattr(rebel_kernels.reference, name)
    assert rebel_kernels.positive_finite("eta", 2) == 2.0
    with pytest.raises(ValueError, match="eta must be finite and > 0"):
        rebel_kernels.positive_finite("eta", 0.0)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(topk_ops, "_C", None)
    monkeypatch.setattr(topk_ops, "IMPORT_ERROR", ImportError("No module named 'rebel_kernels._C'"))
    monkeypatch.setattr(topk_ops, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="falls back to a pure PyTorch implementation"):
        sample_logits(torch.randn(2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_logits(torch.randn(2, 7))  # no second warning


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_matches_reference_and_native(no_extension, temperature, top_k, top_p, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(200, 97, generator=gen) * 3).to(dtype)
    x[0, :20] = float("-inf")  # masked entries
    tok, lp = sample_logits(x, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=torch.Generator().manual_seed(seed))
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and tok.shape == lp.shape == (200,)
    u = torch.rand(200, generator=torch.Generator().manual_seed(seed))  # the uniforms sample_logits drew
    ref_tok, ref_lp = reference_sample_logits(x, u, temperature, top_k, top_p)
    assert torch.equal(tok, ref_tok) and torch.equal(lp, ref_lp)
    keep = reference_kept_mask(x, temperature, top_k, top_p)
    assert keep.gather(1, tok[:, None]).all()
    if NATIVE is not None:  # the native CPU kernel sums in float64 like the reference: the same tokens
        nat_tok, nat_lp = torch.ops.rebel_kernels.sample_logits(x, u, temperature, top_k, top_p)
        assert torch.equal(tok, nat_tok)
        torch.testing.assert_close(lp, nat_lp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (1.0, 4, 1.0), (1.2, 0, 0.8), (1.0, 6, 0.9)])
def test_fallback_distribution_chi_square(no_extension, temperature, top_k, top_p):
    """20000 samples of one row follow softmax(x / T) on the kept set (fixed seeds: deterministic)."""
    gen = torch.Generator().manual_seed(1234)
    vocab, n = 10, 20000
    x = torch.randn(1, vocab, generator=gen)
    tok, lp = sample_logits(x.expand(n, -1), temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    assert_samples_follow(tok, lp, x, temperature, top_k, top_p)


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_fallback_bad_rows(fill):
    x = torch.randn(4, 10)
    x[2, 3] = fill
    with pytest.raises(RuntimeError, match="logits row 2"):
        sample_logits_torch(x, torch.rand(4), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="logits row 1"):
        sample_logits_torch(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]), torch.rand(2), 1.0, 0, 1.0)
    if torch.cuda.is_available():  # as the CUDA kernel: token -1 and a NaN log-probability, no sync
        tok, lp = sample_logits_torch(x.cuda(), torch.rand(4, device="cuda"), 1.0, 0, 1.0)
        assert tok[2].item() == -1 and math.isnan(lp[2].item()) and bool((tok[[0, 1, 3]] >= 0).all())
