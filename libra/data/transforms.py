"""Image and box transforms for detection, following MMDetection's `faster-rcnn_r50_fpn_1x_coco`
(`configs/_base_/datasets/coco_detection.py`: `train_pipeline` `Resize scale=(1333, 800)
keep_ratio=True`, `RandomFlip prob=0.5`; `configs/_base_/models/faster-rcnn_r50_fpn.py`:
`data_preprocessor` `pad_size_divisor=32`).

Pipeline of one training sample (all on CPU, in the DataLoader worker):

    decode (PIL, RGB uint8) -> float [3, h0, w0] in 0..255
    -> resize keeping the aspect ratio (bilinear)        boxes *= (new_w / w0, new_h / h0)
       (a very elongated image: so that its short side reaches 32 px, `get_resize_size`)
    -> horizontal flip with probability 0.5 (training)  x1' = W - x2, x2' = W - x1
    -> normalise with the ImageNet mean / std of RGB 0..255
    -> (in `collate`) pad bottom-right with 0 to a multiple of 32

Instance masks (a mask model's targets, ``DetectionTransform.transform_masks``) follow the image:
nearest-neighbour resize to the image's resized size, the same flip, and in `collate` zero
padding to the padded batch size, so masks, boxes and images share coordinates
(MMDetection ``coco_instance.py``: ``LoadAnnotations(with_mask=True)``, masks resized with the image).

Boxes are float32 ``[x1, y1, x2, y2]`` in continuous coordinates (width = x2 - x1, no +1).

Randomness (multi-scale size, flip) never comes from global RNG state: every sample gets a
``torch.Generator`` seeded from ``(seed, index, epoch, ...)`` (see `sample_generator`), so a run
is reproducible whatever the number of DataLoader workers and however they are scheduled.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from libra.structures import Batch

# ImageNet statistics on RGB 0..255 (MMDetection `configs/_base_/models/faster-rcnn_r50_fpn.py`:
# `data_preprocessor.mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True`).
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY: int = 32


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *keys)``, e.g. ``(seed, index, epoch)``.

    ``numpy.random.SeedSequence`` mixes the integers into a well-spread 64-bit seed, so that
    nearby keys (index 3 epoch 4 vs index 4 epoch 3) give unrelated streams.
    """
    entropy = [int(seed) & 0xFFFFFFFF] + [int(k) & 0xFFFFFFFF for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return generator


# The detectors need each side of an image to be at least the coarsest backbone stride
# (``libra.detectors.base.MIN_IMAGE_SIDE``). A very elongated image (20 x 2000 px at 800 / 1333: 13 px
# high after the usual resize) is therefore resized so that its short side reaches it, even if its
# long side then exceeds max_size; beyond MAX_ASPECT_RATIO (a long side over 32,000 px) an image is
# refused (``check_aspect_ratio``: the datasets do it up front, naming the file).
MIN_SIDE: int = 32
MAX_ASPECT_RATIO: float = 1000.0


def check_aspect_ratio(height: int, width: int, what: str = "the image") -> None:
    """ValueError (one line) for an image whose aspect ratio exceeds :data:`MAX_ASPECT_RATIO`."""
    ratio = max(height, width) / max(1, min(height, width))
    if ratio > MAX_ASPECT_RATIO:
        long_side = int(MIN_SIDE * ratio + 0.5)
        shape = f"{MIN_SIDE} x {long_side}" if height < width else f"{long_side} x {MIN_SIDE}"
        raise ValueError(
            f"{what} is {width} x {height} px (w x h), an aspect ratio of {ratio:.0f}:1: with its short side at the "
            f"detector's minimum of {MIN_SIDE} px it would be {shape} px (h x w; at most {MAX_ASPECT_RATIO:.0f}:1 is "
            "taken); crop or split it"
        )


def get_resize_size(height: int, width: int, min_size: int = 800, max_size: int = 1333, min_side: int = 0) -> tuple[int, int]:
    """Output ``(new_h, new_w)`` of the aspect-preserving resize.

    s = min(max_size / long side, min_size / short side); new size = round(h*s), round(w*s)
    (mmcv's ``rescale_size`` for MMDetection's ``Resize scale=(1333, 800) keep_ratio=True``).
    Rounding is half-up, like mmcv's ``int(x + 0.5)``.
    Example: (h, w) = (375, 500) -> (800, 1067).

    ``min_side``: when the short side would come out below it (a very elongated image), the scale
    is raised so that it reaches ``min_side`` exactly; the long side then exceeds ``max_size``
    (``DetectionTransform`` passes :data:`MIN_SIDE`). Example at 800 / 1333: (20, 2000) -> (32, 3200).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got (h, w) = ({height}, {width})")
    if min_size <= 0 or max_size <= 0:
        raise ValueError(f"min_size and max_size must be positive, got {min_size}, {max_size}")
    scale = min(max_size / max(height, width), min_size / min(height, width))
    new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    if min(new_h, new_w) < min_side:
        scale = min_side / min(height, width)
        new_h, new_w = max(min_side, int(height * scale + 0.5)), max(min_side, int(width * scale + 0.5))
    return new_h, new_w


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``image`` [3, h, w] (float) to ``size = (new_h, new_w)``.

    ``align_corners=False`` and no antialiasing, i.e. the plain bilinear sampling that
    mmcv/cv2 use for detection (mmcv ``imresize``'s default ``interpolation='bilinear'``).
    """
    if image.dim() != 3:
        raise ValueError(f"expected an image of shape [3, h, w], got {tuple(image.shape)}")
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]


def scale_boxes(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Multiply ``boxes`` [N, 4] by (sx, sy, sx, sy)."""
    factors = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    return boxes * factors


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror ``boxes`` [N, 4] in an image of width ``width``: x1' = W - x2, x2' = W - x1."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def normalize_image(image: Tensor) -> Tensor:
    """(image - mean) / std per RGB channel, ``image`` [3, h, w] float in 0..255."""
    mean = image.new_tensor(PIXEL_MEAN)[:, None, None]
    std = image.new_tensor(PIXEL_STD)[:, None, None]
    return (image - mean) / std


def denormalize_image(image: Tensor) -> Tensor:
    """Inverse of `normalize_image`: back to float RGB 0..255 (for visualisation)."""
    mean = image.new_tensor(PIXEL_MEAN)[:, None, None]
    std = image.new_tensor(PIXEL_STD)[:, None, None]
    return image * std + mean


@dataclass
class DetectionTransform:
    """Resize (+ optional multi-scale), flip and normalise one image and its boxes.

    Args:
        train: training mode enables multi-scale (if ``multi_scale_range`` is given) and flip.
        min_size, max_size: target short side and cap on the long side (800 / 1333 for COCO).
        multi_scale_range: ``(lo, hi)``: in training the short side is drawn uniformly from
            lo, lo + step, ..., hi (paper 4.1.3 uses (640, 800)); the long side stays <= max_size.
        flip_prob: probability of a horizontal flip in training (0.5).
        multi_scale_step: the step of those short sides: 1 (every integer, MMDetection's
            ``multiscale_mode='range'`` of the COCO recipe) or 32 for LVIS (640, 672, ..., 800:
            ``mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1``, ``multiscale_mode='value'``, paper Sec. 4.2).
    """

    train: bool = False
    min_size: int = 800
    max_size: int = 1333
    multi_scale_range: tuple[int, int] | None = None
    flip_prob: float = 0.5
    multi_scale_step: int = 1

    def __post_init__(self) -> None:
        if self.multi_scale_range is not None:
            lo, hi = self.multi_scale_range
            if not 0 < lo <= hi:
                raise ValueError(f"multi_scale_range must be (lo, hi) with 0 < lo <= hi, got {self.multi_scale_range}")
        if isinstance(self.multi_scale_step, bool) or not isinstance(self.multi_scale_step, int) or self.multi_scale_step < 1:
            raise ValueError(f"multi_scale_step must be a positive integer, got {self.multi_scale_step!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def multiscale_choices(self) -> list[int]:
        """The short sides training draws from (``[min_size]`` without multi-scale)."""
        if self.multi_scale_range is None:
            return [self.min_size]
        lo, hi = self.multi_scale_range
        return list(range(int(lo), int(hi) + 1, self.multi_scale_step))

    def __call__(
        self,
        image: Tensor,
        boxes_by_key: dict[str, Tensor],
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], dict]:
        """Transform ``image`` [3, h0, w0] (float 0..255) and every [N, 4] box tensor in ``boxes_by_key``.

        Returns (normalised image [3, h, w], transformed boxes (same keys), meta) where meta has
        ``img_shape (h, w)``, ``ori_shape (h0, w0)``, ``scale_factor (sx, sy)``, ``flip``.
        """
        h0, w0 = int(image.shape[-2]), int(image.shape[-1])
        min_size = self.min_size
        if self.train and self.multi_scale_range is not None:
            lo, hi = self.multi_scale_range
            if self.multi_scale_step == 1:
                min_size = int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
            else:
                choices = self.multiscale_choices()
                min_size = choices[int(torch.randint(len(choices), (1,), generator=generator).item())]
        check_aspect_ratio(h0, w0)
        new_h, new_w = get_resize_size(h0, w0, min_size, self.max_size, min_side=MIN_SIDE)
        image = resize_image(image.float(), (new_h, new_w))
        scale_x, scale_y = new_w / w0, new_h / h0
        out_boxes = {k: scale_boxes(b.float(), scale_x, scale_y) for k, b in boxes_by_key.items()}

        flip = False
        if self.train and self.flip_prob > 0:
            flip = bool(torch.rand((1,), generator=generator).item() < self.flip_prob)
        if flip:
            image = image.flip(-1)
            out_boxes = {k: hflip_boxes(b, new_w) for k, b in out_boxes.items()}

        meta = {
            "img_shape": (new_h, new_w),
            "ori_shape": (h0, w0),
            "scale_factor": (scale_x, scale_y),
            "flip": flip,
        }
        return normalize_image(image), out_boxes, meta

    @staticmethod
    def transform_masks(masks: Tensor, meta: dict) -> Tensor:
        """Apply a sample's resize and flip (``meta`` returned by ``__call__`` for its image) to its
        instance masks ``[G, h0, w0]`` (uint8 / bool, original image).

        Returns:
            ``[G, h, w]`` with ``(h, w) = meta["img_shape"]``: nearest-neighbour resized
            (``libra.masks.resize_masks``) and mirrored when ``meta["flip"]``, the same flag and
            width as the image and its boxes.
        """
        from libra.masks import hflip_masks, resize_masks

        if tuple(masks.shape[-2:]) != tuple(meta["ori_shape"]):
            raise ValueError(
                f"masks are {tuple(masks.shape[-2:])} (h, w) but the image is {tuple(meta['ori_shape'])}; "
                "decode them at the original image size"
            )
        masks = resize_masks(masks, tuple(meta["img_shape"]))
        return hflip_masks(masks) if meta["flip"] else masks


def pad_images(images: Sequence[Tensor], size_divisibility: int = SIZE_DIVISIBILITY) -> Tensor:
    """Stack [3, h_i, w_i] images into [B, 3, H, W], zero-padded bottom-right.

    H and W are the largest h_i / w_i rounded up to a multiple of ``size_divisibility``
    (so that every FPN level up to stride 32 has an integer size).
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    max_h = max(int(im.shape[-2]) for im in images)
    max_w = max(int(im.shape[-1]) for im in images)
    if size_divisibility > 1:
        max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
        max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)
    batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch


def collate(batch: Sequence[tuple[Tensor, dict]]) -> Batch:
    """DataLoader ``collate_fn``: list of (image [3,h,w], target) -> :class:`~libra.structures.Batch`.

    Images are padded with 0 (after normalisation) to a common size that is a multiple of 32;
    ``image_sizes`` keeps each image's unpadded (h, w), ``original_sizes`` the dataset's
    ``target["ori_shape"]`` (where every target has one), ``proposals`` the pre-computed proposals
    (``target["proposals"]``, where every target has them: Fast R-CNN). Instance masks
    (``target["masks"]`` [G, h, w], mask models) are zero-padded the same way to [G, H, W].
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    images = pad_images([item[0] for item in batch])
    targets = [item[1] for item in batch]
    if any("masks" in target for target in targets):
        from libra.masks import pad_masks

        size = (int(images.shape[-2]), int(images.shape[-1]))
        targets = [{**t, "masks": pad_masks(t["masks"], size)} if "masks" in t else t for t in targets]
    image_sizes = [(int(item[0].shape[-2]), int(item[0].shape[-1])) for item in batch]
    original_sizes = None
    if all("ori_shape" in t for t in targets):
        original_sizes = [(int(t["ori_shape"][0]), int(t["ori_shape"][1])) for t in targets]
    proposals = [t["proposals"] for t in targets] if all("proposals" in t for t in targets) else None
    image_ids = [int(t["image_id"]) for t in targets] if all("image_id" in t for t in targets) else None
    return Batch(images, image_sizes, original_sizes, targets, proposals, image_ids)


def preprocess_images(
    images: Sequence[Tensor], min_size: int = 800, max_size: int = 1333
) -> tuple[Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """Prepare raw images for inference (test-time pipeline without a dataset).

    Args:
        images: list of [3, h, w] RGB tensors, uint8 or float in 0..255. A float image whose values
            all lie in [0, 1] (torchvision's convention) is scaled by 255, with a warning.
        min_size, max_size: resize rule of `get_resize_size`.

    Returns:
        batch: [B, 3, H, W] float32, normalised and zero-padded to a multiple of 32.
        image_sizes: (h, w) of each resized image before padding (the model's ``image_sizes``).
        original_sizes: (h0, w0) of each input (the model's ``original_sizes``).
    """
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    transform = DetectionTransform(train=False, min_size=min_size, max_size=max_size)
    out, image_sizes, original_sizes = [], [], []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image {i}: expected a Tensor[3, h, w] (RGB, 0..255), got {shape}")
        if image.is_floating_point() and image.numel() > 0:
            low, high = float(image.min()), float(image.max())
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"image {i} has NaN or infinite pixel values; pass RGB values in 0..255")
            if 0.0 <= low and high <= 1.0:
                warnings.warn(
                    f"image {i} is a float image with values in [0, 1]; libra expects 0..255 (as uint8 or float) "
                    "and scales it by 255. Pass image * 255 (or a uint8 image) to silence this warning.",
                    stacklevel=2,
                )
                image = image * 255.0
        normalised, _, meta = transform(image.float(), {})
        out.append(normalised)
        image_sizes.append(meta["img_shape"])
        original_sizes.append(meta["ori_shape"])
    return pad_images(out), image_sizes, original_sizes
