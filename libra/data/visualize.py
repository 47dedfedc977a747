"""Draw detections (boxes, captions and instance masks) on an image and save a PNG (for
``eval.py --show``, ``predict.py`` and ``analyze.py browse``), with PIL and numpy only."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor


def _class_colour(label: int) -> tuple[int, int, int]:
    hue = (label * 0.618033988749895) % 1.0  # golden-ratio hues: neighbouring labels differ
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _to_pil(image: str | Path | Tensor | np.ndarray) -> Image.Image:
    if isinstance(image, (str, Path)):
        from .base import image_to_rgb_array

        with Image.open(image) as im:  # 16-bit grayscale scaled, not clipped (libra.data.base)
            return Image.fromarray(np.clip(image_to_rgb_array(im), 0, 255).round().astype(np.uint8))
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, h, w] RGB (0..255), got {tuple(image.shape)}")
        image = image.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be [h, w, 3] RGB, got {array.shape}")
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _blend_masks(
    canvas: Image.Image, masks: Tensor | np.ndarray, labels: list[int], rows: list[int], count: int, alpha: float
) -> Image.Image:
    """``canvas`` with the mask ``rows`` of ``masks`` [D, h, w] painted in their labels' colours."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    width, height = canvas.size
    if array.ndim != 3 or array.shape[0] != count or (count and tuple(array.shape[1:]) != (height, width)):
        raise ValueError(
            f"masks must be [D, h, w] = [{count}, {height}, {width}] (one per box, the image's size), got shape {array.shape}"
        )
    if not rows:
        return canvas
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mask_alpha must be in [0, 1], got {alpha}")
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    for row, label in zip(rows, labels):  # a few drawn detections; each blend is one vectorised op
        inside = array[row].astype(bool)
        pixels[inside] = (1.0 - alpha) * pixels[inside] + alpha * np.asarray(_class_colour(label), np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def render_detections(
    image_path_or_tensor: str | Path | Tensor | np.ndarray,
    boxes: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    scores: Tensor | np.ndarray | None,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    line_width: int = 2,
    masks: Tensor | np.ndarray | None = None,
    mask_alpha: float = 0.45,
    min_side: int = 0,
) -> Image.Image:
    """The image with ``boxes`` [D, 4] (image coordinates), "name score" captions and ``masks`` drawn,
    as a PIL image (:func:`draw_detections` saves it). ``min_side``: enlarge a smaller image (and
    its boxes and masks, nearest) until its short side has that many pixels, so that captions stay
    readable on small images; 0 keeps the size."""
    canvas = _to_pil(image_path_or_tensor)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scale = max(1.0, min_side / min(canvas.size)) if min_side and min(canvas.size) > 0 else 1.0
    if scale > 1.0:
        size = (round(canvas.width * scale), round(canvas.height * scale))
        canvas = canvas.resize(size, Image.Resampling.BILINEAR)
        boxes = boxes * scale
        if masks is not None:
            masks = torch.as_tensor(np.asarray(masks.detach().cpu() if isinstance(masks, Tensor) else masks), dtype=torch.uint8)
            masks = torch.nn.functional.interpolate(masks[None].float(), size=(size[1], size[0]), mode="nearest")[0] > 0.5
    boxes = boxes.tolist()
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).tolist()
    scores_list = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist() if scores is not None else [None] * len(boxes)
    if not len(boxes) == len(labels) == len(scores_list):
        raise ValueError(f"boxes, labels and scores must have the same length, got {len(boxes)}, {len(labels)}, {len(scores_list)}")
    order = sorted(range(len(boxes)), key=lambda i: (scores_list[i] is not None and scores_list[i]) or 0)
    shown = [i for i in order if scores_list[i] is None or scores_list[i] >= score_threshold]
    if masks is not None:
        canvas = _blend_masks(canvas, masks, [labels[i] for i in shown], shown, len(boxes), mask_alpha)
    draw = ImageDraw.Draw(canvas)
    for box, label, score in ((boxes[i], labels[i], scores_list[i]) for i in shown):
        colour = _class_colour(label)
        draw.rectangle(box, outline=colour, width=line_width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        caption = name if score is None else f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), caption)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        draw.rectangle([box[0], y, box[0] + (right - left) + 4, y + (bottom - top) + 2], fill=colour)
        draw.text((box[0] + 2, y), caption, fill=(0, 0, 0))
    return canvas


def draw_detections(
    image_path_or_tensor: str | Path | Tensor | np.ndarray,
    boxes: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    scores: Tensor | np.ndarray | None,
    class_names: Sequence[str],
    out_png: str | Path,
    score_threshold: float = 0.3,
    line_width: int = 2,
    masks: Tensor | np.ndarray | None = None,
    mask_alpha: float = 0.45,
    min_side: int = 0,
) -> Path:
    """Draw ``boxes`` [D, 4] (image coordinates) with "name score" captions and save ``out_png``.

    ``image_path_or_tensor``: a file path, a [3, h, w] tensor or an [h, w, 3] array, RGB 0..255
    (use `libra.data.transforms.denormalize_image` on a normalised tensor first).
    ``masks``: optional [D, h, w] bool / 0-1 instance masks of the same image (Mask R-CNN's
    ``masks``), blended in each detection's class colour with opacity ``mask_alpha`` (lowest score
    first, so the most confident mask is on top) under the boxes.
    Detections with score < ``score_threshold`` are skipped; ``min_side`` enlarges small images
    (:func:`render_detections`). Returns the written path.
    """
    canvas = render_detections(image_path_or_tensor, boxes, labels, scores, class_names, score_threshold,
                               line_width, masks, mask_alpha, min_side)
    out_png = Path(out_png)
    from libra.atomic_io import atomic_write

    atomic_write(out_png, lambda handle: canvas.save(handle, format="PNG"))  # WriteError (one line) on failure
    return out_png


def draw_with_ground_truth(
    image_path_or_tensor: str | Path | Tensor | np.ndarray,
    gt_boxes: Tensor | np.ndarray,
    gt_labels: Tensor | np.ndarray,
    detection: dict,
    class_names: Sequence[str],
    out_png: str | Path,
    score_threshold: float = 0.3,
    min_side: int = 512,
) -> Path:
    """Ground truth (left) and ``detection`` (``boxes``, ``labels``, ``scores``, optional ``masks``;
    right) of one image side by side, each at least ``min_side`` pixels on its short side, titled."""
    left = render_detections(image_path_or_tensor, gt_boxes, gt_labels, None, class_names, min_side=min_side)
    right = render_detections(image_path_or_tensor, detection["boxes"], detection["labels"], detection.get("scores"),
                              class_names, score_threshold, masks=detection.get("masks"), min_side=min_side)
    title = 18
    sheet = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height) + title), (255, 255, 255))
    sheet.paste(left, (0, title))
    sheet.paste(right, (left.width + 8, title))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"ground truth ({len(torch.as_tensor(gt_labels).reshape(-1))})", fill=(0, 0, 0))
    kept = int((torch.as_tensor(detection["scores"]) >= score_threshold).sum()) if "scores" in detection else 0
    draw.text((left.width + 12, 3), f"detections, score >= {score_threshold:g} ({kept})", fill=(0, 0, 0))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
