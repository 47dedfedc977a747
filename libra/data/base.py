"""Common machinery of the detection datasets: parsed image records -> (image, target) samples.

A dataset parses its annotation format once into a list of `ImageRecord` (boxes in ORIGINAL
pixel coordinates, float32 [x1, y1, x2, y2], labels 0..C-1) and hands them to
`DetectionDataset`, which decodes the image, applies `DetectionTransform` and builds the
target dict of the interface contract:

    boxes [G, 4] float32 (resized image coords), labels [G] int64, ignore_boxes [Gi, 4],
    image_id int, img_shape (h, w), ori_shape (h0, w0), scale_factor (sx, sy), flip bool,
    and in evaluation mode also difficult [G] bool (VOC; all False elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import DetectionTransform, sample_generator


@dataclass
class ImageRecord:
    """One image and its parsed ground truth, in original image coordinates.

    boxes: [G, 4] float32; labels: [G] int64 in 0..C-1; difficult: [G] bool (VOC "difficult"
    objects, kept for evaluation); ignore_boxes: [Gi, 4] float32 (COCO crowd regions).
    """

    image_id: int
    file_path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))


def load_rgb_image(path: Path) -> Tensor:
    """Decode an image file to float32 [3, h, w] RGB in 0..255 (no EXIF rotation, like COCO's annotations)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float()


class DetectionDataset(Dataset):
    """Map-style dataset over `ImageRecord`s.

    Indexing: ``dataset[i]`` or ``dataset[(i, *keys)]``. The per-sample random generator is
    seeded from ``(seed, i, *keys)``; with a plain int the keys are ``(epoch,)`` as set by
    `set_epoch`. The samplers of `libra.data.samplers` yield ``(i, epoch, ...)`` tuples so the
    augmentation is right even with persistent DataLoader workers (which never see
    ``set_epoch`` calls made in the main process).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        train: bool,
        transform: DetectionTransform | None = None,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.class_names = list(class_names)
        self.train = train
        self.transform = transform if transform is not None else DetectionTransform(train=train)
        self.seed = int(seed)
        self.epoch = 0
        # contiguous label -> category id of ``coco_api``; loaders with their own ids (COCO, LVIS)
        # set it before calling this constructor
        if not hasattr(self, "label_to_cat_id"):
            self.label_to_cat_id = list(range(1, len(self.class_names) + 1))
        self._coco_api = None

    # How the benchmark of this data is scored: 'coco', 'lvis' (federated) or 'voc' (mAP@0.5);
    # ``libra.evaluation.build_evaluator`` reads it together with ``coco_api``.
    evaluation_protocol: str = "coco"

    # ---- metadata used by samplers, the trainer and the evaluators ----------------------
    @property
    def coco_api(self):
        """The evaluation ground truth as a pycocotools ``COCO`` (built from the records once)."""
        if self._coco_api is None:
            from .coco import load_coco_api

            self._coco_api = load_coco_api(records_to_coco_dict(self.records, self.class_names))
        return self._coco_api

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def aspect_ratio_flags(self) -> list[int]:
        """0 for landscape/square images (w >= h), 1 for portrait (w < h): batch grouping key."""
        return [0 if r.width >= r.height else 1 for r in self.records]

    def image_labels(self) -> list[list[int]]:
        """Distinct labels present in each image (positives only), for repeat-factor sampling."""
        return [sorted(set(r.labels.tolist())) for r in self.records]

    def image_counts_per_class(self) -> Tensor:
        """[C] int64: number of images containing each class (f_i of Eq. 20, used by BCR)."""
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for labels in self.image_labels():
            if labels:
                counts[torch.as_tensor(labels, dtype=torch.int64)] += 1
        return counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ---- samples ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def _split_key(self, key) -> tuple[int, tuple[int, ...]]:
        if isinstance(key, (tuple, list)):
            if len(key) == 0:
                raise ValueError("dataset key tuple must start with the sample index")
            return int(key[0]), tuple(int(k) for k in key[1:])
        return int(key), (self.epoch,)

    def __getitem__(self, key) -> tuple[Tensor, dict]:
        index, keys = self._split_key(key)
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.records)} images")
        record = self.records[index]
        image = load_rgb_image(record.file_path)
        h0, w0 = int(image.shape[-2]), int(image.shape[-1])
        if (h0, w0) != (record.height, record.width):
            raise ValueError(
                f"image {record.image_id} ({record.file_path}): decoded size (h, w) = ({h0}, {w0}) differs from "
                f"the annotated size ({record.height}, {record.width}); the annotation file does not match the image"
            )
        boxes = torch.from_numpy(record.boxes.astype(np.float32).reshape(-1, 4))
        labels = torch.from_numpy(record.labels.astype(np.int64).reshape(-1))
        difficult = torch.from_numpy(record.difficult.astype(bool).reshape(-1))
        ignore = torch.from_numpy(record.ignore_boxes.astype(np.float32).reshape(-1, 4))
        if self.train:
            # Difficult objects are neither positives nor negatives in training (they act like crowd).
            ignore = torch.cat([ignore, boxes[difficult]], dim=0)
            boxes, labels = boxes[~difficult], labels[~difficult]
            difficult = difficult[~difficult]

        generator = sample_generator(self.seed, index, *keys) if self.train else None
        image, out_boxes, meta = self.transform(image, {"boxes": boxes, "ignore_boxes": ignore}, generator)
        target = {
            "boxes": out_boxes["boxes"],
            "labels": labels,
            "ignore_boxes": out_boxes["ignore_boxes"],
            "image_id": record.image_id,
            **meta,
        }
        if not self.train:
            target["difficult"] = difficult
        return image, target


def records_to_coco_dict(records: Sequence[ImageRecord], class_names: Sequence[str]) -> dict:
    """Ground truth of ``records`` as a COCO instances dict (category id = label + 1).

    Difficult objects and ignore regions become ``iscrowd=1`` (ignored by COCOeval). Used to
    run the COCO-style evaluators (e.g. proposal recall) on VOC.
    """
    images, annotations = [], []
    ann_id = 1
    for r in records:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height), "file_name": str(r.file_path.name)})
        crowd_flags = list(r.difficult.astype(bool).tolist()) + [True] * len(r.ignore_boxes)
        labels = list(r.labels.tolist()) + [0] * len(r.ignore_boxes)
        for box, label, crowd in zip(np.concatenate([r.boxes, r.ignore_boxes]).reshape(-1, 4).tolist(), labels, crowd_flags):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": ann_id, "image_id": int(r.image_id), "category_id": int(label) + 1,
                "bbox": [box[0], box[1], w, h], "area": float(w * h), "iscrowd": int(crowd),
            })
            ann_id += 1
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def check_finite_box(values, what: str) -> list[float]:
    """Validate a 4-number box from an annotation file, raising ValueError naming ``what``."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise ValueError(f"{what}: bbox must be 4 numbers, got {values!r}")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: bbox must be 4 numbers, got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}: bbox has NaN or inf values: {values!r}")
    return out
