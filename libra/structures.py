"""The records passed between the stages of a detector.

    image -> backbone -> neck -> dense head --Proposals--> RoI head --SampledRoIs--> branch losses
                                                                  \\--> detections (per-image dicts)

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

__all__ = ["Proposals", "SampledRoIs", "boxes_to_rois"]


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
    """

    rois: Tensor
    labels: Tensor
    matched_gt: Tensor
    box_targets: Tensor
    sampled: Tensor
    positive: Tensor

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
