"""The one environment record every results file carries (loss, generate, iteration, compare,
cuda_check): device, CPU and GPU model, library versions, git commit and date.

Readers (bench/report.py) take older files too: every field is optional there.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Libraries the benchmarks compare against (None in the record: not installed).
PEERS = ("liger-kernel", "cut-cross-entropy", "trl")
# Environment variables that change what runs; recorded when set.
RECORDED_VARS = ("REBEL_KERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")


def _run(cmd) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _triton_version() -> str | None:
    """triton.__version__ (its distribution is "pytorch-triton" in some torch builds)."""
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", None)


def peer_versions() -> dict:
    """Installed versions of the peer libraries (None: not installed)."""
    return {dist: _version(dist) for dist in PEERS}


def environment() -> dict:
    """Device (the GPU's name, else the CPU model), CPU, GPU, CUDA and driver, Python, torch,
    triton, transformers and peer versions, the variables in RECORDED_VARS, git commit (and
    whether the tree was dirty) and the UTC date."""
    import torch

    env = dict(cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
               triton=_triton_version(), transformers=_version("transformers"), peers=peer_versions())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
        env["device"] = env["gpu"]
    else:
        env["device"] = env["cpu"]
    env.update({k: os.environ[k] for k in RECORDED_VARS if k in os.environ})
    commit = _run(["git", "rev-parse", "HEAD"])
    env.update(git_commit=commit, git_dirty=bool(_run(["git", "status", "--porcelain"])) if commit else None)
    now = datetime.datetime.now(datetime.timezone.utc)
    env.update(date=now.strftime("%Y-%m-%d"), datetime_utc=now.isoformat(timespec="seconds"))
    return env
