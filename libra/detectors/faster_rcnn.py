"""Faster R-CNN / Libra R-CNN: backbone -> neck -> RPN -> R-CNN stage.

The balancing components of Libra R-CNN plug into this one class without changing it:
IoU-balanced sampling lives in the R-CNN sampler (``RoIHead``), the balanced feature pyramid is
the second module of ``neck``, and balanced L1 / LGR losses are the ``RoIHead`` (and RPN) losses.
``libra.presets`` assembles the paper's configurations. Input checks and the final rescale are
:class:`~libra.detectors.base.Detector`'s.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from libra.dense_heads import RegionProposalNetwork
from libra.roi_heads import RoIHead

from .base import Detector, check_images


class FasterRCNN(Detector):
    """Two-stage detector.

    Args:
        backbone: ``[B, 3, H, W] -> [C2, C3, C4, C5]``.
        neck: ``nn.Sequential`` of ``FPN`` (``neck.0``) and optionally ``BalancedFeaturePyramid``
            (``neck.1``); maps the backbone features to ``[P2, .., P6]``.
        rpn: :class:`RegionProposalNetwork`.
        roi_head: :class:`RoIHead`.
        validate_targets: check the ground truth (:mod:`libra.detectors.base`).

    Attributes:
        num_classes: C, foreground classes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Sequential,
        rpn: RegionProposalNetwork,
        roi_head: RoIHead,
        validate_targets: bool = True,
    ) -> None:
        super().__init__(roi_head.num_classes, validate_targets)
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_head = roi_head

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        return_proposals: bool = False,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections in eval mode.

        Args:
            images: ``[B, 3, H, W]`` normalised images, zero-padded bottom-right.
            image_sizes: ``(h, w)`` of each image before padding (``h <= H``, ``w <= W``).
            targets: per image ``{"boxes": [G, 4] float (resized image coords), "labels": [G] int64
                in [0, C-1], "ignore_boxes": [Gi, 4] (optional)}``; required in training.
            original_sizes: ``(h0, w0)`` per image; eval boxes are rescaled to them.
            return_proposals: eval only; add ``"proposals" [P, 4]`` and ``"proposal_scores" [P]``
                (in the same coordinates as the boxes) to each output dict.

        Returns:
            training: ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}`` scalars;
            the total loss is the sum of the entries whose key starts with ``"loss"``.
            eval: per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}``.
        """
        image_sizes, targets = self.check_inputs(images, image_sizes, targets, original_sizes)
        features = self.neck(self.backbone(images))
        if self.training:
            proposals, rpn_losses = self.rpn(features, image_sizes, targets)
            samples = self.roi_head.sample(proposals, targets)
            return {**rpn_losses, **self.roi_head.loss(features, samples)}

        proposals, _ = self.rpn(features, image_sizes)
        detections = self.roi_head.predict(features, proposals, image_sizes)
        if return_proposals:
            for output, proposal_output in zip(detections, proposals.outputs()):
                output.update(proposal_output)
        return self.postprocess(detections, image_sizes, original_sizes)

    @torch.no_grad()
    def predict_proposals(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, Tensor]]:
        """RPN proposals only (for proposal recall), with the test settings when in eval mode.

        Returns:
            Per image ``{"proposals": [P, 4], "proposal_scores": [P]}`` sorted by decreasing score,
            in ``original_sizes`` coordinates when given.
        """
        image_sizes = check_images(images, image_sizes, original_sizes)
        features = self.neck(self.backbone(images))
        proposals, _ = self.rpn(features, image_sizes)
        return self.postprocess(proposals.outputs(), image_sizes, original_sizes)
