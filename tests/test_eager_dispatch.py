"""Eager calls of the loss ops on plain tensors skip torch.library's dispatcher (rebel_kernels/logprobs/
ops.py, `_plain`): the same functions run as plain autograd.Functions, so a CPU user's first call
does not import torch._dynamo, sympy or triton (~150 MiB resident, bench/_memory.py). These tests
check that it loads nothing of the sort, and that both routes give bitwise the same values and
gradients; torch.compile and the registered ops themselves are tested in test_compose.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rebel_kernels import fused_rebel_loss, fused_token_logprobs
from rebel_kernels.logprobs import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch._dynamo", "sympy", "triton", "torch.distributed.tensor")

FIRST_CALL = """
import json, sys
import torch
import rebel_kernels
before = set(sys.modules)
g = torch.Generator().manual_seed(0)
h = torch.randn(4, 7, 16, generator=g, requires_grad=True)
w = torch.randn(50, 16, generator=g, requires_grad=True)
y = torch.randint(0, 50, (4, 7), generator=g)
y[:, :3] = -100
loss = rebel_kernels.fused_rebel_loss(h, w, y, torch.zeros(4), torch.randn(4, generator=g), eta=0.5)
loss.backward()
rebel_kernels.fused_token_logprobs(h, w, y, return_entropy=True)
heavy = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("sympy", "triton")
               or m.startswith(("torch._dynamo", "torch.distributed.tensor")))
print(json.dumps(dict(heavy=heavy, grads=[h.grad is not None, w.grad is not None])))
"""


def test_first_eager_call_loads_no_compiler():
    """On the old route (every call through torch.library) the first call imported torch._dynamo and
    sympy, and `resolve` imported triton even for CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "REBEL_KERNELS_BACKEND")}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["grads"] == [True, True]
    assert got["heavy"] == [], f"the first eager call imported {got['heavy'][:10]} (of {HEAVY})"


def _inputs(dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(6, 9, 24, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(77, 24, generator=g, dtype=dtype) * 0.2).requires_grad_()
    b = (torch.randn(77, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, 77, (6, 9), generator=g)
    y[:, :4] = -100
    y[2, 6] = -100
    old = torch.randn(6, 9, generator=g, dtype=dtype)
    r = torch.randn(6, generator=g)
    return h, w, b, y, old, r


def _loss_and_grads(h, w, b, y, old, r, softcap):
    leaves = [t for t in (h, w, b, old, r) if t is not None]
    for t in leaves:
        t.grad = None
    old.requires_grad_(True), r.requires_grad_(True)
    loss = fused_rebel_loss(h, w, y, old, r, eta=0.7, bias=b, temperature=0.9, softcap=softcap)
    logp, ent = fused_token_logprobs(h.detach(), w.detach(), y, bias=None if b is None else b.detach(),
                                     temperature=0.9, return_entropy=True, softcap=softcap)
    loss.backward()
    return [loss.detach(), logp, ent] + [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 5.0)])
def test_eager_route_equals_registered_ops(monkeypatch, dtype, bias, softcap):
    h, w, b, y, old, r = _inputs(dtype, bias, seed=3)
    assert ops._plain((h, w, b, y)), "plain CPU tensors in eager mode take the direct route"
    direct = _loss_and_grads(h, w, b, y, old, r, softcap)
    monkeypatch.setattr(ops, "_plain", lambda args: False)  # every call through torch.ops.rebel_kernels
    registered = _loss_and_grads(h, w, b, y, old, r, softcap)
    assert len(direct) == len(registered)
    for a, c in zip(direct, registered):
        assert a.dtype == c.dtype and torch.equal(a, c)


def test_route_choice():
    """Subclasses, meta tensors and active dispatch modes take the registered ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    h = torch.randn(2, 3)
    assert ops._plain((h, torch.nn.Parameter(h), None, 1.0, "torch"))
    assert not ops._plain((h, torch.empty(2, 3, device="meta")))
    with Passthrough():
        assert not ops._plain((h,))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(h)
    assert not ops._plain((fake,))
