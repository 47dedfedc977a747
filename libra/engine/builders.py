"""Datasets, data loaders and detectors from command-line settings (shared by train.py and eval.py).

Dataset names and their on-disk layouts (see each loader's docstring in ``libra.data``):
- ``synthetic``: generated on first use under ``data_root`` (coloured shapes, 4 classes);
- ``coco``: ``data_root/annotations/instances_{train,val}2017.json``, ``data_root/{train,val}2017/``;
- ``voc``: ``data_root/VOC2007``, ``data_root/VOC2012`` (train = 07+12 trainval, test = 07 test);
- ``lvis``: ``data_root/lvis_v1_{train,val}.json`` and the COCO image folders under ``data_root``;
- ``custom``: any COCO-format instances JSON per split with its image folder, in any layout
  (``--train-ann FILE --train-images DIR --val-ann FILE --val-images DIR``).

Every failure caused by the input (missing folder, missing or undecodable image file, malformed
annotation file, a non-empty folder given to the synthetic builder) is raised as ``DataError``
(a ValueError) with a one-line message.

Pre-flight image check (``DataSettings.check_images``, the ``--check-images`` flag), run by
`build_split` before anything is trained: ``header`` (default) reads the first bytes and the
last 64 bytes of every image file (size against the annotation; a truncated JPEG / PNG has no end
marker and is then decoded to confirm), ~0.03 ms per file, about 4 s for COCO train2017;
``full`` decodes every image (6-12 min for COCO train2017 on 2 cores; finds damage a header
cannot show); ``none`` skips it. Every process of a multi-GPU run checks the whole split (the
same verdict everywhere, so all ranks stop together). A file that passes the check and still
fails to decode is reported, on one line naming it, when it is loaded (also from data-loader
workers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from libra import data
from libra.data.base import IMAGE_CHECKS, DataError, check_image_files, image_fix_hint
from libra.data.samplers import GroupedBatchSampler, InfiniteOrEpochDistributedSampler, RepeatFactorSampler, compute_repeat_factors
from libra.data.transforms import collate

DATASETS = ("synthetic", "coco", "voc", "lvis", "custom")
# The flags of a custom COCO-format dataset (--dataset custom): annotation file and image folder per split.
CUSTOM_DATA_FLAGS = ("train_ann", "train_images", "val_ann", "val_images")




@dataclass
class DataSettings:
    """What the dataset builders need from the command line."""

    dataset: str
    data_root: str | None
    min_size: int
    max_size: int
    multi_scale_range: tuple[int, int] | None = None
    seed: int = 0
    synthetic_num_train: int = 256
    synthetic_num_val: int = 64
    synthetic_image_size: int = 256
    check_images: str = "header"  # pre-flight image check: "header", "full" or "none" (module docstring)
    multi_scale_step: int = 1  # step of the multi-scale short sides (32 for LVIS: 640, 672, ..., 800)
    # The model predicts masks ("segm" in its iou_types): the training split decodes instance masks
    # (DetectionDataset.with_masks) and the evaluation split must have segmentations.
    with_masks: bool = False
    # --dataset custom: COCO-format annotation files and image folders of the two splits.
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None


def default_data_root(settings: DataSettings) -> Path:
    if settings.dataset == "custom":
        return Path(settings.train_ann or settings.val_ann or ".").parent  # for messages only
    if settings.data_root:
        return Path(settings.data_root)
    if settings.dataset == "synthetic":
        return Path("work_dirs") / "synthetic_data"  # work_dirs/ is git-ignored
    raise DataError(f"--data-root is required for --dataset {settings.dataset}")


def build_split(
    settings: DataSettings,
    train: bool,
    check_files: bool = True,
    split: str | None = None,
    proposals_file: str | None = None,
):
    """The training (``train=True``) or evaluation split of ``settings.dataset``, checked (the command
    line's way to :func:`libra.data.build_dataset`, which it calls).

    With ``check_files`` it checks that every image file exists and, per ``settings.check_images``,
    that it can be decoded (module docstring), so that a missing or broken file is reported
    before any training starts instead of inside a data-loader worker.

    ``split`` (``'train'`` or ``'val'``) reads that split whatever ``train`` says, e.g. the training
    images with the test transform (``eval.py --split train``, to save their proposals);
    ``proposals_file`` attaches pre-computed proposals (:mod:`libra.data.proposals`, Fast R-CNN).
    """
    name = settings.dataset
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = default_data_root(settings)
    common: dict[str, Any] = dict(
        min_size=settings.min_size,
        max_size=settings.max_size,
        multi_scale_range=settings.multi_scale_range if train else None,
        multi_scale_step=settings.multi_scale_step,
        seed=settings.seed,
        with_masks=settings.with_masks and train,  # only training reads masks (evaluation reads the gt file)
    )
    if split not in (None, "train", "val"):
        raise DataError(f"unknown split {split!r}; choose train or val")
    role = split or ("train" if train else "val")
    if name == "voc" and role == "val":
        # Evaluation on VOC2007 test (the paper's); a VOC2012-only root evaluates on its val split.
        split = "test" if (root / "VOC2007").is_dir() else "val"
        if split == "val":
            print(f"note: {root} has no VOC2007: evaluating on VOC2012 val (the paper's numbers are on VOC2007 test)",
                  flush=True)
    else:
        split = role
    size = int(settings.synthetic_image_size)
    synthetic_kwargs = dict(
        num_train=settings.synthetic_num_train, num_val=settings.synthetic_num_val, image_size=(size, size), seed=0
    )
    custom: dict[str, Any] = {}
    if name == "custom":
        ann, images = getattr(settings, f"{role}_ann"), getattr(settings, f"{role}_images")
        if not ann or not images:
            what = "training" if role == "train" else "evaluation"
            extra = "" if role == "train" else " (or train with --no-eval)"
            raise DataError(f"--dataset custom needs the {what} split's --{role}-ann FILE and --{role}-images DIR{extra}")
        for path, flag, kind in ((ann, f"--{role}-ann", "file"), (images, f"--{role}-images", "folder")):
            if not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
                raise DataError(f"{flag} {path}: no such {kind}")
        custom = dict(ann_file=ann, image_dir=images)
        root = Path(images)
    try:
        dataset = data.build_dataset(
            name, root, split, train=train, synthetic_kwargs=synthetic_kwargs, **common, **custom
        )
    except DataError:
        raise
    except (FileNotFoundError, NotADirectoryError) as error:
        raise DataError(str(error).splitlines()[0]) from None
    except OSError as error:  # permissions, a full disk while the synthetic set is written, ...
        where = f" {error.filename}" if error.filename else f" under {root}"
        raise DataError(f"cannot use the {name} data{where}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"malformed annotation file under {root}: {error}") from None
    except (ValueError, KeyError, TypeError) as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read the {name} annotations under {root}: {text}") from None
    if len(dataset) == 0:
        from libra.data.base import no_usable_images_reason

        source = str(getattr(dataset, "ann_file", "") or f"the annotations under {root}")
        reason = no_usable_images_reason(getattr(dataset, "annotation_counts", None), source)
        raise DataError(f"the {name} {'training' if train else 'evaluation'} split under {root} has no usable images"
                        + (f": {reason}" if reason else ""))
    check_image_shapes(dataset)
    if settings.with_masks and not train:
        check_mask_ground_truth(dataset, name, root)
    if check_files:
        missing = [r.file_path for r in dataset.records if not Path(r.file_path).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"image file not found: {missing[0]}{more}")
        check_images(dataset, settings.check_images)
    if proposals_file:
        from libra.data.proposals import load_proposals

        dataset.attach_proposals(load_proposals(proposals_file), proposals_file, name, role)
    return dataset


def check_mask_ground_truth(dataset, name: str, root: Path) -> None:
    """A mask model is evaluated with mask AP, which needs a valid segmentation on every ground-truth
    annotation: annotations whose segmentation cannot be evaluated are dropped from the ground truth
    with a warning naming them (as training drops them), and a split without any usable one is
    refused (one-line DataError), before anything is trained, not after
    (`DetectionDataset.clean_mask_ground_truth`)."""
    if not hasattr(dataset, "clean_mask_ground_truth"):
        return
    dataset.clean_mask_ground_truth()


def check_image_shapes(dataset) -> None:
    """Refuse (one-line DataError naming file and image id) an image too elongated to be resized for the
    detector (aspect ratio over ``libra.data.transforms.MAX_ASPECT_RATIO``), from the annotated sizes,
    before anything is trained; less elongated ones are resized so that their short side reaches the
    detector's 32 px minimum (``get_resize_size``)."""
    from libra.data.transforms import check_aspect_ratio

    for record in dataset.records:
        try:
            check_aspect_ratio(record.height, record.width, f"image {record.image_id} ({record.file_path})")
        except ValueError as error:
            hint = dataset.skip_hint(record) if hasattr(dataset, "skip_hint") else "the annotations"
            raise DataError(f"{error}, or remove it from {hint} to skip it") from None


def check_images(dataset, mode: str = "header") -> None:
    """Raise a one-line DataError naming the first unusable image file of ``dataset`` (and how many more)."""
    if mode not in IMAGE_CHECKS:
        raise DataError(f"--check-images must be one of {', '.join(IMAGE_CHECKS)}, got {mode!r}")
    problems = check_image_files(dataset.records, mode)
    if not problems:
        return
    record, problem = problems[0]
    more = ""
    if len(problems) > 1:
        names = ", ".join(Path(r.file_path).name for r, _ in problems[1:4])
        more = f" (and {len(problems) - 1} more: {names}{', ...' if len(problems) > 4 else ''})"
    hint = dataset.skip_hint(record)
    fix = image_fix_hint(hint, many=len(problems) > 1, check_flag=False)
    raise DataError(f"cannot use image file {record.file_path}: {problem}{more}; {fix}")


def build_train_loader(
    dataset,
    batch_size: int,
    workers: int,
    rank: int,
    world_size: int,
    seed: int,
    repeat_factor_sampling: bool = False,
    repeat_threshold: float = 0.001,
    repeat_rounding: str = "stochastic",
) -> tuple[DataLoader, GroupedBatchSampler]:
    """Shuffled, rank-sharded, aspect-ratio-grouped batches of ``batch_size`` images.

    The sampler's order is a function of (seed, epoch) only: call ``batch_sampler.set_epoch(e)``
    before iterating epoch ``e``. The tail of an epoch is merged into mixed batches so every rank
    runs the same number of iterations (DDP needs that). With ``repeat_factor_sampling`` each image is
    repeated by its LVIS repeat factor, rounded by ``repeat_rounding`` (``libra.data.samplers``).
    """
    if repeat_factor_sampling:
        factors, _ = compute_repeat_factors(dataset.image_labels(), dataset.num_classes, repeat_threshold)
        sampler = RepeatFactorSampler(
            factors, num_replicas=world_size, rank=rank, seed=seed, with_epoch=True, rounding=repeat_rounding
        )
    else:
        sampler = InfiniteOrEpochDistributedSampler(
            len(dataset), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, with_epoch=True
        )
    batch_sampler = GroupedBatchSampler(sampler, dataset.aspect_ratio_flags, batch_size, merge_tail=True)
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, batch_sampler


def build_eval_loader(dataset, batch_size: int, workers: int, rank: int, world_size: int) -> DataLoader:
    """Rank ``r`` of ``R`` evaluates images r, r + R, r + 2R, ... in order: every image exactly once
    over all ranks (no padding, so no duplicates to remove after gathering)."""
    indices = list(range(rank, len(dataset), world_size))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers)
