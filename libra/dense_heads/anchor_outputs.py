"""What the dense heads (RPN, RetinaNet) share: their per-anchor outputs in anchor order, and the
assignment of every image's anchors to its ground truth (a helper module, not a stage).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from libra.max_iou_assigner import AssignResult, MaxIoUAssigner

__all__ = ["assign_anchors", "flatten_level"]


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
