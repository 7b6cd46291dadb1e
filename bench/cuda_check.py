"""One-shot CUDA check for the device machine: kernel correctness without the interpreter, a tile
sweep, and fused-vs-naive time and memory at the Llama-3-8B head shape. Writes JSON to argv[1].

    python -m bench.cuda_check $OUT/cuda_check.json
"""
import dataclasses
import json
import os
import sys

import torch
import triton

import rebel_kernels as rk
from bench._environment import environment
from rebel_kernels import reference as R
from rebel_kernels.logprobs import triton_kernels as tk


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@dataclasses.dataclass(frozen=True)
class Shape:
    """A batch of `rows` sequences of `t` positions through an LM head of hidden size `h`, vocabulary `v`."""

    rows: int
    t: int
    h: int
    v: int


def batch(shape: Shape, dtype, *, frac=1.0, bias=False, seed=0):
    """(hidden, weight, bias or None, labels, old log-probs, rewards) on CUDA: the first
    round(t * (1 - frac)) positions of each row are ignored (-100)."""
    rows, t, h, v = shape.rows, shape.t, shape.h, shape.v
    g = torch.Generator(device="cuda").manual_seed(seed)
    hid = (torch.randn(rows, t, h, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (rows, t), device="cuda", generator=g)
    y[:, : int(round(t * (1 - frac)))] = -100
    old = torch.randn(rows, t, device="cuda", generator=g)
    r = torch.randn(rows, device="cuda", generator=g)
    return hid, w, b, y, old, r


def correctness():
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, t, h, v, bias, temp in [(4, 37, 256, 5003, True, 0.7), (2, 1, 4096, 128256, False, 1.0),
                                          (6, 129, 512, 32000, True, 1.3)]:
            hid, w, b, y, old, r = batch(Shape(rows, t, h, v), dtype, frac=0.6, bias=bias)
            params = [hid, w] + ([b] if bias else [])
            loss = rk.fused_rebel_loss(hid, w, y, old, r, bias=b, temperature=temp, eta=0.5)
            grads = torch.autograd.grad(loss, params)
            lp = rk.fused_token_logprobs(hid, w, y, bias=b, temperature=temp)
            lp2 = rk.fused_token_logprobs(hid, w, y, bias=b, temperature=temp)
            p64 = [p.detach().double().requires_grad_() for p in params]
            ref = R.reference_rebel_loss(p64[0], p64[1], y, old.double(), r.double(), bias=p64[2] if bias else None,
                                         temperature=temp, eta=0.5)
            rgrads = torch.autograd.grad(ref, p64)
            # plain PyTorch in the input dtype, the yardstick for low precision
            pt = [p.detach().clone().requires_grad_() for p in params]
            logits = pt[0] @ pt[1].T + (pt[2] if bias else 0)
            logits = logits / temp
            lsm = torch.log_softmax(logits, -1)
            tok = torch.where(y != -100, lsm.gather(-1, y.clamp_min(0)[..., None])[..., 0], 0)
            ploss = R.reference_rebel_loss_from_logprobs(tok, y, old.to(dtype), r.to(dtype), eta=0.5)
            pgrads = torch.autograd.grad(ploss, pt)
            row = dict(dtype=str(dtype), shape=[rows, t, h, v], bias=bias, temperature=temp,
                       loss_err=rel(loss, ref), plain_loss_err=rel(ploss, ref),
                       grad_err=[rel(a, c) for a, c in zip(grads, rgrads)],
                       plain_grad_err=[rel(a, c) for a, c in zip(pgrads, rgrads)],
                       fwd_bitwise_repeat=bool(torch.equal(lp, lp2)),
                       finite=all(torch.isfinite(gg).all().item() for gg in grads))
            out.append(row)
            print(json.dumps(row))
    return out


def bench_ms(fn, reps=10):
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def naive_loss(hid, w, y, old, r):
    logits = (hid @ w.T).float()
    lsm = torch.log_softmax(logits, -1)
    tok = torch.where(y != -100, lsm.gather(-1, y.clamp_min(0)[..., None])[..., 0], 0.0)
    return R.reference_rebel_loss_from_logprobs(tok, y, old, r)


def measure(name, fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = bench_ms(fn)
    return dict(name=name, ms=ms, op_peak_mib=peak / 2**20)


def perf(n_tokens, frac, fwd_cfg=None, bwd_cfg=None, naive=True):
    h, v = 4096, 128256
    rows = 16
    hid, w, _, y, old, r = batch(Shape(rows, n_tokens // rows, h, v), torch.bfloat16, frac=frac)
    n_valid = int((y != -100).sum())
    res = dict(n_tokens=n_tokens, frac=frac, n_valid=n_valid, h=h, v=v)

    def fused_fwd():
        with torch.no_grad():
            rk.fused_token_logprobs(hid, w, y)

    def fused_fb():
        loss = rk.fused_rebel_loss(hid, w, y, old, r)
        torch.autograd.grad(loss, [hid, w])

    def naive_fwd():
        with torch.no_grad():
            naive_loss(hid, w, y, old, r)

    def naive_fb():
        torch.autograd.grad(naive_loss(hid, w, y, old, r), [hid, w])

    rows_out = [measure("fused_fwd", fused_fwd), measure("fused_fwdbwd", fused_fb)]
    if naive:
        rows_out += [measure("naive_fwd", naive_fwd), measure("naive_fwdbwd", naive_fb)]
    for row in rows_out:
        n_eff = n_valid if row["name"].startswith("fused") else n_tokens
        flop = (2 if row["name"].endswith("fwd") else 8) * n_eff * h * v
        row["tflops"] = flop / row["ms"] / 1e9
        row.update(res)
        print(json.dumps(row))
    return rows_out


def sweep():
    out = []
    h, v, n = 4096, 128256, 8192
    hid, w, _, y, old, r = batch(Shape(16, n // 16, h, v), torch.bfloat16)
    y2 = y.reshape(-1)
    idx = torch.arange(n, device="cuda")
    pos = idx.clone()
    h2 = hid.detach().reshape(-1, h)
    for (bm, bn, bk, nw, ns), tma in [((128, 128, 64, 8, 3), "0"), ((128, 128, 64, 8, 4), "0"),
                                      ((128, 256, 64, 8, 3), "0"), ((64, 256, 64, 8, 3), "0"),
                                      ((256, 128, 64, 8, 3), "0"), ((128, 64, 64, 4, 4), "0"),
                                      ((128, 128, 64, 8, 4), "1"), ((128, 256, 64, 8, 3), "1")]:
        os.environ["REBEL_KERNELS_TMA"] = tma
        cfg = tk.TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_v=8192)
        try:
            ms = bench_ms(lambda cfg=cfg: tk.token_logprobs_fwd(h2, w.detach(), None, y2, idx, pos, 1.0, False, cfg))
            out.append(dict(kind="fwd", tma=tma, cfg=dataclasses.asdict(cfg), ms=ms, tflops=2 * n * h * v / ms / 1e9))
        except Exception as e:  # out of shared memory etc.
            out.append(dict(kind="fwd", cfg=dataclasses.asdict(cfg), error=str(e)[:200]))
        print(json.dumps(out[-1]))
    os.environ["REBEL_KERNELS_TMA"] = "0"
    _, lse, _ = tk.token_logprobs_fwd(h2, w.detach(), None, y2, idx, pos, 1.0, False)
    g = torch.randn(n, device="cuda")
    for bm, bn, bk, nw, ns, gm in [(128, 128, 64, 8, 3, 8), (128, 256, 64, 8, 3, 8), (128, 128, 32, 8, 3, 8),
                                   (64, 128, 64, 4, 3, 8), (128, 128, 64, 8, 3, 32)]:
        cfg = tk.TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, group_m=gm)
        try:
            ms = bench_ms(lambda cfg=cfg: tk.token_logprobs_bwd(g, h2, w.detach(), None, y2, idx, lse, 1.0,
                                                                True, True, False, cfg))
            out.append(dict(kind="bwd", cfg=dataclasses.asdict(cfg), ms=ms, tflops=6 * n * h * v / ms / 1e9))
        except Exception as e:
            out.append(dict(kind="bwd", cfg=dataclasses.asdict(cfg), error=str(e)[:200]))
        print(json.dumps(out[-1]))
    return out


def main():
    path = sys.argv[1]
    meta = environment()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    meta["bf16_matmul_tflops"] = 2 * 8192**3 / bench_ms(lambda: a @ a) / 1e9
    print(json.dumps(meta))
    result = dict(meta=meta)
    result["correctness"] = correctness()
    json.dump(result, open(path, "w"), indent=1)
    result["sweep"] = sweep() if os.environ.get("SWEEP", "1") == "1" else []
    json.dump(result, open(path, "w"), indent=1)
    result["perf"] = []
    for n, frac in [(8192, 1.0), (8192, 0.1), (16384, 1.0)]:
        result["perf"] += perf(n, frac)
        json.dump(result, open(path, "w"), indent=1)


if __name__ == "__main__":
    main()
