"""LVIS v1 detection dataset (COCO-like JSON with federated annotations).

Layout of `build_lvis_paths`:

    data_root/lvis_v1_train.json, data_root/lvis_v1_val.json
    data_root/train2017/*.jpg, data_root/val2017/*.jpg   (the COCO 2017 images)

LVIS v1 images carry ``coco_url`` (".../train2017/000000391895.jpg") instead of a file name;
the image path is ``data_root/<folder of the url>/<file of the url>`` (LVIS val draws from both
COCO train2017 and val2017). When ``coco_url`` is empty the ``file_name`` under the image root
is used. Each image also lists ``neg_category_ids`` (verified absent) and
``not_exhaustive_category_ids`` (annotated but maybe not all instances); both are kept for
`LVISEvaluator`. Each category has a frequency group ``'r' | 'c' | 'f'`` (rare: 1-10 training
images, common: 11-100, frequent: > 100); a category without one is grouped by its ``image_count``,
or in no group, by the one rule the evaluator uses too (:func:`libra.coco_api.frequency_groups`).
"""

from __future__ import annotations

from pathlib import Path


from libra.coco_api import frequency_groups

from .base import DetectionDataset
from .coco import load_coco_api, parse_coco_annotations
from .transforms import DetectionTransform

LVIS_LAYOUT_HELP = (
    "expected LVIS v1 layout: <data_root>/lvis_v1_{train,val}.json with the COCO 2017 images in "
    "<data_root>/train2017/ and <data_root>/val2017/"
)


def lvis_image_path(image_root: Path, info: dict) -> Path:
    """Path of an LVIS image: resolved from ``coco_url`` when present, else ``file_name``."""
    url = info.get("coco_url") or ""
    if url:
        parts = url.rstrip("/").split("/")
        return image_root / parts[-2] / parts[-1]
    if info.get("file_name"):
        return image_root / info["file_name"]
    raise ValueError(f"LVIS image {info.get('id')} has neither 'coco_url' nor 'file_name'")


def load_lvis_api(ann_file: str | Path | dict):
    """A pycocotools ``COCO`` over an LVIS JSON (annotations get ``iscrowd = 0``, which COCOeval needs)."""
    coco = load_coco_api(ann_file)
    for ann in coco.dataset["annotations"]:
        ann.setdefault("iscrowd", 0)
    return coco


class LVISDetection(DetectionDataset):
    """LVIS v1 JSON + COCO image folders.

    Args:
        image_root: folder holding ``train2017/`` and ``val2017/`` (or the images themselves
            when the JSON uses ``file_name``).
        ann_file: ``lvis_v1_{train,val}.json``.
        Other args as `CocoDetection`.
    Attributes:
        frequencies: [C] list of 'r' / 'c' / 'f' per contiguous label (None for a category without
            ``frequency`` or ``image_count``: :func:`libra.coco_api.frequency_groups`, the
            evaluator's rule; a warning names such categories).
    """

    def __init__(
        self,
        image_root: str | Path,
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
        self.root = Path(image_root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"LVIS image root not found: {self.root} ({LVIS_LAYOUT_HELP})")
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"LVIS annotation file not found: {self.ann_file} ({LVIS_LAYOUT_HELP})")
        self.lvis = load_lvis_api(self.ann_file)
        self.annotation_counts: dict = {}
        records, self.label_to_cat_id, class_names = parse_coco_annotations(
            self.lvis, self.root, train, image_path_of=lambda info: lvis_image_path(self.root, info), source="LVIS",
            counts=self.annotation_counts,
        )
        # The evaluator's rule (libra.coco_api.frequency_groups): 'frequency', else from 'image_count', else None.
        groups = frequency_groups(self.lvis, str(self.ann_file))
        self.frequencies = [groups[int(c)] for c in self.label_to_cat_id]
        if transform is None:
            transform = DetectionTransform(train, min_size, max_size, multi_scale_range, flip_prob, multi_scale_step)
        super().__init__(records, class_names, train, transform, seed)

    evaluation_protocol = "lvis"  # federated AP with APr / APc / APf

    @property
    def coco_api(self):
        """The LVIS annotation file as a pycocotools ``COCO`` index (the evaluation ground truth)."""
        return self.lvis

    def skip_hint(self, record) -> str:
        return f"{self.ann_file} (image id {record.image_id})"


def build_lvis_paths(data_root: str | Path, split: str) -> tuple[Path, Path]:
    """(image root, annotation file) for 'train' or 'val'."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"LVIS data root not found: {data_root} ({LVIS_LAYOUT_HELP})")
    name = split[:-4] if split.endswith("2017") else split
    return data_root, data_root / f"lvis_v1_{name}.json"
