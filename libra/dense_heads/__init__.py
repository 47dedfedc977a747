"""Dense heads: predictors that run on every location of every pyramid level.

- :class:`RegionProposalNetwork` (+ :class:`RPNHead`): objectness and box deltas per anchor; the
  proposals of a two-stage detector, or a standalone proposal model.
"""

from .rpn import RegionProposalNetwork, RPNHead

__all__ = ["RegionProposalNetwork", "RPNHead"]
