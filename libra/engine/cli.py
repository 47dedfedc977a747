"""Command-line pieces shared by ``train.py`` and ``eval.py``.

Both scripts take the same data and model flags (one flag name per setting, the preset key with
dashes), fill what is not given from :func:`libra.recipes.recipe`, and build the data settings
and the detector from the result.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from libra.presets import build_model, preset_config
from libra.recipes import recipe

from .builders import DATASETS, DataError, DataSettings

# Flags that are preset overrides with their own command-line switch.
ABLATION_FLAGS = ("sampler", "neck", "box_loss", "cls_loss", "box_head")
BACKBONE_FLAGS = ("frozen_stages", "backbone_norm", "width_per_group", "stage_blocks")
SYNTHETIC_FLAGS = ("synthetic_num_train", "synthetic_num_val", "synthetic_image_size")


def add_data_arguments(parser: argparse.ArgumentParser, dataset_default: str | None) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default=dataset_default)
    group.add_argument(
        "--data-root", default=None, help="dataset folder (synthetic: generated there; default work_dirs/synthetic_data)"
    )
    group.add_argument("--min-size", type=int, default=None, help="short side after resize (recipe default)")
    group.add_argument("--max-size", type=int, default=None, help="cap on the long side (recipe default)")
    group.add_argument("--synthetic-num-train", type=int, default=None)
    group.add_argument("--synthetic-num-val", type=int, default=None)
    group.add_argument("--synthetic-image-size", type=int, default=None)
    return group


def add_model_arguments(parser: argparse.ArgumentParser, model_default: str | None) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model_default, help="a preset of libra.presets")
    group.add_argument("--sampler", choices=("random", "iou_balanced"), default=None)
    group.add_argument("--neck", choices=("fpn", "bfp", "pafpn", "bpafpn"), default=None)
    group.add_argument("--box-loss", choices=("smooth_l1", "l1", "balanced_l1", "lgr_l1"), default=None)
    group.add_argument("--cls-loss", choices=("ce", "lgr_ce", "sigmoid_ce"), default=None)
    group.add_argument("--box-head", choices=("shared2fc", "4conv1fc"), default=None)
    group.add_argument("--frozen-stages", type=int, default=None, help="-1 none, 0 stem, k stem + layer1..k (preset: 1)")
    group.add_argument(
        "--backbone-norm", choices=("frozen", "bn"), default=None,
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


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}`` with JSON values where they parse (else strings)."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise DataError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def apply_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the data and model settings that are None in ``args`` from the recipe of
    ``(args.dataset, the preset's detector)``; sets ``args.overrides``. Returns the recipe."""
    detector = preset_config(args.model)["detector"]
    chosen = recipe(args.dataset, detector)
    for key in ("min_size", "max_size", *BACKBONE_FLAGS):
        if getattr(args, key, None) is None:
            setattr(args, key, chosen.get(key))
    synthetic = recipe("synthetic", detector)
    for key in SYNTHETIC_FLAGS:
        if getattr(args, key, None) is None:
            setattr(args, key, synthetic[key])
    overrides = dict(chosen.get("overrides", {}))
    for key in ABLATION_FLAGS:
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    overrides.update(parse_set_overrides(list(getattr(args, "set", []) or [])))
    args.overrides = overrides
    if getattr(args, "device", None) is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return chosen


def data_settings(args: argparse.Namespace) -> DataSettings:
    return DataSettings(
        dataset=args.dataset,
        data_root=args.data_root,
        min_size=args.min_size,
        max_size=args.max_size,
        multiscale_min_sizes=getattr(args, "multi_scale_range", None),
        seed=getattr(args, "seed", 0),
        synthetic_num_train=args.synthetic_num_train,
        synthetic_num_val=args.synthetic_num_val,
        synthetic_image_size=args.synthetic_image_size,
    )


def build_detector(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The preset ``args.model`` with the command line's overrides (backbone knobs included)."""
    overrides = dict(args.overrides)
    for key in BACKBONE_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = tuple(value) if key == "stage_blocks" else value
    return build_model(args.model, num_classes, pretrained=getattr(args, "pretrained", None), **overrides)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (data-loader workers wrap it in a traceback)."""
    text = str(error).strip()
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    return " ".join(text.split()) or type(error).__name__
