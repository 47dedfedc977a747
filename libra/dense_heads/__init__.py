"""Dense heads: predictors that run on every location of every pyramid level.

- :class:`RegionProposalNetwork` (+ :class:`RPNHead`): objectness and box deltas per anchor; the
  proposals of a two-stage detector, or a standalone proposal model.
- :class:`RetinaNetDenseHead` (+ :class:`RetinaHead`): class scores and box deltas per anchor,
  focal loss without sampling, and the detections of a one-stage detector (RetinaNet).
"""

from .retina_head import RetinaHead, RetinaNetDenseHead
from .rpn import RegionProposalNetwork, RPNHead

__all__ = ["RegionProposalNetwork", "RPNHead", "RetinaHead", "RetinaNetDenseHead"]
