"""RetinaNet / Libra RetinaNet: backbone -> neck -> dense head, one stage.

RetinaNet (Lin et al. 2017, the paper's ref. [37]; MMDetection ``retinanet_r50_fpn_1x_coco``) is
``ResNet`` -> ``FPN`` P3..P7 (from C3; P6 a stride-2 conv on C5, P7 one on P6) -> the RetinaNet
head with the sigmoid focal loss. Libra RetinaNet (paper Sec. 4.1.3, Table 2; MMDetection
``libra-retinanet_r50_fpn_1x_coco``) adds the two balancing components that apply without a
sampler: the balanced feature pyramid (``neck.1``, refined at P4) and the balanced L1 loss
(beta 0.11). Input checks and the final rescale are :class:`~libra.detectors.base.Detector`'s;
the outputs have the format of every libra detector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from libra.dense_heads import RetinaNetDenseHead
from libra.structures import Batch

from .base import Detector


class RetinaNet(Detector):
    """One-stage detector.

    Args:
        backbone: ``[B, 3, H, W] -> [C2, C3, C4, C5]``.
        neck: ``nn.Sequential`` of ``FPN`` (``neck.0``, ``start_level=1``, 5 outputs) and optionally
            ``BalancedFeaturePyramid`` (``neck.1``); maps the backbone features to ``[P3, .., P7]``.
        dense_head: :class:`RetinaNetDenseHead` (its ``head`` holds MMDetection's ``bbox_head.*``).
        validate_targets: check the ground truth (:mod:`libra.detectors.base`).

    Attributes:
        num_classes: C, foreground classes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Sequential,
        dense_head: RetinaNetDenseHead,
        validate_targets: bool = True,
    ) -> None:
        super().__init__(dense_head.num_classes, validate_targets)
        self.check_strides(neck, anchors=dense_head.anchor_generator.strides)
        self.backbone = backbone
        self.neck = neck
        self.dense_head = dense_head

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """``{"loss_cls", "loss_bbox"}`` scalars (the total loss is their sum)."""
        image_sizes, targets = self.check_batch(batch, training=True)
        features = self.neck(self.backbone(batch.images))
        return self.dense_head.loss(features, image_sizes, targets)

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}`` in ``batch.original_sizes``
        coordinates."""
        image_sizes, _ = self.check_batch(batch, training=False)
        features = self.neck(self.backbone(batch.images))
        detections = self.dense_head.predict(features, image_sizes)
        return self.postprocess(detections, image_sizes, batch.original_sizes)
