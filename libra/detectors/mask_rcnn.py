"""Mask R-CNN / Libra Mask R-CNN: Faster R-CNN plus a mask branch (paper Sec. 4.1.5, Table 8).

    backbone -> neck -> RPN -> RoIHead.sample (once) -> box branch loss  (loss_cls, loss_bbox)
                                                   \\-> mask branch loss (loss_mask)
    test:  RPN -> box branch predict -> mask head on the final boxes (resized-image coordinates)
           -> postprocess (boxes rescaled to the original image, once)
           -> masks pasted into the ORIGINAL image at the rescaled boxes, thresholded at 0.5

The balancing components of Libra R-CNN (IoU-balanced sampling, balanced feature pyramid,
balanced L1) act on the shared parts and the box branch exactly as in Faster R-CNN; the mask
branch is MMDetection's ``mask-rcnn_r50_fpn_1x_coco`` branch (``libra.roi_heads.MaskRoIHead``).
The paper's LVIS models (Sec. 4.2, Tables 9-10) are this detector with class-balanced positives
and bucketed class re-weighting (``libra.presets``).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from libra.dense_heads import RegionProposalNetwork
from libra.masks import paste_masks_in_image
from libra.roi_heads import MaskRoIHead

from .faster_rcnn import FasterRCNN

__all__ = ["MaskRCNN"]


class MaskRCNN(FasterRCNN):
    """Two-stage detector with instance masks.

    Args:
        backbone, neck, rpn: as :class:`FasterRCNN`.
        roi_head: :class:`~libra.roi_heads.MaskRoIHead` (box branch + mask branch).
        validate_targets: check the ground truth (:mod:`libra.detectors.base`; the masks' shapes
            are checked here).

    Attributes:
        iou_types: ``("bbox", "segm")``: the evaluator measures box and mask AP, and the data
            pipeline decodes instance masks for training (``DetectionDataset.with_masks``).
    """

    iou_types: tuple[str, ...] = ("bbox", "segm")

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Sequential,
        rpn: RegionProposalNetwork,
        roi_head: MaskRoIHead,
        validate_targets: bool = True,
    ) -> None:
        if not isinstance(roi_head, MaskRoIHead):
            raise ValueError(f"MaskRCNN needs a MaskRoIHead (box and mask branch), got {type(roi_head).__name__}")
        super().__init__(backbone, neck, rpn, roi_head, validate_targets)

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        return_proposals: bool = False,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections with masks in eval mode.

        Args:
            images: ``[B, 3, H, W]`` normalised images, zero-padded bottom-right.
            image_sizes: ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": [G, 4], "labels": [G], "masks": [G, H', W'] uint8/bool
                (instance masks in the resized image's coordinates, any padding: ``collate`` pads
                them to ``H x W``), "ignore_boxes": [Gi, 4] (optional)}``; required in training.
            original_sizes: ``(h0, w0)`` per image: boxes are rescaled to them and masks pasted
                into them; None keeps both in resized-image coordinates.
            return_proposals: eval only; add ``"proposals"`` / ``"proposal_scores"``.

        Returns:
            training: ``{"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "acc"}``;
            eval: per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64,
            "masks": [D, h0, w0] bool}`` (masks of the image ``original_sizes`` names, or of the
            resized image without it).
        """
        if self.training and targets is not None:
            check_mask_targets(targets)
        image_sizes, targets = self.check_inputs(images, image_sizes, targets, original_sizes)
        features = self.neck(self.backbone(images))
        if self.training:
            proposals, rpn_losses = self.rpn(features, image_sizes, targets)
            samples = self.roi_head.sample(proposals, targets)  # once, for both branches
            losses = {**rpn_losses, **self.roi_head.loss(features, samples)}
            gt_masks = [t["masks"].to(images.device, non_blocking=True) for t in targets]
            losses.update(self.roi_head.mask_loss(features, samples, gt_masks, self.roi_head.slot_counts(proposals, targets)))
            return losses

        proposals, _ = self.rpn(features, image_sizes)
        detections = self.roi_head.predict(features, proposals, image_sizes)
        mask_probs = self.roi_head.predict_mask_probs(features, detections)  # on the resized-image boxes
        if return_proposals:
            for output, proposal_output in zip(detections, proposals.outputs()):
                output.update(proposal_output)
        outputs = self.postprocess(detections, image_sizes, original_sizes)  # the one box rescale
        paste_sizes = original_sizes if original_sizes is not None else image_sizes
        for output, probs, size in zip(outputs, mask_probs, paste_sizes):
            # Pasted at the boxes as returned (rescaled above), so masks and boxes agree.
            output["masks"] = paste_masks_in_image(probs, output["boxes"], (int(size[0]), int(size[1])), self.roi_head.mask_thresh)
        return outputs


def check_mask_targets(targets: Sequence[dict[str, Tensor]]) -> None:
    """Shape checks of ``target["masks"]`` (host metadata only, no device sync): one ``[G, H, W]``
    mask per gt box."""
    for index, target in enumerate(targets):
        masks = target.get("masks") if isinstance(target, dict) else None
        if masks is None:
            raise ValueError(
                f"targets[{index}] has no 'masks': Mask R-CNN trains on instance masks [G, H, W] (the dataset "
                "decodes them with with_masks=True; train.py sets it for a mask model)"
            )
        boxes = target.get("boxes")
        num_boxes = int(boxes.shape[0]) if isinstance(boxes, Tensor) and boxes.dim() >= 1 else None
        if not isinstance(masks, Tensor) or masks.dim() != 3 or (num_boxes is not None and masks.shape[0] != num_boxes):
            raise ValueError(
                f"targets[{index}]['masks'] must be a [G, H, W] tensor with G = {num_boxes} (one mask per box), "
                f"got {tuple(getattr(masks, 'shape', ())) or type(masks).__name__}"
            )
        if masks.is_floating_point() or masks.is_complex():
            raise ValueError(f"targets[{index}]['masks'] must be uint8 or bool 0/1 masks, got {masks.dtype}")
