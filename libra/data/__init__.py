"""Datasets (COCO 2017, Pascal VOC 07+12, LVIS v1, embedded synthetic shapes), transforms,
samplers and `collate`.

    dataset = build_dataset("coco", "/data/coco", "train")
    images, targets = collate([dataset[0], dataset[1]])
"""

from __future__ import annotations

from pathlib import Path

from .base import IMAGE_CHECKS, DataError, DetectionDataset, ImageFileError, ImageRecord, check_image_files, records_to_coco_dict
from .coco import CocoDetection, build_coco_paths, load_coco_api
from .lvis import LVISDetection, build_lvis_paths, load_lvis_api
from .samplers import (
    GroupedBatchSampler,
    InfiniteOrEpochDistributedSampler,
    RepeatFactorSampler,
    compute_repeat_factors,
    image_counts_per_class,
)
from .synthetic import SYNTHETIC_CLASSES, ensure_synthetic_dataset
from .transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    DetectionTransform,
    collate,
    denormalize_image,
    get_resize_size,
    preprocess_images,
)
from .visualize import draw_detections
from .voc import VOC_CLASSES, VOCDetection, voc_split_parts

DATASET_NAMES: tuple[str, ...] = ("coco", "voc", "lvis", "synthetic", "custom")

# Default (min_size, max_size) per dataset: the paper's 800 x 1333 on real data, a small size
# on the 256 x 256 synthetic images so that CPU training is quick.
DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "coco": (800, 1333), "voc": (800, 1333), "lvis": (800, 1333), "synthetic": (256, 384), "custom": (800, 1333),
}


def build_dataset(
    name: str,
    data_root: str | Path,
    split: str,
    train: bool | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    multi_scale_range: tuple[int, int] | None = None,
    flip_prob: float = 0.5,
    seed: int = 0,
    synthetic_kwargs: dict | None = None,
    multi_scale_step: int = 1,
    with_masks: bool = False,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
) -> DetectionDataset:
    """Build a dataset by name.

    Args:
        name: 'coco' (data_root/annotations/instances_{split}2017.json + data_root/{split}2017/),
            'voc' (VOCdevkit root with VOC2007 and/or VOC2012; split 'train' = 07+12 trainval,
            'test' = VOC2007 test, other names = that ImageSet of each year present),
            'lvis' (data_root/lvis_v1_{split}.json, images in data_root/train2017 and val2017),
            'synthetic' (generated under data_root on first use; split 'train' or 'val'),
            'custom' (any COCO-format instances JSON ``ann_file`` with its images under ``image_dir``,
            in any layout: ``file_name`` relative to it; category ids and names from the file).
        split: 'train' / 'val' (COCO, LVIS, synthetic), 'train' / 'test' / 'val' / ... (VOC).
        train: training mode; default ``split.startswith('train')``.
        min_size, max_size: resize rule; default `DEFAULT_SIZES[name]`.
        multi_scale_range: e.g. (640, 800) for multi-scale training (paper 4.1.3).
        synthetic_kwargs: extra arguments of `ensure_synthetic_dataset` (num_train, num_val, image_size, seed).
        multi_scale_step: step of the multi-scale short sides (1; 32 for LVIS: 640, 672, ..., 800).
        with_masks: decode instance masks into ``target["masks"]`` (a mask model's training data;
            `DataError` for a dataset without segmentations, e.g. VOC).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    if train is None:
        train = split.startswith("train")
    default_min, default_max = DEFAULT_SIZES[name]
    kwargs = dict(
        train=train,
        min_size=default_min if min_size is None else min_size,
        max_size=default_max if max_size is None else max_size,
        multi_scale_range=multi_scale_range,
        flip_prob=flip_prob,
        seed=seed,
        multi_scale_step=multi_scale_step,
    )
    if name == "custom":
        if ann_file is None or image_dir is None:
            raise ValueError("a custom dataset needs its annotation file and image folder (ann_file, image_dir)")
        dataset: DetectionDataset = CocoDetection(image_dir, ann_file, **kwargs)
    elif name == "coco":
        image_dir, ann_file = build_coco_paths(data_root, split)
        dataset: DetectionDataset = CocoDetection(image_dir, ann_file, **kwargs)
    elif name == "voc":
        dataset = VOCDetection(voc_split_parts(data_root, split), **kwargs)
    elif name == "lvis":
        image_root, ann_file = build_lvis_paths(data_root, split)
        dataset = LVISDetection(image_root, ann_file, **kwargs)
    else:
        if split not in ("train", "val"):
            raise ValueError(f"synthetic dataset splits are 'train' and 'val', got {split!r}")
        paths = ensure_synthetic_dataset(data_root, **(synthetic_kwargs or {}))
        dataset = CocoDetection(paths[f"{split}_images"], paths[f"{split}_ann"], **kwargs)
    if with_masks:
        dataset.set_with_masks(True)
    return dataset


__all__ = [
    "build_dataset", "collate", "preprocess_images", "DetectionTransform", "get_resize_size", "denormalize_image",
    "PIXEL_MEAN", "PIXEL_STD", "DetectionDataset", "ImageRecord", "records_to_coco_dict",
    "DataError", "ImageFileError", "check_image_files", "IMAGE_CHECKS",
    "CocoDetection", "VOCDetection", "LVISDetection", "VOC_CLASSES", "SYNTHETIC_CLASSES",
    "ensure_synthetic_dataset", "load_coco_api", "load_lvis_api",
    "GroupedBatchSampler", "InfiniteOrEpochDistributedSampler", "RepeatFactorSampler",
    "compute_repeat_factors", "image_counts_per_class", "draw_detections", "DATASET_NAMES", "DEFAULT_SIZES",
]
