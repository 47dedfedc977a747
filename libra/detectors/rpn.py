"""RPN / Libra RPN as a standalone proposal model: backbone -> neck -> RPN, trained alone.

The paper's Table 2 evaluates proposal generation on its own: a ResNet-50 FPN RPN (MMDetection
``rpn_r50_fpn_1x_coco``, AR@100/300/1000 42.5 / 51.2 / 57.1 in the paper's re-implementation) and
"Libra RPN" (52.1 / 58.3 / 62.5). The paper gives no configuration for Libra RPN; ``libra.presets``
documents what ``libra_rpn_r50_fpn`` applies and why. The model's outputs are proposals, scored by
class-agnostic COCO proposal recall (``iou_types = ("proposal",)``), and are what
``eval.py --save-proposals`` writes for the Fast R-CNN protocol (:mod:`libra.detectors.fast_rcnn`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from libra.dense_heads import RegionProposalNetwork

from .base import Detector, check_images


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
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, proposals in eval mode.

        Args:
            images: ``[B, 3, H, W]`` normalised images, zero-padded bottom-right.
            image_sizes: ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": [G, 4], "labels": [G], "ignore_boxes": [Gi, 4] (optional)}``;
                required in training (the labels are not used: objectness is class-agnostic).
            original_sizes: ``(h0, w0)`` per image; eval proposals are rescaled to them.

        Returns:
            training: ``{"loss_rpn_cls", "loss_rpn_bbox"}`` scalars;
            eval: per image ``{"proposals": [P, 4], "proposal_scores": [P]}`` by decreasing score.
        """
        if not self.training:
            return self.predict_proposals(images, image_sizes, original_sizes)
        image_sizes, targets = self.check_inputs(images, image_sizes, targets, original_sizes)
        features = self.neck(self.backbone(images))
        # Trained alone, the RPN's proposals feed nothing: skip computing them.
        _, losses = self.rpn(features, image_sizes, targets, with_proposals=False)
        return losses

    @torch.no_grad()
    def predict_proposals(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Proposals with the RPN's settings of the current mode (same interface as
        :meth:`FasterRCNN.predict_proposals`).

        Returns:
            Per image ``{"proposals": [P, 4], "proposal_scores": [P]}`` sorted by decreasing score,
            in ``original_sizes`` coordinates when given.
        """
        image_sizes = check_images(images, image_sizes, original_sizes)
        features = self.neck(self.backbone(images))
        proposals, _ = self.rpn(features, image_sizes)
        return self.postprocess(proposals.outputs(), image_sizes, original_sizes)
