"""torch.library registration: the ops, their fake (meta) implementations and their autograd.

Three ops, each dispatching to the Triton or the chunked PyTorch backend:
  rebel_kernels::token_logprobs           (hidden, weight, bias, labels) -> logp, lse, entropy
                                          (logits softcap_fn(logit_scale * (h W^T + b)) / T)
  rebel_kernels::token_logprobs_backward  -> d hidden, d weight, d bias
  rebel_kernels::pair_loss                (logp [2B, T], labels, old, rewards) -> loss [B], err [B]
Being custom ops, they are opaque to torch.compile (no graph break) and to FSDP2. The Triton
launchers (triton_kernels.py, which imports triton) are imported only when `backend == "triton"`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _alloc, _validate
from . import torch_impl


def _compact(labels: Tensor, ignore_index: int):
    """Flat labels, valid mask, idx [N] (flat positions of valid tokens), pos [NT] (compact index or -1)."""
    y = labels.reshape(-1).contiguous()
    valid = y != ignore_index
    idx = valid.nonzero().squeeze(1)
    pos = torch.where(valid, valid.cumsum(0) - 1, -1)
    return y, valid, idx, pos


def _rows(hidden: Tensor) -> Tensor:
    h2 = hidden.reshape(-1, hidden.shape[-1])
    return h2 if h2.stride(-1) == 1 else h2.contiguous()


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """t's rows at idx (the compacted valid tokens); t itself when every row is valid (no copy)."""
    return t if idx.numel() == t.shape[0] else t.index_select(0, idx)


def _scatter(values: Tensor, idx: Tensor, shape, dtype) -> Tensor:
    """A dense tensor of `shape` (not a view: FSDP2 hooks module outputs) with `values` at flat `idx`, 0 elsewhere."""
    out = _alloc.empty(shape, dtype=dtype, device=values.device).zero_()
    out.view(-1).index_copy_(0, idx, values.to(dtype))
    return out


def _out_dtype(hidden: Tensor):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _token_logprobs_impl(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    temperature: float, ignore_index: int, return_entropy: bool, backend: str,
    logit_scale: float = 1.0, softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    y, valid, idx, pos = _compact(labels, ignore_index)
    _validate.label_values(y, valid, weight.shape[0])
    h2, shape = _rows(hidden), labels.shape
    if backend == "triton":
        from . import triton_kernels

        logp, lse, ent = triton_kernels.token_logprobs_fwd(
            h2, weight.contiguous(), None if bias is None else bias.contiguous(), y, idx, pos, temperature,
            return_entropy, out_shape=shape, logit_scale=logit_scale, softcap=softcap,
        )
    else:
        logp_c, lse_c, ent_c = torch_impl.token_logprobs_fwd(
            _take(h2, idx), weight, bias, _take(y, idx), temperature, return_entropy,
            logit_scale=logit_scale, softcap=softcap,
        )
        dtype = _out_dtype(hidden)
        logp, lse = _scatter(logp_c, idx, shape, dtype), _scatter(lse_c, idx, shape, dtype)
        ent = _scatter(ent_c, idx, shape, dtype) if return_entropy else None
    return logp, lse, ent if ent is not None else hidden.new_empty(0, dtype=logp.dtype)


token_logprobs = torch.library.custom_op("rebel_kernels::token_logprobs", mutates_args=())(_token_logprobs_impl)


@token_logprobs.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, backend, logit_scale=1.0,
      softcap=None):
    dtype = _out_dtype(hidden)
    logp = hidden.new_empty(labels.shape, dtype=dtype)
    ent = hidden.new_empty(labels.shape if return_entropy else (0,), dtype=dtype)
    return logp, torch.empty_like(logp), ent


def _token_logprobs_backward_impl(
    grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
    temperature: float, ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool, backend: str,
    logit_scale: float = 1.0, softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    y, _, idx, _ = _compact(labels, ignore_index)
    h2 = _rows(hidden)
    g = grad.reshape(-1).index_select(0, idx).to(_out_dtype(hidden))
    lse_c = lse.reshape(-1).index_select(0, idx)
    if backend == "triton":
        from . import triton_kernels

        dh, dw, db = triton_kernels.token_logprobs_bwd(  # dh: dense [NT, H] in hidden's dtype
            g, h2, weight.contiguous(), None if bias is None else bias.contiguous(), y, idx, lse_c, temperature,
            need_dh, need_dw, need_db, logit_scale=logit_scale, softcap=softcap,
        )
    else:
        dh_c, dw, db = torch_impl.token_logprobs_bwd(
            g, _take(h2, idx), weight, bias, _take(y, idx), lse_c, temperature, need_dh, need_dw, need_db,
            logit_scale=logit_scale, softcap=softcap,
        )
        dh = None
        if need_dh and idx.numel() == h2.shape[0] and dh_c.dtype == hidden.dtype:
            dh = dh_c  # every row valid: the compacted gradient is the dense one
        elif need_dh:
            dh = torch.zeros_like(h2).index_copy_(0, idx, dh_c.to(hidden.dtype))
    empty = hidden.new_empty(0)
    dh = dh.view(hidden.shape) if need_dh else empty
    dw = dw.to(weight.dtype) if need_dw else empty.clone()
    db = db.to(bias.dtype) if need_db else empty.clone()
    return dh, dw, db


token_logprobs_backward = torch.library.custom_op("rebel_kernels::token_logprobs_backward", mutates_args=())(
    _token_logprobs_backward_impl)


@token_logprobs_backward.register_fake
def _(grad, hidden, weight, bias, labels, lse, temperature, ignore_index, need_dh, need_dw, need_db, backend,
      logit_scale=1.0, softcap=None):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else hidden.new_empty(0)
    db = torch.empty_like(bias) if need_db else hidden.new_empty(0)
    return dh, dw, db


def _token_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, _, backend, logit_scale, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.args = (temperature, ignore_index, backend, logit_scale, softcap)


def _token_backward(ctx, grad_logp, grad_lse, grad_entropy):
    # lse and entropy are auxiliary outputs: the public API detaches the entropy, lse never leaves.
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    temperature, ignore_index, backend, logit_scale, softcap = ctx.args
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and bias is not None
    if grad_logp is None or not (need_dh or need_dw or need_db):
        return (None,) * 10
    dh, dw, db = _call(token_logprobs_backward, _token_logprobs_backward_impl)(
        grad_logp, hidden, weight, bias, labels, lse, temperature, ignore_index,
        need_dh, need_dw, need_db, backend, logit_scale, softcap,
    )
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + (None,) * 7


token_logprobs.register_autograd(_token_backward, setup_context=_token_setup)


def _pair_loss_impl(
    logp: Tensor, labels: Tensor, old_logprobs: Tensor, rewards: Tensor, eta: float, ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    valid = labels != ignore_index
    _validate.finite_values("rewards", rewards)
    _validate.finite_values("old_logprobs", old_logprobs, valid if old_logprobs.dim() == 2 else None)
    if backend == "triton" and logp.dtype == torch.float32:
        from . import triton_kernels

        return triton_kernels.pair_loss(logp.contiguous(), labels, old_logprobs, rewards, eta, ignore_index)
    return torch_impl.pair_loss(logp, valid, old_logprobs, rewards, eta)


pair_loss = torch.library.custom_op("rebel_kernels::pair_loss", mutates_args=())(_pair_loss_impl)


@pair_loss.register_fake
def _(logp, labels, old_logprobs, rewards, eta, ignore_index, backend):
    half = logp.shape[0] // 2
    return logp.new_empty(half), logp.new_empty(half)


def _pair_setup(ctx, inputs, output):
    _, labels, old_logprobs, rewards, eta, ignore_index, _ = inputs
    ctx.save_for_backward(labels, output[1])
    ctx.args = (eta, ignore_index, old_logprobs.dim(), old_logprobs.dtype, rewards.dtype)


def _pair_backward(ctx, grad_loss, grad_err):
    # loss_j = err_j^2 with err_j = (ratio_j - ratio_{B+j}) / eta - (r_j - r_{B+j}), ratio_i = S_i - O_i:
    #   dloss_j/dS_j = 2 err_j / eta = -dloss_j/dS_{B+j},  dloss/dO = -dloss/dS,
    #   dloss_j/dr_j = -2 err_j = -dloss_j/dr_{B+j};  dS_i/dlogp[i, t] = 1 on valid tokens.
    labels, err = ctx.saved_tensors
    eta, ignore_index, old_dim, old_dtype, rew_dtype = ctx.args
    if grad_loss is None:
        return (None,) * 7
    two_err = 2.0 * err * grad_loss  # [B]
    d_seq = torch.cat([two_err, -two_err]) / eta  # [2B]
    valid = labels != ignore_index
    d_logp = torch.where(valid, d_seq[:, None], 0.0).to(err.dtype)
    d_old = (-d_logp if old_dim == 2 else -d_seq).to(old_dtype)
    d_rew = torch.cat([-two_err, two_err]).to(rew_dtype)
    return d_logp, None, d_old, d_rew, None, None, None


pair_loss.register_autograd(_pair_backward, setup_context=_pair_setup)


# The same ops as plain autograd.Functions, for eager calls on plain tensors (see `_plain`).

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(*inputs):
        return _token_logprobs_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2])  # lse and the entropy (detached by the API)
        ctx.set_materialize_grads(False)
        _token_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        return _token_backward(ctx, grad_logp, grad_lse, grad_entropy)


class _PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(*inputs):
        return _pair_loss_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # err, saved for the backward
        ctx.set_materialize_grads(False)
        _pair_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_loss, grad_err):
        return _pair_backward(ctx, grad_loss, grad_err)


def _plain(args) -> bool:
    """Can this call skip torch.library's dispatcher? Yes in eager mode on plain CPU/CUDA tensors: the
    dispatcher's Python entry imports torch._dynamo on the first call of any custom op (~140 MiB of
    resident modules and seconds of import on CPU), which an eager user of the op should not pay.
    torch.compile, functorch transforms, active dispatch modes, fake/meta tensors and tensor
    subclasses (DTensor, ...) go through the registered ops, which run the same functions."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    tensors = [a for a in args if isinstance(a, Tensor)]
    return all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type != "meta" for t in tensors)


def _call(op, impl):
    """A function of op's arguments that runs `impl` directly when `_plain`, else the registered op."""
    def run(*args):
        return impl(*args) if _plain(args) else op(*args)
    return run


def call_token_logprobs(*args):
    """torch.ops.rebel_kernels.token_logprobs(*args), differentiable; without the dispatcher when `_plain`."""
    return _TokenLogprobs.apply(*args) if _plain(args) else token_logprobs(*args)


def call_pair_loss(*args):
    """torch.ops.rebel_kernels.pair_loss(*args), differentiable; without the dispatcher when `_plain`."""
    return _PairLoss.apply(*args) if _plain(args) else pair_loss(*args)
