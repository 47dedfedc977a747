"""Mask R-CNN / Libra Mask R-CNN: Faster R-CNN plus a mask branch (paper Sec. 4.1.5, Table 8).

    backbone -> neck -> RPN -> RoIHead.sample (once) -> box branch loss  (loss_cls, loss_bbox)
                                                   \\-> mask branch loss (loss_mask)
    test:  RPN -> box branch predict -> mask head on the final boxes (resized-image coordinates)
           -> postprocess: boxes rescaled to the original image (once), masks pasted into the
              ORIGINAL image at the rescaled boxes, thresholded at 0.5

Faster R-CNN's ``loss`` / ``predict`` run unchanged: the mask branch lives in the RoI head
(:class:`~libra.roi_heads.MaskRoIHead` extends the box branch's ``sample`` / ``loss`` /
``predict``), and the one postprocess pastes the masks. This class adds the mask targets' checks,
``iou_types`` and the mask threshold.

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
from libra.roi_heads import MaskRoIHead
from libra.structures import Batch

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
        self.check_strides(neck, mask_roi_extractor=roi_head.mask_roi_extractor.featmap_strides)

    @property
    def mask_thr(self) -> float:
        """Threshold of the pasted mask probabilities (the mask branch's ``mask_thr``, 0.5)."""
        return self.roi_head.mask_thr

    def check_batch(self, batch: Batch, training: bool):
        """:meth:`Detector.check_batch`, and in training first the masks' shapes (one per gt box)."""
        if training and batch.targets is not None:
            check_mask_targets(batch.targets)
        return super().check_batch(batch, training)


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
