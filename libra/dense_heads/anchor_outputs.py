"""What the dense heads (RPN, RetinaNet) share: their per-anchor outputs in anchor order, and the
assignment of every image's anchors to its ground truth (a helper module, not a stage).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from libra.anchor_generator import AnchorGenerator
from libra.max_iou_assigner import AssignResult, MaxIoUAssigner

__all__ = ["assign_anchors", "concat_levels", "flatten_level"]


def flatten_level(logits: Tensor, deltas: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """``[B, A*K, H, W]``, ``[B, A*4, H, W]`` -> ``[B, H*W*A, K]``, ``[B, H*W*A, 4]``.

    Anchor order ``(y*W + x)*A + a``, the anchor generator's: channel ``a*K + k`` of cell ``(y, x)``
    becomes row ``(y*W + x)*A + a``, column ``k`` (K = 1 objectness logit for the RPN, C class
    logits for RetinaNet).
    """
    batch = logits.shape[0]
    flat_logits = logits.permute(0, 2, 3, 1).reshape(batch, -1, channels)
    flat_deltas = deltas.permute(0, 2, 3, 1).reshape(batch, -1, 4)
    return flat_logits, flat_deltas


def concat_levels(
    anchor_generator: AnchorGenerator,
    features: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    anchors: Sequence[Tensor],
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A dense head's per-level outputs joined over the levels for its loss: anchors ``[N, 4]``,
    logits ``[B, N, K]`` (``[B, N]`` for the RPN), deltas ``[B, N, 4]``, and ``valid`` ``[B, N]``, the
    anchors inside each image's own padded extent (:meth:`AnchorGenerator.valid_flags`)."""
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    valid = anchor_generator.valid_flags(feature_sizes, image_sizes, device=features[0].device)
    return torch.cat(list(anchors), dim=0), torch.cat(list(logits), dim=1), torch.cat(list(deltas), dim=1), valid


def assign_anchors(
    assigner: MaxIoUAssigner, anchors: Tensor, targets: Sequence[dict[str, Tensor]], valid: Tensor | None = None
) -> list[AssignResult]:
    """Max-IoU assignment of the ``[N, 4]`` anchors (the same for every image) to each image's gts.

    Args:
        targets: per image ``{"boxes": [G, 4], "labels": [G], "ignore_boxes": [Gi, 4] (optional)}``,
            validated by the detector once per batch.
        valid: ``[B, N]`` bool, the anchors inside each image's own padded extent
            (:meth:`AnchorGenerator.valid_flags`); None: all anchors are valid.
    """
    return [
        assigner.assign(
            anchors, target["boxes"], target["labels"], target.get("ignore_boxes"), validate=False,
            valid=None if valid is None else valid[index],
        )
        for index, target in enumerate(targets)
    ]
