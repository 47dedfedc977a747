"""COCO-format detection dataset (COCO 2017 and the embedded synthetic set).

Expected layout for COCO 2017 (see `build_coco_paths`):

    data_root/annotations/instances_train2017.json   data_root/train2017/*.jpg
    data_root/annotations/instances_val2017.json     data_root/val2017/*.jpg

Annotation rules (MMDetection's ``CocoDataset.parse_data_info``; ``filter_empty_gt=True`` of
`configs/_base_/datasets/coco_detection.py`): COCO boxes [x, y, w, h] become [x, y, x + w, y + h];
annotations with area <= 0, w < 1 or h < 1 are skipped; the boxes (crowd ones too) are clipped to
the image and skipped when the clipped box has w < 1 or h < 1 (MMDetection skips the boxes
without overlap with the image and clips the others in ``Resize``, ``clip_object_border=True``);
a box reaching more than 10 image sizes outside the image is an error; ``iscrowd`` boxes go to
``ignore_boxes``; category ids map to contiguous labels 0..C-1 in increasing id order
(``label_to_cat_id[label]`` maps back). Training drops images without usable boxes;
evaluation keeps every image. Each kept box's ``segmentation`` (polygons or RLE) is kept with it,
undecoded; a mask model decodes it (``DetectionDataset.with_masks``).
"""

from __future__ import annotations

import math
from pathlib import Path


import numpy as np
from pycocotools.coco import COCO

from libra import coco_api

from .base import DetectionDataset, ImageRecord, check_box_extent, check_finite_box, check_image_size, clip_box_to_image
from .transforms import DetectionTransform

COCO_LAYOUT_HELP = (
    "expected COCO 2017 layout: <data_root>/annotations/instances_{train,val}2017.json and "
    "images in <data_root>/train2017/ and <data_root>/val2017/"
)


def load_coco_api(ann_file: str | Path | dict) -> COCO:
    """A quiet pycocotools ``COCO`` from a JSON path or an in-memory dict (the COCO layout named when missing)."""
    return coco_api.load_coco_api(ann_file, missing_hint=COCO_LAYOUT_HELP)


def parse_coco_annotations(
    coco: COCO, image_root: Path, train: bool, image_path_of=None, source: str = "COCO", counts: dict | None = None
) -> tuple[list[ImageRecord], list[int], list[str]]:
    """Turn a ``COCO`` index into `ImageRecord`s.

    Args:
        image_path_of: optional ``f(image_info: dict) -> Path``; default ``image_root / file_name``.
        counts: filled with what was read and why annotations were not used as object boxes
            (``images``, ``annotations``, ``boxes``, ``crowd``, ``degenerate``, ``outside``,
            ``no_annotations``): :func:`libra.data.base.no_usable_images_reason` says it in words.
    Returns:
        (records, label_to_cat_id, class_names)
    """
    counts = counts if counts is not None else {}
    for key in ("images", "annotations", "boxes", "crowd", "degenerate", "outside", "no_annotations"):
        counts[key] = 0
    cat_ids = sorted(int(c) for c in coco.cats.keys())
    cat_id_to_label = {cid: i for i, cid in enumerate(cat_ids)}
    class_names = [str(coco.cats[cid].get("name", cid)) for cid in cat_ids]

    records = []
    for image_id in sorted(coco.imgs.keys()):
        info = coco.imgs[image_id]
        if image_path_of is not None:
            path = Path(image_path_of(info))
        else:
            if "file_name" not in info:
                raise ValueError(f"{source} image {image_id} has no 'file_name'")
            path = image_root / info["file_name"]
        width, height = check_image_size(info.get("width"), info.get("height"), f"{source} image {image_id}")
        boxes, labels, ignore, segmentations, ann_ids = [], [], [], [], []
        counts["images"] += 1
        counts["no_annotations"] += not coco.imgToAnns.get(image_id)
        for ann in coco.imgToAnns.get(image_id, []):
            counts["annotations"] += 1
            what = f"{source} annotation {ann.get('id')} of image {image_id}"
            x, y, w, h = check_finite_box(ann.get("bbox"), what)
            check_box_extent([x, y, x + w, y + h], width, height, what, shown=ann.get("bbox"))
            cat_id = ann.get("category_id")
            if cat_id not in cat_id_to_label:
                raise ValueError(f"{what}: unknown category_id {cat_id!r} (not in 'categories')")
            area = ann.get("area", w * h)
            if not isinstance(area, (int, float)) or not math.isfinite(area):
                raise ValueError(f"{what}: area must be a finite number, got {area!r}")
            if area <= 0 or w < 1 or h < 1:
                counts["degenerate"] += 1
                continue
            box = clip_box_to_image([x, y, x + w, y + h], width, height)
            if box is None:  # outside the image (or a sliver of < 1 px inside it)
                counts["outside"] += 1
                continue
            if ann.get("iscrowd", 0):
                counts["crowd"] += 1
                ignore.append(box)
            else:
                counts["boxes"] += 1
                boxes.append(box)
                labels.append(cat_id_to_label[cat_id])
                # Kept as annotated (decoded only for a mask model, libra.data.base.DetectionDataset).
                segmentations.append(ann.get("segmentation"))
                ann_ids.append(ann.get("id"))
        if train and not boxes:
            continue
        records.append(
            ImageRecord(
                image_id=int(image_id),
                file_path=path,
                width=width,
                height=height,
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                labels=np.asarray(labels, np.int64),
                difficult=np.zeros(len(boxes), bool),
                ignore_boxes=np.asarray(ignore, np.float32).reshape(-1, 4),
                segmentations=segmentations,
                ann_ids=ann_ids,
            )
        )
    return records, cat_ids, class_names


class CocoDetection(DetectionDataset):
    """COCO instances JSON + image folder.

    Args:
        root: folder holding the images named by ``file_name``.
        ann_file: instances JSON.
        train: training mode (augmentation, drop images without boxes).
        transform: resize/flip/normalise; default ``DetectionTransform(train, min_size, max_size)``.
        min_size, max_size, multi_scale_range, flip_prob, multi_scale_step: used to build the default transform.
        seed: base seed of the per-sample augmentation RNG.
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path,
        train: bool,
        transform: DetectionTransform | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        multi_scale_range: tuple[int, int] | None = None,
        flip_prob: float = 0.5,
        seed: int = 0,
        multi_scale_step: int = 1,
    ) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} ({COCO_LAYOUT_HELP})")
        self.coco = load_coco_api(self.ann_file)
        self.annotation_counts: dict = {}
        records, self.label_to_cat_id, class_names = parse_coco_annotations(
            self.coco, self.root, train, counts=self.annotation_counts)
        if transform is None:
            transform = DetectionTransform(train, min_size, max_size, multi_scale_range, flip_prob, multi_scale_step)
        super().__init__(records, class_names, train, transform, seed)

    @property
    def coco_api(self) -> COCO:
        """The annotation file's own ``COCO`` index (the evaluation ground truth)."""
        return self.coco

    def skip_hint(self, record) -> str:
        return f"{self.ann_file} (image id {record.image_id})"


def build_coco_paths(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a COCO 2017 split ('train', 'val', 'train2017', ...)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"COCO data root not found: {data_root} ({COCO_LAYOUT_HELP})")
    name = split if split.endswith("2017") else f"{split}2017"
    return data_root / name, data_root / "annotations" / f"instances_{name}.json"
