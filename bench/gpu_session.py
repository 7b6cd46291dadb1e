"""Every GPU check this project owes, in ONE device call of at most 8 minutes. Each part runs in its own
process under its own time limit and writes its JSON under --out as soon as it has a row, so a part
cut short keeps what it measured and the next part still runs. In order of value:

  correctness  the op on CUDA without the interpreter, small shapes, fp32/bf16/fp16, both backward
               modes (REBEL_KERNELS_BWD=gemm|atomic where the op has them) vs the float64 reference,
               next to plain PyTorch's error in the same dtype; the forward's bitwise repeatability
  loss         Llama-3-8B head (H 4096, V 128256), 8k and 16k response tokens, bf16, T = 0.7: ours vs
               naive PyTorch, PyTorch's chunked linear_cross_entropy (where the device's torch has it),
               Liger-Kernel, Cut Cross-Entropy, torch.compile; p50 time, peak memory above the inputs,
               TFLOP/s, fraction of the matmul peak measured in the same process, and
               bench/perf_model.py's prediction beside ours
  packing      the GPU-only tests of packed training (pytest -m cuda): blockwise SDPA against padded rows
               (fp32, bf16), flex attention's compiled BlockMask forward and backward, flash-attn's real
               varlen kernel (when its wheel is carried), Liger-Kernel's patch (when carried)
  generate     random Pythia-1.4B, 128 rows x 53 new tokens: our loop vs Hugging Face generate, tokens/s
  iteration    one REBEL iteration (random Pythia-1.4B, 128 prompts x 2 x 53 tokens, 4 epochs) per phase
               and peak memory: ours, ours with sharing/packing/folding off, TRL's RLOOTrainer k = 2
               (bench/_iteration.py), and the run planner's prediction for ours (engine/plan/)
  tiles        the tile candidates bench/compile_check.py found spill-free, timed: the forward launcher
               (bf16, H 4096, V 128256, 8192 tokens, with and without entropy) and the Gumbel sampler
               (8 to 256 rows), the tile table's entry first

On the device (torch 2.11, no package index there): peers travel as wheels in .whl/ (gitignored;
`pip download --no-deps -d .whl liger-kernel cut-cross-entropy trl datasets dill multiprocess` here,
Python 3.12 manylinux wheels, see the device tool's README), carried with the call:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; \\
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 -m bench.gpu_session --out $OUT

Peers that are missing are recorded as skipped with the reason, never replaced. Without the native
extension built, sampling uses its PyTorch fallback (the engine's default REBEL presets sample through
the Gumbel kernel from the hidden state anyway). Rehearse on CPU before a lend (tiny shapes, same code):

    python -m bench.gpu_session --out /tmp/gpu_dry --dry-run
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

from bench._environment import REPO_ROOT, environment

# seconds each (8 min in all), in order of value
PARTS = {"correctness": 85, "packing": 45, "loss": 130, "generate": 65, "iteration": 115, "tiles": 40}
MAX_TOTAL_S = 480


class Rows:
    """A part's JSON file, rewritten after every row (what a killed part measured stays on disk)."""

    def __init__(self, out: str, part: str, dry_run: bool):
        self.path = os.path.join(out, f"{part}.json")
        self.doc = {"part": part, "dry_run": dry_run, "environment": environment(), "rows": []}
        self.flush()

    def add(self, row: dict) -> None:
        self.doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1, default=str)
        os.replace(tmp, self.path)


@contextlib.contextmanager
def backward_mode(mode: str | None):
    """REBEL_KERNELS_BWD for the duration of a block (None: the op's default)."""
    saved = os.environ.get("REBEL_KERNELS_BWD")
    if mode is not None:
        os.environ["REBEL_KERNELS_BWD"] = mode
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("REBEL_KERNELS_BWD", None)
        else:
            os.environ["REBEL_KERNELS_BWD"] = saved


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to rehearse on CPU")
    return torch.device("cuda")


# ----------------------------------------------------------------------------------------------
# part 1: correctness


def part_correctness(rows: Rows, dry_run: bool) -> None:
    import rebel_kernels as rk
    from rebel_kernels import reference as R

    dev = _device(dry_run)
    shapes = [(4, 9, 32, 301, True, 0.7)] if dry_run else [
        (4, 37, 256, 5003, True, 0.7), (2, 1, 4096, 128256, False, 1.0), (6, 129, 512, 32000, True, 1.3)]
    dtypes = (torch.float32, torch.bfloat16) if dry_run else (torch.float32, torch.bfloat16, torch.float16)
    for mode in ("gemm", "atomic"):
        for dtype in dtypes:
            for rows_, t, h, v, bias, temp in shapes:
                g = torch.Generator(device=dev).manual_seed(0)
                hid = (torch.randn(rows_, t, h, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
                w = (torch.randn(v, h, device=dev, generator=g) / h**0.5).to(dtype).requires_grad_()
                b = (torch.randn(v, device=dev, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
                y = torch.randint(0, v, (rows_, t), device=dev, generator=g)
                y[:, : int(t * 0.4)] = -100
                old, r = torch.randn(rows_, t, device=dev, generator=g), torch.randn(rows_, device=dev, generator=g)
                params = [hid, w] + ([b] if bias else [])
                with backward_mode(mode):
                    loss = rk.fused_rebel_loss(hid, w, y, old, r, bias=b, temperature=temp, eta=0.5)
                    grads = torch.autograd.grad(loss, params)
                lp = rk.fused_token_logprobs(hid, w, y, bias=b, temperature=temp)
                repeat = torch.equal(lp, rk.fused_token_logprobs(hid, w, y, bias=b, temperature=temp))
                p64 = [p.detach().double().requires_grad_() for p in params]
                ref = R.reference_rebel_loss(p64[0], p64[1], y, old.double(), r.double(),
                                             bias=p64[2] if bias else None, temperature=temp, eta=0.5)
                ref_grads = torch.autograd.grad(ref, p64)
                plain = [p.detach().clone().requires_grad_() for p in params]
                logits = (plain[0] @ plain[1].T + (plain[2] if bias else 0)) / temp
                lsm = torch.log_softmax(logits, -1)
                tok = torch.where(y != -100, lsm.gather(-1, y.clamp_min(0)[..., None])[..., 0], 0)
                ploss = R.reference_rebel_loss_from_logprobs(tok, y, old.to(dtype), r.to(dtype), eta=0.5)
                pgrads = torch.autograd.grad(ploss, plain)
                errs = [_rel(a, c) for a, c in zip(grads, ref_grads)]
                plain_errs = [_rel(a, c) for a, c in zip(pgrads, ref_grads)]
                tol = 1e-4 if dtype == torch.float32 else None
                if tol:
                    ok = all(e <= tol for e in errs)
                else:  # low precision: at most 2x plain PyTorch's error in the same dtype
                    ok = all(e <= 2 * max(p, 1e-6) for e, p in zip(errs, plain_errs))
                rows.add(dict(backward=mode, dtype=str(dtype), shape=[rows_, t, h, v], bias=bias, temperature=temp,
                              loss_err=_rel(loss, ref), plain_loss_err=_rel(ploss, ref), grad_err=errs,
                              plain_grad_err=plain_errs, fwd_bitwise_repeat=repeat, ok=bool(ok and repeat)))


# ----------------------------------------------------------------------------------------------
# part 2: the loss at the Llama-3-8B head


def _matmul_peak_tflops(dev: torch.device, dry_run: bool) -> float:
    n = 512 if dry_run else 8192
    dtype = torch.float32 if dry_run else torch.bfloat16
    a = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ a
    return 2 * n**3 / _median_s(lambda: a @ a, dev, 10) / 1e12


def _median_s(fn, dev: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _prediction(n: int, h: int, v: int, mode: str, backward: str) -> dict:
    from bench import perf_model as pm

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    dev = pm.DEVICES["h200" if "H200" in name else "a6000" if "A6000" in name else "h100"]
    kernels = pm.forward(n, h, v)
    useful = 2.0 * n * h * v
    if mode == "fwdbwd":
        kernels = kernels + (pm.backward_gemm(n, h, v) if backward == "gemm" else pm.backward_atomic(n, h, v))
        useful = 8.0 * n * h * v
    return {"device_model": dev.name, **pm.predict(kernels, dev, useful)}


def part_loss(rows: Rows, dry_run: bool) -> None:
    from bench import _providers as P
    from bench._cases import Case

    dev = _device(dry_run)
    peak = _matmul_peak_tflops(dev, dry_run)
    rows.doc["matmul_peak_tflops"] = peak
    h, v = (64, 1000) if dry_run else (4096, 128256)
    providers = [("fused", "gemm"), ("fused", "atomic"), ("naive", None), ("liger", None), ("cce", None),
                 ("torch-lce", None), ("compile", None)]
    for n in ((256,) if dry_run else (8192, 16384)):
        case = Case(f"llama3_8b-N{n}", dev.type, "float32" if dry_run else "bfloat16", 16, n // 16, h, v, 1.0,
                    temperature=0.7, model="llama3_8b")
        for provider, backward in providers:
            for mode in ("fwdbwd", "fwd"):
                if backward == "atomic" and mode == "fwd":
                    continue  # the forward is the same kernel
                row = dict(provider=provider if backward != "atomic" else "fused-atomic-bwd", mode=mode, tokens=n,
                           hidden=h, vocab=v, dtype=case.dtype, matmul_peak_tflops=peak)
                reason = P.provider_skip_reason(provider, dev.type)
                if reason:
                    rows.add(row | {"status": "skipped", "reason": reason})
                    continue
                try:
                    with backward_mode(backward):
                        row |= _measure_loss(P, case, provider, mode, dev, peak, dry_run)
                        if provider == "fused":
                            row["model_prediction"] = _prediction(n, h, v, mode, backward or "gemm")
                except Exception as e:  # a peer that fails at this size is a result, not a crash
                    row |= {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.add(row)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()


def _measure_loss(P, case, provider: str, mode: str, dev: torch.device, peak: float, dry_run: bool) -> dict:
    from bench._cases import make_inputs

    check = P.check_provider(provider, dev.type, case.dtype)
    if not check["ok"]:
        return {"status": "incorrect", "check": check}
    x = make_inputs(case, requires_grad=mode == "fwdbwd")
    step = P.make_step(provider, mode, x, dev.type, temperature=case.temperature)
    step()  # warm-up: compilation, autotuning
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = _median_s(step, dev, 2 if dry_run else 5)
    op_peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None
    flop = (8 if mode == "fwdbwd" else 2) * case.valid_tokens * case.hidden * case.vocab
    return {"status": "ok", "p50_ms": s * 1e3, "tflops": flop / s / 1e12,
            "fraction_of_matmul_peak": flop / s / 1e12 / peak, "op_peak_mib": op_peak,
            "check_rel_err_grad_weight": check.get("rel_err_grad_weight")}


# ----------------------------------------------------------------------------------------------
# part 3: generation


def part_generate(rows: Rows, dry_run: bool) -> None:
    from bench.test_bench_generate import build_model
    from engine.config import SamplingConfig
    from engine.model.generate import Sampler

    dev = _device(dry_run)
    name, prompts, plen, new = ("tiny-llama", 4, 16, 8) if dry_run else ("pythia-1.4b", 64, 128, 53)
    dtype = torch.float32 if dry_run else torch.bfloat16
    model = build_model(name, dev, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(2, vocab, (prompts, plen), device=dev, generator=g)
    mask = torch.ones_like(ids)
    mask[: prompts // 2, : plen // 4] = 0
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.7, samples_per_prompt=2)
    sampler = Sampler(model, eos_ids=[vocab], pad_token_id=0)  # one sampler: its CUDA graphs captured once
    steps = {"ours": lambda: sampler.generate(ids, mask, cfg, generator=g),
             "hf-dynamic": lambda: model.generate(ids.repeat(2, 1), attention_mask=mask.repeat(2, 1), do_sample=True,
                                                  temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=new,
                                                  min_new_tokens=new, eos_token_id=vocab, pad_token_id=0)}
    for provider, fn in steps.items():
        fn()  # warm-up: CUDA graph capture, cache allocation
        s = _median_s(fn, dev, 3)
        rows.add(dict(provider=provider, model=name, rows=2 * prompts, prompt_len=plen, new_tokens=new,
                      dtype=str(dtype), p50_s=s, tokens_per_s=2 * prompts * new / s))


# ----------------------------------------------------------------------------------------------
# part 4: one RL iteration


def part_iteration(rows: Rows, dry_run: bool) -> None:
    from bench import _iteration

    case = "cpu-tiny" if dry_run else "pythia-1.4b-random-128"
    for provider in ("ours", "ours-off", "trl-rloo"):
        try:
            for row in _iteration.measure(provider, case, iterations=2, timeout=40):
                rows.add(row)
        except Exception as e:
            rows.add(dict(provider=provider, case=case, status="error", error=f"{type(e).__name__}: {str(e)[-400:]}"))
    try:  # the run planner's prediction beside the measured rows: the lend refits it (bench/plan_check.py --refit)
        from bench import plan_check

        rows.add(plan_check.predicted_row(case))
    except Exception as e:
        rows.add(dict(provider="planner", case=case, status="error", error=f"{type(e).__name__}: {str(e)[-400:]}"))


PACKING_TESTS = ("tests/test_block_attention.py", "tests/test_packing.py", "tests/test_varlen.py",
                 "tests/test_liger.py")


def part_packing(rows: Rows, dry_run: bool) -> None:
    """The packing tests marked cuda, one row per test with its outcome (pytest's junit report)."""
    import xml.etree.ElementTree as ET

    report = os.path.join(os.path.dirname(rows.path), "packing-junit.xml")
    # the rehearsal runs one file's CPU twins (CI runs them all anyway)
    marker, files = ("not cuda", PACKING_TESTS[:1]) if dry_run else ("cuda", PACKING_TESTS)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider",
                    f"--junitxml={report}", *files], cwd=REPO_ROOT)
    cases = list(ET.parse(report).getroot().iter("testcase"))
    os.remove(report)  # read: the device returns at most 8 files
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        detail = next((child.get("message", "") for child in case if child.tag != "system-out"), "")
        rows.add(dict(test=f"{case.get('classname')}::{case.get('name')}", status=outcome, seconds=case.get("time"),
                      detail=detail[:400]))


# ----------------------------------------------------------------------------------------------
# part 6: which spill-free tile is fastest


def _tile_candidates(dry_run: bool) -> dict:
    """Launch kind -> [(name, TileConfig)]: the table's entry first, then the candidates bench/compile_check.py
    found spill-free (or the entry before it, which spilled) that only a GPU can rank."""
    from rebel_kernels._tiles import TileConfig as T

    if dry_run:
        return {"fwd": [("interpret", T(block_m=16, block_n=32, block_k=16, num_warps=1, num_stages=1, split_v=64))],
                "sample": [("interpret", T(block_m=32, block_n=32, block_k=16, num_warps=1, num_stages=1,
                                           split_v=64))]}
    fwd = dict(block_m=128, block_n=128, block_k=64, split_v=8192)
    sample = dict(block_m=64, block_n=128, block_k=64, split_v=256)
    return {
        "fwd": [("table w8 s3", T(**fwd, num_warps=8, num_stages=3)),
                ("before w8 s4", T(**fwd, num_warps=8, num_stages=4)),
                ("w16 s4", T(**fwd, num_warps=16, num_stages=4)),
                ("128x64x64 w8 s4", T(**{**fwd, "block_n": 64}, num_warps=8, num_stages=4))],
        "sample": [("table w8 s4", T(**sample, num_warps=8, num_stages=4)),
                   ("before w4 s4", T(**sample, num_warps=4, num_stages=4)),
                   ("64x64x64 w4 s4", T(**{**sample, "block_n": 64}, num_warps=4, num_stages=4)),
                   ("w8 s3", T(**sample, num_warps=8, num_stages=3)),
                   ("w8 s4 split 512", T(**{**sample, "split_v": 512}, num_warps=8, num_stages=4))],
    }


def part_tiles(rows: Rows, dry_run: bool) -> None:
    """p50 milliseconds of the forward launcher (bf16, Llama-3-8B head, with and without entropy) and of the
    Gumbel sampler (bf16, decode batches of 8 to 256 rows) for each tile candidate, the table's first."""
    from rebel_kernels.gumbel.triton_kernels import draw_seed, gumbel_sample_triton
    from rebel_kernels.logprobs.triton_kernels import token_logprobs_fwd

    dev = _device(dry_run)
    dtype = torch.float32 if dry_run else torch.bfloat16
    n, h, v = (16, 32, 300) if dry_run else (8192, 4096, 128256)
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(n, h, device=dev, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(v, h, device=dev, generator=g) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    idx = torch.arange(n, device=dev)
    reps = 2 if dry_run else 10
    candidates = _tile_candidates(dry_run)
    for entropy in (False, True):
        for name, cfg in candidates["fwd"]:
            def fwd(cfg=cfg, entropy=entropy):
                token_logprobs_fwd(hidden, weight, None, labels, idx, idx, 1.0, entropy, config=cfg)
            _time_tile(rows, dict(kernel="fwd", shape=[n, h, v], entropy=entropy), name, cfg, fwd, dev, reps)
    seed = draw_seed(torch.Generator(device=dev).manual_seed(1), dev)
    for batch in ((4,) if dry_run else (8, 64, 256)):
        for name, cfg in candidates["sample"]:
            def sample(cfg=cfg, batch=batch):
                gumbel_sample_triton(hidden[:batch], weight, None, 0.7, seed, config=cfg)
            _time_tile(rows, dict(kernel="sample", shape=[batch, h, v]), name, cfg, sample, dev, reps)


def _time_tile(rows: Rows, row: dict, name: str, cfg, fn, dev: torch.device, reps: int) -> None:
    row = dict(row, candidate=name, tiles=dataclasses.asdict(cfg))
    try:
        fn()  # compile
        rows.add(dict(row, p50_ms=1e3 * _median_s(fn, dev, reps), status="ok"))
    except Exception as e:  # a candidate that does not launch (shared memory, registers) is a result too
        rows.add(dict(row, status="error", error=f"{type(e).__name__}: {str(e)[-300:]}"))


RUN = {"correctness": part_correctness, "packing": part_packing, "loss": part_loss, "generate": part_generate,
       "iteration": part_iteration, "tiles": part_tiles}


# ----------------------------------------------------------------------------------------------
# the driver


def run_all(out: str, dry_run: bool, only: list[str]) -> dict:
    """Each part in a fresh process under its limit; summary.json says what each part did."""
    os.makedirs(out, exist_ok=True)
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": dry_run, "parts": {}}
    start = time.monotonic()
    with open(os.path.join(out, "session.log"), "a") as log:
        for part in only:
            left = MAX_TOTAL_S - (time.monotonic() - start)
            limit = min(PARTS[part], left)
            if limit < 10:
                summary["parts"][part] = {"status": "not run: no time left"}
                continue
            cmd = [sys.executable, "-m", "bench.gpu_session", "--part", part, "--out", out] + ["--dry-run"] * dry_run
            t0 = time.monotonic()
            log.write(f"=== {part} (limit {limit:.0f} s)\n")
            log.flush()
            try:
                # rehearsing tiles: the launchers' Triton kernels interpreted on CPU tensors (set before triton loads)
                env = dict(os.environ, TRITON_INTERPRET="1") if dry_run and part == "tiles" else None
                proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s (rows so far kept)"
            summary["parts"][part] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
            print(f"{part}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: rehearse every code path")
    p.add_argument("--part", choices=list(PARTS), help="run one part in this process (the driver's child)")
    p.add_argument("--only", nargs="*", choices=list(PARTS), default=list(PARTS))
    a = p.parse_args(argv)
    if a.part:
        RUN[a.part](Rows(a.out, a.part, a.dry_run), a.dry_run)
        return 0
    summary = run_all(a.out, a.dry_run, a.only)
    return 0 if all(s["status"] == "ok" for s in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
