"""Instance masks for Mask R-CNN, one file per place they are used: ``coding`` (polygons and RLE of
the annotation files and the evaluators), ``transforms`` (the data pipeline), ``targets`` (training
targets and pasting, the model). Everything is re-exported here.

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

from .coding import (
    InvalidMaskError, MaskWarning, check_segmentation, decode_masks, decode_segmentation, encode_rle, rle_counts_from_string,
)
from .targets import MASK_SIZE, MASK_THRESHOLD, PASTE_CHUNK_ELEMENTS, mask_targets, paste_masks_in_image
from .transforms import hflip_masks, pad_masks, resize_masks

__all__ = [
    "InvalidMaskError",
    "MaskWarning",
    "MASK_SIZE",
    "MASK_THRESHOLD",
    "PASTE_CHUNK_ELEMENTS",
    "check_segmentation",
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
