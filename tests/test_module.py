"""FusedRebelLoss (the nn.Module form) agrees with fused_rebel_loss, forward and backward."""
import pytest
import torch
from _inputs import make_batch, value_and_grads
from torch import nn

from rebel_kernels import FusedRebelLoss, fused_rebel_loss


def head_from(batch) -> nn.Linear:
    """An nn.Linear(H, V) holding the batch's weight (and bias, if any)."""
    V, H = batch.weight.shape
    head = nn.Linear(H, V, bias=batch.bias is not None, dtype=batch.weight.dtype, device=batch.weight.device)
    with torch.no_grad():
        head.weight.copy_(batch.weight)
        if batch.bias is not None:
            head.bias.copy_(batch.bias)
    return head


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(eta=0.5, temperature=0.7, reduction="sum"),
        dict(eta=2.0, temperature=1.3, ignore_index=-1, reduction="none"),
        dict(temperature=0.7, reduction="none", logit_scale=0.25, softcap=1.5),
    ],
    ids=["defaults", "eta_temp_sum", "ignore_none", "scale_softcap_none"],
)
@pytest.mark.parametrize("old", ["token", "seq"])
def test_module_matches_function(bias, kwargs, old, backend, seed, device):
    b = make_batch(seed, pairs=2, T=5, H=24, V=67, bias=bias, old=old, ignore_index=kwargs.get("ignore_index", -100),
                   temperature=kwargs.get("temperature", 1.0), eta=kwargs.get("eta", 1.0), masked_rows=(3,),
                   device=device)
    head = head_from(b)
    loss_fn = FusedRebelLoss(**kwargs)
    assert list(loss_fn.parameters()) == [], "the loss module must not own parameters"

    hidden_m = b.hidden.detach().clone().requires_grad_(True)
    out_m = loss_fn(hidden_m, head, b.labels, b.old_logprobs, b.rewards)
    out_f = fused_rebel_loss(*b.loss_args(), bias=b.bias, **kwargs)
    msg = f"{backend} (seed={seed})"
    assert out_m.shape == out_f.shape and out_m.dtype == out_f.dtype, msg
    torch.testing.assert_close(out_m, out_f, rtol=1e-6, atol=0, msg=msg)

    w = torch.randn(out_f.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    module_leaves = [hidden_m, head.weight] + ([head.bias] if bias else [])
    _, grads_m = value_and_grads(out_m, module_leaves, w if out_m.dim() else None)
    _, grads_f = value_and_grads(out_f, b.leaves(), w if out_f.dim() else None)
    for name, gm, gf in zip(("d hidden", "d lm_head.weight", "d lm_head.bias"), grads_m, grads_f):
        torch.testing.assert_close(gm, gf, rtol=1e-5, atol=1e-6, msg=f"{name}: {msg}")


def test_module_backward_fills_lm_head_grads(backend, seed, device):
    """loss.backward() through the module populates .grad of the head's weight and bias."""
    b = make_batch(seed, pairs=1, T=4, H=16, V=33, device=device)
    head = head_from(b)
    loss = FusedRebelLoss(temperature=0.7)(b.hidden, head, b.labels, b.old_logprobs, b.rewards)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert b.hidden.grad is not None
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(head.bias.grad).all()
    assert head.weight.grad.abs().sum() > 0


def test_module_repr_shows_the_head_transforms():
    assert "softcap" not in repr(FusedRebelLoss()) and "logit_scale" not in repr(FusedRebelLoss())
    text = repr(FusedRebelLoss(logit_scale=0.25, softcap=30))
    assert "logit_scale=0.25" in text and "softcap=30.0" in text
