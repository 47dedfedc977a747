"""Pascal VOC 2007 / 2012 detection dataset (VOC XML, parsed with xml.etree).

Layout (standard VOCdevkit):

    data_root/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{trainval,test}.txt}
    data_root/VOC2012/{...same...}

Splits of `build_voc_datasets`: 'train' = VOC2007 trainval + VOC2012 trainval (those present),
'test' = VOC2007 test, any other name (e.g. 'val', 'trainval') = that ImageSet of every year
present. A root holding only VOC2012 works.

Coordinate convention: VOC XML gives 1-based inclusive pixel indices (xmin..xmax both inside the
object). We map them to continuous coordinates as ``[xmin - 1, ymin - 1, xmax, ymax]``, so the
pixel with 1-based index i covers [i-1, i) and width = xmax - xmin + 1 without any "+1" later.
With this convention the plain IoU of the project equals the VOC devkit's "+1" IoU on raw XML
numbers, so `VOCEvaluator` reproduces the devkit's matching.

``difficult`` objects: excluded from training (they go to ``ignore_boxes``), kept in the
evaluation ground truth flagged difficult (neither TP nor FP when matched).

Boxes are clipped to the image (``[0, width] x [0, height]`` of ``<size>``) and dropped when the
clipped box is narrower or lower than 1 px; coordinates more than 10 image sizes outside the
image are an error naming the XML file.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DetectionDataset, ImageRecord, check_box_extent, check_image_size, clip_box_to_image
from .transforms import DetectionTransform

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

VOC_LAYOUT_HELP = (
    "expected VOCdevkit layout: <data_root>/VOC2007 and/or <data_root>/VOC2012, each with "
    "Annotations/*.xml, JPEGImages/*.jpg and ImageSets/Main/<split>.txt"
)


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: <{tag}> is not finite: {text!r}")
    return value


def parse_voc_xml(xml_path: Path, image_id: int, image_path: Path, class_names: Sequence[str] = VOC_CLASSES) -> ImageRecord:
    """Parse one VOC annotation file into an `ImageRecord` (boxes as [xmin-1, ymin-1, xmax, ymax])."""
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {xml_path} ({VOC_LAYOUT_HELP})")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: malformed XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{xml_path}: missing <size>")
    width, height = check_image_size(_number(size, "width", str(xml_path)), _number(size, "height", str(xml_path)),
                                     f"{xml_path} <size>")
    name_to_label = {n: i for i, n in enumerate(class_names)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        where = f"{xml_path} object {k}"
        name = _text(obj, "name", where)
        if name not in name_to_label:
            raise ValueError(f"{where}: unknown class name {name!r} (expected one of the 20 VOC classes)")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = [xmin - 1.0, ymin - 1.0, xmax, ymax]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"{where}: empty box (xmin, ymin, xmax, ymax) = {(xmin, ymin, xmax, ymax)}")
        shown = "(xmin, ymin, xmax, ymax) = (" + ", ".join(_text(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax")) + ")"
        check_box_extent(box, width, height, where, shown=shown)
        box = clip_box_to_image(box, width, height)
        if box is None:  # outside the image
            continue
        diff_node = obj.find("difficult")
        is_difficult = diff_node is not None and diff_node.text is not None and diff_node.text.strip() not in ("", "0")
        boxes.append(box)
        labels.append(name_to_label[name])
        difficult.append(is_difficult)
    return ImageRecord(
        image_id=image_id,
        file_path=image_path,
        width=width,
        height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        difficult=np.asarray(difficult, bool),
    )


def voc_image_id(year_dir: Path, stem: str) -> int:
    """A stable integer id for a VOC image: digits of its name (e.g. 2011_000003 -> 2011000003),
    plus 10**10 for VOC2007 so that ids of both years never collide."""
    digits = "".join(ch for ch in stem if ch.isdigit())
    if not digits:
        raise ValueError(f"cannot derive an integer image id from VOC image name {stem!r}")
    offset = 10**10 if year_dir.name == "VOC2007" else 0
    return offset + int(digits)


class VOCDetection(DetectionDataset):
    """One or more (VOC year folder, ImageSet split) pairs as one dataset.

    Args:
        year_dirs_and_splits: e.g. ``[(root/'VOC2007', 'trainval'), (root/'VOC2012', 'trainval')]``.
        train: training mode (difficult -> ignore_boxes, images without non-difficult boxes dropped).
        Other args as `CocoDetection`.
    """

    def __init__(
        self,
        year_dirs_and_splits: Sequence[tuple[str | Path, str]],
        train: bool,
        transform: DetectionTransform | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        multi_scale_range: tuple[int, int] | None = None,
        flip_prob: float = 0.5,
        seed: int = 0,
        multi_scale_step: int = 1,
        class_names: Sequence[str] = VOC_CLASSES,
    ) -> None:
        records = []
        self.annotation_counts = counts = {"images": 0, "annotations": 0, "boxes": 0, "difficult": 0, "no_annotations": 0}
        self._list_file_of: dict[int, Path] = {}  # image id -> the ImageSets file listing it
        for year_dir, split in year_dirs_and_splits:
            year_dir = Path(year_dir)
            list_file = year_dir / "ImageSets" / "Main" / f"{split}.txt"
            if not list_file.is_file():
                raise FileNotFoundError(f"VOC split file not found: {list_file} ({VOC_LAYOUT_HELP})")
            stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
            for stem in stems:
                self._list_file_of[voc_image_id(year_dir, stem)] = list_file
                record = parse_voc_xml(
                    year_dir / "Annotations" / f"{stem}.xml",
                    voc_image_id(year_dir, stem),
                    year_dir / "JPEGImages" / f"{stem}.jpg",
                    class_names,
                )
                counts["images"] += 1
                counts["annotations"] += len(record.labels)
                counts["difficult"] += int(record.difficult.sum())
                counts["boxes"] += int((~record.difficult).sum())
                counts["no_annotations"] += len(record.labels) == 0
                if train and not (~record.difficult).any():
                    continue
                records.append(record)
        ids = [r.image_id for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate VOC image ids: an image is listed twice in the split files")
        self.label_to_cat_id = list(range(1, len(class_names) + 1))
        if transform is None:
            transform = DetectionTransform(train, min_size, max_size, multi_scale_range, flip_prob, multi_scale_step)
        super().__init__(records, class_names, train, transform, seed)

    def skip_hint(self, record: ImageRecord) -> str:
        list_file = self._list_file_of.get(record.image_id)
        stem = Path(record.file_path).stem
        return f"{list_file} (line {stem!r})" if list_file else f"the split files (image {stem!r})"

    def ground_truth(self) -> dict[int, dict[str, np.ndarray]]:
        """``{image_id: {"boxes" [G,4], "labels" [G], "difficult" [G]}}`` in original coordinates."""
        return {r.image_id: {"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult} for r in self.records}

    evaluation_protocol = "voc"  # mAP@0.5 (area and VOC07 11-point); difficult objects are iscrowd in coco_api


def voc_split_parts(data_root: str | Path, split: str) -> list[tuple[Path, str]]:
    """(year folder, ImageSet) pairs of a named split; see the module docstring."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"VOC data root not found: {data_root} ({VOC_LAYOUT_HELP})")
    years = [data_root / y for y in ("VOC2007", "VOC2012") if (data_root / y).is_dir()]
    if not years:
        raise FileNotFoundError(f"no VOC2007 or VOC2012 folder in {data_root} ({VOC_LAYOUT_HELP})")
    if split == "train":
        return [(y, "trainval") for y in years]
    if split == "test":
        if not (data_root / "VOC2007").is_dir():
            raise FileNotFoundError(f"split 'test' needs {data_root / 'VOC2007'} (VOC2007 test set) ({VOC_LAYOUT_HELP})")
        return [(data_root / "VOC2007", "test")]
    return [(y, split) for y in years]
