"""The chunked PyTorch path of Gumbel-max sampling (CPU tensors by default, or
REBEL_KERNELS_BACKEND=torch).

The same math as the Triton path over chunks of TORCH_ROW_CHUNK rows x TORCH_VOCAB_CHUNK columns,
with uniforms drawn by `torch.rand` from the generator chunk by chunk (rows outer, columns inner).
Its samples follow the same distribution but are not the Triton path's samples for the same seed
(different random streams).
"""
from __future__ import annotations

import torch

from .. import _alloc
from .._torch_common import acc_dtype, logits_tile

TORCH_ROW_CHUNK = 1024
TORCH_VOCAB_CHUNK = 4096


def gumbel_sample_torch(hidden, weight, bias, temperature: float, generator: torch.Generator | None, *,
                        add_noise: bool = True, logit_scale: float = 1.0, softcap: float | None = None):
    """The chunked PyTorch path. Returns (tokens int64 [R], logprobs [R]) (float32; float64 for
    float64 inputs), with logits z = softcap_fn(logit_scale * (hidden W^T + b)) / temperature
    (`rebel_kernels._torch_common.logits_tile`). Uniforms come from `torch.rand(..., generator=generator)`, one
    [<= TORCH_ROW_CHUNK, <= TORCH_VOCAB_CHUNK] draw per chunk, rows outer, columns inner."""
    inv_temp = 1.0 / temperature
    acc = acc_dtype(hidden)
    rows, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    tokens = _alloc.empty((rows,), dtype=torch.int64, device=dev)
    logprobs = _alloc.empty((rows,), dtype=acc, device=dev)
    for r0 in range(0, rows, TORCH_ROW_CHUNK):
        hc = hidden[r0 : r0 + TORCH_ROW_CHUNK].to(acc)  # products and sums in float32 (float64 for float64)
        n = hc.shape[0]
        best = torch.full((n,), float("-inf"), dtype=acc, device=dev)
        idx = torch.zeros((n,), dtype=torch.int64, device=dev)
        zsel = torch.zeros((n,), dtype=acc, device=dev)
        m = torch.full((n,), float("-inf"), dtype=acc, device=dev)
        s = torch.zeros((n,), dtype=acc, device=dev)
        for v0 in range(0, vocab, TORCH_VOCAB_CHUNK):
            bc = None if bias is None else bias[v0 : v0 + TORCH_VOCAB_CHUNK].to(acc)
            z = logits_tile(hc, weight[v0 : v0 + TORCH_VOCAB_CHUNK].to(acc), bc, inv_temp,
                            logit_scale, softcap)  # [n, c]
            score = z
            if add_noise:
                u = torch.rand(z.shape, generator=generator, dtype=acc, device=dev)
                score = z - torch.log(-torch.log(u))
            c_idx = torch.argmax(score, dim=1, keepdim=True)  # first maximal column of the chunk
            c_best = score.gather(1, c_idx)[:, 0]
            take = c_best > best  # strict: ties keep the earlier chunk's (smaller) column
            best = torch.where(take, c_best, best)
            idx = torch.where(take, c_idx[:, 0] + v0, idx)
            zsel = torch.where(take, z.gather(1, c_idx)[:, 0], zsel)
            m_new = torch.maximum(m, z.amax(1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m = m_new
        tokens[r0 : r0 + n] = idx
        logprobs[r0 : r0 + n] = zsel - (m + torch.log(s))
    return tokens, logprobs
