"""Instance masks in the model: 28 x 28 training targets of the positive RoIs, and the predicted
probabilities pasted back into the original image.

    positive RoIs + matched gt   --mask_targets-->          [R, 28, 28] binary training targets
    mask head probabilities      --paste_masks_in_image-->  [D, h0, w0] bool, original image

Tensor ops on whole stacks (no Python loop over RoIs or detections; pasting loops over a few
chunks of detections only to bound memory).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from libra.ops import roi_align

from .transforms import pad_masks

__all__ = ["MASK_SIZE", "MASK_THRESHOLD", "PASTE_CHUNK_ELEMENTS", "mask_targets", "paste_masks_in_image"]

# Mask R-CNN defaults (MMDetection `mask-rcnn_r50_fpn.py`): `train_cfg.rcnn.mask_size=28`,
# `test_cfg.rcnn.mask_thr_binary=0.5`.
MASK_SIZE: int = 28
MASK_THRESHOLD: float = 0.5
# Float elements of one pasting chunk (2 ** 25 float32 = 128 MiB per intermediate tensor).
PASTE_CHUNK_ELEMENTS: int = 1 << 25


def _stack_batch_masks(gt_masks: Tensor | Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """All gt masks of the batch as ``[sum G, 1, H, W]`` float32 plus the ``[B]`` index of each
    image's first mask in that stack."""
    if isinstance(gt_masks, Tensor):
        if gt_masks.dim() != 4:
            raise ValueError(f"mask_targets: a gt_masks tensor must be [B, G, H, W], got {tuple(gt_masks.shape)}")
        batch, per_image = int(gt_masks.shape[0]), int(gt_masks.shape[1])
        stack = gt_masks.reshape(batch * per_image, 1, *gt_masks.shape[-2:])
        offsets = torch.arange(batch, device=device) * per_image
        return stack.to(device=device, dtype=torch.float32), offsets
    masks = list(gt_masks)
    if not masks:
        raise ValueError("mask_targets: gt_masks is empty; pass one [G_i, H, W] mask stack per image")
    for index, m in enumerate(masks):
        if not isinstance(m, Tensor) or m.dim() != 3:
            raise ValueError(f"mask_targets: gt_masks[{index}] must be a [G_i, H, W] tensor, got {getattr(m, 'shape', type(m))}")
    height = max(int(m.shape[-2]) for m in masks)
    width = max(int(m.shape[-1]) for m in masks)
    counts = [int(m.shape[0]) for m in masks]
    stack = torch.cat([pad_masks(m.to(device=device, dtype=torch.float32), (height, width)) for m in masks])
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)
    offsets = torch.tensor(starts, dtype=torch.int64, device=device)
    return stack[:, None], offsets


def mask_targets(
    gt_masks: Tensor | Sequence[Tensor],
    matched_gt: Tensor,
    rois: Tensor,
    mask_size: int = MASK_SIZE,
    sampling_ratio: int = 0,
    threshold: float = 0.5,
) -> Tensor:
    """Binary mask targets of RoIs: each RoI's matched gt mask cropped to the RoI and resized.

    One RoIAlign call over all RoIs of the batch: the gt masks of all images are stacked and each
    RoI's batch index becomes the position of its matched gt mask in that stack, so no mask is
    copied per RoI. RoIAlign uses ``aligned=True`` and ``sampling_ratio=0`` (adaptive, ceil(roi
    side / mask_size) samples per bin) and the result is binarised at ``>= 0.5``, as MMDetection's
    ``BitmapMasks.crop_and_resize`` does for ``mask_target`` (``train_cfg.rcnn.mask_size=28``).

    Args:
        gt_masks: per image ``[G_i, H_i, W_i]`` masks (uint8/bool/float, 0/1) in the coordinates of
            ``rois`` (the resized, flipped image; padding optional: stacks of different sizes are
            zero-padded bottom-right to the largest), or one padded tensor ``[B, G, H, W]``.
        matched_gt: ``[R]`` int64 index of each RoI's gt within its image (``SampledRoIs.matched_gt``),
            ``< 0`` for RoIs without one (their target is all zeros). Indices must be below that
            image's G_i (not checked, to avoid a host sync).
        rois: ``[R, 5]`` ``(image_index, x1, y1, x2, y2)`` in resized-image pixels.
        mask_size: side M of the targets (28).
        sampling_ratio: RoIAlign samples per bin side; <= 0 adaptive.
        threshold: binarisation threshold of the resampled mask.

    Returns:
        ``[R, M, M]`` float32 of 0/1 on ``rois.device`` (no gradient).
    """
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"mask_targets: rois must be [R, 5] (image_index, x1, y1, x2, y2), got {tuple(rois.shape)}")
    if matched_gt.shape != rois.shape[:1]:
        raise ValueError(f"mask_targets: matched_gt must be [R] = [{rois.shape[0]}], got {tuple(matched_gt.shape)}")
    device = rois.device
    num_rois = int(rois.shape[0])
    with torch.no_grad():
        stack, offsets = _stack_batch_masks(gt_masks, device)
        if num_rois == 0 or stack.shape[0] == 0:
            return torch.zeros((num_rois, mask_size, mask_size), dtype=torch.float32, device=device)
        matched_gt = matched_gt.to(device=device, dtype=torch.int64)
        has_gt = matched_gt >= 0
        image_index = rois[:, 0].long().clamp(0, offsets.numel() - 1)
        mask_index = (offsets[image_index] + matched_gt.clamp(min=0)).clamp(max=stack.shape[0] - 1)
        mask_rois = torch.cat([mask_index[:, None].to(torch.float32), rois[:, 1:].to(torch.float32)], dim=1)
        resampled = roi_align(stack, mask_rois, mask_size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=True)
        targets = (resampled[:, 0] >= threshold) & has_gt[:, None, None]
        return targets.to(torch.float32)


# ----------------------------------------------------------------------------- test-time pasting
def _axis_taps(start: Tensor, end: Tensor, cells: int, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear-interpolation taps along one image axis for every detection.

    Pixel centre ``p + 0.5`` of the image axis falls at ``(p + 0.5 - start) * cells / (end -
    start) - 0.5`` in mask-cell units (cell centres at integers), i.e. ``grid_sample`` with
    ``align_corners=False``. Taps outside ``[0, cells - 1]`` get weight 0 (zero padding).

    Returns:
        low, high: ``[D, length]`` int64 cell indices (clamped into range),
        weight_low, weight_high: ``[D, length]`` float32 weights.
    """
    centres = torch.arange(length, device=start.device, dtype=torch.float32) + 0.5
    extent = (end - start).clamp(min=1e-6)
    source = (centres[None, :] - start[:, None]) * (cells / extent)[:, None] - 0.5
    # Non-finite boxes sample nothing; clamping keeps far-away samples out of range on both taps.
    source = torch.nan_to_num(source, nan=-2.0, posinf=cells + 1.0, neginf=-2.0).clamp(-2.0, cells + 1.0)
    low_f = source.floor()
    frac = source - low_f
    low = low_f.long()
    high = low + 1
    weight_low = (1.0 - frac) * ((low >= 0) & (low < cells))
    weight_high = frac * ((high >= 0) & (high < cells))
    return low.clamp(0, cells - 1), high.clamp(0, cells - 1), weight_low, weight_high


def _paste_chunk(probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resampling of ``probs [d, Mh, Mw]`` into ``[d, height, width]`` float32."""
    count, cells_h, cells_w = probs.shape
    y_low, y_high, wy_low, wy_high = _axis_taps(boxes[:, 1], boxes[:, 3], cells_h, height)
    x_low, x_high, wx_low, wx_high = _axis_taps(boxes[:, 0], boxes[:, 2], cells_w, width)
    # Bilinear interpolation is separable: interpolate the mask rows first ([d, height, Mw]) ...
    rows = probs.gather(1, y_low[:, :, None].expand(count, height, cells_w)) * wy_low[:, :, None]
    rows.addcmul_(probs.gather(1, y_high[:, :, None].expand(count, height, cells_w)), wy_high[:, :, None])
    # ... then the columns ([d, height, width]).
    out = rows.gather(2, x_low[:, None, :].expand(count, height, width)).mul_(wx_low[:, None, :])
    out.addcmul_(rows.gather(2, x_high[:, None, :].expand(count, height, width)), wx_high[:, None, :])
    return out


def paste_masks_in_image(
    mask_probs: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float | None = MASK_THRESHOLD,
    chunk_elements: int = PASTE_CHUNK_ELEMENTS,
) -> Tensor:
    """Paste per-detection mask probabilities into full images.

    Every image pixel is sampled at its centre ``(x + 0.5, y + 0.5)``, mapped into its
    detection's box and bilinearly interpolated from the ``M x M`` mask, whose cells tile the box
    (``grid_sample(align_corners=False)`` with zero padding: a pixel whose centre is more than half
    a mask cell outside the box gets 0; within that half cell the edge values blend with 0).
    This is MMDetection's ``_do_paste_mask`` on the full image, followed by
    ``>= mask_thr_binary`` (0.5, ``test_cfg.rcnn``). It runs on the device of ``mask_probs`` in
    chunks of detections holding at most ``chunk_elements`` pixels (memory), separable per axis.

    Args:
        mask_probs: ``[D, Mh, Mw]`` probabilities (sigmoid of the detected class's channel; see
            ``mask_probs_for_labels``); computed in float32.
        boxes: ``[D, 4]`` ``(x1, y1, x2, y2)`` in the coordinates of the output image, i.e. the
            ORIGINAL image when pasting for evaluation (the mask head itself runs on the boxes in
            resized-image coordinates).
        image_size: ``(H0, W0)`` of the output.
        threshold: binarisation threshold, or None for the soft probabilities.

    Returns:
        ``[D, H0, W0]`` bool (``>= threshold``), or float32 when ``threshold`` is None.
    """
    if mask_probs.dim() != 3:
        raise ValueError(f"paste_masks_in_image: mask_probs must be [D, M, M], got {tuple(mask_probs.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != mask_probs.shape[0]:
        raise ValueError(
            f"paste_masks_in_image: boxes must be [D, 4] with D = {mask_probs.shape[0]}, got {tuple(boxes.shape)}"
        )
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"paste_masks_in_image: image_size must be positive, got {tuple(image_size)}")
    device = mask_probs.device
    probs = mask_probs.to(torch.float32)
    boxes = boxes.to(device=device, dtype=torch.float32)
    count = int(probs.shape[0])
    out = torch.empty((count, height, width), dtype=torch.float32 if threshold is None else torch.bool, device=device)
    step = max(1, int(chunk_elements) // (height * width))
    for first in range(0, count, step):
        chunk = _paste_chunk(probs[first : first + step], boxes[first : first + step], height, width)
        out[first : first + step] = chunk if threshold is None else chunk >= threshold
    return out


# ----------------------------------------------------------------------------- evaluation
