"""Instance masks for Mask R-CNN: decoding, data-pipeline transforms, training targets, pasting
and RLE encoding.

Coordinates. A mask bitmap ``[H, W]`` lives in the same continuous coordinates as the boxes
(``[x1, y1, x2, y2]``, width ``x2 - x1``, no +1): pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``, which is what RoIAlign with
``aligned=True`` and ``grid_sample`` with ``align_corners=False`` assume.

Where each piece runs (MMDetection ``configs/_base_/models/mask-rcnn_r50_fpn.py`` and
``configs/_base_/datasets/coco_instance.py``, ``mask-rcnn_r50_fpn_1x_coco``):

    annotation (polygons / RLE)  --decode_masks-->      [G, h0, w0] uint8, original image
    --resize_masks (nearest) --hflip_masks --pad_masks--> [G, H, W] in the resized, flipped,
                                                          padded image, like the boxes
    positive RoIs + matched gt   --mask_targets-->      [R, 28, 28] binary training targets
    mask head probabilities      --paste_masks_in_image--> [D, h0, w0] bool, original image
    --encode_rle-->              COCO RLE dicts for pycocotools' COCOeval ('segm')

Decoding uses pycocotools (``frPyObjects`` / ``merge`` / ``decode``) after checking every
annotation, so a bad one fails with :class:`InvalidMaskError` (or is dropped with a
:class:`MaskWarning`) naming its image and annotation, never deep inside the C code.
Transforms, targets and pasting are tensor ops on whole stacks (no Python loop over instances,
RoIs or detections; pasting loops over a few chunks of detections only to bound memory).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

from libra.ops import roi_align

__all__ = [
    "InvalidMaskError",
    "MaskWarning",
    "decode_segmentation",
    "decode_masks",
    "resize_masks",
    "hflip_masks",
    "pad_masks",
    "mask_targets",
    "paste_masks_in_image",
    "encode_rle",
    "rle_counts_from_string",
]

# Mask R-CNN defaults (MMDetection `mask-rcnn_r50_fpn.py`): `train_cfg.rcnn.mask_size=28`,
# `test_cfg.rcnn.mask_thr_binary=0.5`.
MASK_SIZE: int = 28
MASK_THRESHOLD: float = 0.5
# Float elements of one pasting chunk (2 ** 25 float32 = 128 MiB per intermediate tensor).
PASTE_CHUNK_ELEMENTS: int = 1 << 25


class InvalidMaskError(ValueError):
    """A segmentation annotation that cannot be decoded; the message names the image and
    annotation and says what is wrong."""


class MaskWarning(UserWarning):
    """A bad segmentation (or polygon part) that was dropped instead of raising."""


# ----------------------------------------------------------------------------- decoding
def _where(image_id: Any, ann_id: Any) -> str:
    parts = []
    if image_id is not None:
        parts.append(f"image {image_id}")
    if ann_id is not None:
        parts.append(f"annotation {ann_id}")
    return ", ".join(parts) if parts else "segmentation"


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string.

    The format (pycocotools ``rleToString``): each run length is written as 5-bit groups, least
    significant first, in characters ``48 + group`` where bit 0x20 says another group follows and
    the last group's bit 0x10 is the sign; from the third run on, the value is the difference to
    the run two places before.

    Raises:
        ValueError: a character outside ``'0'..'o'`` or a string that ends inside a number.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    values: list[int] = []
    position, length = 0, len(data)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position >= length:
                raise ValueError("the RLE string ends inside a run length (truncated)")
            group = data[position] - 48
            if not 0 <= group < 64:
                raise ValueError(f"the RLE string has an invalid character {chr(data[position])!r} at {position}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign-extend
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def _check_counts(counts: Sequence[int], height: int, width: int) -> None:
    if any(c < 0 for c in counts):
        raise ValueError("the RLE has a negative run length")
    total = sum(counts)
    if total != height * width:
        raise ValueError(f"the RLE run lengths sum to {total}, but the mask has {height} x {width} = {height * width} pixels")


def _decode_rle(segmentation: dict, height: int, width: int) -> np.ndarray:
    """Check and decode an RLE dict (compressed string or uncompressed list of counts)."""
    if "size" not in segmentation or "counts" not in segmentation:
        raise ValueError(f"an RLE needs 'size' and 'counts', got keys {sorted(segmentation)}")
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(s, numbers.Integral) for s in size):
        raise ValueError(f"the RLE 'size' must be [height, width] integers, got {size!r}")
    if (int(size[0]), int(size[1])) != (height, width):
        raise ValueError(f"the RLE size [{size[0]}, {size[1]}] does not match the image (height, width) = ({height}, {width})")
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        _check_counts(rle_counts_from_string(counts), height, width)
        rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    elif isinstance(counts, (list, tuple)):
        if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        _check_counts(counts, height, width)
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    else:
        raise ValueError(f"RLE 'counts' must be a string (compressed) or a list of integers, got {type(counts).__name__}")
    return mask_utils.decode(rle)


def _polygon_parts(segmentation: list, height: int, width: int) -> tuple[list[list[float]], list[str]]:
    """Split a polygon list into valid parts and the reasons the other parts are invalid."""
    if len(segmentation) == 0:
        raise ValueError("empty polygon list")
    if all(isinstance(v, numbers.Number) for v in segmentation):
        raise ValueError("polygons must be a list of [x1, y1, x2, y2, ...] lists, got one flat list of numbers")
    valid, problems = [], []
    for index, part in enumerate(segmentation):
        if not isinstance(part, (list, tuple, np.ndarray)) or not all(isinstance(v, numbers.Real) for v in part):
            problems.append(f"polygon {index} is not a list of numbers")
            continue
        coords = [float(v) for v in part]
        if len(coords) % 2 or len(coords) < 6:
            problems.append(f"polygon {index} has {len(coords)} coordinates (needs an even number >= 6, i.e. >= 3 points)")
        elif not all(math.isfinite(v) for v in coords):
            problems.append(f"polygon {index} has a non-finite coordinate")
        else:
            valid.append(coords)
    if valid:
        xs = [v for part in valid for v in part[0::2]]
        ys = [v for part in valid for v in part[1::2]]
        if max(xs) <= 0 or min(xs) >= width or max(ys) <= 0 or min(ys) >= height:
            raise ValueError(
                f"the polygon lies entirely outside the image (x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g}; "
                f"image width {width}, height {height})"
            )
    return valid, problems


def decode_segmentation(
    segmentation: Any,
    height: int,
    width: int,
    image_id: Any = None,
    ann_id: Any = None,
    strict: bool = True,
) -> np.ndarray:
    """Decode one COCO/LVIS segmentation into a bitmap.

    Args:
        segmentation: polygons (a list of ``[x1, y1, x2, y2, ...]`` lists, in pixels of the
            original image), or an RLE dict ``{"size": [height, width], "counts": ...}`` with
            compressed (str/bytes) or uncompressed (list of int) counts.
        height, width: the image's size (the RLE size must equal it).
        image_id, ann_id: named in error messages.
        strict: raise for an invalid polygon part; with False, invalid parts (odd or fewer than 6
            coordinates, non-finite) are dropped with a :class:`MaskWarning` as long as one valid
            part remains (MMDetection's ``LoadAnnotations`` drops such parts too).

    Returns:
        ``[height, width]`` uint8 bitmap (0/1), C-contiguous. A valid polygon or RLE may decode
        to an empty bitmap (e.g. a sliver thinner than a pixel); that is not an error.

    Raises:
        InvalidMaskError: no segmentation, an empty polygon list, no valid polygon, a polygon
            entirely outside the image, a malformed RLE (bad characters, truncated, run lengths
            that do not sum to ``height * width``) or an RLE whose size is not the image's.
    """
    where = _where(image_id, ann_id)
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise InvalidMaskError(f"{where}: the image size must be positive, got (height, width) = ({height}, {width})")
    try:
        if segmentation is None:
            raise ValueError("no segmentation")
        if isinstance(segmentation, dict):
            bitmap = _decode_rle(segmentation, height, width)
        elif isinstance(segmentation, (list, tuple)):
            parts, problems = _polygon_parts(list(segmentation), height, width)
            if problems and (strict or not parts):
                raise ValueError("; ".join(problems))
            if problems:
                warnings.warn(f"{where}: dropped invalid polygon parts: {'; '.join(problems)}", MaskWarning, stacklevel=2)
            bitmap = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width)))
        else:
            raise ValueError(f"unsupported segmentation type {type(segmentation).__name__} (expected polygons or an RLE dict)")
    except InvalidMaskError:
        raise
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidMaskError(f"{where}: invalid segmentation: {error}") from None
    return np.ascontiguousarray(bitmap, dtype=np.uint8)


def decode_masks(
    segmentations: Sequence[Any],
    height: int,
    width: int,
    image_id: Any = None,
    ann_ids: Sequence[Any] | None = None,
    on_invalid: str = "raise",
) -> tuple[Tensor, np.ndarray]:
    """Decode the segmentations of one image's instances into a mask stack.

    Args:
        segmentations: G segmentations (see :func:`decode_segmentation`), one per instance.
        height, width: the original image size.
        image_id, ann_ids: named in errors and warnings (``ann_ids``: G annotation ids).
        on_invalid: ``"raise"``: the first bad segmentation raises :class:`InvalidMaskError`;
            ``"warn"``: bad instances are dropped with a :class:`MaskWarning` (and bad polygon
            parts of otherwise valid instances too), and ``keep`` says which instances remain,
            so that the caller drops their boxes and labels as well.

    Returns:
        masks: ``[G', height, width]`` uint8 (0/1) in original image coordinates, the kept
            instances in their input order.
        keep: ``[G]`` bool numpy array, True for the instances in ``masks``.
    """
    if on_invalid not in ("raise", "warn"):
        raise ValueError(f"on_invalid must be 'raise' or 'warn', got {on_invalid!r}")
    if ann_ids is not None and len(ann_ids) != len(segmentations):
        raise ValueError(f"got {len(segmentations)} segmentations but {len(ann_ids)} annotation ids")
    bitmaps: list[np.ndarray] = []
    keep = np.ones(len(segmentations), dtype=bool)
    for index, segmentation in enumerate(segmentations):
        ann_id = ann_ids[index] if ann_ids is not None else None
        try:
            bitmaps.append(decode_segmentation(segmentation, height, width, image_id, ann_id, strict=on_invalid == "raise"))
        except InvalidMaskError as error:
            if on_invalid == "raise":
                raise
            warnings.warn(f"{error}; the instance is dropped", MaskWarning, stacklevel=2)
            keep[index] = False
    if not bitmaps:
        return torch.zeros((0, int(height), int(width)), dtype=torch.uint8), keep
    return torch.from_numpy(np.stack(bitmaps)), keep


# ----------------------------------------------------------------------------- transforms
def _check_stack(masks: Tensor, what: str) -> None:
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"{what}: masks must be a [G, H, W] tensor, got {getattr(masks, 'shape', type(masks))}")


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a mask stack ``[G, h, w]`` to ``size = (new_h, new_w)``.

    Source pixel of output ``(i, j)``: ``(floor(i * h / new_h), floor(j * w / new_w))``, the
    legacy nearest rule of cv2's ``INTER_NEAREST`` that mmcv's ``BitmapMasks.rescale`` uses
    (``interpolation='nearest'``). Use the image's resized size so masks and boxes agree.

    Returns:
        ``[G, new_h, new_w]`` in the dtype of ``masks`` (uint8, bool or float).
    """
    _check_stack(masks, "resize_masks")
    new_h, new_w = int(size[0]), int(size[1])
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"resize_masks: size must be positive, got {tuple(size)}")
    if tuple(masks.shape[-2:]) == (new_h, new_w):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, new_h, new_w))
    source = masks.to(torch.uint8) if masks.dtype == torch.bool else masks
    resized = F.interpolate(source[None], size=(new_h, new_w), mode="nearest")[0]
    return resized.to(masks.dtype)


def hflip_masks(masks: Tensor) -> Tensor:
    """Mirror a mask stack ``[G, H, W]`` left-right (column j -> W - 1 - j), matching
    ``hflip_boxes`` (x -> W - x) in the same image width."""
    _check_stack(masks, "hflip_masks")
    return masks.flip(-1)


def pad_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad a mask stack ``[G, h, w]`` bottom-right to ``size = (H, W)`` (the padded batch
    size of the images), so that masks and padded images share coordinates.

    Returns:
        ``[G, H, W]``, same dtype.
    """
    _check_stack(masks, "pad_masks")
    height, width = int(size[0]), int(size[1])
    h, w = int(masks.shape[-2]), int(masks.shape[-1])
    if height < h or width < w:
        raise ValueError(f"pad_masks: cannot pad masks of size ({h}, {w}) to the smaller size ({height}, {width})")
    if (height, width) == (h, w):
        return masks
    padded = masks.new_zeros((masks.shape[0], height, width))
    padded[:, :h, :w] = masks
    return padded


# ----------------------------------------------------------------------------- training targets
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
def encode_rle(masks: Tensor | np.ndarray) -> list[dict]:
    """COCO RLEs of a mask stack ``[D, H, W]`` (bool / 0-1), for COCO ``segm`` results.

    Returns:
        D dicts ``{"size": [H, W], "counts": str}`` (pycocotools' compressed counts decoded to
        ASCII so that they can be written as JSON and pickled across ranks).
    """
    if isinstance(masks, Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_rle: masks must be [D, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    # pycocotools encodes column-major [H, W, D] uint8.
    stacked = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8, copy=False))
    rles = mask_utils.encode(stacked)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
        rle["size"] = [int(s) for s in rle["size"]]
    return rles
