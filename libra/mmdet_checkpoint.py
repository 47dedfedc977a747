"""Load released MMDetection v2/v3 Faster R-CNN / Libra R-CNN checkpoints (SPEC.md section 5).

MMDetection key -> this project's key:

- ``backbone.*``                                -> ``backbone.*`` (torchvision ResNet names in both)
- ``neck.0.lateral_convs.{i}.conv.{w,b}``       -> ``neck.0.lateral_convs.{i}.{w,b}``
- ``neck.0.fpn_convs.{i}.conv.{w,b}``           -> ``neck.0.fpn_convs.{i}.{w,b}``
- ``neck.1.refine.{g,theta,phi,conv_out}.conv.*`` -> ``neck.1.refine.{g,theta,phi,conv_out}.*``
- ``rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*``      -> ``rpn.head.{rpn_conv,rpn_cls,rpn_reg}.*``
- ``roi_head.bbox_head.*``                      -> ``roi_head.box_head.*``
  (``shared_fcs.{0,1}``, ``fc_cls`` ``[C+1, 1024]``, ``fc_reg`` ``[4C, 1024]``).

MMDetection wraps convs in a ``ConvModule`` (``X.conv.weight``); this project uses plain
``nn.Conv2d`` where there is no norm layer, so ``.conv`` is dropped whenever the key
without it is the model's (e.g. ``neck.1.refine.conv.weight`` of the 'conv' refiner and
``shared_convs.{i}.conv.weight`` of the GN head keep it, because the model names them so).
Both use background as the LAST class, so classifier rows need no reordering.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

# MMDetection top-level prefixes -> this project's module paths.
_PREFIXES = (
    ("rpn_head.", "rpn.head."),
    ("roi_head.bbox_head.", "roi_head.box_head."),
)


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping) -> Mapping[str, Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        try:
            checkpoint = torch.load(os.fspath(path_or_state_dict), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised with advice
            raise ValueError(
                f"could not read {os.fspath(path_or_state_dict)!r} as a weights-only checkpoint ({error}); "
                "re-save it as {'state_dict': model_state_dict} with plain tensors"
            ) from error
    else:
        checkpoint = path_or_state_dict
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise ValueError("checkpoint['state_dict'] must be a dict of tensors")
    if state_dict and all(key.startswith("module.") for key in state_dict):  # saved from DataParallel
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def convert_mmdet_state_dict(state_dict: Mapping[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Rename MMDetection keys to this project's (see module docstring).

    Args:
        state_dict: MMDetection ``state_dict`` (``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``).
        model_keys: keys of the target model's ``state_dict``, used to decide whether a
            ConvModule's ``.conv`` level exists in the model.

    Returns:
        A new dict with renamed keys (unknown keys are kept, renamed by prefix only, so that
        the caller can report them).
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for old, new in _PREFIXES:
            if new_key.startswith(old):
                new_key = new + new_key[len(old):]
                break
        if new_key not in model_keys and ".conv." in new_key:
            head, _, leaf = new_key.rpartition(".conv.")
            if f"{head}.{leaf}" in model_keys:
                new_key = f"{head}.{leaf}"
        converted[new_key] = value
    return converted


def load_mmdet_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping) -> nn.Module:
    """Load an MMDetection v2/v3 Faster R-CNN or Libra R-CNN checkpoint into ``model`` (in place).

    Args:
        model: a :class:`libra.faster_rcnn.FasterRCNN` built with the same architecture (e.g.
            ``build_model("libra_faster_rcnn_r50_fpn", num_classes=80)``).
        path_or_state_dict: a ``.pth`` path, a dict with ``'state_dict'`` (MMDetection's format),
            or a raw state_dict.

    Returns:
        ``model``.

    Raises:
        ValueError: when a model key is missing from the checkpoint, a checkpoint key has no
            place in the model (e.g. a RetinaNet or Mask R-CNN checkpoint, or a BFP checkpoint into a
            plain-FPN model), or a shape differs (e.g. another class count); the message names them.
    """
    expected = model.state_dict()
    converted = convert_mmdet_state_dict(_read_state_dict(path_or_state_dict), set(expected))

    # BatchNorm's num_batches_tracked carries no information: allow it on either side.
    def optional(key: str) -> bool:
        return key.endswith("num_batches_tracked")

    missing = sorted(k for k in expected if k not in converted and not optional(k))
    unexpected = sorted(k for k in converted if k not in expected and not optional(k))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and isinstance(v, Tensor) and v.shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint ({len(missing)}): {_head(missing)}")
        if unexpected:
            problems.append(f"not in the model ({len(unexpected)}): {_head(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatch ({len(mismatched)}): {_head(mismatched)}")
        hint = ""
        cls_key = "roi_head.box_head.fc_cls.weight"
        if cls_key in converted and cls_key in expected and converted[cls_key].shape != expected[cls_key].shape:
            hint = (
                f" The checkpoint has {converted[cls_key].shape[0] - 1} classes, the model "
                f"{expected[cls_key].shape[0] - 1}: build the model with num_classes={converted[cls_key].shape[0] - 1}."
            )
        raise ValueError(
            "the checkpoint does not match the model: " + "; ".join(problems) + "." + hint
            + " Build the model with the preset the checkpoint was trained with."
        )

    to_load = {k: v for k, v in converted.items() if k in expected}
    for key in expected:
        if optional(key) and key not in to_load:
            to_load[key] = expected[key]
    model.load_state_dict(to_load, strict=True)
    return model


def _head(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
