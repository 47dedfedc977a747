"""Assign each box (anchor or proposal) to a ground-truth box by maximum IoU.

Faster R-CNN / MMDetection ``MaxIoUAssigner`` (``faster-rcnn_r50_fpn_1x_coco``: ``train_cfg.rpn.assigner``
pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3; ``train_cfg.rcnn.assigner`` 0.5 / 0.5 / 0.5), with MaxIoUAssigner
semantics:

* negative (gt index 0): max IoU over all gts in ``[0, neg_iou_thr)``;
* positive (gt index i + 1): max IoU ``>= pos_iou_thr`` with gt ``i`` = its argmax;
* ignored (-1): everything else (max IoU in ``[neg_iou_thr, pos_iou_thr)``);
* low-quality matches (``match_low_quality``, used by the RPN): every gt whose best
  IoU is ``>= min_pos_iou`` also takes *all* boxes tied at that best IoU, even
  below ``pos_iou_thr``. When one box is a best match of several gts, the gt
  with the highest index wins (mmdet loops over gts and later ones overwrite);
  here this is computed without a loop.

Ignore (crowd) regions, a documented difference from mmdet: a box whose
intersection-over-its-own-area (IoF) with some ignore box exceeds
``ignore_iof_thr`` is marked -1 *unless it is positive*. mmdet instead sets such
boxes' IoUs to -1 before matching, so they can never be positive even when they
overlap a real gt well; we keep positives because a well-matched gt box is a
valid training target regardless of a nearby crowd region. ``max_overlaps``
always holds the true max IoU with the (non-ignore) gts.

Everything runs on the device of the inputs. The only host sync is the optional
input validation (``validate=True``), a debug/safety check that hot paths whose
data loader already validated the ground truth may turn off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from libra.boxes import box_iof, box_iou, check_boxes


class AssignResult(NamedTuple):
    """Per-box assignment.

    Attributes:
        gt_inds: ``[N]`` int64: -1 ignored, 0 negative, ``i + 1`` matched to gt ``i``.
        max_overlaps: ``[N]`` float: max IoU of each box over all gts (0 when there is no gt).
        labels: ``[N]`` int64: label of the matched gt for positives, -1 otherwise.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor


class MaxIoUAssigner:
    """Max-IoU assignment of boxes to ground truth.

    Args:
        pos_iou_thr: a box is positive when its max IoU is ``>=`` this (RPN 0.7, R-CNN 0.5).
        neg_iou_thr: a box is negative when its max IoU is in ``[0, neg_iou_thr)`` (RPN 0.3, R-CNN 0.5).
        min_pos_iou: minimum IoU for a low-quality match (RPN 0.3).
        match_low_quality: let each gt take all its best-IoU boxes (RPN True, R-CNN False).
        ignore_iof_thr: boxes with IoF above this with an ignore box become -1 unless
            positive; ``<= 0`` disables ignore handling.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float,
        match_low_quality: bool = True,
        ignore_iof_thr: float = 0.5,
    ) -> None:
        if not 0.0 <= neg_iou_thr <= pos_iou_thr:
            raise ValueError(
                f"need 0 <= neg_iou_thr <= pos_iou_thr, got neg_iou_thr={neg_iou_thr}, pos_iou_thr={pos_iou_thr}"
            )
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = float(neg_iou_thr)
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = bool(match_low_quality)
        self.ignore_iof_thr = float(ignore_iof_thr)

    def assign(
        self,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        ignore_boxes: Tensor | None = None,
        validate: bool = True,
        valid: Tensor | None = None,
    ) -> AssignResult:
        """Assign ``boxes`` to ``gt_boxes``.

        Args:
            boxes: ``[N, 4]`` anchors or proposals.
            gt_boxes: ``[G, 4]`` ground-truth boxes (G may be 0).
            gt_labels: ``[G]`` int64 labels in ``0..C-1``.
            ignore_boxes: ``[Gi, 4]`` ignore (crowd) regions, or None.
            validate: check that ``gt_boxes`` are finite with x2 >= x1, y2 >= y1 and that
                ``gt_labels`` are non-negative. A debug/safety check: it reads a flag back
                from the device (host sync); the data loader already validates on the CPU.
            valid: ``[N]`` bool or None. Invalid boxes (e.g. anchors in another image's padding)
                take no part at all: they are ignored (-1) and never a gt's best match, as if
                they were not passed (MMDetection assigns only the anchors inside ``valid_flags``).

        Returns:
            :class:`AssignResult` with ``[N]`` tensors.
        """
        self._check_shapes(boxes, gt_boxes, gt_labels, ignore_boxes)
        if validate:
            check_boxes(gt_boxes, "gt_boxes")
            if gt_labels.numel() > 0 and bool((gt_labels < 0).any()):  # host sync
                raise ValueError(
                    "gt_labels must be non-negative class indices 0..C-1 (background is not a gt label), "
                    f"got min {int(gt_labels.min())}"
                )

        num_boxes, num_gts = boxes.shape[0], gt_boxes.shape[0]
        device = boxes.device
        if num_gts == 0 or num_boxes == 0:
            # No gt: every box is a negative with IoU 0 (then ignore regions may apply).
            gt_inds = torch.zeros(num_boxes, dtype=torch.long, device=device)
            max_overlaps = boxes.new_zeros(num_boxes)
            labels = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
            gt_inds = self._apply_ignore(gt_inds, boxes, ignore_boxes)
            if valid is not None:
                gt_inds = torch.where(valid, gt_inds, torch.full_like(gt_inds, -1))
            return AssignResult(gt_inds, max_overlaps, labels)

        overlaps = box_iou(gt_boxes.to(boxes.dtype), boxes)  # [G, N]
        if valid is not None:
            # -1 is below every real IoU, so an invalid box is never a gt's best match.
            overlaps = torch.where(valid[None, :], overlaps, torch.full_like(overlaps, -1.0))
        max_overlaps, argmax_gt = overlaps.max(dim=0)  # [N] each

        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
        gt_inds = torch.where(max_overlaps < self.neg_iou_thr, torch.zeros_like(gt_inds), gt_inds)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax_gt + 1, gt_inds)

        if self.match_low_quality:
            gt_inds = self._match_low_quality(overlaps, gt_inds)

        gt_inds = self._apply_ignore(gt_inds, boxes, ignore_boxes)
        if valid is not None:
            gt_inds = torch.where(valid, gt_inds, torch.full_like(gt_inds, -1))
            max_overlaps = max_overlaps.clamp(min=0.0)
        positive = gt_inds > 0
        # Gather with a clamped index (no boolean-mask indexing), then blank non-positives.
        matched_labels = gt_labels.to(torch.long)[(gt_inds - 1).clamp(min=0)]
        labels = torch.where(positive, matched_labels, torch.full_like(matched_labels, -1))
        return AssignResult(gt_inds, max_overlaps, labels)

    def _match_low_quality(self, overlaps: Tensor, gt_inds: Tensor) -> Tensor:
        """Give each gt all boxes tied at its best IoU (if that IoU >= min_pos_iou).

        ``overlaps`` is ``[G, N]``. A box that is a best match of several gts goes
        to the highest-index gt, which is what a loop over gts that overwrites
        would produce.
        """
        gt_max_overlaps = overlaps.max(dim=1, keepdim=True).values  # [G, 1]
        is_best = (overlaps == gt_max_overlaps) & (gt_max_overlaps >= self.min_pos_iou)  # [G, N]
        # argmax returns the first maximum; on the gt-reversed matrix that is the last gt.
        last_gt_reversed = torch.argmax(is_best.flip(0).to(torch.uint8), dim=0)  # [N]
        last_gt = overlaps.shape[0] - 1 - last_gt_reversed
        return torch.where(is_best.any(dim=0), last_gt + 1, gt_inds)

    def _apply_ignore(self, gt_inds: Tensor, boxes: Tensor, ignore_boxes: Tensor | None) -> Tensor:
        """Mark non-positive boxes lying mostly inside an ignore region as -1."""
        if ignore_boxes is None or self.ignore_iof_thr <= 0 or ignore_boxes.numel() == 0 or boxes.numel() == 0:
            return gt_inds
        iof = box_iof(boxes, ignore_boxes.to(boxes.dtype))  # [N, Gi]
        inside_ignore = iof.max(dim=1).values > self.ignore_iof_thr
        return torch.where(inside_ignore & (gt_inds <= 0), torch.full_like(gt_inds, -1), gt_inds)

    @staticmethod
    def _check_shapes(
        boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, ignore_boxes: Tensor | None
    ) -> None:
        # Shapes live on the host: checking them costs no sync.
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
        if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
            raise ValueError(f"gt_boxes must have shape [G, 4], got {tuple(gt_boxes.shape)}")
        if gt_labels.dim() != 1 or gt_labels.shape[0] != gt_boxes.shape[0]:
            raise ValueError(
                f"gt_labels must have shape [G] = [{gt_boxes.shape[0]}] to match gt_boxes, "
                f"got {tuple(gt_labels.shape)}"
            )
        if gt_labels.is_floating_point() or gt_labels.dtype == torch.bool:
            raise ValueError(f"gt_labels must be an integer tensor (int64), got dtype {gt_labels.dtype}")
        if ignore_boxes is not None and (ignore_boxes.dim() != 2 or ignore_boxes.shape[1] != 4):
            raise ValueError(f"ignore_boxes must have shape [Gi, 4] or be None, got {tuple(ignore_boxes.shape)}")

    def __repr__(self) -> str:
        return (
            f"MaxIoUAssigner(pos_iou_thr={self.pos_iou_thr}, neg_iou_thr={self.neg_iou_thr}, "
            f"min_pos_iou={self.min_pos_iou}, match_low_quality={self.match_low_quality}, "
            f"ignore_iof_thr={self.ignore_iof_thr})"
        )
