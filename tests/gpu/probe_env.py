"""Print one JSON object describing this machine for ``tests/gpu/gpu_check.py``.

    python tests/gpu/probe_env.py              # python, torch, CUDA, GPU, nvcc, packages
    python tests/gpu/probe_env.py --check-ops  # also: does libra._C load, with CUDA kernels that agree with the CPU's

Runs in its own process so that the driver never initialises CUDA itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def command_output(argv: list[str], timeout: float = 20.0) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def find_cuda_home() -> str | None:
    """torch's CUDA_HOME, else a folder with bin/nvcc among the usual places."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return str(CUDA_HOME)
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parents[1]))
    for candidate in candidates:
        if candidate and Path(candidate, "bin", "nvcc").exists():
            return candidate
    return CUDA_HOME


def probe() -> dict:
    import torch

    info: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("torchvision", "numpy", "pycocotools", "xdist", "pytest_timeout", "ninja", "setuptools"):
        spec = importlib.util.find_spec(name)
        version = None
        if spec is not None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version({"xdist": "pytest-xdist", "pytest_timeout": "pytest-timeout"}.get(name, name))
            except Exception:  # noqa: BLE001 - importable but without metadata
                version = "importable"
        info[name] = version
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            capability=f"{major}.{minor}",
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    smi = command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["nvidia_smi"] = smi.splitlines()[0] if smi else None
    cuda_home = find_cuda_home()
    info["cuda_home"] = cuda_home
    nvcc = str(Path(cuda_home, "bin", "nvcc")) if cuda_home and Path(cuda_home, "bin", "nvcc").exists() else shutil.which("nvcc")
    version = command_output([nvcc, "--version"]) if nvcc else None
    info["nvcc"] = version.splitlines()[-1] if version else None
    return info


def check_ops() -> dict:
    """Load libra._C; on CUDA compare its kernels with the CPU ones on small inputs."""
    import torch

    result: dict = {"extension": False}
    try:
        sys.path.insert(0, str(REPO))
        import libra.ops
    except Exception as error:  # noqa: BLE001
        return {**result, "error": f"import libra.ops: {type(error).__name__}: {error}"}
    result["extension"] = libra.ops.EXTENSION_AVAILABLE
    if not libra.ops.EXTENSION_AVAILABLE:
        return {**result, "error": libra.ops._extension.EXTENSION_ERROR}
    import libra

    result["extension_file"] = getattr(getattr(libra, "_C", None), "__file__", None)

    def has_cuda_kernel(op: str) -> bool:
        try:
            return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"libra::{op}", "CUDA"))
        except TypeError:  # a torch whose binding takes only the enum
            return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"libra::{op}", torch._C.DispatchKey.CUDA))

    try:
        result["cuda_kernels"] = all(
            has_cuda_kernel(op) for op in ("nms", "batched_nms", "roi_align", "deform_conv2d", "_deform_conv2d_backward")
        )
    except Exception as error:  # noqa: BLE001 - then the comparison below tells
        result["cuda_kernels_error"] = f"{type(error).__name__}: {error}"[:200]
    if torch.cuda.is_available() and result.get("cuda_kernels", True):
        try:
            generator = torch.Generator().manual_seed(0)
            xy = torch.rand(500, 2, generator=generator) * 200
            boxes = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=generator) * 50], dim=1)
            scores = torch.rand(500, generator=generator)
            cpu = libra.ops.nms(boxes, scores, 0.5)
            gpu = libra.ops.nms(boxes.cuda(), scores.cuda(), 0.5).cpu()
            result["nms_cuda_equals_cpu"] = bool(torch.equal(cpu, gpu))
            feature = torch.randn(2, 8, 32, 32, generator=generator)
            rois = torch.cat([torch.randint(0, 2, (50, 1), generator=generator).float(), boxes[:50] / 8], dim=1)
            out_cpu = libra.ops.roi_align(feature, rois, 7, 0.25, 0, True)
            out_gpu = libra.ops.roi_align(feature.cuda(), rois.cuda(), 7, 0.25, 0, True).cpu()
            result["roi_align_cuda_max_abs_diff"] = float((out_cpu - out_gpu).abs().max())
            offset = torch.randn(2, 18, 32, 32, generator=generator) * 2
            weight = torch.randn(8, 8, 3, 3, generator=generator) * 0.1
            out_cpu = libra.ops.deform_conv2d(feature, offset, weight, padding=1)
            out_gpu = libra.ops.deform_conv2d(feature.cuda(), offset.cuda(), weight.cuda(), padding=1).cpu()
            result["deform_conv2d_cuda_max_abs_diff"] = float((out_cpu - out_gpu).abs().max())
            result.setdefault("cuda_kernels", True)  # they ran
        except Exception as error:  # noqa: BLE001 - e.g. no CUDA kernel registered
            result["cuda_kernels"] = False
            result["error"] = f"CUDA ops: {type(error).__name__}: {' '.join(str(error).split())}"[:300]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-ops", action="store_true")
    args = parser.parse_args()
    print(json.dumps(check_ops() if args.check_ops else probe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
