"""Named detector configurations as plain dicts, and ``build_model`` to assemble them.

Presets (MMDetection v2 / paper numbers in SPEC.md section 4):

- ``faster_rcnn_r50_fpn``: the baseline. Random samplers, FPN, L1 box loss, softmax CE.
- ``libra_faster_rcnn_r50_fpn``: MMDetection's Libra R-CNN (the conference version, 38.3 AP):
  IoU-balanced negatives + instance-balanced positives (Sec. 3.1), FPN + balanced feature
  pyramid with a non-local refiner at P4 (Sec. 3.2), balanced L1 loss (Sec. 3.3.1), and the
  RPN negatives capped at 5 x #positives.
- ``libra_faster_rcnn_r50_fpn_lgr``: the journal version: LGR-L1 (Eq. 11-14) and LGR-CE
  (Eq. 15-19, alpha 0.8, gamma 1.0) instead of balanced L1 and CE.
- ``faster_rcnn_r101_fpn``, ``libra_faster_rcnn_r101_fpn``, ``libra_faster_rcnn_x101_64x4d_fpn``.

Every component is a keyword override of :func:`build_model`, so the paper's ablation
(Table 3) is a list of flags, see ``TABLE3_ABLATION``::

    build_model("faster_rcnn_r50_fpn", 80, sampler="iou_balanced", neck="bfp", box_loss="lgr_l1")

Overrides (any key of a preset dict):

- ``backbone``: ``'resnet50' | 'resnet101' | 'resnext101_64x4d'`` or an ``nn.Module`` returning
  4 feature maps and exposing ``out_channels`` (e.g. a tiny backbone for tests).
- ``sampler``: ``'random'`` or ``'iou_balanced'`` (IoU-balanced negatives + instance-balanced
  positives, as in MMDetection's Libra config); ``pos_sampler`` / ``neg_sampler`` override each
  half (``'random' | 'instance_balanced' | 'class_balanced'`` and ``'random' | 'iou_balanced'``);
  ``num_bins``, ``floor_thr``, ``floor_fraction`` configure the IoU-balanced sampler.
- ``neck``: ``'fpn' | 'bfp' | 'pafpn' | 'bpafpn'``; ``refine_type``: ``'non_local' | 'conv' | None``;
  ``refine_level``; ``fpn_channels``.
- ``box_loss``: ``'smooth_l1' | 'l1' | 'balanced_l1' | 'lgr_l1'``; ``cls_loss``: ``'ce' | 'lgr_ce'``;
  ``lgr_ce_alpha``, ``lgr_ce_gamma``.
- ``box_head``: ``'shared2fc' | '4conv1fc'``; ``fc_channels``.
- backbone: ``frozen_stages``, ``backbone_norm`` (``'frozen' | 'bn'``), ``width_per_group``,
  ``stage_blocks`` (e.g. ``(1, 1, 1, 1)``), all for the named ResNets.
- ``rpn_neg_pos_ub``, ``rpn_batch_size``, ``roi_batch_size``, ``ignore_iof_thr``
  (-1 disables ignore regions, as MMDetection's configs do).
- test settings: ``score_thr``, ``nms_thr``, ``max_per_img``, ``rpn_pre_nms_top_n_train``,
  ``rpn_pre_nms_top_n_test``, ``rpn_post_nms_top_n_train``, ``rpn_post_nms_top_n_test``, ``rpn_nms_thr``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from libra.backbone import build_resnet, load_pretrained
from libra.box_head import Shared2FCBoxHead, Shared4Conv1FCBoxHead
from libra.faster_rcnn import FasterRCNN
from libra.losses import BalancedL1Loss, CrossEntropyLoss, L1Loss, LGRCrossEntropyLoss, LGRL1Loss, SmoothL1Loss
from libra.necks import FPN, PAFPN, BalancedFeaturePyramid
from libra.roi_extractor import MultiLevelRoIExtractor
from libra.roi_head import RoIHead
from libra.rpn import RegionProposalNetwork, RPNHead

_BASELINE: dict[str, Any] = {
    "backbone": "resnet50",
    "frozen_stages": 1,
    # "frozen": BN statistics fixed (the ImageNet-pretrained recipe of SPEC.md); "bn": trainable
    # statistics, which a backbone trained from scratch needs (train.py's synthetic default).
    "backbone_norm": "frozen",
    "width_per_group": None,  # None: the named backbone's (64 for ResNet, 4 for ResNeXt 64x4d)
    "stage_blocks": None,  # None: the depth's, e.g. (3, 4, 6, 3); (1, 1, 1, 1) for a shallow net
    "neck": "fpn",
    "fpn_channels": 256,
    "refine_type": "non_local",
    "refine_level": 2,
    # Crowd / difficult boxes: candidates covered more than this by one are neither positive nor
    # negative (both stages; SPEC.md section 1). MMDetection's configs use -1 (ignore boxes unused).
    "ignore_iof_thr": 0.5,
    # RPN
    "rpn_batch_size": 256,
    "rpn_neg_pos_ub": -1,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_thr": 0.7,
    # R-CNN
    "roi_batch_size": 512,
    "sampler": "random",
    "pos_sampler": None,  # None: follow ``sampler``
    "neg_sampler": None,
    "num_bins": 3,
    "floor_thr": 0.0,
    "floor_fraction": 0.0,
    "box_head": "shared2fc",
    "fc_channels": 1024,
    "box_loss": "l1",
    "cls_loss": "ce",
    "lgr_ce_alpha": 0.8,
    "lgr_ce_gamma": 1.0,
    "score_thr": 0.05,
    "nms_thr": 0.5,
    "max_per_img": 100,
}

_LIBRA: dict[str, Any] = {
    **_BASELINE,
    "neck": "bfp",
    "rpn_neg_pos_ub": 5,
    "sampler": "iou_balanced",
    "box_loss": "balanced_l1",
}

PRESETS: dict[str, dict[str, Any]] = {
    "faster_rcnn_r50_fpn": dict(_BASELINE),
    "libra_faster_rcnn_r50_fpn": dict(_LIBRA),
    "libra_faster_rcnn_r50_fpn_lgr": {**_LIBRA, "box_loss": "lgr_l1", "cls_loss": "lgr_ce"},
    "faster_rcnn_r101_fpn": {**_BASELINE, "backbone": "resnet101"},
    "libra_faster_rcnn_r101_fpn": {**_LIBRA, "backbone": "resnet101"},
    "libra_faster_rcnn_x101_64x4d_fpn": {**_LIBRA, "backbone": "resnext101_64x4d"},
}

# The paper's Table 3 (ResNet-50 FPN, COCO val2017): each row adds one component.
TABLE3_ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("baseline (35.9 AP)", {}),
    ("+ IoU-balanced sampling (36.8)", {"sampler": "iou_balanced"}),
    ("+ balanced feature pyramid (37.7)", {"sampler": "iou_balanced", "neck": "bfp"}),
    ("+ LGR-L1 (38.5)", {"sampler": "iou_balanced", "neck": "bfp", "box_loss": "lgr_l1"}),
    (
        "+ LGR-CE (39.0)",
        {"sampler": "iou_balanced", "neck": "bfp", "box_loss": "lgr_l1", "cls_loss": "lgr_ce"},
    ),
]

_CHOICES = {
    "backbone_norm": ("frozen", "bn"),
    "sampler": ("random", "iou_balanced"),
    "pos_sampler": (None, "random", "instance_balanced", "class_balanced"),
    "neg_sampler": (None, "random", "iou_balanced"),
    "neck": ("fpn", "bfp", "pafpn", "bpafpn"),
    "refine_type": ("non_local", "conv", None),
    "box_loss": ("smooth_l1", "l1", "balanced_l1", "lgr_l1"),
    "cls_loss": ("ce", "lgr_ce"),
    "box_head": ("shared2fc", "4conv1fc"),
}


def available_presets() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(PRESETS)


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset dict ``name`` with ``overrides`` applied and checked (a new dict)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(available_presets())}")
    config = dict(PRESETS[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; valid overrides: {', '.join(sorted(config))}")
    config.update(overrides)
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"{key}={config[key]!r} is not supported; choose one of {list(choices)}")
    return config


def build_model(name: str, num_classes: int, pretrained: str | None = None, **overrides: Any) -> FasterRCNN:
    """Assemble the detector of preset ``name``.

    Args:
        name: one of :func:`available_presets`.
        num_classes: C foreground classes (80 for COCO, 20 for VOC).
        pretrained: path to torchvision-format ImageNet backbone weights, or None (random init).
        **overrides: component switches and settings (module docstring).

    Returns:
        A :class:`FasterRCNN` in training mode.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    config = preset_config(name, **overrides)

    backbone = config["backbone"]
    if isinstance(backbone, str):
        backbone = build_resnet(
            backbone,
            frozen_stages=config["frozen_stages"],
            norm_eval=config["backbone_norm"] == "frozen",
            width_per_group=config["width_per_group"],
            stage_blocks=config["stage_blocks"],
        )
        if pretrained is not None:
            load_pretrained(backbone, pretrained)
    elif not isinstance(backbone, nn.Module) or not hasattr(backbone, "out_channels"):
        raise ValueError("backbone must be a name or an nn.Module with an out_channels list")
    elif pretrained is not None:
        raise ValueError("pretrained weights can only be loaded into a named backbone")

    channels = config["fpn_channels"]
    neck = _build_neck(config, list(backbone.out_channels), channels)
    rpn = RegionProposalNetwork(
        RPNHead(channels, num_anchors=3),
        batch_size_per_image=config["rpn_batch_size"],
        neg_pos_ub=config["rpn_neg_pos_ub"],
        pre_nms_top_n_train=config["rpn_pre_nms_top_n_train"],
        pre_nms_top_n_test=config["rpn_pre_nms_top_n_test"],
        post_nms_top_n_train=config["rpn_post_nms_top_n_train"],
        post_nms_top_n_test=config["rpn_post_nms_top_n_test"],
        nms_thresh=config["rpn_nms_thr"],
        ignore_iof_thr=config["ignore_iof_thr"],
    )
    roi_head = _build_roi_head(config, num_classes, channels)
    return FasterRCNN(backbone, neck, rpn, roi_head)


def _build_neck(config: dict[str, Any], in_channels: list[int], channels: int) -> nn.Sequential:
    kind = config["neck"]
    pyramid = PAFPN if kind in ("pafpn", "bpafpn") else FPN
    modules: list[nn.Module] = [pyramid(in_channels, channels, num_outs=5)]
    if kind in ("bfp", "bpafpn"):
        modules.append(
            BalancedFeaturePyramid(
                channels, num_levels=5, refine_level=config["refine_level"], refine_type=config["refine_type"]
            )
        )
    return nn.Sequential(*modules)


def _build_roi_head(config: dict[str, Any], num_classes: int, channels: int) -> RoIHead:
    if config["box_head"] == "shared2fc":
        box_head: nn.Module = Shared2FCBoxHead(channels, 7, config["fc_channels"], num_classes)
    else:
        box_head = Shared4Conv1FCBoxHead(
            channels, 7, conv_channels=channels, fc_channels=config["fc_channels"], num_classes=num_classes
        )
    box_loss = {
        "l1": L1Loss,
        "smooth_l1": SmoothL1Loss,  # beta 1.0
        "balanced_l1": BalancedL1Loss,  # alpha 0.5, gamma 1.5, beta 1.0
        "lgr_l1": LGRL1Loss,  # same alpha, gamma, beta
    }[config["box_loss"]]()
    if config["cls_loss"] == "ce":
        cls_loss: nn.Module = CrossEntropyLoss()
    else:
        cls_loss = LGRCrossEntropyLoss(alpha=config["lgr_ce_alpha"], gamma=config["lgr_ce_gamma"])

    balanced = config["sampler"] == "iou_balanced"
    pos_sampler = config["pos_sampler"] or ("instance_balanced" if balanced else "random")
    neg_sampler = config["neg_sampler"] or ("iou_balanced" if balanced else "random")
    neg_kwargs = {}
    if neg_sampler == "iou_balanced":
        neg_kwargs = {
            "num_bins": config["num_bins"],
            "floor_thr": config["floor_thr"],
            "floor_fraction": config["floor_fraction"],
        }
    return RoIHead(
        box_head,
        num_classes,
        MultiLevelRoIExtractor(7, (4, 8, 16, 32), sampling_ratio=0),
        ignore_iof_thr=config["ignore_iof_thr"],
        batch_size_per_image=config["roi_batch_size"],
        positive_fraction=0.25,
        pos_sampler=pos_sampler,
        neg_sampler=neg_sampler,
        neg_sampler_kwargs=neg_kwargs,
        cls_loss=cls_loss,
        box_loss=box_loss,
        score_thresh=config["score_thr"],
        nms_thresh=config["nms_thr"],
        detections_per_img=config["max_per_img"],
    )
