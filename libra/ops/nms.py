"""Non-maximum suppression: ``nms`` and class-aware ``batched_nms``.

Both return int64 indices of kept boxes sorted by decreasing score (ties: lower index
first). A box is suppressed when a kept box overlaps it with IoU strictly greater
than ``iou_threshold``; coordinates are continuous (no +1).

Drop-in for ``torchvision.ops.nms`` / ``batched_nms`` (including ``batched_nms`` of no boxes given
as ``torch.empty(0)``, which torchvision answers with an empty result), with two differences:

- Bad arguments (shapes, devices) raise ``ValueError`` from these wrappers, where
  torchvision raises ``RuntimeError``; the ops ``torch.ops.libra.*`` called directly
  raise ``RuntimeError``.
- ``batched_nms`` is exact: it keeps exactly the boxes that ``nms`` run on each group
  separately keeps. torchvision's coordinate trick (one ``nms`` on boxes shifted by
  ``idx * (max_coordinate + 1)``) rounds the shifted coordinates in float32 (to 1/8 px
  at LVIS's 1203 classes x 1333 px), which moves IoUs near the threshold and changes
  the kept set; libra uses no offsets (see ``batched_nms``).

Both compile with ``torch.jit.script``, as torchvision's do. The scripted forms call the compiled
ops directly after the same checks (they need ``libra._C``: no pure-PyTorch fallback), and the
scripted ``batched_nms`` always makes the one class-aware call (exact, like the per-group loop it
skips on very large CUDA inputs).
"""
import math

import torch
from torch import Tensor

from libra.ops._extension import use_extension
from libra.ops.nms_reference import nms_reference

# batched_nms makes one class-aware call (torch.ops.libra.batched_nms) unless there are
# more boxes than this, then one nms call per group from Python. Both are exact, so the
# choice is only about cost. The CPU kernel walks each group on its own (O(sum of
# n_group^2), no cost per group), so the loop never pays there. The CUDA kernel compares
# all pairs (O(N^2) time, N^2 / 8 bytes of mask) while the loop costs O(sum of
# n_group^2) plus a launch and a host sync per group.
PER_CLASS_LOOP_THRESHOLD = {"cpu": math.inf, "cuda": 20000}
# Without libra._C the fallback builds an N x N IoU matrix: loop over groups above this.
REFERENCE_PER_CLASS_LOOP_THRESHOLD = 4000


@torch.jit.unused
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
    if not torch.jit.is_scripting():
        return _nms_eager(boxes, scores, iou_threshold)
    # TorchScript (the branch above is left out when scripting): the checks with constant messages.
    _check_scripted(boxes, scores, "nms")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    return torch.ops.libra.nms(boxes, scores, float(iou_threshold))


@torch.jit.unused
def _nms_eager(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    _check_boxes_scores(boxes, scores, "nms")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    if use_extension(stacklevel=4):
        return torch.ops.libra.nms(boxes, scores, float(iou_threshold))
    return nms_reference(boxes, scores, float(iou_threshold))


def _check_scripted(boxes: Tensor, scores: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(name + ": boxes must be a [N, 4] tensor (x1, y1, x2, y2)")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(name + ": scores must be a [N] tensor with N = boxes.shape[0]")
    if scores.device != boxes.device:
        raise ValueError(name + ": boxes and scores must be on one device")


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category: boxes with different ``idxs`` never suppress each other.

    Exact for any number of groups and any coordinates: the result is exactly
    ``nms`` run on each group separately (in float32), merged by decreasing score (ties:
    lower index first). Both paths below guarantee it, and neither shifts coordinates:

    - up to ``PER_CLASS_LOOP_THRESHOLD[device]`` boxes (any number on the CPU; 4000
      without libra._C), one class-aware call, ``torch.ops.libra.batched_nms`` (or the
      reference with ``idxs``): a box is only compared with boxes of its own group. No
      host sync beyond the one for the output size that every CUDA NMS needs.
    - above it (CUDA beyond 20000 boxes, the fallback beyond 4000), one ``nms`` per
      group: cheaper than the single call's O(N^2), at one host sync for the group sizes
      plus one per group.

    The coordinate-offset trick (torchvision's: one NMS on boxes shifted by
    ``idx * (max_coordinate + 1)``) is not used: float32 has a 24-bit significand, so a
    shifted coordinate v is rounded to a multiple of ``2**(floor(log2(v)) - 23)``, e.g.
    1/8 px for 1203 LVIS classes x 1333 px (v ~ 1.6e6), which moves IoUs near the
    threshold and changes the kept set. The trick is exact only when every shifted
    coordinate is representable in float32 (e.g. integer coordinates with
    ``(max_coordinate + 1) * num_groups <= 2**24``); fractional coordinates can be
    rounded even with 2 groups, and checking the data would cost a host sync.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2); computed in float32. No boxes (``[0, 4]`` or
            ``torch.empty(0)``) give an empty result, scores and idxs then may be None.
        scores: [N].
        idxs: [N] integer category (or level, or image) of each box.
        iou_threshold: suppress when IoU > iou_threshold.

    Returns:
        [M] int64 indices into ``boxes`` of kept boxes, by decreasing score.

    Raises:
        ValueError: for bad shapes or devices (torchvision raises RuntimeError).
    """
    if not torch.jit.is_scripting():
        return _batched_nms_eager(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0 and boxes.dim() <= 2:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    _check_scripted(boxes, scores, "batched_nms")
    if idxs.shape != scores.shape:
        raise ValueError("batched_nms: idxs must be a [N] tensor like scores")
    idxs = idxs.to(device=boxes.device, dtype=torch.int64)
    return torch.ops.libra.batched_nms(boxes.float(), scores, idxs, float(iou_threshold))


@torch.jit.unused
def _batched_nms_eager(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    if isinstance(boxes, Tensor) and boxes.numel() == 0 and boxes.dim() <= 2:
        # No boxes (also torch.empty(0), as torchvision accepts, with scores / idxs None or empty).
        for name, value in (("scores", scores), ("idxs", idxs)):
            if value is not None and (not isinstance(value, Tensor) or value.numel() != 0):
                raise ValueError(f"batched_nms: boxes are empty but {name} has {getattr(value, 'shape', type(value))}.")
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    _check_boxes_scores(boxes, scores, "batched_nms")
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        raise ValueError(f"batched_nms: idxs must be a [N] tensor like scores, got {getattr(idxs, 'shape', type(idxs))}.")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.float()
    # Groups are compared as int64 on the boxes' device; like torchvision, float labels and
    # idxs on another device are accepted (float labels are truncated).
    idxs = idxs.to(device=boxes.device, dtype=torch.int64)
    compiled = use_extension(stacklevel=4)
    threshold = REFERENCE_PER_CLASS_LOOP_THRESHOLD
    if compiled:
        threshold = PER_CLASS_LOOP_THRESHOLD.get(boxes.device.type, REFERENCE_PER_CLASS_LOOP_THRESHOLD)
    if boxes.shape[0] > threshold:
        return _batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    if compiled:
        return torch.ops.libra.batched_nms(boxes, scores, idxs, float(iou_threshold))
    return nms_reference(boxes, scores, float(iou_threshold), idxs)


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
