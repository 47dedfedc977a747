"""Pure-PyTorch greedy non-maximum suppression: definition, test oracle and fallback.

Greedy NMS visits boxes by decreasing score (ties: lower index first, i.e. a stable
sort) and keeps a box unless a kept box overlaps it with IoU strictly greater than
``iou_threshold``. Coordinates are continuous: area = (x2 - x1) * (y2 - y1), no +1.
The IoU matrix is computed at once; only the greedy walk, which is inherently
sequential, loops over boxes. With ``idxs`` (class-aware NMS, ``batched_nms``) only
boxes of the same group suppress each other.
"""
import torch
from torch import Tensor


def pairwise_iou(boxes: Tensor) -> Tensor:
    """[N, 4] boxes -> [N, N] IoU, computed exactly like the kernels (same op order)."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    inter_w = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp(min=0)
    inter_h = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp(min=0)
    inter = inter_w * inter_h
    return inter / (areas[:, None] + areas[None, :] - inter)


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None) -> Tensor:
    """Greedy NMS.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2).
        scores: [N].
        iou_threshold: a box is suppressed by a kept box when IoU > iou_threshold.
        idxs: optional [N] integer group of each box; boxes of different groups never
            suppress each other (exactly NMS on each group, merged by score).

    Returns:
        [M] int64 indices of the kept boxes, sorted by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    compute_dtype = torch.float32 if boxes.dtype in (torch.float16, torch.bfloat16) else boxes.dtype
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes.detach().to(compute_dtype)[order]
    # suppresses[i, j]: box i (in score order) would suppress box j. NaN IoU -> False.
    suppresses = pairwise_iou(sorted_boxes) > iou_threshold
    if idxs is not None:
        sorted_idxs = idxs.to(order.device)[order]
        suppresses &= sorted_idxs[:, None] == sorted_idxs[None, :]
    suppresses = suppresses.cpu()
    removed = torch.zeros(order.numel(), dtype=torch.bool)
    keep = torch.zeros(order.numel(), dtype=torch.bool)
    for i in range(order.numel()):
        if removed[i]:
            continue
        keep[i] = True
        removed |= suppresses[i]
    return order[keep.to(order.device)]
