"""RPN / Libra RPN as a standalone proposal model: backbone -> neck -> RPN, trained alone.

The paper's Table 2 evaluates proposal generation on its own: a ResNet-50 FPN RPN (MMDetection
``rpn_r50_fpn_1x_coco``, AR@100/300/1000 42.5 / 51.2 / 57.1 in the paper's re-implementation) and
"Libra RPN" (52.1 / 58.3 / 62.5). The paper gives no configuration for Libra RPN; ``libra.presets``
documents what ``libra_rpn_r50_fpn`` applies and why. The model's outputs are proposals, scored by
class-agnostic COCO proposal recall (``iou_types = ("proposal",)``), and are what
``eval.py --save-proposals`` writes for the Fast R-CNN protocol (:mod:`libra.detectors.fast_rcnn`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from libra.dense_heads import RegionProposalNetwork
from libra.structures import Batch

from .base import Detector
from .faster_rcnn import rpn_proposals


class ProposalNetwork(Detector):
    """Proposal-only detector.

    Args:
        backbone: ``[B, 3, H, W] -> [C2, C3, C4, C5]``.
        neck: ``nn.Sequential`` of ``FPN`` (``neck.0``) and optionally ``BalancedFeaturePyramid``
            (``neck.1``); ``[P2, .., P6]``.
        rpn: :class:`RegionProposalNetwork` (its test settings give the proposals: MMDetection's
            standalone ``test_cfg.rpn``: 2000 per level before NMS 0.7, 1000 per image).
        validate_targets: check the ground truth (:mod:`libra.detectors.base`).
    """

    iou_types = ("proposal",)
    makes_proposals = True

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Sequential,
        rpn: RegionProposalNetwork,
        num_classes: int,
        validate_targets: bool = True,
    ) -> None:
        # Objectness is class-agnostic; ``num_classes`` is the dataset's, for checkpoints and the
        # target validation (labels must still lie in [0, C-1]).
        super().__init__(num_classes, validate_targets)
        self.check_strides(neck, anchors=rpn.anchor_generator.strides)
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """``{"loss_rpn_cls", "loss_rpn_bbox"}`` scalars (the labels are not used: objectness is
        class-agnostic, but they are validated)."""
        image_sizes, targets = self.check_batch(batch, training=True)
        features = self.neck(self.backbone(batch.images))
        # Trained alone, the RPN's proposals feed nothing: skip computing them.
        return self.rpn.loss(features, image_sizes, targets)

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[dict[str, Tensor]]:
        """The outputs of a proposal model are its proposals: :meth:`predict_proposals`."""
        return self.predict_proposals(batch)

    @torch.no_grad()
    def predict_proposals(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Proposals with the RPN's settings of the current mode (the same code as
        :meth:`FasterRCNN.predict_proposals`, :func:`~libra.detectors.faster_rcnn.rpn_proposals`)."""
        return rpn_proposals(self, batch)
