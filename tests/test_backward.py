"""The two Triton backward designs (rebel_kernels/logprobs/triton_kernels.py, REBEL_KERNELS_BWD):
the gemm backward (chunks of dz + dense GEMMs) agrees with the atomic one, is bitwise repeatable,
and picks its chunks by the documented rule.  Against the reference: tests/test_correctness.py
runs every case on each design."""
import pytest
import torch
from _inputs import make_batch, value_and_grads

try:
    import triton  # noqa: F401  (a dependency on Linux; without it there is no Triton backend to test)
except ImportError:
    pytest.skip("triton is not installed", allow_module_level=True)

from rebel_kernels import fused_rebel_loss, fused_token_logprobs
from rebel_kernels.logprobs import triton_kernels  # ours: an import error fails the suite

# (split, budget): one chunk; the smallest chunks in each orientation; both at once.
GEMM_CHUNKS = {"one-chunk": ("auto", None), "token-chunks": ("tokens", 1), "vocab-chunks": ("vocab", 1),
               "blocks-and-chunks": ("auto", 1)}


def _grads(monkeypatch, device, seed, bwd: str, chunks: str = "auto", budget=None, dtype=torch.float32):
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("REBEL_KERNELS_BWD", bwd)
    monkeypatch.setattr(triton_kernels, "CHUNKS", chunks)
    if budget is not None:
        monkeypatch.setattr(triton_kernels, "DZ_BUDGET_BYTES", budget)
    b = make_batch(seed, pairs=3, T=7, H=40, V=131, dtype=dtype, bias=True, old="token", masked_rows=(2,),
                   temperature=0.7, device=device)
    loss = fused_rebel_loss(*b.loss_args(), bias=b.bias, temperature=0.7, reduction="none")
    _, grads = value_and_grads(loss, b.leaves(), torch.linspace(-1.0, 2.0, loss.numel(), device=device))
    logp = fused_token_logprobs(b.hidden, b.weight, b.labels, bias=b.bias, temperature=0.7)
    _, tok_grads = value_and_grads(logp, b.leaves(), torch.ones_like(logp))
    return [g.detach().clone() for g in grads + tok_grads]


@pytest.mark.parametrize("chunking", list(GEMM_CHUNKS))
def test_gemm_and_atomic_backward_agree(chunking, monkeypatch, device, seed):
    gemm = _grads(monkeypatch, device, seed, "gemm", *GEMM_CHUNKS[chunking])
    atomic = _grads(monkeypatch, device, seed, "atomic")
    for i, (a, b) in enumerate(zip(gemm, atomic)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                   msg=lambda m, i=i: f"gradient {i} ({chunking}, seed={seed}): {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunking", list(GEMM_CHUNKS))
def test_gemm_backward_is_bitwise_repeatable(chunking, dtype, monkeypatch, device, seed):
    first = _grads(monkeypatch, device, seed, "gemm", *GEMM_CHUNKS[chunking], dtype=dtype)
    second = _grads(monkeypatch, device, seed, "gemm", *GEMM_CHUNKS[chunking], dtype=dtype)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"gradient {i} differs between two identical calls ({chunking}, seed={seed})"


def test_bwd_mode_is_checked(monkeypatch):
    monkeypatch.setenv("REBEL_KERNELS_BWD", "fast")
    with pytest.raises(ValueError, match="REBEL_KERNELS_BWD"):
        triton_kernels.bwd_mode()


def test_the_launcher_walks_the_plan_of_plan_py():
    """The plan's rule itself (budget, traffic, splits) is tested in tests/test_plan.py."""
    from rebel_kernels.logprobs import plan

    assert triton_kernels.DZ_BUDGET_BYTES == plan.BUDGET_BYTES and triton_kernels.CHUNKS == "auto"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_acc_mm_accumulates_in_float32(dtype, monkeypatch):
    """The CPU ("upcast") path of _acc_mm, in K slices: exact float32 sums of exact products."""
    monkeypatch.setattr(triton_kernels, "_SLICE_BYTES", 4 * (5 + 7) * 3)  # K slices of 3
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=gen).to(dtype), torch.randn(11, 7, generator=gen).to(dtype)
    acc = torch.randn(5, 7, generator=gen)
    want = acc.double() + a.double() @ b.double()
    triton_kernels._acc_mm(acc, a, b)
    torch.testing.assert_close(acc.double(), want, rtol=1e-6, atol=1e-6)
