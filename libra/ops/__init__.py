"""Detection ops: RoIAlign and NMS (compiled kernels, pure-PyTorch fallback).

    from libra.ops import roi_align, RoIAlign, nms, batched_nms

``EXTENSION_AVAILABLE`` says whether ``libra._C`` (the C++/CUDA kernels) loaded; when
it did not, the ops run the references in ``roi_align_reference.py`` /
``nms_reference.py`` and warn once.
"""
from libra.ops._extension import EXTENSION_AVAILABLE
from libra.ops.nms import batched_nms, nms
from libra.ops.nms_reference import nms_reference
from libra.ops.roi_align import RoIAlign, roi_align
from libra.ops.roi_align_reference import MAX_ADAPTIVE_SAMPLING_GRID, roi_align_reference

if EXTENSION_AVAILABLE:
    from libra.ops import _registrations  # noqa: F401  (fake kernels + autograd)

__all__ = [
    "EXTENSION_AVAILABLE",
    "MAX_ADAPTIVE_SAMPLING_GRID",
    "RoIAlign",
    "batched_nms",
    "nms",
    "nms_reference",
    "roi_align",
    "roi_align_reference",
]
