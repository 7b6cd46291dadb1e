"""Build script of the native extension rebel_kernels._C (csrc/), through torch.utils.cpp_extension.

Packages and metadata come from pyproject.toml; this file only adds the extension. The C++ CPU op
always builds; the CUDA kernel is added when the installed torch has CUDA and a CUDA toolkit is found
(REBEL_KERNELS_NO_CUDA=1 skips it). The extension compiles against the torch already installed, so
install torch first and build without isolation:

    pip install torch setuptools wheel ninja
    pip install --no-build-isolation -e .

GPU architectures: sm_80, sm_86, sm_90 (+ compute_90 PTX), unless TORCH_CUDA_ARCH_LIST is set.
"""
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    raise SystemExit(
        f"rebel-kernels builds its C++/CUDA extension against the installed torch, but torch is not "
        f"importable here ({exc}). Install torch first (e.g. `pip install torch setuptools wheel ninja`), "
        f"then install this package without build isolation: `pip install --no-build-isolation -e .`"
    ) from exc

CSRC = "csrc"  # relative: setuptools wants source paths relative to this file
CPU_SOURCES = [os.path.join(CSRC, "bindings.cpp"), os.path.join(CSRC, "sampling_cpu.cpp")]
CUDA_SOURCES = [os.path.join(CSRC, "sampling_cuda.cu")]
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_86,code=sm_86",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",  # PTX: newer GPUs JIT-compile it
]


def with_cuda() -> bool:
    if os.environ.get("REBEL_KERNELS_NO_CUDA", "0") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    # OpenMP makes at::parallel_for run rows in parallel (torch's Linux builds use OpenMP); the
    # runtime torch already loaded (libgomp.so.1) is reused.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp]
    if not with_cuda():
        return CppExtension("rebel_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx},
                            extra_link_args=openmp)
    nvcc = ["-O3", "-lineinfo"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += GENCODE  # otherwise torch derives the -gencode flags from TORCH_CUDA_ARCH_LIST
    return CUDAExtension(
        "rebel_kernels._C",
        CPU_SOURCES + CUDA_SOURCES,
        define_macros=[("REBEL_KERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=openmp,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
