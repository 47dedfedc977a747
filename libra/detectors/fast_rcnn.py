"""Fast R-CNN / Libra Fast R-CNN: backbone -> neck -> R-CNN stage on pre-computed proposals.

The protocol of the paper's ablations (Sec. 4.1.4, Tables 3-7): "the same pre-computed proposals
for fair comparisons", so that a change to the R-CNN stage (sampling, feature pyramid, losses) is
measured without the RPN changing with it. MMDetection ships it as ``fast-rcnn_r50_fpn_1x_coco`` and
``libra-fast-rcnn_r50_fpn_1x_coco``, on proposals of an R50-FPN RPN (1000 per image). The proposals
come from a file (:mod:`libra.data.proposals`, written by ``eval.py --save-proposals``) through the
data pipeline, which resizes and flips them with the image, and reach :meth:`FastRCNN.forward` as
one tensor per image.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from libra.boxes import clip_boxes_per_image
from libra.roi_heads import RoIHead
from libra.structures import Batch, Proposals

from .base import Detector


class FastRCNN(Detector):
    """R-CNN stage on given proposals.

    Args:
        backbone: ``[B, 3, H, W] -> [C2, C3, C4, C5]``.
        neck: ``nn.Sequential`` of ``FPN`` (``neck.0``) and optionally ``BalancedFeaturePyramid`` (``neck.1``).
        roi_head: :class:`RoIHead` (the same as Faster R-CNN's).
        validate_targets: check the ground truth (:mod:`libra.detectors.base`).

    Attributes:
        takes_proposals: True: it runs on ``batch.proposals`` (``collate`` takes them from
            ``target["proposals"]``, which the data pipeline resizes and flips with the image).
    """

    takes_proposals = True

    def __init__(self, backbone: nn.Module, neck: nn.Sequential, roi_head: RoIHead, validate_targets: bool = True) -> None:
        super().__init__(roi_head.num_classes, validate_targets)
        self.check_strides(neck, roi_extractor=roi_head.roi_extractor.featmap_strides)
        self.backbone = backbone
        self.neck = neck
        self.roi_head = roi_head

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """``{"loss_cls", "loss_bbox", "acc"}`` on RoIs sampled from ``batch.proposals`` (per image
        ``[P_i, 4]`` in the resized image; ``P_i`` may differ between images and may be 0)."""
        image_sizes, targets = self.check_batch(batch, training=True)
        batch_proposals = pad_proposals(batch.proposals, image_sizes, batch.images.device)
        features = self.neck(self.backbone(batch.images))
        samples = self.roi_head.sample(batch_proposals, targets)
        return self.roi_head.loss(features, samples)

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes", "scores", "labels"}`` from ``batch.proposals``, in ``batch.original_sizes``
        coordinates."""
        image_sizes, _ = self.check_batch(batch, training=False)
        batch_proposals = pad_proposals(batch.proposals, image_sizes, batch.images.device)
        features = self.neck(self.backbone(batch.images))
        detections = self.roi_head.predict(features, batch_proposals, image_sizes)
        return self.postprocess(detections, image_sizes, batch.original_sizes)


def pad_proposals(
    proposals: Sequence[Tensor] | None, image_sizes: Sequence[tuple[int, int]], device: torch.device
) -> Proposals:
    """Per-image ``[P_i, 4]`` proposals -> :class:`Proposals` ``[B, P, 4]`` with ``P = max(1, max_i P_i)``.

    The boxes are clipped to each image (resizing a file's boxes can overshoot by rounding); the
    padding slots are invalid. ``P_i`` are shapes, known on the host: no device sync.
    """
    if proposals is None:
        raise ValueError(
            "a Fast R-CNN model needs proposals: pass proposals=[[P_i, 4] per image]; train.py / eval.py "
            "take them from --proposals-file (eval.py --save-proposals writes one)"
        )
    if len(proposals) != len(image_sizes):
        raise ValueError(f"got proposals for {len(proposals)} images in a batch of {len(image_sizes)}")
    for index, boxes in enumerate(proposals):
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"proposals[{index}] must be a float [P, 4] tensor (x1, y1, x2, y2), got {shape}")
    slots = max(1, max(int(boxes.shape[0]) for boxes in proposals))
    padded = torch.zeros((len(proposals), slots, 4), dtype=torch.float32, device=device)
    valid = torch.zeros((len(proposals), slots), dtype=torch.bool, device=device)
    for index, boxes in enumerate(proposals):
        count = int(boxes.shape[0])
        padded[index, :count] = boxes.to(device=device, dtype=torch.float32)
        valid[index, :count] = True
    padded = clip_boxes_per_image(padded, image_sizes)
    valid &= (padded[..., 2] > padded[..., 0]) & (padded[..., 3] > padded[..., 1])
    # The R-CNN stage does not read proposal scores; valid slots score 1.
    return Proposals(padded, valid.to(torch.float32), valid)
