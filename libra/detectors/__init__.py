"""Detectors: explicit compositions of a backbone, a neck and heads.

- :class:`Detector`: the shared base (input checks, target validation, the one final rescale);
- :class:`FasterRCNN`: two-stage (RPN + R-CNN), the detector of Libra R-CNN;
- :class:`MaskRCNN`: Faster R-CNN with a mask branch (Mask R-CNN, Libra Mask R-CNN; box and mask AP);
- :class:`RetinaNet`: one-stage (dense head with the focal loss), RetinaNet and Libra RetinaNet;
- :class:`ProposalNetwork`: a standalone RPN (proposals only), RPN and Libra RPN;
- :class:`FastRCNN`: the R-CNN stage alone on pre-computed proposals (the paper's ablation protocol).
"""

from .base import Detector, check_images, check_targets, rescale_boxes
from .fast_rcnn import FastRCNN, pad_proposals
from .faster_rcnn import FasterRCNN
from .mask_rcnn import MaskRCNN
from .retinanet import RetinaNet
from .rpn import ProposalNetwork

__all__ = [
    "Detector", "FastRCNN", "FasterRCNN", "MaskRCNN", "ProposalNetwork", "RetinaNet", "check_images", "check_targets",
    "pad_proposals", "rescale_boxes",
]
