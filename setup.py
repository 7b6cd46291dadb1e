"""Build script of the native extension rebel_kernels._C (csrc/), through torch.utils.cpp_extension.

Packages and metadata come from pyproject.toml; this file only adds the extension. The C++ CPU op
always builds; the CUDA kernel is added when the installed torch has CUDA and a CUDA toolkit is found
(REBEL_KERNELS_NO_CUDA=1 skips it). The extension compiles against the torch already installed, so
install torch first and build without isolation:

    pip install torch setuptools wheel ninja
    pip install --no-build-isolation -e .

GPU architectures: sm_80, sm_86, sm_90 (+ compute_90 PTX), unless TORCH_CUDA_ARCH_LIST is set.

The extension is optional: if torch is not importable here or the compilation fails, the install
goes on without it (with a warning) and rebel_kernels.sample_logits uses its PyTorch fallback
(slower; it warns once at run time). REBEL_KERNELS_REQUIRE_EXT=1 turns a failed build into an error.
"""
import os
import sys
import traceback

from setuptools import setup

REQUIRE_EXT = os.environ.get("REBEL_KERNELS_REQUIRE_EXT", "0") not in ("", "0")
HOW_TO_BUILD = (
    "Install torch first (e.g. `pip install torch setuptools wheel ninja`), then install this package "
    "without build isolation: `pip install --no-build-isolation -e .`"
)


def warn_without_extension(reason: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nWARNING: rebel_kernels._C (the native top-k/top-p sampler, csrc/) is NOT built: {reason}\n"
          f"rebel-kernels installs without it; rebel_kernels.sample_logits then runs a pure PyTorch "
          f"fallback (same results, slower).\n{HOW_TO_BUILD}\n"
          f"Set REBEL_KERNELS_REQUIRE_EXT=1 to make this an error.\n{bar}\n", file=sys.stderr)


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    if REQUIRE_EXT:
        raise SystemExit(
            f"rebel-kernels builds its C++/CUDA extension against the installed torch, but torch is not "
            f"importable here ({exc}). {HOW_TO_BUILD}"
        ) from exc
    TORCH_MISSING = exc
else:
    TORCH_MISSING = None

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


def optional_build_ext():
    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, but a failed compilation leaves the package installable without
        the extension (a warning instead of an error), unless REBEL_KERNELS_REQUIRE_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, compile/link error, CUDA toolkit mismatch, ...
                if REQUIRE_EXT:
                    raise
                traceback.print_exc()
                warn_without_extension(f"the build failed ({type(exc).__name__}: {exc})")

        def get_outputs(self):  # only what was built: install/wheel steps must not look for a missing .so
            return [path for path in super().get_outputs() if os.path.exists(path)]

    return OptionalBuildExtension


if TORCH_MISSING is not None:
    warn_without_extension(f"torch is not importable at build time ({TORCH_MISSING})")
    setup()
else:
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": optional_build_ext()},
    )
