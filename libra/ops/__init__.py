"""Detection ops: RoIAlign, NMS and deformable convolution (compiled kernels, pure-PyTorch fallback).

    from libra.ops import roi_align, RoIAlign, nms, batched_nms
    from libra.ops import deform_conv2d, DeformConv2dPack, ModulatedDeformConv2dPack

``EXTENSION_AVAILABLE`` says whether ``libra._C`` (the C++/CUDA kernels) loaded; when
it did not, the ops run the references in ``roi_align_reference.py`` /
``nms_reference.py`` / ``deform_conv_reference.py`` and warn once.
"""
import torch.fx

from libra.ops._extension import EXTENSION_AVAILABLE
from libra.ops.deform_conv import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
)
from libra.ops.deform_conv_reference import deform_conv2d_reference
from libra.ops.nms import batched_nms, nms
from libra.ops.nms_reference import nms_reference
from libra.ops.roi_align import RoIAlign, roi_align
from libra.ops.roi_align_reference import MAX_ADAPTIVE_SAMPLING_GRID, roi_align_reference

if EXTENSION_AVAILABLE:
    from libra.ops import _registrations  # noqa: F401  (fake kernels + autograd)

# torch.fx: a module that calls ``libra.ops.roi_align(...)`` traces it as one leaf node, as
# torchvision's ``roi_align`` (roi_align.py wraps it for the calls made there, e.g. by ``RoIAlign``).
torch.fx.wrap("roi_align")

__all__ = [
    "EXTENSION_AVAILABLE",
    "MAX_ADAPTIVE_SAMPLING_GRID",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "RoIAlign",
    "batched_nms",
    "deform_conv2d",
    "deform_conv2d_reference",
    "nms",
    "nms_reference",
    "roi_align",
    "roi_align_reference",
]
