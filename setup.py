"""Builds the compiled extension ``app._C`` from ``csrc/`` (everything else lives in pyproject.toml).

The C++/OpenMP kernels are always built. The CUDA kernels are added when the installed torch has CUDA
and ``nvcc`` is found, unless ``APP_DISABLE_CUDA=1``. The CUDA architectures default to sm_80 and sm_90
(A100, H100/H200) and follow ``TORCH_CUDA_ARCH_LIST`` when it is set.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

# torch guesses CUDA_HOME from the directory of `nvcc` on PATH, which is wrong when that is a wrapper
# script (/usr/local/bin/nvcc); prefer the toolkit's conventional home when it is there.
if (
    "CUDA_HOME" not in os.environ
    and "CUDA_PATH" not in os.environ
    and os.path.exists("/usr/local/cuda/bin/nvcc")
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)


def _want_cuda() -> bool:
    if os.environ.get("APP_DISABLE_CUDA", "0") not in ("", "0"):
        return False
    import torch

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _extension() -> cpp_extension.CppExtension:
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    openmp = ["/openmp"] if sys.platform == "win32" else ["-fopenmp"]
    extra_compile_args = {"cxx": ["-O3", *openmp]}
    extra_link_args = [] if sys.platform == "win32" else ["-fopenmp"]
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "app._C", cpp_sources, extra_compile_args=extra_compile_args, extra_link_args=extra_link_args
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "app._C",
        cpp_sources + sorted(glob.glob("csrc/*/*.cu")),
        define_macros=[("APP_WITH_CUDA", None)],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    },
)
