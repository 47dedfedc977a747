"""The R-CNN stage of Mask R-CNN: the box branch of :class:`RoIHead` plus a mask branch.

Mask R-CNN (He et al. 2017; the paper's Libra Mask R-CNN, Sec. 4.1.5 / Table 8, "insert a mask
branch to Libra R-CNN, like how Mask R-CNN differs from Faster R-CNN"; MMDetection
``configs/_base_/models/mask-rcnn_r50_fpn.py``, ``StandardRoIHead`` with ``mask_head``):

training (one :class:`~libra.structures.SampledRoIs` per step, shared with the box branch)
    positive RoIs  --RoIAlign 14x14 (mask_roi_extractor)-->  [R+, 256, 14, 14]
                   --FCNMaskHead-->                           [R+, C, 28, 28] logits (only the gt class's
                                                                channel is computed, class_logits)
    matched gt masks cropped to the RoIs (libra.masks.mask_targets) -> [R+, 28, 28] targets,
    per-pixel BCE on the channel of the gt class, mean over positives x 28 x 28 (``loss_mask``)

test (on the final detections of the box branch, boxes in resized-image coordinates)
    detections --RoIAlign 14x14--> mask head --sigmoid of the detected class--> [D, 28, 28]
    (``mask_probs`` of each detection; the detector's one postprocess pastes them into the original
    image at the rescaled boxes)

Which rows are positive is known on the device only. To avoid a host sync, the mask branch
runs on a fixed prefix of each image's rows: :meth:`RoIHead.sample` puts the positives first
and takes at most ``max_positives_per_image`` (128 of 512) of them, so the first
``min(rows_i, 128)`` rows of image i hold all its positives (``SampledRoIs.positive_prefix``);
the rows among them that are not positive carry weight 0 in the loss.

:meth:`MaskRoIHead.sample`, :meth:`MaskRoIHead.loss` and :meth:`MaskRoIHead.predict` extend the box
branch's: the samples carry the gt masks, the loss adds ``loss_mask``, the detections add
``mask_probs``. The detector (Faster R-CNN's code) does not know there is a mask branch. The mask head therefore costs what it costs in MMDetection
on a full batch of positives (which runs it on exactly the positives, after a host sync).

The parameters live under ``mask_head.*`` (this module is the detector's ``roi_head``), so an
MMDetection key ``roi_head.mask_head.X`` is this module's ``roi_head.mask_head.X`` unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor

from libra.masks import MASK_THRESHOLD, mask_targets
from libra.structures import Proposals, SampledRoIs, boxes_to_rois

from .mask_head import FCNMaskHead, mask_loss, mask_probs_for_labels
from .mask_head import mask_roi_extractor as build_mask_roi_extractor
from .roi_extractor import MultiLevelRoIExtractor
from .roi_head import RoIHead

__all__ = ["MaskRoIHead"]


class MaskRoIHead(RoIHead):
    """:class:`RoIHead` (box branch, sampling, box post-processing) with a Mask R-CNN mask branch.

    Args:
        box_head, num_classes, roi_extractor: as :class:`RoIHead`.
        mask_head: :class:`~libra.roi_heads.mask_head.FCNMaskHead` predicting ``num_classes``
            masks (or one, class-agnostic).
        mask_roi_extractor: default ``mask_roi_extractor()`` (RoIAlign 14x14, sampling_ratio 0,
            the box branch's FPN level rule).
        mask_loss_weight: multiplier of ``loss_mask`` (1.0, ``loss_mask.loss_weight``).
        mask_thr: test-time binarisation of the pasted probabilities (0.5,
            ``test_cfg.rcnn.mask_thr_binary``); read by the detector when it pastes.
        **box_kwargs: the keyword arguments of :class:`RoIHead` (sampling, losses, test settings).
    """

    def __init__(
        self,
        box_head: torch.nn.Module,
        num_classes: int,
        roi_extractor: MultiLevelRoIExtractor | None = None,
        *,
        mask_head: FCNMaskHead,
        mask_roi_extractor: MultiLevelRoIExtractor | None = None,
        mask_loss_weight: float = 1.0,
        mask_thr: float = MASK_THRESHOLD,
        **box_kwargs,
    ) -> None:
        super().__init__(box_head, num_classes, roi_extractor, **box_kwargs)
        if not mask_head.class_agnostic and mask_head.num_classes != num_classes:
            raise ValueError(f"mask_head predicts {mask_head.num_classes} classes but num_classes={num_classes}")
        if not 0.0 <= mask_thr <= 1.0:
            raise ValueError(f"mask_thr must be in [0, 1] (a probability), got {mask_thr}")
        self.mask_head = mask_head
        self.mask_roi_extractor = mask_roi_extractor if mask_roi_extractor is not None else build_mask_roi_extractor()
        self.mask_loss_weight = mask_loss_weight
        self.mask_thr = mask_thr

    @property
    def mask_size(self) -> int:
        """Side M of the predicted masks and their targets (2 x the 14x14 RoI features: 28)."""
        return 2 * self.mask_roi_extractor.output_size

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def sample(self, proposals: Proposals, targets: Sequence[dict[str, Tensor]]) -> SampledRoIs:
        """:meth:`RoIHead.sample`, carrying each image's gt masks (``target["masks"]`` [G_i, H, W];
        without them the samples serve the box branch only)."""
        samples = super().sample(proposals, targets)
        if not all("masks" in t for t in targets):
            return samples
        device = samples.rois.device
        return replace(samples, gt_masks=[t["masks"].to(device, non_blocking=True) for t in targets])

    def loss(self, features: Sequence[Tensor], samples: SampledRoIs) -> dict[str, Tensor]:
        """The box branch's losses (:meth:`RoIHead.loss`) plus ``loss_mask`` on the same samples."""
        return {**super().loss(features, samples), **self.mask_loss(features, samples)}

    def mask_loss(self, features: Sequence[Tensor], samples: SampledRoIs) -> dict[str, Tensor]:
        """``{"loss_mask": scalar}`` on the positive rows of ``samples`` (module docstring).

        Args:
            features: pyramid levels ``[B, C, H_l, W_l]``.
            samples: the batch's :class:`SampledRoIs` of :meth:`sample` (with ``gt_masks``: per image
                ``[G_i, H, W]`` uint8/bool masks in the rois' coordinates, row j = gt box j).

        Returns:
            ``loss_mask``: BCE of the gt class's channel, mean over positives x M x M; 0 (in the
            graph) without positives.
        """
        if samples.gt_masks is None:
            raise ValueError("the mask branch needs samples with gt_masks (MaskRoIHead.sample attaches target['masks'])")
        rows = samples.positive_prefix()
        rois = samples.rois.index_select(0, rows)
        labels = samples.labels.index_select(0, rows)
        # Only the gt class's channel enters the loss: compute just that one ([K, 1, M, M]); the
        # loss and its gradients equal those of the full [K, C, M, M] logits.
        logits = self.mask_head.class_logits(self.mask_roi_extractor(list(features), rois), labels)[:, None]
        targets = mask_targets(
            list(samples.gt_masks), samples.matched_gt.index_select(0, rows), rois, mask_size=int(logits.shape[-1])
        )
        loss = mask_loss(
            logits, targets, labels, weights=samples.positive.index_select(0, rows), loss_weight=self.mask_loss_weight
        )
        return {"loss_mask": loss}

    # ------------------------------------------------------------------ test
    @torch.no_grad()
    def predict(
        self, features: Sequence[Tensor], proposals: Proposals, image_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """:meth:`RoIHead.predict` plus each detection's ``mask_probs`` ``[D, M, M]`` (float32,
        the detected class's channel in its box; pasted by the detector's postprocess)."""
        detections = super().predict(features, proposals, image_sizes)
        for detection, probs in zip(detections, self.predict_mask_probs(features, detections)):
            detection["mask_probs"] = probs
        return detections

    @torch.no_grad()
    def predict_mask_probs(self, features: Sequence[Tensor], detections: Sequence[dict[str, Tensor]]) -> list[Tensor]:
        """Mask probabilities of the final detections (one mask-head call for the whole batch).

        Args:
            features: pyramid levels ``[B, C, H_l, W_l]``.
            detections: per image ``{"boxes": [D_i, 4] (resized-image coordinates), "labels": [D_i]}``
                (the output of :meth:`RoIHead.predict`, before the detector rescales it).

        Returns:
            Per image ``[D_i, M, M]`` float32 probabilities: the sigmoid of the detected class's
            channel (``mask_probs_for_labels``), in the detection's box.
        """
        counts = [int(d["boxes"].shape[0]) for d in detections]
        rois = boxes_to_rois([d["boxes"] for d in detections])
        labels = torch.cat([d["labels"] for d in detections])
        # The detected class's channel only (FCNMaskHead.class_logits), then its sigmoid
        # (mask_probs_for_labels on a one-channel stack).
        logits = self.mask_head.class_logits(self.mask_roi_extractor(list(features), rois), labels)[:, None]
        return list(mask_probs_for_labels(logits, labels).split(counts))
