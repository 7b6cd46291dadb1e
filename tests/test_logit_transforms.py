"""The LM head's final transforms (logit_scale, softcap) through torch.library (opcheck), and the
memory behaviour of the chunked torch path with a softcap. torch.compile with them: test_compose.py;
values and gradients on every backend: test_correctness.py; the sampler: test_gumbel_sampling.py;
validation: test_validation.py."""
import pytest
import torch

from rebel_kernels.logprobs import torch_impl


def _batch(seed=0, rows=4, t=6, h=24, v=37, spread=40.0):
    """Raw logits of standard deviation ~`spread`, so a softcap of 30 is far from linear."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(rows, t, h, generator=g)
    w = torch.randn(v, h, generator=g) * (spread / h**0.5)
    b = torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, v, (rows, t), generator=g)
    y[:, :2] = -100
    return hid, w, b, y, -torch.rand(rows, t, generator=g) * 40.0, torch.randn(rows, generator=g)


@pytest.mark.parametrize("head", [(0.0625, None), (1.0, 30.0), (8.0, 30.0)], ids=["scale", "softcap", "both"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_with_transforms(backend, head):
    """Schema (float logit_scale=1., float? softcap=None), fake and autograd registration agree with the
    kernels when the transforms are on, for both ops (forward and backward)."""
    if backend == "triton":
        pytest.importorskip("triton")
    hid, w, b, y, _, _ = _batch()
    for t in (hid, w, b):
        t.requires_grad_()
    logit_scale, softcap = head
    torch.library.opcheck(torch.ops.rebel_kernels.token_logprobs.default,
                          (hid, w, b, y, 0.7, -100, True, backend, logit_scale, softcap))
    _, lse, _ = torch.ops.rebel_kernels.token_logprobs(hid, w, b, y, 0.7, -100, False, backend, logit_scale, softcap)
    grad = torch.randn(y.shape)
    torch.library.opcheck(torch.ops.rebel_kernels.token_logprobs_backward.default,
                          (grad, hid.detach(), w.detach(), b.detach(), y, lse.detach(), 0.7, -100, True, True, True,
                           backend, logit_scale, softcap))


def test_torch_path_softcap_backward_keeps_one_tile_of_memory(monkeypatch):
    """With a softcap the torch backward holds two tiles (tanh and 1 - tanh^2) of half the width: its
    largest allocation is a [TOKEN_CHUNK, VOCAB_CHUNK / 2] tile, and the gradients do not depend on
    the chunking."""
    hid, w, b, y, _, _ = _batch(2, rows=6, t=7, v=101)
    h2, y2 = hid.reshape(-1, hid.shape[-1]), y.reshape(-1)
    keep = y2 != -100
    h2, y2 = h2[keep], y2[keep]
    g = torch.randn(y2.shape)
    full = [torch_impl.token_logprobs_fwd(h2, w, b, y2, 0.9, False, logit_scale=2.0, softcap=30.0)[1]]
    full += torch_impl.token_logprobs_bwd(g, h2, w, b, y2, full[0], 0.9, True, True, True, logit_scale=2.0,
                                          softcap=30.0)
    monkeypatch.setattr(torch_impl, "TOKEN_CHUNK", 8)
    monkeypatch.setattr(torch_impl, "VOCAB_CHUNK", 16)
    shapes = []
    real_mm = torch.mm

    def spy_mm(a, c, *args, **kwargs):
        out = real_mm(a, c, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", spy_mm)
    chunked = torch_impl.token_logprobs_bwd(g, h2, w, b, y2, full[0], 0.9, True, True, True, logit_scale=2.0,
                                            softcap=30.0)
    monkeypatch.setattr(torch, "mm", real_mm)
    assert shapes and max(r * c for r, c in shapes) == 8 * 8, shapes  # tiles of 8 rows x 16 / 2 columns
    for a, c in zip(full[1:], chunked):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
