"""Command-line pieces shared by ``train.py`` and ``eval.py``.

Both scripts take the same data and model flags (one flag name per setting, the preset key with
dashes), fill what is not given from :func:`libra.recipes.recipe`, and build the data settings
and the detector from the result.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from typing import Any

import torch

from libra import presets
from libra.presets import build_model, preset_config, preset_iou_types
from libra.recipes import recipe

from .builders import CUSTOM_DATA_FLAGS, DATASETS, IMAGE_CHECKS, DataError, DataSettings


# Preset keys with a command-line flag of their own (``--frozen-stages`` is ``frozen_stages``): aliases
# of ``--set key=value``, applied before ``--set``; giving both with different values is refused.
MODEL_FLAGS = (
    "sampler", "neck", "box_loss", "cls_loss", "box_head", "frozen_stages", "backbone_norm", "width_per_group",
    "stage_blocks",
)
SYNTHETIC_FLAGS = ("synthetic_num_train", "synthetic_num_val", "synthetic_image_size")


def add_data_arguments(parser: argparse.ArgumentParser, dataset_default: str | None) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("data")
    fallback = dataset_default or "the checkpoint's"
    group.add_argument(
        "--dataset", choices=DATASETS, default=None,
        help=f"default: custom with --train-ann / --val-ann, else {fallback}",
    )
    parser.set_defaults(dataset_default=dataset_default)
    group.add_argument("--train-ann", default=None, metavar="FILE", help="custom dataset: COCO-format instances JSON of the training split")
    group.add_argument("--train-images", default=None, metavar="DIR", help="custom dataset: the folder its file_name entries are relative to")
    group.add_argument("--val-ann", default=None, metavar="FILE", help="custom dataset: COCO-format instances JSON of the evaluation split")
    group.add_argument("--val-images", default=None, metavar="DIR", help="custom dataset: the evaluation split's image folder")
    group.add_argument(
        "--data-root", default=None, help="dataset folder (synthetic: generated there; default work_dirs/synthetic_data)"
    )
    group.add_argument("--min-size", type=int, default=None, help="short side after resize (recipe default)")
    group.add_argument("--max-size", type=int, default=None, help="cap on the long side (recipe default)")
    group.add_argument("--synthetic-num-train", type=int, default=None)
    group.add_argument("--synthetic-num-val", type=int, default=None)
    group.add_argument("--synthetic-image-size", type=int, default=None)
    group.add_argument(
        "--proposals-file", default=None, metavar="FILE",
        help="pre-computed proposals of this split (train.py: of the training split) for the Fast R-CNN "
        "presets; eval.py --save-proposals writes them",
    )
    group.add_argument(
        "--check-images", choices=IMAGE_CHECKS, default="header",
        help="pre-flight check of the image files: header (size and end marker of each file, ~4 s for COCO "
        "train2017), full (decode every image: minutes), none",
    )
    return group


def add_model_arguments(parser: argparse.ArgumentParser, model_default: str | None) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model_default, help="a preset of libra.presets")
    choices = presets.CHOICES
    group.add_argument("--sampler", choices=choices["sampler"], default=None)
    group.add_argument("--neck", choices=choices["neck"], default=None)
    group.add_argument("--box-loss", choices=choices["box_loss"], default=None)
    group.add_argument(
        "--cls-loss", choices=choices["cls_loss"], default=None,
        help="bcr: bucketed class re-weighting (paper Sec. 3.3.3; --set bcr_t=0.025 --set bcr_s=10, Table 10)",
    )
    group.add_argument("--box-head", choices=choices["box_head"], default=None)
    group.add_argument("--frozen-stages", type=int, default=None, help="-1 none, 0 stem, k stem + layer1..k (preset: 1)")
    group.add_argument(
        "--backbone-norm", choices=choices["backbone_norm"], default=None,
        help="frozen: BN with fixed statistics (ImageNet recipe); bn: trainable statistics (from scratch)",
    )
    group.add_argument("--width-per-group", type=int, default=None, help="ResNet 3x3 width per group (64 = standard)")
    group.add_argument(
        "--stage-blocks", type=int, nargs=4, default=None, metavar="N",
        help="keep only the first N blocks of each ResNet stage (e.g. 1 1 1 1; default: all, 3 4 6 3 for R-50)",
    )
    group.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any other preset override, e.g. --set roi_batch_size=256 (value parsed as JSON when possible)",
    )
    return group


def parse_set_overrides(items: list[str], preset: str | None = None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}`` with JSON values where they parse (else strings).

    With ``preset`` each value goes through the one validator of preset keys
    (:func:`libra.presets.check_setting`): a one-line `DataError` names the item, what the key
    takes and the preset default; an unknown key gets the closest valid ones.
    """
    defaults = preset_config(preset) if preset is not None else None
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise DataError(f"--set {item}: expected KEY=VALUE (e.g. --set roi_batch_size=256), got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if defaults is not None:
            if key not in defaults:
                close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
                if close:
                    raise DataError(f"--set {item}: unknown key {key!r}; did you mean {' or '.join(close)}? (valid keys: libra/presets.py)")
                raise DataError(f"--set {item}: unknown key {key!r}; valid keys: {', '.join(sorted(defaults))}")
            try:
                value = presets.check_setting(key, value, defaults[key])
            except ValueError as error:
                raise DataError(f"--set {item}: {error}") from None
        overrides[key] = value
    return overrides


def resolve_model_config(args: argparse.Namespace, recipe_overrides: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The complete config of the model ``args.model`` from, in this order (later wins): the
    recipe's preset keys, ``base`` (a checkpoint's recorded config), the dedicated flags
    (:data:`MODEL_FLAGS`), then ``--set``. A flag and a ``--set`` of one key with different values
    are refused in one line; every value is validated once (:func:`libra.presets.preset_config`)."""
    sets = parse_set_overrides(list(getattr(args, "set", []) or []), args.model)
    flags: dict[str, Any] = {}
    for key in MODEL_FLAGS:
        value = getattr(args, key, None)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        try:
            flags[key] = presets.check_setting(key, value, presets.PRESETS[args.model][key])
        except ValueError as error:
            raise DataError(f"{flag} {value}: {error}") from None
        if key in sets and sets[key] != flags[key]:
            raise DataError(
                f"{flag} {value} and --set {key}={sets[key]!r} give {key} two values: pass one of them"
            )
    layers = {**recipe_overrides, **(base or {}), **flags, **sets}
    try:
        return preset_config(args.model, **layers)
    except ValueError as error:
        raise DataError(f"--model {args.model}: {one_line(error)}") from None


def apply_recipe(args: argparse.Namespace, base_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill the data settings that are None in ``args`` from the recipe of ``(args.dataset, the
    preset's detector)`` and resolve the model's complete config into ``args.model_config``
    (:func:`resolve_model_config`; ``base_config``: a checkpoint's). Returns the recipe.

    A bad ``--model``, flag or ``--set`` raises `DataError` (a ValueError with a one-line message),
    before any file is read or written."""
    try:
        detector = preset_config(args.model)["detector"]
    except ValueError as error:
        raise DataError(f"--model {args.model}: {one_line(error)}") from None
    resolve_dataset(args)
    chosen = recipe(args.dataset, detector, getattr(args, "recipe", None) or "v2")
    for key in ("min_size", "max_size"):
        if getattr(args, key, None) is None:
            setattr(args, key, chosen.get(key))
    synthetic = recipe("synthetic", detector)
    for key in SYNTHETIC_FLAGS:
        if getattr(args, key, None) is None:
            setattr(args, key, synthetic[key])
    args.model_config = resolve_model_config(args, dict(chosen.get("overrides", {})), base_config)
    if getattr(args, "device", None) is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return chosen


def resolve_dataset(args: argparse.Namespace) -> None:
    """``args.dataset``: as given, else ``custom`` when a custom split's files are given, else the
    script's default; custom-dataset flags with another ``--dataset`` are refused in one line."""
    given = [f"--{key.replace('_', '-')}" for key in CUSTOM_DATA_FLAGS if getattr(args, key, None)]
    if args.dataset is None:
        args.dataset = "custom" if given else (getattr(args, "dataset_default", None) or "synthetic")
    if given and args.dataset != "custom":
        raise DataError(f"{' '.join(given)} describe a custom dataset but --dataset is {args.dataset}: drop --dataset")


def check_proposals_flags(args: argparse.Namespace, flags: list[tuple[str, str]]) -> None:
    """A Fast R-CNN preset needs each proposals file of ``flags`` (``(attribute, flag)``); any other
    model reads none (it makes its own proposals, or has none). One-line `DataError` otherwise."""
    fast_rcnn = preset_config(args.model)["detector"] == "fast_rcnn"
    for attribute, flag in flags:
        given = getattr(args, attribute, None)
        if fast_rcnn and not given:
            split = "val" if "val" in attribute or getattr(args, "split", "train") == "val" else "train"
            raise DataError(
                f"--model {args.model} runs the R-CNN stage on pre-computed proposals: pass {flag} FILE "
                f"(written by: python eval.py --checkpoint <RPN checkpoint> --split {split} --save-proposals FILE)"
            )
        if given and not fast_rcnn:
            raise DataError(
                f"{flag} is read by the Fast R-CNN presets only (fast_rcnn_r50_fpn, libra_fast_rcnn_r50_fpn); "
                f"--model {args.model} does not take pre-computed proposals"
            )


def data_settings(args: argparse.Namespace) -> DataSettings:
    """The data settings of ``args``; masks are decoded for a model whose outputs include ``"segm"``
    (:func:`libra.presets.preset_iou_types`)."""
    return DataSettings(
        dataset=args.dataset,
        data_root=args.data_root,
        min_size=args.min_size,
        max_size=args.max_size,
        multi_scale_range=getattr(args, "multi_scale_range", None),
        seed=getattr(args, "seed", 0),
        synthetic_num_train=args.synthetic_num_train,
        synthetic_num_val=args.synthetic_num_val,
        synthetic_image_size=args.synthetic_image_size,
        check_images=getattr(args, "check_images", None) or "header",
        multi_scale_step=int(getattr(args, "multi_scale_step", None) or 1),
        with_masks="segm" in preset_iou_types(args.model),
        **{key: getattr(args, key, None) for key in CUSTOM_DATA_FLAGS},
    )


def build_detector(args: argparse.Namespace, num_classes: int, train_set=None) -> torch.nn.Module:
    """The model ``args.model`` with its resolved config ``args.model_config`` (:func:`apply_recipe`).

    ``train_set``: the training dataset, whose per-class image counts a ``cls_loss='bcr'`` model needs
    (bucketed class re-weighting, Eq. 21); they are cached in ``args.work_dir`` keyed by the
    annotation file (:func:`libra.data.class_counts.cached_class_image_counts`). Without it (eval.py)
    a BCR model is built for evaluation only; its checkpoint holds the class weights.
    """
    config = args.model_config
    counts = None
    if train_set is not None and config.get("cls_loss") == "bcr":
        from pathlib import Path

        from libra.data.class_counts import cached_class_image_counts

        counts = cached_class_image_counts(train_set, Path(args.work_dir) / "class_image_counts.json")
    return build_model(
        args.model, num_classes, pretrained=getattr(args, "pretrained", None), class_image_counts=counts,
        trust_pretrained=bool(getattr(args, "trust_checkpoint", False)), **config
    )


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    An exception re-raised from a DataLoader worker carries "Caught X in DataLoader worker
    process N. Original Traceback ..." with the worker's traceback: the message is then the
    traceback's last line without its ``module.X:`` prefix.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        caught = re.match(r"Caught (\w+) ", lines[0]) if lines else None
        text = lines[-1].strip() if lines else text
        if caught:
            text = re.sub(rf"^(?:[\w.]+\.)?{caught.group(1)}: ", "", text)
    return " ".join(text.split()) or type(error).__name__
