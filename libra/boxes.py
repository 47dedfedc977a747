"""Box geometry on ``[x1, y1, x2, y2]`` tensors.

Convention (MMDetection v2+ and Detectron2): continuous coordinates, width = x2 - x1 and
height = y2 - y1, with no "+1" anywhere. Every function here is vectorised and
stays on the device of its inputs, except :func:`check_boxes`, which has to
read a flag back to the host to raise its error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Guards divisions by the area/union of degenerate (zero-area) boxes, so that
# they give IoU 0 instead of NaN.
_EPS = 1e-6


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box.

    Args:
        boxes: ``[N, 4]`` (or ``[..., 4]``) boxes ``x1, y1, x2, y2``.

    Returns:
        ``[N]`` (or ``[...]``) areas ``(x2 - x1) * (y2 - y1)``.
    """
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_intersection(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """``[N, M]`` intersection areas of every box of ``boxes_a`` with every box of ``boxes_b``."""
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
    width_height = (bottom_right - top_left).clamp(min=0)
    return width_height[..., 0] * width_height[..., 1]


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Intersection over union of every pair.

    Args:
        boxes_a: ``[N, 4]`` boxes.
        boxes_b: ``[M, 4]`` boxes.

    Returns:
        ``[N, M]`` IoU in ``[0, 1]``; a pair whose union is empty gives 0.
    """
    intersection = _pairwise_intersection(boxes_a, boxes_b)
    union = box_area(boxes_a)[:, None] + box_area(boxes_b)[None, :] - intersection
    return intersection / union.clamp(min=_EPS)


def box_iof(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Intersection over the area of the *first* box ("intersection over foreground").

    Used to find boxes lying mostly inside an ignore (crowd) region: the crowd
    region may be much larger than the box, so IoU would be small.

    Args:
        boxes_a: ``[N, 4]`` boxes whose own area is the denominator.
        boxes_b: ``[M, 4]`` boxes (e.g. ignore regions).

    Returns:
        ``[N, M]`` values in ``[0, 1]``; a zero-area box of ``boxes_a`` gives 0.
    """
    intersection = _pairwise_intersection(boxes_a, boxes_b)
    return intersection / box_area(boxes_a)[:, None].clamp(min=_EPS)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip boxes to the image ``[0, w] x [0, h]``.

    Args:
        boxes: ``[..., 4]`` boxes.
        image_size: ``(h, w)`` of the (unpadded) image.

    Returns:
        ``[..., 4]`` clipped boxes (a new tensor).
    """
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1
    )


def check_boxes(boxes: Tensor, name: str) -> None:
    """Raise a ValueError unless ``boxes`` is a finite ``[N, 4]`` tensor with x2 >= x1 and y2 >= y1.

    Meant for ground truth. This reads one flag back from the device (a host
    sync), so callers on a hot path make it optional.

    Args:
        boxes: tensor that should be ``[N, 4]`` boxes ``x1, y1, x2, y2``.
        name: what the boxes are, used in the error message (e.g. ``"gt_boxes"``).
    """
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [N, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {boxes.dtype}")
    if boxes.numel() == 0:
        return
    not_finite = ~torch.isfinite(boxes).all(dim=1)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    bad = not_finite | inverted
    if bool(bad.any()):  # the one host sync of this module
        row = int(torch.argmax(bad.to(torch.uint8)))
        reason = "a NaN or infinite coordinate" if bool(not_finite[row]) else "x2 < x1 or y2 < y1"
        raise ValueError(
            f"{name} row {row} = {boxes[row].tolist()} has {reason}; boxes must be finite "
            f"[x1, y1, x2, y2] with x2 >= x1 and y2 >= y1 (fix or drop such boxes in the data loader)"
        )


def clip_boxes_per_image(boxes: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """Clip ``[B, ..., 4]`` boxes to each image's own ``(h, w)``.

    A loop over the (few) images with Python-scalar bounds: building a bounds tensor from
    host values would be a host-to-device copy, which blocks on CUDA.
    """
    return torch.stack([clip_boxes(image_boxes, size) for image_boxes, size in zip(boxes, image_sizes)])
