"""Detectors: explicit compositions of a backbone, a neck and heads.

- :class:`Detector`: the shared base (input checks, target validation, the one final rescale);
- :class:`FasterRCNN`: two-stage (RPN + R-CNN), the detector of Libra R-CNN;
- :class:`RetinaNet`: one-stage (dense head with the focal loss), RetinaNet and Libra RetinaNet.
"""

from .base import Detector, check_images, check_targets, rescale_boxes
from .faster_rcnn import FasterRCNN
from .retinanet import RetinaNet

__all__ = ["Detector", "FasterRCNN", "RetinaNet", "check_images", "check_targets", "rescale_boxes"]
