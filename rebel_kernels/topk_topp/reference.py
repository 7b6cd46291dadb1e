"""The specification of `sample_logits`: the kept set and the sampled token by a stable sort in
float64 (also re-exported by `rebel_kernels.reference`, and the PyTorch fallback when the native
extension is not built: torch_impl.py)."""
from __future__ import annotations

import torch
from torch import Tensor


def reference_kept_mask(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """The kept set S of every row (bool [R, V]), by a stable descending sort in float64.

    The stable sort puts tied values in index order, so taking the first top_k positions keeps the
    lower indices of a tie at the k-th value. The top-p cut is the first sorted position whose running
    mass reaches top_p of the total; every entry with the value found there is kept as well.
    """
    x = logits.float()  # the values the kernels compare; -0.0 == +0.0 ties, as in their keys
    rows, vocab = x.shape
    x_sorted, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [R, V]
    e_sorted = torch.exp((x_sorted.double() - x_sorted[:, :1].double()) / temperature)
    keep = torch.ones_like(x_sorted, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep[:, top_k:] = False
        e_sorted = e_sorted * keep
    if top_p < 1:
        cum = e_sorted.cumsum(-1)  # [R, V] float64
        cut = torch.searchsorted(cum, top_p * cum[:, -1:], right=False)  # first cum >= p * Z
        cut = cut.clamp_max(vocab - 1)  # only if rounding left the total below p * Z
        keep &= x_sorted >= x_sorted.gather(-1, cut)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def reference_sample_logits(
    logits: Tensor, uniform: Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[Tensor, Tensor]:
    """The specification of `sample_logits` for given uniforms [R] (float64 sums, sort-based).

    float64 because the token is decided by comparing running sums with u * W and the top-p mass
    with top_p * Z: summed in float64 (as the CPU kernel does, in index order), those sums agree
    with the kernel's to ~1e-16 relative, so a different token needs u to fall that close to a
    boundary. In float32 the gap would be ~1e-7 per term and visible over a 50k vocabulary.
    """
    x = logits.float().double()  # [R, V]
    m = x.max(-1, keepdim=True).values
    keep = reference_kept_mask(logits, temperature, top_k, top_p)
    w = torch.where(keep, torch.exp((x - m) / temperature), 0.0)  # [R, V]
    cum = w.cumsum(-1)  # index order, like the kernels
    total = cum[:, -1]
    token = torch.searchsorted(cum, (uniform.double() * total)[:, None], right=True)[:, 0]
    last = w.shape[1] - 1 - (w > 0).flip(-1).int().argmax(-1)  # last kept entry with mass
    token = torch.where(token < w.shape[1], token, last)
    logprob = (x.gather(-1, token[:, None])[:, 0] - m[:, 0]) / temperature - total.log()
    return token, logprob.float()
