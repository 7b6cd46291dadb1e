"""Compile every @triton.jit kernel of rebel_kernels for sm_90, sm_80 and sm_86 without a GPU, exactly
as its launcher would launch it, and check what ptxas made of it.

    python -m bench.compile_check [--quick] [--targets sm_90 sm_86] [--dtypes bf16] [--kernels gumbel_partial]
                                  [--out bench/results/NAME.json] [--markdown PATH [--summary]] [--jobs N]
    python -m bench.compile_check --table-from bench/results/NAME.json --markdown PATH --summary   # README table

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32), options=...)`
runs Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and the ptxas that ships inside the triton wheel.
Each launch variant takes the launcher's tiles (rebel_kernels._tiles.tile_config_for: the "sm90" entry for
sm_90, the "sm80" entry for sm_80 and sm_86, float32's own entries), its constexprs (bias, softcap,
entropy, the dot precision, TMA where `_use_tma` would pick it), num_warps and num_stages, and the
specialization Triton's JIT gives the arguments at run time (see ASSUMPTIONS).

Read back per variant: Triton's shared memory (metadata.shared), and from ptxas' verbose log (captured
through Triton's add_stages_inspection_hook, kept in the cached metadata) the registers, spill stores and
loads and the stack frame; the instruction each tl.dot lowers to (wgmma / mma.sync from the PTX, "fma"
when the TTIR has a dot but the PTX no tensor-core instruction).

Fails (exit status 1) when a variant does not compile, when its shared memory exceeds the target's
per-block limit (227 KB sm_90, 163 KB sm_80, 99 KB sm_86), or when a variant on a default path spills.
Default path: what the launchers run with the default settings for that target and dtype, with any
constexprs the inputs select (bias, softcap, entropy); not default (reported, never failed): the atomic
backward (REBEL_KERNELS_BWD=atomic), TMA weight loads (REBEL_KERNELS_TMA=1), the noise-free argmax and
the uniforms kernel (tests only). --quick: the default-arguments variant of every kernel on sm_90 and
sm_86 in bf16 (bench/test_compile_check.py runs it). Results: bench/results/<cpu>_<date>_compile-check.json
by default, with the environment (triton and ptxas versions, git commit, date).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
import warnings

import torch

from rebel_kernels._tiles import TileConfig, tile_config_for

KB = 1024


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    cc: int  # compute capability, 90 = sm_90
    smem_limit: int  # bytes of shared memory one block may use (opt-in maximum)
    gpus: str


TARGETS = {
    "sm_90": Target("sm_90", 90, 227 * KB, "H100 / H200"),
    "sm_80": Target("sm_80", 80, 163 * KB, "A100"),
    "sm_86": Target("sm_86", 86, 99 * KB, "A6000 / RTX 30xx"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ANY = "any"  # kernels whose inputs are float32 whatever the model's dtype (combines, pair loss, uniforms)

# How the variants specialize their arguments, as Triton's JIT does at run time for the usual inputs:
ASSUMPTIONS = {
    "pointers": "16-byte aligned (tt.divisibility 16), as torch allocations are; nothing guarantees it (the "
                "caller's tensors may be views; parts[i] of the launchers' [4, splits, N] partials is aligned when "
                "splits * N is a multiple of 4), so the '+unaligned' variants (not default paths) compile the "
                "plain variant of the matmul kernels in bf16 with no pointer specialized",
    "integers": "H, stride_h and stride_w divisible by 16 (every supported model's hidden size); vocabulary, "
                "token and row counts unspecialized; int32; none equal to 1",
    "vocabulary": "large (V >= split_v): SPLIT_V is the tile table's split_v",
    "old_logprobs": "float32 (the pair loss)",
    "fp_fusion": "Triton's default (fused multiply-add allowed)",
}
# Integer arguments Triton's JIT marks divisible by 16 for the usual shapes (H a multiple of 16).
ALIGNED_INTS = frozenset({"H", "stride_h", "stride_w"})


@dataclasses.dataclass(frozen=True)
class Launch:
    """One compile: a kernel as one launcher launches it for one target, dtype and set of constexprs."""
    kernel: str
    target: str
    dtype: str
    variant: str
    types: tuple  # (name, Triton type) of the non-constexpr arguments
    constexprs: tuple  # (name, value)
    num_warps: int
    num_stages: int
    tiles: tuple = ()  # (name, value) of the tile table's entry, for the report
    default: bool = True  # on a default path: a spill fails the check
    aligned: bool = True  # pointers specialized as 16-byte aligned
    skip: str = ""  # why this variant is not compiled (recorded, never silent)

    @property
    def key(self) -> str:
        return f"{self.kernel} {self.target} {self.dtype} {self.variant}"


# ----------------------------------------------------------------------------------------------
# the launch variants, mirroring the launchers
# ----------------------------------------------------------------------------------------------
def _kernel_fns() -> dict:
    """name -> JITFunction (imports triton and the kernel modules)."""
    from rebel_kernels.gumbel import triton_kernels as gk
    from rebel_kernels.logprobs import triton_kernels as lk

    return {
        "fwd_partial": lk._fwd_partial_kernel, "fwd_combine": lk._fwd_combine_kernel,
        "dz": lk._dz_kernel, "bwd_atomic": lk._bwd_kernel, "pair_loss": lk._pair_loss_kernel,
        "gumbel_partial": gk._gumbel_partial_kernel, "gumbel_combine": gk._gumbel_combine_kernel,
        "uniforms": gk._uniforms_kernel,
    }


KERNELS = ("fwd_partial", "fwd_combine", "dz", "bwd_atomic", "pair_loss", "gumbel_partial", "gumbel_combine",
           "uniforms")
PLAIN = "plain"  # the variant of the default arguments (no bias, no softcap, no entropy)


def _tname(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _tiles(cfg: TileConfig, *names: str) -> tuple:
    return tuple((n, getattr(cfg, n)) for n in ("block_m", "block_n", "block_k", *names))


def _dot_constexprs(dtype: torch.dtype) -> dict:
    from rebel_kernels._triton_common import _dot_precision

    # UPCAST is the interpreter's bf16 work-around (_upcast_dot): False on a GPU.
    return dict(DOT_PRECISION=_dot_precision(dtype), UPCAST=False)


def _tma_picked(target: Target, dtype: torch.dtype, cfg: TileConfig) -> str:
    """'' when `_use_tma` picks TMA for a weight of `dtype` under REBEL_KERNELS_TMA=1 on `target`, else why not.
    (Its other conditions hold for the usual inputs: rows of H * itemsize bytes, a 16-byte aligned weight.)"""
    if target.cc < 90:
        return "TMA tensor descriptors need sm_90+"
    if cfg.block_k * dtype.itemsize < 16:
        return "block_k * itemsize < 16 bytes"
    return ""


def _logit_types(w: str) -> dict:
    return dict(h_ptr=w, w_ptr=w, b_ptr=w)


def _tiled(kernel: str, target: Target, dtype: torch.dtype, cfg: TileConfig, types: dict, variants: dict, *,
           with_tma: tuple, extra: dict, tiles: str, default: bool = True) -> list[Launch]:
    """A tiled logits kernel's launches: each variant (name -> its flag constexprs) without TMA, and on sm_90
    the variants in `with_tma` with TMA weight loads (recorded as skipped where the launcher would not pick
    TMA); `extra`: the tile constexprs besides BLOCK_M/N/K; `tiles`: the tile entry's extra field."""
    tma = _tma_picked(target, dtype, cfg)
    out = []
    for use_tma in (False, True) if target.cc >= 90 else (False,):
        for name, flags in variants.items():
            if use_tma and name not in with_tma:
                continue
            consts = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **extra,
                          **_dot_constexprs(dtype), USE_TMA=use_tma)
            out.append(Launch(kernel, target.name, _tname(dtype), ("tma+" if use_tma else "") + name,
                              tuple(types.items()), tuple(consts.items()), cfg.num_warps, cfg.num_stages,
                              _tiles(cfg, tiles), default=default and not use_tma, skip=tma if use_tma else ""))
    return out


def _fwd_partial(target: Target, dtype: torch.dtype, cfg: TileConfig | None = None) -> list[Launch]:
    cfg = cfg or tile_config_for("fwd", target.cc // 10, dtype)
    w = "*" + _tname(dtype)
    types = dict(_logit_types(w), idx_ptr="*i64", y_ptr="*i64", m_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32",
                 sz_ptr="*fp32", N="i32", V="i32", H="i32", stride_h="i32", stride_w="i32", z_scale="fp32",
                 cap_over_temp="fp32")
    variants = {name: dict(HAS_BIAS=bias, HAS_SOFTCAP=softcap, WITH_ENTROPY=entropy)
                for name, (bias, softcap, entropy) in {PLAIN: (False, False, False), "entropy": (False, False, True),
                                                       "softcap": (False, True, False),
                                                       "bias+softcap+entropy": (True, True, True)}.items()}
    return _tiled("fwd_partial", target, dtype, cfg, types, variants, with_tma=(PLAIN, "bias+softcap+entropy"),
                  extra=dict(SPLIT_V=cfg.split_v), tiles="split_v")


def _fwd_combine(target: Target, dtype: None, cfg: None = None) -> list[Launch]:
    types = dict(m_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32", sz_ptr="*fp32", pos_ptr="*i64", logp_ptr="*fp32",
                 lse_ptr="*fp32", ent_ptr="*fp32", NT="i32", N="i32", NUM_SPLITS="i32")
    return [Launch("fwd_combine", target.name, ANY, PLAIN if not ent else "entropy", tuple(types.items()),
                   (("WITH_ENTROPY", ent), ("BLOCK", 256)), 4, 3, (("block", 256),))
            for ent in (False, True)]


def _backward_types(w: str) -> dict:
    return dict(_logit_types(w), idx_ptr="*i64", y_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", V="i32", H="i32",
                stride_h="i32", stride_w="i32", z_scale="fp32", cap_over_temp="fp32", grad_scale="fp32")


_BWD_FLAGS = {PLAIN: (False, False), "softcap": (False, True), "bias+softcap": (True, True)}


def _dz(target: Target, dtype: torch.dtype, cfg: TileConfig | None = None) -> list[Launch]:
    """The gemm backward's dz kernel (REBEL_KERNELS_BWD=gemm, the default)."""
    cfg = cfg or tile_config_for("bwd", target.cc // 10, dtype)
    w = "*" + _tname(dtype)
    types = dict(_backward_types(w), dz_ptr=w, dbp_ptr="*fp32", r0="i32", n_rows="i32", c0="i32", n_cols="i32")
    variants = {name: dict(HAS_BIAS=bias, HAS_SOFTCAP=softcap, NEED_DB=bias)
                for name, (bias, softcap) in _BWD_FLAGS.items()}
    return _tiled("dz", target, dtype, cfg, types, variants, with_tma=(PLAIN, "bias+softcap"),
                  extra=dict(GROUP_M=cfg.group_m), tiles="group_m")


def _bwd_atomic(target: Target, dtype: torch.dtype, cfg: TileConfig | None = None) -> list[Launch]:
    """The atomic backward (REBEL_KERNELS_BWD=atomic): never a default path."""
    cfg = cfg or tile_config_for("bwd", target.cc // 10, dtype)
    w = "*" + _tname(dtype)
    types = dict(_backward_types(w), dh_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", N="i32")
    variants = {name: dict(HAS_BIAS=bias, HAS_SOFTCAP=softcap, NEED_DH=True, NEED_DW=True, NEED_DB=bias)
                for name, (bias, softcap) in _BWD_FLAGS.items() if name != "softcap"}
    return _tiled("bwd_atomic", target, dtype, cfg, types, variants, with_tma=tuple(variants),
                  extra=dict(GROUP_M=cfg.group_m), tiles="group_m", default=False)


def _pair_loss(target: Target, dtype: None, cfg: None = None) -> list[Launch]:
    types = dict(logp_ptr="*fp32", y_ptr="*i64", old_ptr="*fp32", rew_ptr="*fp32", loss_ptr="*fp32",
                 err_ptr="*fp32", B="i32", T="i32", eta="fp32", ignore_index="i32")
    # BLOCK_T = min(1024, next_power_of_2(max(T, 16))): 1024 from 513 response tokens on
    return [Launch("pair_loss", target.name, ANY, name, tuple(types.items()),
                   (("OLD_PER_TOKEN", per_token), ("BLOCK_T", 1024)), 4, 3, (("block_t", 1024),))
            for name, per_token in ((PLAIN, True), ("old-per-sequence", False))]


def _gumbel_partial(target: Target, dtype: torch.dtype, cfg: TileConfig | None = None) -> list[Launch]:
    cfg = cfg or tile_config_for("sample", target.cc // 10, dtype)
    w = "*" + _tname(dtype)
    types = dict(_logit_types(w), seed_ptr="*i64", best_ptr="*fp32", zsel_ptr="*fp32", m_ptr="*fp32", s_ptr="*fp32",
                 idx_ptr="*i32", R="i32", V="i32", H="i32", stride_h="i32", stride_w="i32", z_scale="fp32",
                 cap_over_temp="fp32")
    out = []
    for name, (bias, softcap, noise) in {PLAIN: (False, False, True), "bias+softcap": (True, True, True),
                                         "argmax": (False, False, False)}.items():
        consts = dict(HAS_BIAS=bias, HAS_SOFTCAP=softcap, ADD_NOISE=noise, SPLIT_V=cfg.split_v, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **_dot_constexprs(dtype))
        out.append(Launch("gumbel_partial", target.name, _tname(dtype), name, tuple(types.items()),
                          tuple(consts.items()), cfg.num_warps, cfg.num_stages, _tiles(cfg, "split_v"),
                          default=noise))  # add_noise=False: the tests' tie-breaking check only
    return out


def _gumbel_combine(target: Target, dtype: None, cfg: None = None) -> list[Launch]:
    types = dict(best_ptr="*fp32", zsel_ptr="*fp32", m_ptr="*fp32", s_ptr="*fp32", idx_ptr="*i32", tok_ptr="*i64",
                 logp_ptr="*fp32", R="i32", NUM_SPLITS="i32")
    return [Launch("gumbel_combine", target.name, ANY, PLAIN, tuple(types.items()), (("BLOCK", 256),), 4, 3,
                   (("block", 256),))]


def _uniforms(target: Target, dtype: None, cfg: None = None) -> list[Launch]:
    types = dict(seed_ptr="*i64", out_ptr="*fp32", R="i32", V="i32")
    return [Launch("uniforms", target.name, ANY, PLAIN, tuple(types.items()), (("BLOCK_M", 16), ("BLOCK_N", 64)),
                   4, 3, (("block_m", 16), ("block_n", 64)), default=False)]  # kernel_uniforms: tests only


_BUILDERS = {"fwd_partial": _fwd_partial, "fwd_combine": _fwd_combine, "dz": _dz, "bwd_atomic": _bwd_atomic,
             "pair_loss": _pair_loss, "gumbel_partial": _gumbel_partial, "gumbel_combine": _gumbel_combine,
             "uniforms": _uniforms}
_DTYPE_FREE = ("fwd_combine", "pair_loss", "gumbel_combine", "uniforms")
_MATMUL = ("fwd_partial", "dz", "gumbel_partial")


def with_tiles(kernel: str, target: str, dtype: str, variant: str, cfg: TileConfig) -> Launch:
    """The launch variant `variant` of `kernel` with tiles `cfg` instead of the table's (for sweeps)."""
    found = [x for x in _BUILDERS[kernel](TARGETS[target], DTYPES[dtype], cfg) if x.variant == variant]
    if not found:
        raise ValueError(f"{kernel} has no variant {variant!r}")
    return found[0]


def launches(targets=tuple(TARGETS), dtypes=tuple(DTYPES), kernels=KERNELS, quick: bool = False) -> list[Launch]:
    """The matrix: every kernel's launch variants per target and dtype (the dtype-free kernels once per target).
    quick: only the PLAIN variant (the default arguments) of each kernel, in bf16."""
    out = []
    for t in targets:
        for k in kernels:
            if k in _DTYPE_FREE:
                out += _BUILDERS[k](TARGETS[t], None)
            else:
                for d in dtypes:
                    out += _BUILDERS[k](TARGETS[t], DTYPES[d])
            if k in _MATMUL and "bf16" in dtypes:  # the general specialization Triton compiles for odd inputs
                plain = next(x for x in out if (x.kernel, x.target, x.dtype, x.variant) == (k, t, "bf16", PLAIN))
                out.append(dataclasses.replace(plain, variant=PLAIN + "+unaligned", aligned=False, default=False))
    if quick:
        out = [x for x in out if x.variant == PLAIN and x.dtype in ("bf16", ANY)]
    return out


# ----------------------------------------------------------------------------------------------
# compiling and reading ptxas' log
# ----------------------------------------------------------------------------------------------
_HOOK_KEY = "rebel-compile-check-ptxas-log-v1"


def _ptxas_log_hook(*args):
    """Triton's add_stages_inspection_hook: wraps the cubin stage so that ptxas' verbose log (ptxas always
    runs with -v; TRITON_DUMP_PTXAS_LOG prints it) lands in the kernel's metadata, cached with it."""
    if not args:
        return _HOOK_KEY, _HOOK_KEY
    from triton import knobs

    _backend, stages, _options, _language, _capability = args
    make_cubin = stages["cubin"]

    def cubin(src, metadata):
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            out = make_cubin(src, metadata)
        metadata["ptxas_log"] = log.getvalue()
        return out

    stages["cubin"] = cubin


_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)\.(\w+)")
_MMA = re.compile(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.(\w+)\.(\w+)\.(\w+)\.(\w+)")


def parse_ptxas_log(log: str) -> dict:
    """registers, spill_stores, spill_loads, stack_frame (bytes per thread) from `ptxas -v`: the largest
    over the functions in the log (the entry, and any function it calls)."""
    out = dict(registers=None, spill_stores=0, spill_loads=0, stack_frame=0)
    for m in _SPILL.finditer(log):
        out["stack_frame"] = max(out["stack_frame"], int(m.group(1)))
        out["spill_stores"] = max(out["spill_stores"], int(m.group(2)))
        out["spill_loads"] = max(out["spill_loads"], int(m.group(3)))
    regs = [int(m.group(1)) for m in _REGS.finditer(log)]
    out["registers"] = max(regs) if regs else None
    return out


def dot_instruction(ptx: str, ttir: str) -> str:
    """What tl.dot became: 'wgmma m64n128k16 f32.bf16.bf16', 'mma.sync m16n8k16 f32.bf16.bf16.f32',
    'fma' (a dot without tensor cores) or '-' (no dot)."""
    found = sorted({f"wgmma {m.group(1)} {m.group(2)}.{m.group(3)}.{m.group(4)}" for m in _WGMMA.finditer(ptx)})
    found += sorted({f"mma.sync {m.group(1)} " + ".".join(m.groups()[1:]) for m in _MMA.finditer(ptx)})
    if found:
        return ", ".join(found)
    return "fma" if "tt.dot" in ttir else "-"


def compile_kernel(launch: Launch):
    """triton.compile of `launch` for its target: the CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin;
    metadata.ptxas_log: ptxas' verbose log). Raises what the compile raises."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fns()[launch.kernel]
    types, consts = dict(launch.types), dict(launch.constexprs)
    missing = [a for a in fn.arg_names if a not in types and a not in consts]
    extra = [a for a in (*types, *consts) if a not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"{launch.key}: arguments out of step with the kernel: missing {missing}, unknown {extra}")
    signature = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in consts and ((launch.aligned and types[a].startswith("*")) or a in ALIGNED_INTS)}
    with knobs.runtime.scope(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        knobs.runtime.add_stages_inspection_hook = _ptxas_log_hook
        return triton.compile(ASTSource(fn, signature, consts, attrs),
                              target=GPUTarget("cuda", TARGETS[launch.target].cc, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def compile_one(launch: Launch) -> dict:
    """Compile `launch` and read it back: a results row (status 'ok', 'fail' or 'skipped')."""
    target = TARGETS[launch.target]
    row = dict(kernel=launch.kernel, target=launch.target, dtype=launch.dtype, variant=launch.variant,
               default=launch.default, **dict(launch.tiles), num_warps=launch.num_warps,
               num_stages=launch.num_stages, smem_limit=target.smem_limit)
    if launch.skip:
        return dict(row, status="skipped", reason=launch.skip)
    t0 = time.perf_counter()
    try:
        kernel = compile_kernel(launch)
    except Exception as e:  # any compile error is a result
        msg = f"{type(e).__name__}: {e}".strip()
        return dict(row, status="fail", failures=["compile: " + msg[-2000:]],
                    compile_s=round(time.perf_counter() - t0, 2))
    meta = kernel.metadata
    res = parse_ptxas_log(getattr(meta, "ptxas_log", ""))
    row.update(shared_bytes=meta.shared, **res, dot=dot_instruction(kernel.asm["ptx"], kernel.asm.get("ttir", "")),
               compile_s=round(time.perf_counter() - t0, 2))
    failures = []
    if res["registers"] is None:
        failures.append("no ptxas -v log (registers unknown)")
    if meta.shared > target.smem_limit:
        failures.append(f"shared memory {meta.shared} B > {target.smem_limit} B ({target.name} per block)")
    if launch.default and (res["spill_stores"] or res["spill_loads"]):
        failures.append(f"spills on a default path: {res['spill_stores']} B stores, {res['spill_loads']} B loads")
    return dict(row, status="fail" if failures else "ok", failures=failures)


def run(matrix: list[Launch], jobs: int = 1, progress=None) -> list[dict]:
    """Compile the matrix (in `jobs` worker processes when > 1), in order."""
    if jobs <= 1:
        rows = []
        for launch in matrix:
            rows.append(compile_one(launch))
            if progress:
                progress(rows[-1])
        return rows
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        rows = []
        for row in pool.imap(compile_one, matrix):
            rows.append(row)
            if progress:
                progress(row)
    return rows


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _tiles_text(row: dict) -> str:
    if "block_k" in row:
        return f"{row['block_m']}x{row['block_n']}x{row['block_k']}"
    return "x".join(str(row[k]) for k in ("block_m", "block_n", "block", "block_t") if k in row)


def _spills_text(row: dict) -> str:
    if row.get("spill_stores") is None:
        return ""
    if not (row["spill_stores"] or row["spill_loads"]):
        return "0"
    return f"{row['spill_stores']} / {row['spill_loads']}"


HEADER = ("kernel", "target", "dtype", "variant", "tiles / warps / stages", "smem KB", "regs",
          "spills st / ld B", "dot", "status")


def table_rows(rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        status = r["status"] if r["status"] != "skipped" else f"skipped: {r['reason']}"
        if r["status"] == "fail":
            status = "FAIL: " + "; ".join(f.splitlines()[0][:100] for f in r["failures"])
        elif not r.get("default", True) and r["status"] == "ok":
            status = "ok (not default)"
        smem = f"{r['shared_bytes'] / KB:.1f}" if r.get("shared_bytes") is not None else ""
        regs = str(r.get("registers") or "")
        out.append((r["kernel"], r["target"], r["dtype"], r["variant"],
                    f"{_tiles_text(r)} / {r['num_warps']} / {r['num_stages']}", smem, regs, _spills_text(r),
                    r.get("dot", ""), status))
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


def summary_rows(rows: list[dict]) -> list[dict]:
    """The README's rows: the plain variant of each (kernel, target, dtype), and every row that spills,
    fails or was skipped."""
    return [r for r in rows if r["variant"] == PLAIN or r["status"] != "ok" or r.get("spill_stores")
            or r.get("spill_loads")]


def print_table(rows: list[dict], file=sys.stdout) -> None:
    cells = [HEADER, *table_rows(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip(), file=file)


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['kernel']} {r['target']} {r['dtype']} {r['variant']}: {f}" for r in rows if r["status"] == "fail"
            for f in r["failures"]]


def _ptxas_versions() -> dict:
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    out = {}
    for t in TARGETS.values():
        tool = get_ptxas(t.cc)
        try:
            text = subprocess.run([tool.path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except OSError as e:
            text = f"unavailable: {e}"
        release = re.search(r"release ([\d.]+), (V[\d.]+)", text)
        out[t.name] = f"{os.path.basename(tool.path)} {release.group(2) if release else text.strip()[-60:]}"
    return out


def document(rows: list[dict], args: argparse.Namespace, seconds: float) -> dict:
    from bench._environment import environment

    env = environment()
    env["ptxas"] = _ptxas_versions()
    return dict(suite="compile-check", environment=env, quick=args.quick, jobs=args.jobs,
                wall_s=round(seconds, 1), targets={t: dataclasses.asdict(TARGETS[t]) for t in args.targets},
                assumptions=ASSUMPTIONS, failures=failures(rows), rows=rows)


def default_out() -> str:
    """bench/results/<cpu>_<date>_compile-check.json (the machine that compiled, as the other results name it)."""
    import datetime

    from bench._environment import REPO_ROOT, cpu_model, slug

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(REPO_ROOT, "bench", "results", f"{slug(cpu_model())}_{date}_compile-check.json")


def _write_markdown(path: str, rows: list[dict], summary: bool) -> None:
    with open(path, "w") as f:
        f.write(markdown_table(summary_rows(rows) if summary else rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the default-arguments variant of each kernel, bf16")
    p.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=None,
                   help="default: all (sm_90 sm_86 with --quick)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None, help="default: all (bf16 with --quick)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<cpu>_<date>_compile-check.json;"
                                               " '-': none)")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    p.add_argument("--summary", action="store_true",
                   help="markdown: only the plain variants and the rows that spill, fail or were skipped")
    p.add_argument("--table-from", default=None, metavar="JSON",
                   help="compile nothing: print (and with --markdown write) the table of a results file")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = p.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            rows = json.load(f)["rows"]
        print_table(rows)
        if args.markdown:
            _write_markdown(args.markdown, rows, args.summary)
        return 0
    args.targets = args.targets or (["sm_90", "sm_86"] if args.quick else list(TARGETS))
    args.dtypes = args.dtypes or (["bf16"] if args.quick else list(DTYPES))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("TRITON_INTERPRET=1 turns the kernels into interpreted functions: unset it to compile them")
    matrix = launches(args.targets, args.dtypes, args.kernels, quick=args.quick)
    print(f"compiling {len(matrix)} launch variants ({', '.join(args.targets)}; {', '.join(args.dtypes)})",
          file=sys.stderr)
    t0 = time.perf_counter()
    rows = run(matrix, args.jobs, progress=lambda r: print(
        f"  {r['kernel']} {r['target']} {r['dtype']} {r['variant']}: {r['status']} "
        f"regs={r.get('registers')} spills={_spills_text(r)} ({r.get('compile_s', 0)} s)", file=sys.stderr))
    seconds = time.perf_counter() - t0
    print_table(rows)
    out = args.out if args.out is not None else default_out()
    if out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(document(rows, args, seconds), f, indent=1)
            f.write("\n")
        os.replace(out + ".tmp", out)
        print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    if args.markdown:
        _write_markdown(args.markdown, rows, args.summary)
    bad = failures(rows)
    for line in bad:
        print("FAIL " + line, file=sys.stderr)
    print(f"{len(rows)} variants in {seconds:.0f} s: {len(bad)} failure(s)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
