"""Faster R-CNN / Libra R-CNN: backbone -> neck -> RPN -> R-CNN stage.

The balancing components of Libra R-CNN plug into this one class without changing it:
IoU-balanced sampling lives in the R-CNN sampler (``RoIHead``), the balanced feature pyramid is
the second module of ``neck``, and balanced L1 / LGR losses are the ``RoIHead`` (and RPN) losses.
``libra.presets`` assembles the paper's configurations. Input checks and the final rescale are
:class:`~libra.detectors.base.Detector`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from libra.dense_heads import RegionProposalNetwork
from libra.roi_heads import RoIHead
from libra.structures import Batch

from .base import Detector, check_images


class FasterRCNN(Detector):
    """Two-stage detector (``loss`` / ``predict`` / ``predict_proposals``, :mod:`libra.detectors.base`).

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

    makes_proposals = True

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Sequential,
        rpn: RegionProposalNetwork,
        roi_head: RoIHead,
        validate_targets: bool = True,
    ) -> None:
        super().__init__(roi_head.num_classes, validate_targets)
        self.check_strides(neck, anchors=rpn.anchor_generator.strides, roi_extractor=roi_head.roi_extractor.featmap_strides)
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_head = roi_head

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """Training losses: RPN, then the R-CNN stage on RoIs sampled once for every branch.

        Returns:
            ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"}`` scalars (plus the
            RoI head's own branch losses, e.g. ``loss_mask``); the total loss is the sum of the
            entries whose key starts with ``"loss"``.
        """
        image_sizes, targets = self.check_batch(batch, training=True)
        features = self.neck(self.backbone(batch.images))
        rpn_losses, proposals = self.rpn.loss_and_predict(features, image_sizes, targets)
        samples = self.roi_head.sample(proposals, targets)  # once, for every branch of the RoI head
        return {**rpn_losses, **self.roi_head.loss(features, samples)}

    @torch.no_grad()
    def predict(self, batch: Batch, return_proposals: bool = False) -> list[dict[str, Tensor]]:
        """Detections per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}`` (plus what the
        RoI head adds, e.g. ``masks``) in ``batch.original_sizes`` coordinates.

        Args:
            return_proposals: add ``"proposals" [P, 4]`` and ``"proposal_scores" [P]`` (in the same
                coordinates as the boxes) to each output dict.
        """
        image_sizes, _ = self.check_batch(batch, training=False)
        features = self.neck(self.backbone(batch.images))
        proposals = self.rpn.predict(features, image_sizes)
        detections = self.roi_head.predict(features, proposals, image_sizes)
        if return_proposals:
            for output, proposal_output in zip(detections, proposals.outputs()):
                output.update(proposal_output)
        return self.postprocess(detections, image_sizes, batch.original_sizes)

    @torch.no_grad()
    def predict_proposals(self, batch: Batch) -> list[dict[str, Tensor]]:
        """RPN proposals only (for proposal recall), with the RPN's settings of the current mode:
        :func:`rpn_proposals`."""
        return rpn_proposals(self, batch)


def rpn_proposals(detector: Detector, batch: Batch) -> list[dict[str, Tensor]]:
    """The proposals of a detector's ``backbone -> neck -> rpn`` (Faster / Mask R-CNN and the
    standalone RPN share it).

    Returns:
        Per image ``{"proposals": [P, 4], "proposal_scores": [P]}`` sorted by decreasing score, in
        ``batch.original_sizes`` coordinates when given.
    """
    image_sizes = check_images(batch.images, batch.image_sizes, batch.original_sizes)
    features = detector.neck(detector.backbone(batch.images))
    proposals = detector.rpn.predict(features, image_sizes)
    return detector.postprocess(proposals.outputs(), image_sizes, batch.original_sizes)
