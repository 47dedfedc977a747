"""Load released MMDetection v2/v3 detector checkpoints: Faster R-CNN, PAFPN, Libra R-CNN, Mask R-CNN,
RetinaNet, Libra RetinaNet, the standalone RPN and Fast R-CNN.

Key layouts are those of the MMDetection v2/v3 released checkpoints of the configs
``faster-rcnn_r50_fpn_1x_coco`` (v2: ``faster_rcnn_r50_fpn_1x_coco``),
``pafpn/faster-rcnn_r50_pafpn_1x_coco``, ``libra-faster-rcnn_r50_fpn_1x_coco`` (v2:
``libra_faster_rcnn_r50_fpn_1x_coco``, Libra R-CNN, Pang et al., CVPR 2019), of the GN
``Shared4Conv1FCBBoxHead`` (``norm_cfg=dict(type='GN', num_groups=32)``, as in
``gn/mask-rcnn_r50_fpn_gn-all_2x_coco``; the paper's "4conv-fc head with GN", Sec. 4.1.3), and of
the one-stage ``retinanet_r50_fpn_1x_coco`` and ``libra-retinanet_r50_fpn_1x_coco`` (v2:
``libra_retinanet_r50_fpn_1x_coco_20200205-804d94ce.pth``; paper Table 2), of the proposal model
``rpn_r50_fpn_1x_coco`` (``backbone.*``, single ``neck.*``, ``rpn_head.*``: the rules of Faster R-CNN's
RPN; MMDetection 3.x's ``RPN`` detector saves its head as ``bbox_head.rpn_{conv,cls,reg}.*``, which
loads too) and of ``fast-rcnn_r50_fpn_1x_coco`` (no ``rpn_head.*``), and of ``mask-rcnn_r50_fpn_1x_coco``
(Faster R-CNN's keys plus ``roi_head.mask_head.*``).

This project always holds the neck as an ``nn.Sequential``: ``neck.0`` is the FPN or PAFPN,
``neck.1`` the balanced feature pyramid (BFP) when there is one. MMDetection indexes its neck
only when the config gives a LIST of necks (``neck=[FPN, BFP]``, Libra R-CNN, or
``[PAFPN, BFP]``); a single neck (plain Faster R-CNN, PAFPN) has no index. The checkpoint's own
keys decide which: any ``neck.<name>.*`` key (e.g. ``neck.lateral_convs.0.conv.weight``) makes
it a single-neck checkpoint, otherwise ``neck.<i>.*`` keys are a list (a mix is refused).

MMDetection key -> this project's key (rules applied in this order):

==============================================================  ==============================================
MMDetection v2/v3 released checkpoint                           this project
==============================================================  ==============================================
``backbone.*`` (torchvision ResNet names)                       ``backbone.*`` (unchanged)
``backbone.layerX.Y.conv2.conv_offset.*`` (DCN, ``dconv-c3-c5``)  ``backbone.layerX.Y.conv2.conv_offset.*`` (unchanged)
single neck: ``neck.X``                                         ``neck.0.X``
list of necks: ``neck.{0,1}.X``                                 ``neck.{0,1}.X``
``neck.0.{lateral,fpn}_convs.{i}.conv.{weight,bias}``           ``neck.0.{lateral,fpn}_convs.{i}.{weight,bias}``
``neck.0.{downsample,pafpn}_convs.{i}.conv.{weight,bias}``      ``neck.0.{downsample,pafpn}_convs.{i}.{weight,bias}``
``neck.1.refine.{g,theta,phi,conv_out}.conv.{weight,bias}``     ``neck.1.refine.{g,theta,phi,conv_out}.{weight,bias}``
``neck.1.refine.conv.{weight,bias}`` (``refine_type='conv'``)   unchanged
``rpn_head.{rpn_conv,rpn_cls,rpn_reg}.*``                       ``rpn.head.{rpn_conv,rpn_cls,rpn_reg}.*``
``bbox_head.{rpn_conv,rpn_cls,rpn_reg}.*`` (3.x standalone RPN)  ``rpn.head.{rpn_conv,rpn_cls,rpn_reg}.*``
``roi_head.bbox_head.*``                                        ``roi_head.box_head.*``
``roi_head.bbox_head.shared_convs.{i}.{conv,gn}.*`` (GN head)   ``roi_head.box_head.shared_convs.{i}.{conv,gn}.*``
``roi_head.mask_head.*`` (Mask R-CNN)                           ``roi_head.mask_head.*`` (unchanged)
``bbox_head.{cls_convs,reg_convs}.{i}.conv.*`` (RetinaNet)      ``dense_head.head.{cls_convs,reg_convs}.{i}.*``
``bbox_head.{retina_cls,retina_reg}.*`` (RetinaNet)             ``dense_head.head.{retina_cls,retina_reg}.*``
anything else                                                   unchanged, hence reported as not in the model
==============================================================  ==============================================

(``shared_fcs.{0,1}``, ``fc_cls`` ``[C+1, 1024]``, ``fc_reg`` ``[4C, 1024]``; the RPN has
``rpn_cls`` ``[3, 256, 1, 1]``, ``rpn_reg`` ``[12, 256, 1, 1]``; RetinaNet has ``retina_cls``
``[9C, 256, 3, 3]`` (channel ``anchor * C + class``, no background) and ``retina_reg``
``[36, 256, 3, 3]``, and its FPN (from C3) ``lateral_convs.{0,1,2}`` and ``fpn_convs.{0..4}``, where
``fpn_convs.3`` (on C5, ``[256, 2048, 3, 3]``) and ``fpn_convs.4`` are the P6 / P7 convs. Mask
R-CNN's ``FCNMaskHead`` has ``convs.{0-3}.conv.*`` ``[256, 256, 3, 3]`` (ConvModules, whose names
``libra.roi_heads.FCNMaskHead`` keeps), ``upsample.*`` (``ConvTranspose2d(256, 256, 2, stride=2)``,
``[256, 256, 2, 2]``) and ``conv_logits.*`` ``[C, 256, 1, 1]``, one mask per class, no background.)

MMDetection wraps convs in a ``ConvModule`` (``X.conv.weight``). Only the wrappers listed
above, which this project replaces by a plain ``nn.Conv2d`` (no norm layer), lose ``.conv``;
the renaming uses the checkpoint's names only, never the target model's, so a key that no rule
knows (e.g. a GN neck's ``neck.lateral_convs.0.gn.weight``, or Mask R-CNN's ``roi_head.mask_head.*``
loaded into a Faster R-CNN) is kept as is and reported, never silently dropped. The two-stage
models use background as the LAST class, as this project does, so classifier rows need no
reordering; RetinaNet has no background class. A BFP without a refiner (``refine_type=None``)
has no parameters, so its checkpoint cannot be told from a plain FPN one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import Tensor, nn

from libra.safe_load import UntrustedCheckpointError, load_torch_file

# MMDetection top-level prefixes -> this project's module paths.
_PREFIXES = (
    ("rpn_head.", "rpn.head."),
    # MMDetection 3.x's standalone RPN (mmdet/models/detectors/rpn.py) holds its RPNHead as
    # ``bbox_head``; the v2 checkpoints say ``rpn_head``. Before the RetinaNet rule below.
    ("bbox_head.rpn_", "rpn.head.rpn_"),
    ("roi_head.bbox_head.", "roi_head.box_head."),
    ("bbox_head.", "dense_head.head."),  # RetinaNet: the dense head's predictor
)

# ConvModule wrappers that are plain nn.Conv2d here: drop their ``.conv`` level (after the neck
# has been given its Sequential index and the prefixes have been renamed).
_PLAIN_CONVS = re.compile(
    r"^(neck\.0\.(?:lateral_convs|fpn_convs|downsample_convs|pafpn_convs)\.\d+"
    r"|neck\.1\.refine\.(?:g|theta|phi|conv_out)"
    r"|dense_head\.head\.(?:cls_convs|reg_convs)\.\d+)\.conv\.(weight|bias)$"
)

# What the head keys show the detector to be (this project's names), and presets that build it.
_HEAD_PREFIXES = {"rpn": "rpn.", "roi": "roi_head.", "dense": "dense_head.", "mask": "roi_head.mask_head."}
_DETECTOR_OF_HEADS = {
    ("roi", "rpn"): "faster_rcnn", ("mask", "roi", "rpn"): "mask_rcnn", ("rpn",): "rpn", ("roi",): "fast_rcnn",
    ("dense",): "retinanet",
}
_DETECTOR_PRESETS = {
    "faster_rcnn": "faster_rcnn_r50_fpn, libra_faster_rcnn_r50_fpn",
    "mask_rcnn": "mask_rcnn_r50_fpn, libra_mask_rcnn_r50_fpn",
    "retinanet": "retinanet_r50_fpn, libra_retinanet_r50_fpn",
    "rpn": "rpn_r50_fpn, libra_rpn_r50_fpn",
    "fast_rcnn": "fast_rcnn_r50_fpn, libra_fast_rcnn_r50_fpn",
}

_SINGLE_NECK_KEY = re.compile(r"^neck\.(?!\d+\.)")  # neck.<name>.*: one neck, no Sequential index
_LIST_NECK_KEY = re.compile(r"^neck\.\d+\.")


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping, trust: bool = False) -> Mapping[str, Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        try:
            checkpoint = load_torch_file(path_or_state_dict, trust=trust, trust_hint="trust=True")
        except UntrustedCheckpointError:
            raise
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


def _convert_key(key: str, single_neck: bool) -> str:
    if single_neck and key.startswith("neck."):
        key = "neck.0." + key[len("neck."):]
    for old, new in _PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    return _PLAIN_CONVS.sub(r"\1.\2", key)


def _convert(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Renamed state_dict and, for each new key, the checkpoint key it came from."""
    single = sorted(key for key in state_dict if _SINGLE_NECK_KEY.match(key))
    listed = sorted(key for key in state_dict if _LIST_NECK_KEY.match(key))
    if single and listed:
        raise ValueError(
            f"the checkpoint mixes single-neck keys ({_head(single, 3)}) with list-of-necks keys "
            f"({_head(listed, 3)}); an MMDetection checkpoint has one or the other"
        )
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = _convert_key(key, single_neck=bool(single))
        if new_key in origin:
            raise ValueError(f"checkpoint keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
        converted[new_key] = value
        origin[new_key] = key
    return converted, origin


def convert_mmdet_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename MMDetection keys to this project's (rules in the module docstring).

    The renaming depends on the checkpoint's keys only (single neck or list of necks is read
    from them), not on a target model.

    Args:
        state_dict: MMDetection ``state_dict`` (``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``).

    Returns:
        A new dict with renamed keys. Keys no rule knows are kept unchanged, so that the caller
        can report them.

    Raises:
        ValueError: when the checkpoint mixes ``neck.<name>.*`` and ``neck.<i>.*`` keys, or two
            keys map to the same name.
    """
    return _convert(state_dict)[0]


def _detector(keys: Mapping[str, object] | set[str]) -> str | None:
    """The detector this project's keys show: ``'faster_rcnn'`` (RPN and R-CNN heads; ``'mask_rcnn'``
    with a mask head), ``'rpn'``
    (only the RPN's: a standalone proposal model), ``'fast_rcnn'`` (only the R-CNN's), ``'retinanet'``;
    None when they show none or a mix."""
    heads = tuple(sorted(name for name, prefix in _HEAD_PREFIXES.items() if any(key.startswith(prefix) for key in keys)))
    return _DETECTOR_OF_HEADS.get(heads)


def _layout(keys: Mapping[str, object] | set[str]) -> dict[str, str]:
    """The preset overrides (``neck``, ``box_head``) that a set of this project's keys implies.

    Only the parts the keys show are returned (no ``neck`` entry without ``neck.*`` keys).
    """
    layout = {}
    if any(key.startswith("neck.") for key in keys):
        bfp = any(key.startswith("neck.1.") for key in keys)
        pafpn = any(key.startswith("neck.0.downsample_convs.") for key in keys)
        layout["neck"] = {(False, False): "fpn", (True, False): "bfp", (False, True): "pafpn", (True, True): "bpafpn"}[
            (bfp, pafpn)
        ]
    if any(key.startswith("roi_head.box_head.") for key in keys):
        four_conv = any(key.startswith("roi_head.box_head.shared_convs.") for key in keys)
        layout["box_head"] = "4conv1fc" if four_conv else "shared2fc"
    return layout


def load_mmdet_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, trust: bool = False) -> nn.Module:
    """Load an MMDetection v2/v3 Faster R-CNN, PAFPN, Libra R-CNN, Mask R-CNN, RetinaNet or Libra
    RetinaNet checkpoint into ``model`` (in place).

    Args:
        model: a detector from :func:`libra.presets.build_model` with the same architecture (e.g.
            ``build_model("libra_faster_rcnn_r50_fpn", num_classes=80)`` for
            ``libra-faster-rcnn_r50_fpn_1x_coco``, ``build_model("faster_rcnn_r50_fpn", 80)`` for
            ``faster-rcnn_r50_fpn_1x_coco``, ``neck="pafpn"`` for ``faster-rcnn_r50_pafpn_1x_coco``,
            ``build_model("libra_retinanet_r50_fpn", 80)`` for ``libra-retinanet_r50_fpn_1x_coco``,
            ``build_model("retinanet_r50_fpn", 80)`` for ``retinanet_r50_fpn_1x_coco``,
            ``build_model("mask_rcnn_r50_fpn", 80)`` for ``mask-rcnn_r50_fpn_1x_coco``).
        path_or_state_dict: a ``.pth`` path, a dict with ``'state_dict'`` (MMDetection's format),
            or a raw state_dict (a ``module.`` prefix on every key is stripped). A path is read with
            ``torch.load(weights_only=True)`` (:mod:`libra.safe_load`).
        trust: read a file that holds Python objects beyond tensors and plain values (unpickling it
            runs code stored in it; only for a file you trust). Without it such a file is refused
            with ``UntrustedCheckpointError`` before any of it runs.

    Returns:
        ``model``.

    Raises:
        ValueError: when a model key is missing from the checkpoint, a checkpoint key has no
            place in the model (e.g. a RetinaNet checkpoint into a Faster R-CNN, a Mask R-CNN
            checkpoint into a Faster R-CNN, or a BFP checkpoint into a plain-FPN model), or a shape differs (e.g. another
            class count); the message names them (checkpoint keys by their MMDetection name) and the
            preset overrides (or presets) that would fit.
    """
    expected = model.state_dict()
    converted, origin = _convert(_read_state_dict(path_or_state_dict, trust))

    # BatchNorm's num_batches_tracked carries no information: allow it on either side.
    def optional(key: str) -> bool:
        return key.endswith("num_batches_tracked")

    def named(key: str) -> str:
        return key if origin[key] == key else f"{origin[key]} (as {key})"

    missing = sorted(k for k in expected if k not in converted and not optional(k))
    unexpected = sorted(named(k) for k in converted if k not in expected and not optional(k))
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
        retina_key = "dense_head.head.retina_cls.weight"
        if retina_key in converted and retina_key in expected and converted[retina_key].shape != expected[retina_key].shape:
            # A * C rows (no background); the anchors per location are the model's.
            num_anchors = expected[retina_key].shape[0] // getattr(model, "num_classes", 1)
            classes = converted[retina_key].shape[0] / max(num_anchors, 1)
            if classes == int(classes):
                hint = (
                    f" The checkpoint has {int(classes)} classes ({num_anchors} anchors per location), the model "
                    f"{expected[retina_key].shape[0] // num_anchors}: build the model with num_classes={int(classes)}."
                )
        checkpoint_detector, model_detector = _detector(converted), _detector(expected)
        if checkpoint_detector and model_detector and checkpoint_detector != model_detector:
            hint += (
                f" The checkpoint holds a {checkpoint_detector} detector, the model is a {model_detector}: "
                f"build it with a {checkpoint_detector} preset ({_DETECTOR_PRESETS[checkpoint_detector]})."
            )
        hint += _dcn_hint(converted, expected)
        checkpoint_layout, model_layout = _layout(converted), _layout(expected)
        differ = {k: v for k, v in checkpoint_layout.items() if model_layout.get(k, v) != v}
        if differ:
            hint += (
                f" The checkpoint's layout is {_overrides(checkpoint_layout)}, the model's "
                f"{_overrides(model_layout)}: build the model with {_overrides(differ)}."
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


_DCN_OFFSET_KEY = re.compile(r"^backbone\.layer([1-4])\.\d+\.conv2\.conv_offset\.weight$")


def _dcn_hint(converted: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """A hint when the checkpoint's backbone and the model's differ in their deformable convs
    (``conv2.conv_offset.*``, MMDetection's DCN configs): which stages and which dcn type."""

    def stages(keys) -> list[int]:
        return sorted({int(m.group(1)) for key in keys if (m := _DCN_OFFSET_KEY.match(key))})

    in_checkpoint, in_model = stages(converted), stages(expected)
    if in_checkpoint == in_model:
        return ""
    if not in_checkpoint:
        return (f" The model's backbone has deformable convs in layer{in_model} but the checkpoint's has none: "
                "build the model without dcn.")
    channels = next(v.shape[0] for k, v in converted.items() if _DCN_OFFSET_KEY.match(k))
    # conv_offset predicts 2 (DCN) or 3 (DCNv2: offsets and mask) values per kernel point (3x3) and offset group.
    kinds = [f"{{'type': '{name}', 'deform_groups': {channels // per}}}" for name, per in (("DCN", 18), ("DCNv2", 27))
             if channels % per == 0]
    flags = tuple(stage in in_checkpoint for stage in (1, 2, 3, 4))
    return (f" The checkpoint's backbone has deformable convs in layer{in_checkpoint} (conv_offset with {channels} "
            f"channels): build the model with dcn={' or '.join(kinds) or '?'}, stage_with_dcn={flags}.")


def _overrides(layout: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in layout.items())


def _head(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
