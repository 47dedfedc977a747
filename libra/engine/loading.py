"""Turning a checkpoint (libra's or MMDetection's) and a command line into a ready detector.

Shared by ``eval.py``, ``analyze.py`` and the Python API (:func:`load_detector`); no script imports
another script. A libra checkpoint records the complete config its model was built from
(``model_config``, :func:`libra.engine.checkpoint.checkpoint_model_config`; older checkpoints are
resolved from their recorded command line), so the model is rebuilt from it, and a flag or
``--set`` given now applies on top of it (e.g. a test-time ``--set score_thr=0.001``). An
MMDetection checkpoint (``state_dict`` with ``rpn_head.*`` / ``roi_head.*`` / ``bbox_head.*``
keys) is loaded into the preset its keys describe (:func:`guess_mmdet_preset`) or ``--model``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from libra.detectors import Detector
from libra.presets import PRESETS, build_model, preset_config

from libra.safe_load import TRUST_FLAG

from .checkpoint import (
    CheckpointError,
    check_model_identity,
    checkpoint_model_config,
    is_libra_checkpoint,
    load_checkpoint_file,
    load_model_state,
)
from .cli import add_data_arguments, add_model_arguments, apply_recipe, one_line

# Data settings of the training run that eval.py / analyze.py take from a libra checkpoint unless
# given on their command line (the model's own settings come from its recorded config).
DATA_FROM_CHECKPOINT = (
    "dataset", "model", "min_size", "max_size", "synthetic_num_train", "synthetic_num_val", "synthetic_image_size",
    "data_root", "train_ann", "train_images", "val_ann", "val_images",
)


def build_eval_parser() -> argparse.ArgumentParser:
    """eval.py's command line (analyze.py's model commands take the same data / model flags)."""
    parser = argparse.ArgumentParser(description="Evaluate a libra / MMDetection checkpoint.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=None,
        help="libra or MMDetection .pth, or a train.py work dir (its last checkpoint); required unless --fps",
    )
    data = add_data_arguments(parser, dataset_default=None)
    data.add_argument("--workers", type=int, default=2)
    add_model_arguments(parser, model_default=None)
    parser.add_argument("--proposals", action="store_true", help="evaluate RPN proposal recall AR@100/300/1000 (COCOeval) and AR@k_mmdet (MMDetection's, the paper's Table 2)")
    parser.add_argument(
        "--save-proposals", nargs="?", const="auto", default=None, metavar="FILE",
        help="also write the top --proposals-per-image proposals of every image (Fast R-CNN input, format in "
        "libra/data/proposals.py); no value: proposals_<split>.pt in --work-dir. Implies --proposals",
    )
    parser.add_argument("--proposals-per-image", type=int, default=1000, help="proposals kept per image by --save-proposals")
    parser.add_argument(
        "--split", choices=("train", "val"), default="val",
        help="the split to run on (train: e.g. to save the training images' proposals; test transform either way)",
    )
    parser.add_argument("--fps", action="store_true", help="measure inference images/s (batch 1, after warm-up)")
    parser.add_argument("--fps-images", type=int, default=50, help="images timed by --fps (after 5 warm-up images)")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="draw detections of N images into PNG files")
    parser.add_argument("--show-score-thr", type=float, default=0.3)
    parser.add_argument(
        "--per-class", action="store_true",
        help="print the AP (and AP50) of every class; it is always written to per_class.json",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per process")
    parser.add_argument(
        "--batch-independent", action="store_true",
        help="predict every image of a batch on its own, so that its detections do not depend on the other images "
        "of the batch (the balanced feature pyramid and padding make them differ slightly otherwise; "
        "Detector.batch_independent). Batch 1 (the default) is independent anyway",
    )
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--gpus", type=int, default=1, help="processes (DDP-style sharded evaluation)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    add_trust_argument(parser)
    return parser


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file from what a user may pass: the file itself, a ``train.py`` work dir, or the
    work dir's ``last_checkpoint`` pointer file (both resolve to the checkpoint it names)."""
    path = Path(path)
    pointer = path / "last_checkpoint" if path.is_dir() else path
    if path.is_dir() and not pointer.is_file():
        found = sorted(p.name for p in path.glob("*.pth"))
        raise CheckpointError(
            f"{path} is a folder without a last_checkpoint file (not a train.py work dir): pass a checkpoint file"
            + (f" (there: {', '.join(found[-3:])})" if found else "")
        )
    if pointer.name == "last_checkpoint" and pointer.is_file():
        name = pointer.read_text().strip()
        target = pointer.parent / name
        if not name or not target.is_file():
            raise CheckpointError(f"{pointer} names {name or 'nothing'!r}, which is not a file in {pointer.parent}")
        return target
    return path


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``: the opt-in of every script for a checkpoint that needs more than
    ``torch.load(weights_only=True)`` reads (:mod:`libra.safe_load`)."""
    parser.add_argument(
        TRUST_FLAG, dest="trust_checkpoint", action="store_true",
        help="load a checkpoint that holds Python objects beyond tensors and plain values (a libra checkpoint "
        "of before weights-only loading, an MMDetection 3.x checkpoint with mmengine objects). Unpickling such "
        "a file runs code stored in it: pass this only for a file you trust. Without it such a file is refused "
        "and nothing of it runs",
    )


def read_checkpoint(path: str | Path, trust: bool = False, trust_hint: str = TRUST_FLAG) -> tuple[str, dict]:
    """('libra' | 'mmdet', checkpoint dict) of ``path`` (:func:`resolve_checkpoint_path`), read
    weights-only unless ``trust`` (:mod:`libra.safe_load`)."""
    checkpoint = load_checkpoint_file(resolve_checkpoint_path(path), map_location="cpu", trust=trust, trust_hint=trust_hint)
    if is_libra_checkpoint(checkpoint):
        return "libra", checkpoint
    state = checkpoint.get("state_dict", checkpoint)
    if isinstance(state, dict) and any(k.startswith(("rpn_head.", "roi_head.bbox_head.", "bbox_head.")) for k in state):
        return "mmdet", checkpoint
    raise CheckpointError(
        f"{path} is neither a libra checkpoint (train.py) nor an MMDetection detector checkpoint "
        "(state_dict with rpn_head.* / roi_head.bbox_head.* / bbox_head.* keys)"
    )


def guess_mmdet_preset(state: dict) -> str:
    """The libra preset an MMDetection checkpoint's keys describe: detector family (``bbox_head.retina_*``:
    RetinaNet; ``rpn_head.*`` (a 3.x standalone RPN: ``bbox_head.rpn_*``) and ``roi_head.*``: Faster R-CNN, Mask R-CNN with ``roi_head.mask_head.*``;
    only ``rpn_head.*``: a standalone RPN; only ``roi_head.*``: Fast R-CNN), Libra (a second neck, the
    BFP: ``neck.1.*``) and backbone (ResNet-50 / 101 by the number of layer3 blocks, ResNeXt by its
    grouped 3x3 convs)."""
    rpn = any(k.startswith(("rpn_head.", "bbox_head.rpn_")) for k in state)  # bbox_head.rpn_*: MMDetection 3.x's RPN
    roi = any(k.startswith("roi_head.") for k in state)
    if any(k.startswith("bbox_head.retina_cls") for k in state):
        family = "retinanet"
    elif rpn and any(k.startswith("roi_head.mask_head.") for k in state):
        family = "mask_rcnn"
    else:
        family = "faster_rcnn" if rpn and roi else ("rpn" if rpn else "fast_rcnn")
    libra = any(k.startswith("neck.1.") for k in state)
    blocks = {k.split(".")[2] for k in state if k.startswith("backbone.layer3.")}
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.dim() == 4 and conv2.shape[1] < conv2.shape[0]
    depth = "x101_64x4d" if grouped else ("r101" if len(blocks) > 6 else "r50")
    name = f"{'libra_' if libra else ''}{family}_{depth}_fpn"
    if any(".conv2.conv_offset." in k for k in state) and f"{name}_dcn" in PRESETS:
        name = f"{name}_dcn"  # deformable convolutions in the backbone (Table 1's strongest row)
    return name


def resolve_checkpoint_args(args: argparse.Namespace) -> tuple[argparse.Namespace, str | None, dict | None]:
    """Read ``args.checkpoint`` and fill ``args`` from it: the training run's data settings (unless
    given), the model (the checkpoint's, or the preset an MMDetection checkpoint's keys describe)
    and ``args.model_config`` (the checkpoint's recorded config with this command line's flags and
    ``--set`` on top). Returns ``(args, 'libra' | 'mmdet' | None, checkpoint dict or None)``."""
    kind, checkpoint = (None, None)
    if getattr(args, "checkpoint", None):
        args.checkpoint = str(resolve_checkpoint_path(args.checkpoint))
        kind, checkpoint = read_checkpoint(args.checkpoint, trust=bool(getattr(args, "trust_checkpoint", False)))
    saved = checkpoint.get("args", {}) if kind == "libra" else {}
    for key in DATA_FROM_CHECKPOINT:
        if getattr(args, key, None) is None and saved.get(key) is not None:
            setattr(args, key, saved[key])
    if args.model is None and kind == "mmdet":
        args.model = guess_mmdet_preset(checkpoint.get("state_dict", checkpoint))
    args.model = args.model or "libra_faster_rcnn_r50_fpn"
    base = None
    if kind == "libra" and checkpoint.get("model_name", args.model) == args.model:
        base = checkpoint_model_config(checkpoint, args.checkpoint)
    apply_recipe(args, base)  # sizes and synthetic settings not given or saved; the model config
    return args, kind, checkpoint


def load_weights(
    model: torch.nn.Module, kind: str | None, checkpoint: dict | None, args, num_classes: int, class_names=None
) -> None:
    if kind == "libra":
        check_model_identity(checkpoint, args.model, num_classes, args.checkpoint, class_names=class_names)
        load_model_state(model, checkpoint["model"], args.checkpoint)
    elif kind == "mmdet":
        from libra.mmdet_checkpoint import load_mmdet_checkpoint

        state = checkpoint.get("state_dict", checkpoint)
        fc_cls = state.get("roi_head.bbox_head.fc_cls.weight")
        if fc_cls is not None and fc_cls.shape[0] != num_classes + 1:
            raise CheckpointError(
                f"{args.checkpoint} classifies {fc_cls.shape[0] - 1} classes but the {args.dataset} dataset has {num_classes}"
            )
        try:
            load_mmdet_checkpoint(model, checkpoint)
        except ValueError as error:
            raise CheckpointError(f"{args.checkpoint} does not fit --model {args.model}: {one_line(error)}") from None


@dataclass
class LoadedDetector:
    """What :func:`load_detector` returns: the model (eval mode, on its device) and what it is.

    ``min_size`` / ``max_size`` are the test-time resize of the run that trained it (800 / 1333
    for MMDetection checkpoints); ``label_to_cat_id`` the dataset's category id of each label
    (labels + 1 when the checkpoint does not record them)."""

    model: Detector
    preset: str
    config: dict[str, Any]
    num_classes: int
    class_names: tuple[str, ...] | None
    kind: str  # "libra" or "mmdet"
    min_size: int = 800
    max_size: int = 1333
    label_to_cat_id: tuple[int, ...] = ()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(
        self, images: Sequence[Any], batch_size: int = 1, score_thr: float | None = None
    ) -> list[dict[str, Any]]:
        """Detections of image files or tensors, in their original pixels.

        Args:
            images: paths (``str`` / ``Path``) and / or ``[3, h, w]`` RGB tensors (uint8, or float in 0..255).
            batch_size: images per forward pass.
            score_thr: keep detections scoring at least this (None: the model's own ``score_thr``).

        Returns:
            Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D], "class_names": [D names]``
            (``"masks": [D, h, w]`` bool for a mask model), and ``"file_name"`` for a path``}``.
            An unreadable file raises :class:`libra.engine.predict.InputError` (``predict.py`` skips it).
        """
        from .predict import keep_above, predict_images, read_image

        tensors, names = [], []
        for item in images:
            if isinstance(item, (str, Path)):
                tensors.append(read_image(Path(item)))
                names.append(str(item))
            else:
                tensors.append(item)
                names.append(None)
        outputs = predict_images(self.model, tensors, self.min_size, self.max_size, batch_size, self.device)
        labelled = self.class_names or tuple(str(i) for i in range(self.num_classes))
        results = []
        for output, name in zip(outputs, names):
            if score_thr is not None:
                output = keep_above(output, score_thr)
            output["class_names"] = [labelled[i] for i in output["labels"].tolist()] if "labels" in output else []
            if name is not None:
                output["file_name"] = name
            results.append(output)
        return results


def classifier_num_classes(state: dict, prefix: str = "") -> int | None:
    """C of a detector state dict, from its classifier: ``roi_head.<box>.fc_cls`` (C + 1 rows, with
    background) or the RetinaNet head's ``retina_cls`` (C x A rows, ``retina_reg`` 4 x A); None for a
    model without one (an RPN). ``prefix`` picks the key layout: ``"mmdet"`` (``roi_head.bbox_head.*``,
    ``bbox_head.*``) or libra's (``roi_head.box_head.*``, ``dense_head.head.*``)."""
    box, dense = ("roi_head.bbox_head", "bbox_head") if prefix == "mmdet" else ("roi_head.box_head", "dense_head.head")
    fc_cls = state.get(f"{box}.fc_cls.weight")
    if fc_cls is not None:
        return int(fc_cls.shape[0]) - 1  # + background
    retina_cls, retina_reg = state.get(f"{dense}.retina_cls.weight"), state.get(f"{dense}.retina_reg.weight")
    if retina_cls is not None and retina_reg is not None:
        return int(retina_cls.shape[0]) // (int(retina_reg.shape[0]) // 4)  # C x A rows, 4 x A
    return None


def mmdet_class_names(checkpoint: dict) -> tuple[str, ...] | None:
    """Class names an MMDetection checkpoint carries (``meta.dataset_meta.classes`` in 3.x,
    ``meta.CLASSES`` in 2.x), or None."""
    meta = checkpoint.get("meta") or {}
    names = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
    return tuple(str(n) for n in names) if names else None


def load_detector(
    checkpoint: str | Path,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
) -> LoadedDetector:
    """A libra or MMDetection checkpoint as a ready detector (eval mode, on ``device``).

    Args:
        checkpoint: path of a ``train.py`` checkpoint or a released MMDetection one.
        preset: the preset to build (default: the checkpoint's; an MMDetection checkpoint's is
            guessed from its keys, :func:`guess_mmdet_preset`). A libra checkpoint of another
            preset is refused.
        overrides: preset keys applied on top of the recorded config (test-time settings such as
            ``score_thr``); validated as everywhere (:func:`libra.presets.preset_config`).
        num_classes, class_names: the data the model is meant for; a checkpoint trained for other
            classes is refused in one line. An MMDetection RPN has no classifier: ``num_classes``
            defaults to 1 there.
        device: where the model is put.
        trust_checkpoint: read a file that holds Python objects beyond tensors and plain values
            (unpickling it runs code stored in it: only for a file you trust). Without it such a
            file is refused (:mod:`libra.safe_load`).

    Raises:
        CheckpointError: the file is not a checkpoint libra reads, or does not fit (one line).
        UntrustedCheckpointError: the file needs ``trust_checkpoint=True`` (nothing of it ran).
    """
    kind, raw = read_checkpoint(str(checkpoint), trust=trust_checkpoint, trust_hint="trust_checkpoint=True")
    return detector_from_checkpoint(kind, raw, checkpoint, preset=preset, overrides=overrides, num_classes=num_classes,
                                    class_names=class_names, device=device)


def checkpoint_preset(kind: str, raw: dict) -> str:
    """The preset a checkpoint read by :func:`read_checkpoint` is built as: a libra checkpoint's
    recorded one, or the one an MMDetection checkpoint's keys describe (:func:`guess_mmdet_preset`)."""
    if kind == "libra":
        return raw.get("model_name") or (raw.get("args") or {}).get("model")
    return guess_mmdet_preset(raw.get("state_dict", raw))


def detector_from_checkpoint(
    kind: str,
    raw: dict,
    checkpoint: str | Path,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedDetector:
    """:func:`load_detector` of a checkpoint already read (``(kind, raw) = read_checkpoint(checkpoint)``),
    for a caller that looked into it first (``predict.py`` validates ``--set`` against its preset)."""
    overrides = dict(overrides or {})
    preset = preset or checkpoint_preset(kind, raw)
    if kind == "libra":
        saved_classes = raw.get("class_names")
        check_model_identity(raw, preset, int(num_classes or raw["num_classes"]), checkpoint, class_names=class_names)
        config = preset_config(preset, **{**checkpoint_model_config(raw, checkpoint), **overrides})
        classes = int(raw["num_classes"])
        model = build_model(preset, classes, **config)
        load_model_state(model, raw["model"], checkpoint)
        names = tuple(saved_classes) if saved_classes else (tuple(class_names) if class_names else None)
        saved_args = raw.get("args") or {}
        sizes = (int(saved_args.get("min_size") or 800), int(saved_args.get("max_size") or 1333))
        cat_ids = tuple(raw.get("label_to_cat_id") or range(1, classes + 1))
    else:
        from libra.mmdet_checkpoint import load_mmdet_checkpoint

        state = raw.get("state_dict", raw)
        try:
            config = preset_config(preset, **overrides)
        except ValueError as error:
            raise CheckpointError(f"{checkpoint}: {one_line(error)}") from None
        found = classifier_num_classes(state, "mmdet")
        classes = found if found is not None else int(num_classes or 1)
        if num_classes is not None and classes != int(num_classes):
            raise CheckpointError(f"{checkpoint} classifies {classes} classes but the data has {num_classes}")
        model = build_model(preset, classes, **config)
        try:
            load_mmdet_checkpoint(model, raw)
        except ValueError as error:
            raise CheckpointError(f"{checkpoint} does not fit --model {preset}: {one_line(error)}") from None
        names = mmdet_class_names(raw) or (tuple(class_names) if class_names else None)
        sizes, cat_ids = (800, 1333), tuple(range(1, classes + 1))  # MMDetection's test pipeline: 1333 x 800
    model.to(device).eval()
    return LoadedDetector(model, preset, config, classes, names, kind, sizes[0], sizes[1], cat_ids)


def init_model_config(path: str | Path, preset: str, trust: bool = False) -> dict[str, Any] | None:
    """The model config a fine-tuning run starts from: a libra checkpoint's recorded config when it
    is of ``preset`` (the new run's flags and ``--set`` still apply on top), else None (the preset's,
    e.g. for an MMDetection checkpoint, whose architecture is the preset's)."""
    kind, raw = read_checkpoint(path, trust=trust)
    if kind == "libra" and raw.get("model_name") == preset:
        return checkpoint_model_config(raw, path)
    return None


def init_from_checkpoint(model: torch.nn.Module, path: str | Path, trust: bool = False) -> str:
    """Fine-tuning (``train.py --init-from``): copy into ``model`` every tensor of a libra or
    MMDetection detector checkpoint whose name and shape fit, and leave the others as initialised
    (e.g. the classifier and box regressor when the class count differs). Only weights: no
    optimizer, epoch or generator state (that is ``--resume``).

    Returns:
        One line saying how many tensors were taken and which layers were re-initialised and why.

    Raises:
        CheckpointError: the file is no detector checkpoint, or fewer than half of the model's
            tensors fit (another architecture: the message names the checkpoint's preset).
    """
    from libra.mmdet_checkpoint import convert_mmdet_state_dict

    kind, raw = read_checkpoint(path, trust=trust)
    if kind == "libra":
        source, where = raw["model"], f"the {raw.get('model_name')} checkpoint"
    else:
        source, where = convert_mmdet_state_dict(raw.get("state_dict", raw)), "the MMDetection checkpoint"
    own = model.state_dict()
    taken, reshaped, absent = {}, [], []
    for key, value in own.items():
        theirs = source.get(key)
        if theirs is None:
            absent.append(key)
        elif tuple(theirs.shape) != tuple(value.shape):
            reshaped.append(f"{key} {tuple(theirs.shape)} -> {tuple(value.shape)}")
        else:
            taken[key] = theirs.to(value.dtype)
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    if len([k for k in taken if not k.endswith("num_batches_tracked")]) < len(counted) / 2:
        guess = raw.get("model_name") if kind == "libra" else guess_mmdet_preset(raw.get("state_dict", raw))
        raise CheckpointError(
            f"--init-from {path}: only {len(taken)} of {len(own)} tensors of this model fit {where} "
            f"(a {guess} model): pass --model {guess}, or another checkpoint"
        )
    model.load_state_dict(taken, strict=False)
    layers = sorted({item.split(" ")[0].rsplit(".", 1)[0] for item in reshaped})
    message = f"--init-from {path}: loaded {len(taken)} of {len(own)} tensors of {where}"
    if layers:
        theirs, ours = classifier_num_classes(source), classifier_num_classes(own)
        why = (f"the checkpoint classifies {theirs} classes, this model {ours}" if theirs and ours and theirs != ours
               else f"other shapes: {'; '.join(reshaped[:2])}{'; ...' if len(reshaped) > 2 else ''}")
        message += f"; re-initialised {', '.join(layers)} ({why})"
    if absent:
        message += f"; {len(absent)} not in the checkpoint kept as initialised ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''})"
    return message
