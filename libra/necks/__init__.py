"""Necks: FPN, PAFPN and the Balanced Feature Pyramid with its non-local refiner.

The detector's neck is ``nn.Sequential(FPN(...), BalancedFeaturePyramid(...))`` (Libra R-CNN),
``nn.Sequential(FPN(...))`` (baseline), or the same with ``PAFPN`` ("Balanced PAFPN", Table 5).
"""

from .balanced_feature_pyramid import BalancedFeaturePyramid, ConvRefine
from .fpn import FPN
from .non_local import NonLocal2d
from .pafpn import PAFPN

__all__ = ["BalancedFeaturePyramid", "ConvRefine", "FPN", "NonLocal2d", "PAFPN"]
