"""bench/compile_check.py: the quick subset (the default-arguments variant of every Triton kernel, compiled
for sm_90 and sm_86 in bf16 by the ptxas inside the triton wheel, no GPU needed) compiles, fits the
target's shared memory and does not spill on a default path; the check fails a variant that spills.

The compiles run in a subprocess: under TRITON_INTERPRET=1 (tests/conftest.py sets it) @triton.jit
makes interpreted functions, which do not compile. Triton is a dependency on Linux, so a missing
triton or ptxas fails here rather than skipping; triton ships no wheel for other platforms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import compile_check as cc
from bench._environment import REPO_ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="triton (with its ptxas) is installed on Linux only")


def _python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_subset_compiles_fits_and_does_not_spill(tmp_path):
    out = tmp_path / "quick.json"
    proc = _python(["-m", "bench.compile_check", "--quick", "--out", str(out)])
    assert out.exists(), proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["kernel"], r["target"]) for r in rows} == {(k, t) for k in cc.KERNELS for t in ("sm_90", "sm_86")}
    assert {r["dtype"] for r in rows} <= {"bf16", cc.ANY}
    for r in rows:
        name = f"{r['kernel']} {r['target']} {r['dtype']} {r['variant']}"
        assert r["status"] == "ok", f"{name}: {r.get('failures') or r.get('reason')}"
        assert r["registers"] is not None and 0 < r["registers"] <= 255, name
        assert 0 <= r["shared_bytes"] <= cc.TARGETS[r["target"]].smem_limit, name
        if r["default"]:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{name} spills"
    # tensor cores where the launchers use them: wgmma on sm_90, mma.sync on sm_86
    dots = {(r["kernel"], r["target"]): r["dot"] for r in rows}
    for kernel in ("fwd_partial", "dz", "bwd_atomic", "gumbel_partial"):
        assert dots[(kernel, "sm_90")].startswith("wgmma"), dots[(kernel, "sm_90")]
        assert dots[(kernel, "sm_86")].startswith("mma.sync"), dots[(kernel, "sm_86")]
    assert doc["environment"]["triton"] and doc["environment"]["ptxas"]["sm_90"]
    assert doc["failures"] == [] and proc.returncode == 0, proc.stderr[-4000:]


def test_a_spilling_default_variant_fails():
    # the sm_90 sampler tile before the fix: 64 x 128 x 64 with 4 warps spills (255 registers)
    code = (
        "import json\n"
        "from bench import compile_check as cc\n"
        "from rebel_kernels._tiles import TileConfig\n"
        "cfg = TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, split_v=256)\n"
        "print(json.dumps(cc.compile_one(cc.with_tiles('gumbel_partial', 'sm_90', 'bf16', 'plain', cfg))))\n"
    )
    proc = _python(["-c", code])
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["status"] == "fail" and row["spill_stores"] > 0, row
    assert any("spills on a default path" in f for f in row["failures"])


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    456 bytes stack frame, 524 bytes spill stores, 492 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 456 bytes cumulative stack size
"""
    assert cc.parse_ptxas_log(log) == dict(registers=255, spill_stores=524, spill_loads=492, stack_frame=456)
    assert cc.parse_ptxas_log("")["registers"] is None


def test_dot_instruction():
    assert cc.dot_instruction("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {", "tt.dot") == \
        "wgmma m64n128k16 f32.bf16.bf16"
    assert cc.dot_instruction("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {", "tt.dot") == \
        "mma.sync m16n8k16 f32.bf16.bf16.f32"
    assert cc.dot_instruction("fma.rn.f32", "tt.dot") == "fma"
    assert cc.dot_instruction("add.f32", "tt.load") == "-"


def test_matrix_mirrors_the_tile_table():
    import torch

    from rebel_kernels._tiles import tile_config_for

    matrix = cc.launches()
    assert {x.kernel for x in matrix} == set(cc.KERNELS)
    kinds = {"fwd_partial": "fwd", "dz": "bwd", "bwd_atomic": "bwd", "gumbel_partial": "sample"}
    for x in matrix:
        if x.kernel in kinds:
            cfg = tile_config_for(kinds[x.kernel], cc.TARGETS[x.target].cc // 10, cc.DTYPES[x.dtype])
            consts = dict(x.constexprs)
            assert (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], x.num_warps, x.num_stages) == \
                (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages), x.key
            assert consts["DOT_PRECISION"] == ("ieee" if x.dtype == "fp32" else "tf32")
            if "USE_TMA" in consts:
                assert consts["USE_TMA"] == x.variant.startswith("tma"), x.key
    # TMA only on sm_90, and never on a default path; the atomic backward is never a default path
    assert all(x.target == "sm_90" and not x.default for x in matrix if x.variant.startswith("tma"))
    assert not any(x.default for x in matrix if x.kernel == "bwd_atomic")
    assert tile_config_for("fwd", 8, torch.bfloat16) is tile_config_for("fwd", 8, torch.float16)


def test_every_kernel_of_the_package_is_checked():
    import importlib

    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1

    found = set()
    for name in ("rebel_kernels.logprobs.triton_kernels", "rebel_kernels.gumbel.triton_kernels",
                 "rebel_kernels._triton_common"):
        module = importlib.import_module(name)
        found |= {attr for attr, value in vars(module).items() if isinstance(value, KernelInterface)
                  and attr.endswith("_kernel")}
    assert found == {fn.__name__ for fn in cc._kernel_fns().values()}
