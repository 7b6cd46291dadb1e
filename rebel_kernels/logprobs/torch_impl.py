"""The chunked PyTorch path of the token log-probabilities and the REBEL loss (the default on CPU
tensors).

It works on the compacted valid tokens only and walks them in blocks of `TOKEN_CHUNK` rows and
the vocabulary in blocks of `VOCAB_CHUNK` columns, with an online log-sum-exp, so the largest
temporary is one [TOKEN_CHUNK, VOCAB_CHUNK] float32 tile (2 MiB), never [tokens, vocab]. Each tile
of logits z = softcap_fn(logit_scale * (h W^T + b)) / T is transformed in place (one tile alive at a
time); the backward recomputes it from the saved log-sum-exp, turns it into dz in place and
accumulates d hidden and d weight into their float32 buffers with addmm_ (no [chunk, H] or [tile, H]
temporaries). With a softcap the backward also holds the tile of 1 - tanh^2, and both tiles are half
as wide, so its working memory stays one full tile.
"""
from __future__ import annotations

import torch

from .._torch_common import acc_dtype, logits_tile

TOKEN_CHUNK = 512
VOCAB_CHUNK = 1024


def token_logprobs_fwd(h, w, b, labels, temperature: float, with_entropy: bool, *, logit_scale: float = 1.0,
                       softcap: float | None = None):
    """Compacted rows h [N, H] with labels [N] in [0, V) -> (logp [N], lse [N], entropy [N] or None)."""
    inv_temp = 1.0 / temperature
    acc = acc_dtype(h)
    n, vocab = h.shape[0], w.shape[0]
    logp = torch.empty(n, dtype=acc, device=h.device)
    lse = torch.empty(n, dtype=acc, device=h.device)
    entropy = torch.empty(n, dtype=acc, device=h.device) if with_entropy else None
    for r0 in range(0, n, TOKEN_CHUNK):
        hc, yc = h[r0 : r0 + TOKEN_CHUNK].to(acc), labels[r0 : r0 + TOKEN_CHUNK]
        m = torch.full((hc.shape[0],), float("-inf"), dtype=acc, device=h.device)
        s = torch.zeros_like(m)  # sum exp(z - m)
        sz = torch.zeros_like(m)  # sum exp(z - m) * z, for the entropy
        target = torch.zeros_like(m)
        for v0 in range(0, vocab, VOCAB_CHUNK):
            bv = None if b is None else b[v0 : v0 + VOCAB_CHUNK].to(acc)
            z = logits_tile(hc, w[v0 : v0 + VOCAB_CHUNK].to(acc), bv, inv_temp, logit_scale, softcap)
            local = yc - v0
            hit = (local >= 0) & (local < z.shape[1])
            target += torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
            m_new = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - m_new)
            if with_entropy:
                e = torch.exp(z - m_new[:, None])
                sz = sz * alpha + torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
                s = s * alpha + e.sum(1)
                del e
            else:
                s = s * alpha + z.sub_(m_new[:, None]).exp_().sum(1)  # z is spent
            m = m_new
            del z
        lse_c = m + torch.log(s)
        lse[r0 : r0 + TOKEN_CHUNK] = lse_c
        logp[r0 : r0 + TOKEN_CHUNK] = target - lse_c
        if with_entropy:
            entropy[r0 : r0 + TOKEN_CHUNK] = lse_c - sz / s
    return logp, lse, entropy


def token_logprobs_bwd(grad, h, w, b, labels, lse, temperature: float, need_dh: bool, need_dw: bool, need_db: bool,
                       *, logit_scale: float = 1.0, softcap: float | None = None):
    """Gradients of sum_n grad[n] * logp[n] for compacted rows.

    d logp_n / d z_n = onehot(y_n) - softmax(z_n). With pre = h W^T + b, u = logit_scale * pre and
    z = softcap_fn(u) / T, the gradient with respect to pre is
        dz_n = grad_n * (onehot(y_n) - p_n) * logit_scale / T                      (softcap None)
        dz_n = grad_n * (onehot(y_n) - p_n) * (1 - tanh^2(u / cap)) * logit_scale / T  (softcap cap)
    and dh = dz W,  dW = dz^T h,  db = sum_n dz_n.
    Accumulated in float32 (float64 for float64 inputs) buffers, in place; returned in that dtype.
    With a softcap the tile of 1 - tanh^2 is a second tile, so the vocabulary is walked in half
    chunks: the working memory stays one [TOKEN_CHUNK, VOCAB_CHUNK] tile.
    """
    inv_temp = 1.0 / temperature
    acc = acc_dtype(h)
    n, vocab = h.shape[0], w.shape[0]
    chunk = VOCAB_CHUNK if softcap is None else max(1, VOCAB_CHUNK // 2)
    dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=acc, device=h.device) if need_dw else None
    db = torch.zeros(vocab, dtype=acc, device=h.device) if need_db else None
    for r0 in range(0, n, TOKEN_CHUNK):
        hc, yc = h[r0 : r0 + TOKEN_CHUNK].to(acc), labels[r0 : r0 + TOKEN_CHUNK]
        gc, lc = grad[r0 : r0 + TOKEN_CHUNK].to(acc) * (logit_scale * inv_temp), lse[r0 : r0 + TOKEN_CHUNK]
        rows = torch.arange(hc.shape[0], device=h.device)
        for v0 in range(0, vocab, chunk):
            wv = w[v0 : v0 + chunk].to(acc)
            bv = None if b is None else b[v0 : v0 + chunk].to(acc)
            slope = None
            if softcap is None:
                dz = logits_tile(hc, wv, bv, inv_temp, logit_scale)
            else:
                dz = logits_tile(hc, wv, bv, 1.0).mul_(logit_scale / softcap).tanh_()  # tanh(u / cap)
                slope = torch.mul(dz, dz).neg_().add_(1.0)  # 1 - tanh^2
                dz.mul_(softcap * inv_temp)  # z
            dz.sub_(lc[:, None]).exp_().neg_()  # -p
            local = yc - v0
            hit = (local >= 0) & (local < dz.shape[1])
            dz[rows[hit], local[hit]] += 1.0  # onehot - p
            if slope is not None:
                dz.mul_(slope)
                del slope
            dz.mul_(gc[:, None])
            if need_dh:
                dh[r0 : r0 + TOKEN_CHUNK].addmm_(dz, wv)
            if need_dw:
                dw[v0 : v0 + chunk].addmm_(dz.T, hc)
            if need_db:
                db[v0 : v0 + chunk] += dz.sum(0)
            del dz
    return dh, dw, db


def pair_loss(logp, valid, old_logprobs, rewards, eta: float):
    """Per-pair REBEL errors and losses from dense per-token logp [2B, T] (0 at ignored positions).

    err_j = (ratio_j - ratio_{B+j}) / eta - (r_j - r_{B+j}),  loss_j = err_j^2.  Returns (loss [B], err [B]).
    """
    acc = logp.dtype
    if old_logprobs.dim() == 1:
        old = old_logprobs.to(acc)
    else:
        old = torch.where(valid, old_logprobs.to(acc), torch.zeros((), dtype=acc, device=logp.device)).sum(-1)
    ratio = logp.sum(-1) - old  # [2B]
    half = ratio.shape[0] // 2
    rew = rewards.to(acc)
    err = (ratio[:half] - ratio[half:]) / eta - (rew[:half] - rew[half:])
    return err * err, err
