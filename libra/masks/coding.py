"""Instance masks as the annotation files and the evaluators write them: polygons and RLE.

    annotation (polygons / RLE)  --decode_masks-->  [G, h0, w0] uint8, original image
    predicted masks              --encode_rle-->    COCO RLE dicts for pycocotools' COCOeval ('segm')

Decoding uses pycocotools (``frPyObjects`` / ``merge`` / ``decode``) after checking every
annotation, so a bad one fails with :class:`InvalidMaskError` (or is dropped with a
:class:`MaskWarning`) naming its image and annotation, never deep inside the C code.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

__all__ = [
    "InvalidMaskError", "MaskWarning", "check_segmentation", "decode_masks", "decode_segmentation", "encode_rle",
    "rle_counts_from_string",
]


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


def _check_rle(segmentation: dict, height: int, width: int) -> dict:
    """Check an RLE dict (compressed string or uncompressed list of counts) against the image; returns
    the RLE pycocotools decodes (``counts`` as bytes, or compressed from the list)."""
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
        return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    if isinstance(counts, (list, tuple)):
        if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        _check_counts(counts, height, width)
        return mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)
    raise ValueError(f"RLE 'counts' must be a string (compressed) or a list of integers, got {type(counts).__name__}")


_PLAIN_NUMBERS = frozenset((int, float))  # JSON's numbers: checked by type, without the ABC machinery
# A vertex further than this many image sizes outside the image is an annotation bug (the boxes' rule,
# libra.data.base.ABSURD_BOX_FACTOR).
_ABSURD = 10.0


def _polygon_parts(segmentation: list, height: int, width: int) -> tuple[list[list[float]], list[str]]:
    """Split a polygon list into valid parts and the reasons the other parts are invalid (about 3 us
    per 40-coordinate polygon on a shared core: the training split of COCO, 860k annotations, in about 5 s)."""
    if len(segmentation) == 0:
        raise ValueError("empty polygon list")
    if all(isinstance(v, numbers.Number) for v in segmentation):
        raise ValueError("polygons must be a list of [x1, y1, x2, y2, ...] lists, got one flat list of numbers")
    valid, problems = [], []
    x_low = y_low = math.inf
    x_high = y_high = -math.inf
    for index, part in enumerate(segmentation):
        if isinstance(part, list) and set(map(type, part)) <= _PLAIN_NUMBERS:
            coords = part  # the annotation's own list (ints and floats), not copied
        elif isinstance(part, (list, tuple, np.ndarray)) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in part
        ):
            coords = [float(v) for v in part]
        else:
            problems.append(f"polygon {index} is not a list of numbers")
            continue
        if len(coords) % 2 or len(coords) < 6:
            problems.append(f"polygon {index} has {len(coords)} coordinates (needs an even number >= 6, i.e. >= 3 points)")
        elif not all(map(math.isfinite, coords)):
            problems.append(f"polygon {index} has a non-finite coordinate")
        else:
            xs, ys = coords[0::2], coords[1::2]
            valid.append((index, coords, (min(xs), max(xs)), (min(ys), max(ys))))
    for _, _, (part_x_low, part_x_high), (part_y_low, part_y_high) in valid:
        x_low, x_high = min(x_low, part_x_low), max(x_high, part_x_high)
        y_low, y_high = min(y_low, part_y_low), max(y_high, part_y_high)
    if valid and (x_high <= 0 or x_low >= width or y_high <= 0 or y_low >= height):
        raise ValueError(
            f"the polygon lies entirely outside the image (x {x_low:g}..{x_high:g}, y {y_low:g}..{y_high:g}; "
            f"image width {width}, height {height})"
        )
    kept = []
    for index, coords, (part_x_low, part_x_high), (part_y_low, part_y_high) in valid:
        if (part_x_low < -_ABSURD * width or part_x_high > (_ABSURD + 1) * width
                or part_y_low < -_ABSURD * height or part_y_high > (_ABSURD + 1) * height):
            # pycocotools rasterises every edge pixel by pixel: a vertex at 1e9 takes hours.
            problems.append(f"polygon {index} reaches x {part_x_low:g}..{part_x_high:g}, y {part_y_low:g}..{part_y_high:g}, "
                            f"more than {_ABSURD:g} image sizes outside the {width} x {height} image")
        else:
            kept.append(coords)
    return kept, problems


def check_segmentation(
    segmentation: Any,
    height: int,
    width: int,
    image_id: Any = None,
    ann_id: Any = None,
    strict: bool = True,
) -> dict | list[list[float]]:
    """Check one COCO/LVIS segmentation against its ``height`` x ``width`` image without decoding it
    (the checks of :func:`decode_segmentation`, which calls this first).

    Returns what pycocotools can decode safely: the polygon parts (with ``strict=False`` only the
    valid ones, the others dropped with a :class:`MaskWarning`), or the checked RLE dict.

    Raises:
        InvalidMaskError: see :func:`decode_segmentation`. Nothing that fails here reaches
            pycocotools (whose C code raises TypeErrors, or loops for hours on an RLE claiming
            billions of pixels).
    """
    where = _where(image_id, ann_id)
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise InvalidMaskError(f"{where}: the image size must be positive, got (height, width) = ({height}, {width})")
    try:
        if segmentation is None:
            raise ValueError("no segmentation")
        if isinstance(segmentation, dict):
            return _check_rle(segmentation, height, width)
        if isinstance(segmentation, (list, tuple)):
            parts, problems = _polygon_parts(list(segmentation), height, width)
            if problems and (strict or not parts):
                raise ValueError("; ".join(problems))
            if problems:
                warnings.warn(f"{where}: dropped invalid polygon parts: {'; '.join(problems)}", MaskWarning, stacklevel=3)
            return parts
        raise ValueError(f"unsupported segmentation type {type(segmentation).__name__} (expected polygons or an RLE dict)")
    except InvalidMaskError:
        raise
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidMaskError(f"{where}: invalid segmentation: {error}") from None


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
            that do not sum to ``height * width``) or an RLE whose size is not the image's
            (:func:`check_segmentation`).
    """
    checked = check_segmentation(segmentation, height, width, image_id, ann_id, strict)
    height, width = int(height), int(width)
    try:
        if isinstance(checked, dict):
            bitmap = mask_utils.decode(checked)
        else:
            bitmap = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(checked, height, width)))
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidMaskError(f"{_where(image_id, ann_id)}: invalid segmentation: {error}") from None
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
