"""Builds the C++/CUDA extension ``libra._C``; the package metadata is in pyproject.toml.

    pip install --no-build-isolation -e .

--no-build-isolation builds against the torch already installed (see pyproject.toml).
CUDA kernels are compiled when CUDA_HOME is set and either a GPU is visible or
FORCE_CUDA=1 (e.g. to compile them on a machine without a GPU). TORCH_CUDA_ARCH_LIST
selects the architectures (e.g. "8.0;9.0"); without it torch picks the visible GPU's.
"""
import glob
import os

import setuptools
from setuptools import setup

try:
    import torch
except ModuleNotFoundError as error:  # the usual cause: pip's build isolation
    raise SystemExit(
        "libra._C is compiled against the installed torch, but torch cannot be imported "
        "by this build. Install torch first, then build without isolation:\n"
        "    pip install torch torchvision\n"
        "    pip install --no-build-isolation -e ."
    ) from error
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

if int(setuptools.__version__.split(".")[0]) < 77:
    # With --no-build-isolation pip does not install [build-system].requires.
    raise SystemExit(
        f"setuptools {setuptools.__version__} is too old to build libra (>= 77 needed): "
        "pip install -U setuptools"
    )


def build_with_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    return CUDA_HOME is not None and (torch.cuda.is_available() or forced)


def cuda_library_dirs() -> list[str]:
    # torch links -lcudart from CUDA_HOME/lib64; some installs (e.g. CUDA_HOME found as
    # /usr/local through a bin/nvcc wrapper) keep it in lib/ or cuda/lib64/ instead.
    subdirs = ("lib64", "lib", os.path.join("cuda", "lib64"), os.path.join("cuda", "lib"))
    candidates = [os.path.join(CUDA_HOME, sub) for sub in subdirs]
    return [d for d in candidates if os.path.exists(os.path.join(d, "libcudart.so"))]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra_compile_args = {"cxx": ["-O3"]}  # torch adds -std=c++20 (required by ATen)
    if build_with_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "libra._C", sources, extra_compile_args=extra_compile_args, library_dirs=cuda_library_dirs()
        )
    if os.environ.get("FORCE_CUDA", "0") == "1":
        raise RuntimeError("FORCE_CUDA=1 but CUDA_HOME is not set: install the CUDA toolkit or unset FORCE_CUDA.")
    return CppExtension("libra._C", sources, extra_compile_args=extra_compile_args)


# name, version, dependencies and packages: pyproject.toml.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
