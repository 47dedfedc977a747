"""The records passed between the stages of a detector.

    Batch -> backbone -> neck -> dense head --Proposals--> RoI head --SampledRoIs--> branch losses
                                                                  \\--> detections (per-image dicts)

A :class:`Batch` (built by ``libra.data.collate``, or by ``Detector.forward`` from tensors) is what
every detector's ``loss(batch)`` / ``predict(batch)`` take: the one interface the engine calls.

Each stage file imports these records from here, never from another stage file, so a stage
(an RPN, a RetinaNet head, a box or mask branch) can be read and replaced on its own.

Fixed sizes keep training free of host round trips: proposals are padded to ``P`` slots per
image with a validity mask, and every image contributes a fixed number of sampled RoIs whose
unused slots carry weight 0.

Detections, the output of every detector in eval mode, stay plain dicts per image (the
torchvision convention): ``{"boxes": [D, 4] float (x1, y1, x2, y2), "scores": [D],
"labels": [D] int64 in [0, C-1]}``, in the original image's coordinates once the detector's
postprocess has rescaled them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Batch", "Proposals", "SampledRoIs", "boxes_to_rois"]


@dataclass
class Batch:
    """The inputs of one batch, as every detector's ``loss`` / ``predict`` take them.

    Attributes:
        images: ``[B, 3, H, W]`` normalised images, zero-padded bottom-right.
        image_sizes: ``(h, w)`` of each image before padding (``h <= H``, ``w <= W``).
        original_sizes: ``(h0, w0)`` of each image as loaded: ``predict`` rescales its boxes (and
            pastes its masks) there; None keeps the resized image's coordinates.
        targets: per image ``{"boxes": [G, 4] float (resized image), "labels": [G] int64 in [0, C-1],
            "ignore_boxes": [Gi, 4] (optional), "masks": [G, H, W] uint8 (mask models)}`` plus what
            the dataset adds (``image_id``, ...); required by ``loss``, ignored by ``predict``.
        proposals: per image ``[P_i, 4]`` pre-computed proposals in the resized image (the Fast
            R-CNN protocol), or None.
        image_ids: the dataset's image ids, or None.

    ``images, targets = batch`` unpacks the pair the data loader yielded in earlier versions.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]] | None = None
    targets: list[dict] | None = None
    proposals: list[Tensor] | None = None
    image_ids: list[int] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __iter__(self):
        return iter((self.images, self.targets))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """A copy with the images, the targets' tensors and the proposals on ``device``."""
        targets = None
        if self.targets is not None:
            targets = [
                {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v) for k, v in t.items()}
                for t in self.targets
            ]
        proposals = None if self.proposals is None else [p.to(device, non_blocking=non_blocking) for p in self.proposals]
        return Batch(
            self.images.to(device, non_blocking=non_blocking), list(self.image_sizes),
            None if self.original_sizes is None else list(self.original_sizes), targets, proposals,
            None if self.image_ids is None else list(self.image_ids),
        )


@dataclass
class Proposals:
    """Proposals of a batch, padded to a fixed number ``P`` per image.

    Attributes:
        boxes: ``[B, P, 4]`` boxes in the resized (unpadded) image coordinates, detached.
        scores: ``[B, P]`` objectness probabilities (0 where ``valid`` is False).
        valid: ``[B, P]`` bool; False for slots that hold no proposal (suppressed by NMS
            or an empty box), which happens when fewer than ``P`` candidates survive.
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor

    def per_image(self, index: int) -> tuple[Tensor, Tensor]:
        """``([Pi, 4], [Pi])`` valid proposals and scores of one image (boolean indexing: a host sync)."""
        keep = self.valid[index]
        return self.boxes[index][keep], self.scores[index][keep]

    def outputs(self) -> list[dict[str, Tensor]]:
        """Per image ``{"proposals": [Pi, 4], "proposal_scores": [Pi]}`` of the valid slots, by
        decreasing score: the output format of proposals (eval mode, ``return_proposals``)."""
        outputs = []
        for index in range(self.valid.shape[0]):
            boxes, scores = self.per_image(index)
            outputs.append({"proposals": boxes, "proposal_scores": scores})
        return outputs


@dataclass
class SampledRoIs:
    """The RoIs the R-CNN sampler chose for a batch, ``R = sum_i min(N_i, #candidates_i)`` rows.

    Sampled once per training step; every branch (box, and a mask branch) computes its loss on
    these same rows, as in Mask R-CNN.

    Attributes:
        rois: ``[R, 5]`` rows ``(image_index, x1, y1, x2, y2)`` in resized image coordinates.
        labels: ``[R]`` int64 class of the matched gt for positives, C (background) otherwise.
        matched_gt: ``[R]`` int64 index of the matched gt within its image (``0..G_i-1``) for
            positives, -1 otherwise; mask targets are cropped from that gt's mask.
        box_targets: ``[R, 4]`` encoded regression targets, zero for non-positives.
        sampled: ``[R]`` float, 1 for a sampled RoI (positive or negative), 0 for an unused slot.
        positive: ``[R]`` float, 1 for a positive RoI.
        rows_per_image: rows of each image (host integers, images in order). Within an image's
            rows the positives come first, and there are at most ``max_positives_per_image`` of
            them: a branch that needs only the positives (the mask branch) runs on the first
            ``min(rows, max_positives_per_image)`` rows of each image, a static set of rows.
        max_positives_per_image: the sampler's cap on positives per image.
        gt_masks: per image ``[G_i, H, W]`` instance masks of the gts (mask models; ``matched_gt``
            indexes them), else None.
    """

    rois: Tensor
    labels: Tensor
    matched_gt: Tensor
    box_targets: Tensor
    sampled: Tensor
    positive: Tensor
    rows_per_image: tuple[int, ...] = ()
    max_positives_per_image: int = 0
    gt_masks: list[Tensor] | None = None

    def positive_prefix(self) -> Tensor:
        """``[K]`` int64 row indices of the first ``min(rows, max_positives_per_image)`` rows of every
        image: all positive rows (and padding rows of weight 0). Built from host integers, so a
        host-to-device copy and no sync."""
        index, start = [], 0
        for count in self.rows_per_image:
            index.extend(range(start, start + min(int(count), int(self.max_positives_per_image))))
            start += int(count)
        return torch.tensor(index, dtype=torch.int64).to(self.rois.device, non_blocking=True)

    @property
    def num_sampled(self) -> Tensor:
        """Scalar: the number of sampled RoIs in the batch (at least 1), the losses' divisor."""
        return self.sampled.sum().clamp(min=1.0)


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image ``[K_i, 4]`` boxes -> ``[sum K_i, 5]`` rows ``(image_index, x1, y1, x2, y2)``."""
    rois = []
    for index, image_boxes in enumerate(boxes):
        column = torch.full((image_boxes.shape[0], 1), float(index), dtype=image_boxes.dtype, device=image_boxes.device)
        rois.append(torch.cat([column, image_boxes], dim=1))
    return torch.cat(rois, dim=0)
