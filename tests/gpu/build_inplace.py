"""Fallback build of ``libra._C`` in the source tree, for when ``pip install -e .`` cannot build.

    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 python tests/gpu/build_inplace.py

The GPU check (``tests/gpu/gpu_check.py``) uses this only after ``pip install
--no-build-isolation --no-deps -e .`` failed (e.g. a setuptools older than ``setup.py`` accepts on
a machine that cannot fetch a newer one). It compiles the same sources with the same flags as
``setup.py`` through ``torch.utils.cpp_extension.load`` (ninja), then copies the shared library to
``libra/_C<EXT_SUFFIX>``, where ``import libra._C`` finds it when Python runs from the repository
root (the tests, ``train.py``). The CUDA sources are included when ``CUDA_HOME`` is known and
either a GPU is visible or ``FORCE_CUDA=1``, as in ``setup.py``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=str(REPO / "build" / "libra_C_inplace"))
    parser.add_argument("--output", default=None, help="where the library goes (default libra/_C<EXT_SUFFIX>)")
    args = parser.parse_args(argv)
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    os.chdir(REPO)
    with_cuda = CUDA_HOME is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"building libra._C from {len(sources)} sources (CUDA: {with_cuda}, CUDA_HOME {CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST {os.environ.get('TORCH_CUDA_ARCH_LIST')}) in {build_dir}", flush=True)
    load(
        name="_C",
        sources=[str(REPO / s) for s in sources],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,  # load_library only: the module is imported as libra._C later
        verbose=True,
    )
    built = build_dir / "_C.so"
    target = Path(args.output) if args.output else REPO / "libra" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    shutil.copy2(built, target)
    print(f"copied {built} -> {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
