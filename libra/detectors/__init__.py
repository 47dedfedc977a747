"""Detectors: explicit compositions of a backbone, a neck and heads.

- :class:`Detector`: the shared base (input checks, target validation, the one final rescale);
- :class:`FasterRCNN`: two-stage (RPN + R-CNN), the detector of Libra R-CNN.
"""

from .base import Detector, check_images, check_targets, rescale_boxes
from .faster_rcnn import FasterRCNN

__all__ = ["Detector", "FasterRCNN", "check_images", "check_targets", "rescale_boxes"]
