"""The Hopper tensor-descriptor (TMA) weight loads give the pointer path's results.

Under the interpreter this checks the indexing of the descriptor path; on an H100 (CUDA, no
interpreter) it checks the real TMA loads.
"""
import pytest
import torch
from _inputs import assert_rel, make_batch, value_and_grads

from rebel_kernels import fused_rebel_loss
from rebel_kernels.logprobs import triton_kernels
from rebel_kernels.reference import reference_rebel_loss

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_weight_loads_match_reference(dtype, seed, device, monkeypatch):
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and not triton_kernels.interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if not on_cpu and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tensor descriptors need Hopper or newer")
    monkeypatch.setenv("REBEL_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("REBEL_KERNELS_TMA", "1")
    b = make_batch(seed, pairs=2, T=5, H=48, V=131, dtype=dtype, bias=True, old="token", device=device)
    cfg = triton_kernels.tile_config("fwd", b.weight.device, dtype)
    assert triton_kernels._use_tma(b.weight, cfg), "the descriptor path must be taken for this shape"
    out, grads = value_and_grads(fused_rebel_loss(*b.loss_args(), bias=b.bias, temperature=0.9), b.leaves())
    b64 = b.to64()
    ref, ref_grads = value_and_grads(reference_rebel_loss(*b64.loss_args(), bias=b64.bias, temperature=0.9),
                                     b64.leaves())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_rel(out, ref, tol, "loss", seed)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel(g, r, tol, f"d{name}", seed)
