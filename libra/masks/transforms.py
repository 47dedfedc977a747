"""Instance masks in the data pipeline: resized (nearest), flipped and padded with the image,
as whole ``[G, H, W]`` stacks (no loop over instances).

    [G, h0, w0] --resize_masks (nearest) --hflip_masks --pad_masks--> [G, H, W] in the resized,
                                                                      flipped, padded image
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hflip_masks", "pad_masks", "resize_masks"]


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
