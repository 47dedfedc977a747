"""R-CNN stage: sample RoIs from the proposals, pool their features, classify and refine them.

Training (defaults: MMDetection ``faster-rcnn_r50_fpn_1x_coco``, ``train_cfg.rcnn``; Libra
R-CNN paper Sec. 3.1 and 3.3):

1. the ground-truth boxes join the proposals as extra candidates (IoU 1 with their gt;
   ``train_cfg.rcnn.sampler.add_gt_as_proposals=True``);
2. max-IoU assignment of the proposals (IoU >= 0.5 positive, < 0.5 negative; low-quality
   matches only with ``match_low_quality``: MMDetection's Mask R-CNN has them,
   ``mask-rcnn_r50_fpn.py`` ``train_cfg.rcnn.assigner.match_low_quality=True, min_pos_iou=0.5``,
   its Faster / Fast R-CNN do not), the gts then prepended as their own positives;
3. sampling of 512 RoIs per image with at most 25% positives: random (baseline) or
   instance-balanced positives + IoU-balanced negatives (Libra, Eq. 1-2);
4. RoIAlign 7x7 on the FPN level of each RoI, box head;
5. softmax CE (or LGR-CE, Eq. 15-19) over all sampled RoIs, and a box loss (L1, smooth L1,
   balanced L1 Eq. 8-10, or LGR-L1 Eq. 11-14) on the positives' gt-class deltas, both divided
   by the number of sampled RoIs in the batch.

:meth:`RoIHead.sample` (steps 1-3) and :meth:`RoIHead.loss` (steps 4-5) are separate: a
detector samples once and feeds every branch (box, mask) from the same
:class:`~libra.structures.SampledRoIs`.

The sampler returns boolean masks over a variable number of candidates. Turning them into
a fixed ``min(512, #candidates)`` RoIs per image with ``topk`` on a priority (positives,
then negatives, then unused slots) keeps everything on the device; unused slots carry
weight 0 in both losses. Test-time post-processing (score threshold, per-class NMS)
produces variable-size outputs and reads shapes back to the host, as it must.

Test-time scoring follows the classification loss: a softmax over C + 1 logits for CE and
LGR-CE, independent per-class sigmoids for sigmoid losses (sigmoid CE, bucketed class
re-weighting, paper Sec. 3.3.3), which mark themselves with ``use_sigmoid = True``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from libra.box_coder import DeltaXYWHBoxCoder
from libra.boxes import clip_boxes_per_image
from libra.losses.basic import CrossEntropyLoss, L1Loss
from libra.max_iou_assigner import AssignResult, MaxIoUAssigner
from libra.ops import batched_nms
from libra.samplers import RandomSampler, sample_pos_neg
from libra.structures import Proposals, SampledRoIs, boxes_to_rois

from .box_head import select_class_deltas
from .roi_extractor import MultiLevelRoIExtractor


class RoIHead(nn.Module):
    """Box branch of Faster R-CNN / Libra R-CNN.

    Args:
        box_head: maps ``[K, C_feat, 7, 7]`` to ``(cls_logits [K, C+1], box_deltas [K, 4C])``
            (``Shared2FCBoxHead`` or ``Shared4Conv1FCBoxHead``); background is column C.
        num_classes: C, the number of foreground classes.
        roi_extractor: default ``MultiLevelRoIExtractor(7, (4, 8, 16, 32), sampling_ratio=0)``.
        pos_iou_thr, neg_iou_thr: assigner thresholds (0.5, 0.5).
        min_pos_iou: a gt's best proposal is a low-quality match when its IoU is at least this
            (0.5, MMDetection's ``train_cfg.rcnn.assigner.min_pos_iou``); read only with
            ``match_low_quality``.
        match_low_quality: each gt also takes every proposal tied at its best IoU (MaxIoUAssigner's
            low-quality matches). False for Faster / Fast R-CNN, True for Mask R-CNN, as in
            MMDetection's configs. With ``min_pos_iou == pos_iou_thr`` this adds no positive; it moves a
            positive from its highest-IoU gt to a gt whose best proposal it is.
        ignore_iof_thr: candidates covered by more than this fraction by an ignore box are not
            sampled (unless positive).
        batch_size: RoIs sampled per image (512).
        positive_fraction: at most this fraction positive (0.25).
        pos_sampler: positive sampler module (:mod:`libra.samplers`; None: random), e.g.
            ``InstanceBalancedPosSampler()`` (Libra R-CNN) or ``ClassBalancedPosSampler()`` (LVIS).
        neg_sampler: negative sampler module (None: random), e.g. ``IoUBalancedNegSampler(num_bins=3,
            floor_thr=0.0, floor_fraction=0.0)`` (the state MMDetection's ``IoUBalancedNegSampler``
            reaches after its first call, ``floor_thr=-1`` rewritten to 0).
        cls_loss: ``forward(logits, labels, weight, avg_factor)``; default softmax CE. A loss with
            ``use_sigmoid = True`` makes test-time scores per-class sigmoids instead of a softmax.
        box_loss: ``forward(pred, target, weight, avg_factor)``; default L1 (MMDetection's
            Faster R-CNN baseline).
        box_coder_stds: R-CNN delta stds (0.1, 0.1, 0.2, 0.2).
        score_thr: test-time minimum class score (strictly greater, 0.05).
        nms_thr: test-time per-class NMS IoU (0.5).
        max_per_img: test-time detections kept per image (100).
        generator: optional RNG for the samplers.
    """

    def __init__(
        self,
        box_head: nn.Module,
        num_classes: int,
        roi_extractor: MultiLevelRoIExtractor | None = None,
        *,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.5,
        min_pos_iou: float = 0.5,
        match_low_quality: bool = False,
        ignore_iof_thr: float = -1.0,
        batch_size: int = 512,
        positive_fraction: float = 0.25,
        pos_sampler: nn.Module | None = None,
        neg_sampler: nn.Module | None = None,
        cls_loss: nn.Module | None = None,
        box_loss: nn.Module | None = None,
        box_coder_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        score_thr: float = 0.05,
        nms_thr: float = 0.5,
        max_per_img: int = 100,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        head_classes = getattr(box_head, "num_classes", num_classes)
        if head_classes != num_classes:
            raise ValueError(f"box_head predicts {head_classes} classes but num_classes={num_classes}")
        self.num_classes = num_classes
        self.box_head = box_head
        self.roi_extractor = roi_extractor if roi_extractor is not None else MultiLevelRoIExtractor()
        self.box_coder = DeltaXYWHBoxCoder(stds=tuple(box_coder_stds))
        self.assigner = MaxIoUAssigner(
            pos_iou_thr, neg_iou_thr, min_pos_iou=min_pos_iou, match_low_quality=match_low_quality,
            ignore_iof_thr=ignore_iof_thr,
        )
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction
        self.pos_sampler = pos_sampler if pos_sampler is not None else RandomSampler()
        self.neg_sampler = neg_sampler if neg_sampler is not None else RandomSampler()
        self.cls_loss = cls_loss if cls_loss is not None else CrossEntropyLoss()
        self.use_sigmoid = bool(getattr(self.cls_loss, "use_sigmoid", False))
        self.box_loss = box_loss if box_loss is not None else L1Loss()
        self.score_thr = score_thr
        self.nms_thr = nms_thr
        self.max_per_img = max_per_img
        self.generator = generator

    # ------------------------------------------------------------------ training
    @property
    def max_positives_per_image(self) -> int:
        """Upper bound of the positives :meth:`sample` takes per image: ``int(batch_size
        * positive_fraction)`` (every positive sampler honours it, ``sample_pos_neg``)."""
        return int(self.batch_size * self.positive_fraction)

    @torch.no_grad()
    def assign(
        self,
        proposal_boxes: Tensor,
        proposal_valid: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        ignore_boxes: Tensor | None = None,
    ) -> tuple[Tensor, AssignResult]:
        """Steps 1-2 for one image: the candidates ``[G + P, 4]`` (gts first) and their assignment.

        The proposals are assigned to the gts (slots that hold no proposal are ignored, -1), then the
        gts join as their own positives with IoU 1, as MMDetection's sampler adds them after the
        assignment (``add_gt_as_proposals``): only proposals compete for a gt's low-quality matches,
        and a gt is a positive of itself even next to an ignore region or a duplicate gt.
        """
        num_gts = gt_boxes.shape[0]
        device = gt_boxes.device
        # Without low-quality matches a box's assignment depends on that box alone; with them an
        # empty slot must not be a gt's best match.
        valid = proposal_valid if self.assigner.match_low_quality else None
        gt_inds, max_overlaps, labels = self.assigner.assign(
            proposal_boxes, gt_boxes, gt_labels, ignore_boxes, validate=False, valid=valid
        )  # the detector validated the targets once per batch
        gt_inds = torch.where(proposal_valid, gt_inds, torch.full_like(gt_inds, -1))
        own = torch.arange(1, num_gts + 1, dtype=gt_inds.dtype, device=device)
        return torch.cat([gt_boxes, proposal_boxes], dim=0), AssignResult(
            torch.cat([own, gt_inds]),
            torch.cat([max_overlaps.new_ones(num_gts), max_overlaps]),
            torch.cat([gt_labels.to(labels.dtype), labels]),
        )

    @torch.no_grad()
    def sample(self, proposals: Proposals, targets: Sequence[dict[str, Tensor]]) -> SampledRoIs:
        """Assign and sample a fixed number of RoIs per image (no gradient flows through sampling).

        Args:
            proposals: ``[B, P, 4]`` proposals with ``[B, P]`` validity.
            targets: per image ``{"boxes": [G, 4], "labels": [G], "ignore_boxes": [Gi, 4] (optional)}``.

        Returns:
            :class:`SampledRoIs` with ``min(batch_size, G_i + P)`` rows per image.
        """
        rois, labels, matched_gts, delta_targets, sampled_weights, positive_weights = [], [], [], [], [], []
        rows_per_image = []
        for index, target in enumerate(targets):
            gt_boxes = target["boxes"].to(proposals.boxes.dtype)
            candidates, (gt_inds, max_overlaps, assigned_labels) = self.assign(
                proposals.boxes[index], proposals.valid[index], gt_boxes, target["labels"], target.get("ignore_boxes")
            )  # [G + P] candidates, gts first

            positive, negative = sample_pos_neg(
                gt_inds,
                max_overlaps,
                num=self.batch_size,
                pos_fraction=self.positive_fraction,
                pos_sampler=self.pos_sampler,
                neg_sampler=self.neg_sampler,
                labels=assigned_labels,
                generator=self.generator,
            )
            # Masks -> a fixed number of slots: positives first, then negatives, then unused
            # candidates (weight 0). topk with a static k needs no host sync; it sorts, so the
            # positives are the first rows of the image (``SampledRoIs.positive_prefix``, the mask branch).
            num_slots = min(self.batch_size, candidates.shape[0])  # a shape: no host sync
            rows_per_image.append(int(num_slots))
            priority = positive.to(torch.float32) * 2.0 + negative.to(torch.float32)
            _, slots = priority.topk(num_slots, sorted=True)
            slot_positive = positive[slots]
            slot_sampled = slot_positive | negative[slots]
            slot_boxes = candidates[slots]

            slot_gt = torch.where(slot_positive, gt_inds[slots] - 1, torch.full_like(gt_inds[slots], -1))
            encoded = self.box_coder.encode_matched(slot_boxes, gt_boxes, slot_gt, slot_positive)
            background = torch.full_like(assigned_labels[slots], self.num_classes)
            rois.append(slot_boxes)
            labels.append(torch.where(slot_positive, assigned_labels[slots], background))
            matched_gts.append(slot_gt)
            delta_targets.append(encoded)
            sampled_weights.append(slot_sampled.to(slot_boxes.dtype))
            positive_weights.append(slot_positive.to(slot_boxes.dtype))
        return SampledRoIs(
            rois=boxes_to_rois(rois),
            labels=torch.cat(labels),
            matched_gt=torch.cat(matched_gts),
            box_targets=torch.cat(delta_targets),
            sampled=torch.cat(sampled_weights),
            positive=torch.cat(positive_weights),
            rows_per_image=tuple(rows_per_image),
            max_positives_per_image=self.max_positives_per_image,
        )

    def loss(self, features: Sequence[Tensor], samples: SampledRoIs) -> dict[str, Tensor]:
        """Classification + box losses on RoIs sampled by :meth:`sample` (see module docstring).

        Args:
            features: pyramid levels ``[B, C, H_l, W_l]``.
            samples: the batch's :class:`SampledRoIs` (``R`` rows).

        Returns:
            ``{"loss_cls": scalar, "loss_bbox": scalar, "acc": scalar}`` (``acc`` in percent,
            over sampled RoIs, no gradient).
        """
        labels, delta_targets = samples.labels, samples.box_targets
        sampled, positive = samples.sampled, samples.positive
        cls_logits, box_deltas = self.box_head(self.roi_extractor(list(features), samples.rois))
        # Both losses are divided by the number of sampled RoIs in the batch (>= 1).
        num_sampled = samples.num_sampled
        loss_cls = self.cls_loss(cls_logits, labels, sampled, num_sampled)
        # Deltas of the gt class; background rows are clamped to a real class and weighted 0,
        # so without positives the loss is exactly 0 and still part of the graph.
        pred_deltas = select_class_deltas(box_deltas, labels)
        loss_bbox = self.box_loss(pred_deltas, delta_targets, positive[:, None].expand(-1, 4), num_sampled)
        with torch.no_grad():
            correct = (cls_logits.argmax(dim=1) == labels).to(sampled.dtype)
            accuracy = (correct * sampled).sum() / num_sampled * 100.0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "acc": accuracy}

    # ------------------------------------------------------------------ test
    @torch.no_grad()
    def predict(
        self,
        features: Sequence[Tensor],
        proposals: Proposals,
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Score, decode, clip and NMS the proposals of every image.

        Args:
            features: pyramid levels ``[B, C, H_l, W_l]``.
            proposals: ``[B, P, 4]`` boxes with ``[B, P]`` validity.
            image_sizes: ``(h, w)`` per image (boxes are clipped to it).

        Returns:
            Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}`` in resized image
            coordinates (the detector rescales them once), ``D <= max_per_img``, sorted by
            decreasing score.
        """
        batch, num_proposals = proposals.valid.shape
        rois = boxes_to_rois(list(proposals.boxes.unbind(0)))
        cls_logits, box_deltas = self.box_head(self.roi_extractor(list(features), rois))
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()  # autocast: score and decode in fp32
        num_classes = self.num_classes
        # Drop the background column (last); proposals that are not real give score 0.
        probabilities = cls_logits.sigmoid() if self.use_sigmoid else cls_logits.softmax(dim=1)
        scores = probabilities[:, :num_classes].view(batch, num_proposals, num_classes)
        scores = scores * proposals.valid[..., None].to(scores.dtype)
        boxes = self.box_coder.decode(
            proposals.boxes[:, :, None, :], box_deltas.view(batch, num_proposals, num_classes, 4)
        )  # [B, P, C, 4]
        boxes = clip_boxes_per_image(boxes, image_sizes)

        detections = []
        class_ids = torch.arange(num_classes, device=scores.device).expand(num_proposals, num_classes)
        for index in range(batch):
            keep_mask = scores[index] > self.score_thr  # [P, C]
            image_boxes = boxes[index][keep_mask]
            image_scores = scores[index][keep_mask]
            image_labels = class_ids[keep_mask]
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_thr)
            keep = keep[: self.max_per_img]
            detections.append(
                {"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]}
            )
        return detections

