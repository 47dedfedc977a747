"""Necks: FPN, PAFPN and the Balanced Feature Pyramid with its non-local refiner.

The detector's neck is ``nn.Sequential(FPN(...), BalancedFeaturePyramid(...))`` (Libra R-CNN),
``nn.Sequential(FPN(...))`` (baseline), or the same with ``PAFPN`` ("Balanced PAFPN", Table 5).
"""

from torch import nn

from .balanced_feature_pyramid import BalancedFeaturePyramid, ConvRefine
from .fpn import FPN
from .non_local import NonLocal2d
from .pafpn import PAFPN

__all__ = ["BalancedFeaturePyramid", "ConvRefine", "FPN", "NonLocal2d", "PAFPN", "neck_strides"]


def neck_strides(neck: nn.Module) -> tuple[int, ...] | None:
    """The stride of each map the neck outputs: its pyramid's ``strides`` (the BFP keeps every
    level's size, so a ``Sequential(FPN, BalancedFeaturePyramid)`` has the FPN's); None for a neck
    that does not say (a custom module without a ``strides`` attribute)."""
    pyramid = neck[0] if isinstance(neck, nn.Sequential) and len(neck) > 0 else neck
    strides = getattr(pyramid, "strides", None)
    return tuple(int(s) for s in strides) if strides is not None else None
