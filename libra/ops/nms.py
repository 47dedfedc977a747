"""Non-maximum suppression: ``nms`` and class-aware ``batched_nms``.

Both return int64 indices of kept boxes sorted by decreasing score (ties: lower index
first). A box is suppressed when a kept box overlaps it with IoU strictly greater
than ``iou_threshold``; coordinates are continuous (no +1).
"""
import torch
from torch import Tensor

from libra.ops._extension import use_extension
from libra.ops.nms_reference import nms_reference

# Above these sizes batched_nms runs NMS once per class instead of once on offset
# boxes: the single call is O(N^2) in time (and the CUDA mask in memory), the loop is
# O(sum of per-class N^2) plus a fixed cost per class. Both give the same kept set.
# The CPU value is where the two cost the same for 80 classes with libra's kernel.
PER_CLASS_LOOP_THRESHOLD = {"cpu": 8000, "cuda": 20000}


def _check_boxes_scores(boxes: Tensor, scores: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must be a [N, 4] tensor (x1, y1, x2, y2), got {getattr(boxes, 'shape', type(boxes))}.")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{name}: scores must be a [N] tensor with N = boxes.shape[0] = {boxes.shape[0]}, got {getattr(scores, 'shape', type(scores))}."
        )
    if scores.device != boxes.device:
        raise ValueError(f"{name}: boxes are on {boxes.device} but scores on {scores.device}; move them to one device.")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2).
        scores: [N].
        iou_threshold: suppress when IoU > iou_threshold.

    Returns:
        [M] int64 indices into ``boxes`` of kept boxes, by decreasing score.
    """
    _check_boxes_scores(boxes, scores, "nms")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if use_extension(stacklevel=3):
        return torch.ops.libra.nms(boxes, scores, float(iou_threshold))
    return nms_reference(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category: boxes with different ``idxs`` never suppress each other.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2); computed in float32.
        scores: [N].
        idxs: [N] int64 category (or level, or image) of each box.
        iou_threshold: suppress when IoU > iou_threshold.

    Returns:
        [M] int64 indices into ``boxes`` of kept boxes, by decreasing score.
    """
    _check_boxes_scores(boxes, scores, "batched_nms")
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        raise ValueError(f"batched_nms: idxs must be a [N] tensor like scores, got {getattr(idxs, 'shape', type(idxs))}.")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.float()
    threshold = PER_CLASS_LOOP_THRESHOLD.get(boxes.device.type, 4000)
    if boxes.shape[0] > threshold:
        return _batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    return _batched_nms_offset(boxes, scores, idxs, iou_threshold)


def _batched_nms_offset(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    # Shift each category to its own disjoint region so one NMS call cannot mix them:
    # category c is offset by c * (coordinate range + 1). Non-finite coordinates are
    # left out of the range so one NaN box cannot poison every offset.
    finite = torch.where(torch.isfinite(boxes), boxes, torch.zeros_like(boxes))
    span = finite.max() - finite.min() + 1
    offset_boxes = boxes + (idxs.to(boxes) * span)[:, None]
    return nms(offset_boxes, scores, iou_threshold)


def _batched_nms_per_class(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    # Group boxes by category with one stable sort, then run NMS on each contiguous group.
    by_category = torch.sort(idxs, stable=True).indices
    _, counts = torch.unique_consecutive(idxs[by_category], return_counts=True)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    start = 0
    for count in counts.tolist():  # one host sync for all group sizes
        members = by_category[start : start + count]
        kept = nms(boxes[members], scores[members], iou_threshold)
        keep_mask[members[kept]] = True
        start += count
    keep = torch.nonzero(keep_mask).view(-1)  # ascending index, so the stable sort breaks ties by index
    order = torch.sort(scores[keep], descending=True, stable=True).indices
    return keep[order]
