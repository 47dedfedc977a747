"""Presets (every preset builds, switches pick the right modules) and the MMDetection checkpoint importer."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from conftest import TinyBackbone
from libra.losses import (
    BalancedL1Loss,
    CrossEntropyLoss,
    L1Loss,
    LGRCrossEntropyLoss,
    LGRL1Loss,
    SigmoidCrossEntropyLoss,
    SmoothL1Loss,
)
from libra.mmdet_checkpoint import load_mmdet_checkpoint
from libra.necks import FPN, PAFPN, BalancedFeaturePyramid, ConvRefine, NonLocal2d
from libra.presets import PRESETS, TABLE3_ABLATION, available_presets, build_model, preset_config
from libra.roi_heads import Shared2FCBoxHead, Shared4Conv1FCBoxHead

pytestmark = pytest.mark.usefixtures("single_thread")


def sname(sampler) -> str:
    """The preset name of a sampler module (the heads hold modules; the presets name them)."""
    from libra.presets import NEG_SAMPLERS, POS_SAMPLERS

    return next(name for table in (POS_SAMPLERS, NEG_SAMPLERS) for name, cls in table.items() if type(sampler) is cls)


def tiny(name: str = "faster_rcnn_r50_fpn", **overrides):
    return build_model(name, 5, backbone=TinyBackbone((8, 8, 8, 8)), fpn_channels=32, fc_channels=32, **overrides)


# --------------------------------------------------------------------------------- presets
def test_available_presets_names():
    assert available_presets() == sorted(PRESETS)
    assert {
        "faster_rcnn_r50_fpn",
        "libra_faster_rcnn_r50_fpn",
        "libra_faster_rcnn_r50_fpn_lgr",
        "faster_rcnn_r101_fpn",
        "libra_faster_rcnn_r101_fpn",
        "libra_faster_rcnn_x101_64x4d_fpn",
    } <= set(PRESETS)
    assert all(isinstance(config, dict) for config in PRESETS.values())


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if c["detector"] == "faster_rcnn"))
def test_every_preset_builds(name):
    """Every two-stage preset (the RetinaNet presets: tests/test_retinanet.py)."""
    model = build_model(name, 80)
    assert model.num_classes == 80
    depth = {"r50": 6, "r101": 23, "x101": 23}[re.search(r"_(r50|r101|x101)", name).group(1)]
    assert len(model.backbone.layer3) == depth
    if "x101" in name:
        assert model.backbone.layer2[0].conv2.groups == 64
    assert model.roi_head.box_head.fc_cls.out_features == 81
    assert model.roi_head.box_head.fc_reg.out_features == 320
    libra = name.startswith("libra")
    assert len(model.neck) == (2 if libra else 1)
    assert isinstance(model.neck[0], FPN)
    if libra:
        assert isinstance(model.neck[1], BalancedFeaturePyramid) and isinstance(model.neck[1].refine, NonLocal2d)
        assert model.rpn.neg_pos_ub == 5
        assert (sname(model.roi_head.pos_sampler), sname(model.roi_head.neg_sampler)) == ("instance_balanced", "iou_balanced")
        assert (model.roi_head.neg_sampler.num_bins, model.roi_head.neg_sampler.floor_thr, model.roi_head.neg_sampler.floor_fraction) == (3, 0.0, 0.0)
    else:
        assert model.rpn.neg_pos_ub == -1
        assert (sname(model.roi_head.pos_sampler), sname(model.roi_head.neg_sampler)) == ("random", "random")
    box_loss = {"faster": L1Loss, "libra": BalancedL1Loss}[name.split("_")[0]]
    cls_loss = CrossEntropyLoss
    if name.endswith("_lgr"):
        box_loss, cls_loss = LGRL1Loss, LGRCrossEntropyLoss
    assert type(model.roi_head.box_loss) is box_loss
    assert type(model.roi_head.cls_loss) is cls_loss


def test_libra_preset_matches_mmdet_settings():
    model = tiny("libra_faster_rcnn_r50_fpn")
    assert model.neck[1].refine_level == 2
    loss = model.roi_head.box_loss
    assert (loss.alpha, loss.gamma, loss.beta) == (0.5, 1.5, 1.0)
    rpn, head = model.rpn, model.roi_head
    assert rpn.batch_size == 256 and rpn.positive_fraction == 0.5
    assert rpn.pre_nms_top_n == {"train": 2000, "test": 1000}
    assert rpn.post_nms_top_n == {"train": 1000, "test": 1000}
    assert rpn.nms_thr == 0.7
    assert (rpn.assigner.pos_iou_thr, rpn.assigner.neg_iou_thr, rpn.assigner.min_pos_iou) == (0.7, 0.3, 0.3)
    assert head.batch_size == 512 and head.positive_fraction == 0.25
    assert (head.assigner.pos_iou_thr, head.assigner.neg_iou_thr, head.assigner.match_low_quality) == (0.5, 0.5, False)
    assert head.box_coder.stds == (0.1, 0.1, 0.2, 0.2)
    assert (head.score_thr, head.nms_thr, head.max_per_img) == (0.05, 0.5, 100)
    lgr = tiny("libra_faster_rcnn_r50_fpn_lgr").roi_head.cls_loss
    assert (lgr.alpha, lgr.gamma) == (0.8, 1.0)


@pytest.mark.parametrize(
    "overrides, check",
    [
        ({"neck": "fpn"}, lambda m: len(m.neck) == 1 and isinstance(m.neck[0], FPN)),
        ({"neck": "bfp", "refine_type": "conv"}, lambda m: isinstance(m.neck[1].refine, ConvRefine)),
        ({"neck": "bfp", "refine_type": None}, lambda m: len(list(m.neck[1].parameters())) == 0),
        ({"neck": "pafpn"}, lambda m: len(m.neck) == 1 and isinstance(m.neck[0], PAFPN)),
        ({"neck": "bpafpn"}, lambda m: isinstance(m.neck[0], PAFPN) and isinstance(m.neck[1], BalancedFeaturePyramid)),
        ({"sampler": "random"}, lambda m: (sname(m.roi_head.pos_sampler), sname(m.roi_head.neg_sampler)) == ("random", "random")),
        ({"neg_sampler": "random"}, lambda m: (sname(m.roi_head.pos_sampler), sname(m.roi_head.neg_sampler)) == ("instance_balanced", "random")),
        ({"pos_sampler": "class_balanced"}, lambda m: sname(m.roi_head.pos_sampler) == "class_balanced"),
        ({"floor_thr": -1.0, "num_bins": 5}, lambda m: m.roi_head.neg_sampler.floor_thr == -1.0 and m.roi_head.neg_sampler.num_bins == 5),
        ({"box_loss": "smooth_l1"}, lambda m: type(m.roi_head.box_loss) is SmoothL1Loss),
        ({"box_loss": "l1"}, lambda m: type(m.roi_head.box_loss) is L1Loss),
        ({"box_loss": "lgr_l1"}, lambda m: type(m.roi_head.box_loss) is LGRL1Loss),
        ({"cls_loss": "lgr_ce", "lgr_ce_alpha": 0.5}, lambda m: m.roi_head.cls_loss.alpha == 0.5),
        ({"box_head": "4conv1fc"}, lambda m: isinstance(m.roi_head.box_head, Shared4Conv1FCBoxHead)),
        ({"box_head": "shared2fc"}, lambda m: isinstance(m.roi_head.box_head, Shared2FCBoxHead)),
        ({"rpn_neg_pos_ub": -1}, lambda m: m.rpn.neg_pos_ub == -1),
        ({"ignore_iof_thr": -1}, lambda m: m.rpn.assigner.ignore_iof_thr == -1 and m.roi_head.assigner.ignore_iof_thr == -1),
        ({"rpn_batch_size": 64, "roi_batch_size": 128},
         lambda m: m.rpn.batch_size == 64 and m.roi_head.batch_size == 128),
        ({"score_thr": 0.001, "nms_thr": 0.6, "max_per_img": 300},
         lambda m: (m.roi_head.score_thr, m.roi_head.nms_thr, m.roi_head.max_per_img) == (0.001, 0.6, 300)),
        ({"rpn_pre_nms_top_n_test": 500, "rpn_post_nms_top_n_test": 300, "rpn_nms_thr": 0.8},
         lambda m: m.rpn.pre_nms_top_n["test"] == 500 and m.rpn.post_nms_top_n["test"] == 300 and m.rpn.nms_thr == 0.8),
        # injection points: the RPN's box loss and sampler, Table 6's loss parameters, sigmoid scoring
        ({"rpn_box_loss": "balanced_l1", "rpn_box_loss_beta": 0.11},
         lambda m: type(m.rpn.box_loss) is BalancedL1Loss and m.rpn.box_loss.beta == 0.11),
        ({"rpn_sampler": "iou_balanced"}, lambda m: (sname(m.rpn.pos_sampler), sname(m.rpn.neg_sampler)) == ("instance_balanced", "iou_balanced")
         and m.rpn.neg_sampler.num_bins == 3),
        ({"box_loss": "balanced_l1", "box_loss_alpha": 0.3, "box_loss_gamma": 1.0, "box_loss_beta": 0.5, "box_loss_weight": 2.0},
         lambda m: (m.roi_head.box_loss.alpha, m.roi_head.box_loss.gamma, m.roi_head.box_loss.beta, m.roi_head.box_loss.loss_weight)
         == (0.3, 1.0, 0.5, 2.0)),
        ({"box_loss": "smooth_l1", "box_loss_beta": 0.5}, lambda m: m.roi_head.box_loss.beta == 0.5),
        ({"cls_loss": "lgr_ce", "lgr_ce_alpha": 0.5, "lgr_ce_gamma": 2.0}, lambda m: m.roi_head.cls_loss.gamma == 2.0),
        ({"cls_loss": "sigmoid_ce"}, lambda m: m.roi_head.use_sigmoid and type(m.roi_head.cls_loss) is SigmoidCrossEntropyLoss),
        ({"cls_loss": "ce"}, lambda m: not m.roi_head.use_sigmoid),
    ],
)
def test_switches_change_the_right_modules(overrides, check):
    assert check(tiny("libra_faster_rcnn_r50_fpn", **overrides))


def test_table3_ablation_rows_build_and_run():
    expected = [
        ("random", "fpn", SmoothL1Loss, CrossEntropyLoss),  # the paper's baseline box loss (Table 6)
        ("iou_balanced", "fpn", SmoothL1Loss, CrossEntropyLoss),
        ("iou_balanced", "bfp", SmoothL1Loss, CrossEntropyLoss),
        ("iou_balanced", "bfp", LGRL1Loss, CrossEntropyLoss),
        ("iou_balanced", "bfp", LGRL1Loss, LGRCrossEntropyLoss),
    ]
    assert len(TABLE3_ABLATION) == 5
    images = torch.randn(1, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}]
    for (_, overrides), (sampler, neck, box_loss, cls_loss) in zip(TABLE3_ABLATION, expected):
        torch.manual_seed(0)
        model = tiny("faster_rcnn_r50_fpn", **overrides)
        assert (sname(model.roi_head.neg_sampler) == "iou_balanced") == (sampler == "iou_balanced")
        assert len(model.neck) == (2 if neck == "bfp" else 1)
        assert type(model.roi_head.box_loss) is box_loss and type(model.roi_head.cls_loss) is cls_loss
        losses = model(images, [(64, 64)], targets)
        assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if c["detector"] == "mask_rcnn"))
def test_every_mask_preset_builds(name):
    """The Mask R-CNN presets: Faster R-CNN's box branch plus mask-rcnn_r50_fpn_1x_coco's FCN mask head."""
    model = build_model(name, 80)
    assert model.iou_types == ("bbox", "segm")
    depth = {"r50": 6, "r101": 23, "x101": 23}[re.search(r"_(r50|r101|x101)", name).group(1)]
    assert len(model.backbone.layer3) == depth
    assert model.roi_head.box_head.fc_cls.out_features == 81
    head = model.roi_head.mask_head
    assert len(head.convs) == 4 and head.convs[0].conv.weight.shape == (256, 256, 3, 3)
    assert head.upsample.weight.shape == (256, 256, 2, 2) and head.conv_logits.weight.shape == (80, 256, 1, 1)
    libra = name.startswith("libra")
    assert len(model.neck) == (2 if libra else 1) and model.rpn.neg_pos_ub == (5 if libra else -1)
    expected_pos = "random" if not libra else ("class_balanced" if "_lvis" in name else "instance_balanced")
    assert sname(model.roi_head.pos_sampler) == expected_pos
    assert sname(model.roi_head.neg_sampler) == ("iou_balanced" if libra else "random")
    # Conference losses (balanced L1 + CE / BCR), or the journal's LGR ones for the _lgr presets.
    journal = name.endswith("_lgr")
    assert type(model.roi_head.box_loss) is (LGRL1Loss if journal else BalancedL1Loss if libra else L1Loss)
    bcr = "_bcr" in name
    assert type(model.roi_head.cls_loss).__name__ == (
        "BCRSigmoidCrossEntropyLoss" if bcr else "LGRCrossEntropyLoss" if journal else "CrossEntropyLoss"
    )
    lvis = "_lvis" in name
    assert (model.roi_head.score_thr, model.roi_head.max_per_img) == ((0.001, 300) if lvis else (0.05, 100))
    assert model.roi_head.use_sigmoid == bcr
    if journal:  # the conference preset of the same name, with only the losses changed
        conference = PRESETS[name[: -len("_lgr")]]
        assert {k for k, v in PRESETS[name].items() if conference[k] != v} <= {"box_loss", "cls_loss"}


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown preset 'mask_rcnn'.*faster_rcnn_r50_fpn"):
        build_model("mask_rcnn", 80)
    with pytest.raises(ValueError, match="unknown key.*'samplr'.*did you mean sampler"):
        build_model("faster_rcnn_r50_fpn", 80, samplr="random")
    with pytest.raises(ValueError, match="neck='bifpn'"):
        preset_config("faster_rcnn_r50_fpn", neck="bifpn")
    with pytest.raises(ValueError, match="box_loss"):
        preset_config("faster_rcnn_r50_fpn", box_loss="giou")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("faster_rcnn_r50_fpn", 0)
    # preset dicts are not mutated by overrides
    preset_config("faster_rcnn_r50_fpn", neck="bfp")
    assert PRESETS["faster_rcnn_r50_fpn"]["neck"] == "fpn"


# ------------------------------------------------------------------- mmdet checkpoint import
def to_mmdet_key(key: str) -> str:
    """This project's key -> MMDetection v2 key (MMDetection v2/v3 released checkpoints), written independently of the loader."""
    key = re.sub(r"^rpn\.head\.", "rpn_head.", key)
    key = re.sub(r"^roi_head\.box_head\.", "roi_head.bbox_head.", key)
    key = re.sub(r"^(neck\.0\.(lateral_convs|fpn_convs)\.\d+)\.(weight|bias)$", r"\1.conv.\3", key)
    key = re.sub(r"^(neck\.1\.refine\.(g|theta|phi|conv_out))\.(weight|bias)$", r"\1.conv.\3", key)
    return key


@pytest.fixture(scope="module")
def libra_r50() -> nn.Module:
    torch.manual_seed(0)
    return build_model("libra_faster_rcnn_r50_fpn", 80)


def mmdet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Random tensors under MMDetection names, with the shapes of ``model``'s parameters."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            state[to_mmdet_key(key)] = torch.randn(value.shape, generator=generator)
        else:
            state[to_mmdet_key(key)] = value.clone()
    return state


def test_mmdet_key_names_and_shapes(libra_r50):
    state = mmdet_state_dict(libra_r50)
    for key, shape in [
        ("neck.0.lateral_convs.3.conv.weight", (256, 2048, 1, 1)),
        ("neck.0.fpn_convs.0.conv.bias", (256,)),
        ("neck.1.refine.theta.conv.weight", (256, 256, 1, 1)),
        ("neck.1.refine.conv_out.conv.bias", (256,)),
        ("rpn_head.rpn_conv.weight", (256, 256, 3, 3)),
        ("rpn_head.rpn_cls.weight", (3, 256, 1, 1)),
        ("rpn_head.rpn_reg.weight", (12, 256, 1, 1)),
        ("roi_head.bbox_head.shared_fcs.0.weight", (1024, 256 * 7 * 7)),
        ("roi_head.bbox_head.shared_fcs.1.weight", (1024, 1024)),
        ("roi_head.bbox_head.fc_cls.weight", (81, 1024)),
        ("roi_head.bbox_head.fc_reg.weight", (320, 1024)),
        ("backbone.layer1.0.downsample.1.running_var", (256,)),
        ("backbone.conv1.weight", (64, 3, 7, 7)),
    ]:
        assert tuple(state[key].shape) == shape, key


def test_load_mmdet_checkpoint_roundtrip(libra_r50, tmp_path):
    state = mmdet_state_dict(libra_r50)
    path = tmp_path / "libra_faster_rcnn_r50_fpn_1x_coco.pth"
    torch.save({"meta": {"CLASSES": ["person"] * 80, "epoch": 12}, "state_dict": state}, path)
    assert load_mmdet_checkpoint(libra_r50, path) is libra_r50
    params = dict(libra_r50.state_dict())
    for key, value in params.items():
        torch.testing.assert_close(value, state[to_mmdet_key(key)], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(libra_r50.rpn.head.rpn_cls.weight, state["rpn_head.rpn_cls.weight"])
    torch.testing.assert_close(libra_r50.neck[1].refine.phi.bias, state["neck.1.refine.phi.conv.bias"])
    # a raw state_dict, with DataParallel's prefix and without num_batches_tracked, loads too
    raw = {"module." + k: v * 2 for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_mmdet_checkpoint(libra_r50, raw)
    torch.testing.assert_close(libra_r50.roi_head.box_head.fc_reg.weight, 2 * state["roi_head.bbox_head.fc_reg.weight"])


def test_load_mmdet_checkpoint_errors(libra_r50):
    state = mmdet_state_dict(libra_r50)

    missing = dict(state)
    del missing["neck.1.refine.theta.conv.weight"]
    with pytest.raises(ValueError, match=r"missing.*neck\.1\.refine\.theta\.weight"):
        load_mmdet_checkpoint(libra_r50, missing)

    voc_model = build_model("libra_faster_rcnn_r50_fpn", 20)
    with pytest.raises(ValueError, match=r"fc_cls\.weight: checkpoint \(81, 1024\) vs model \(21, 1024\).*num_classes=80"):
        load_mmdet_checkpoint(voc_model, {"state_dict": state})

    baseline = build_model("faster_rcnn_r50_fpn", 80)
    with pytest.raises(ValueError, match=r"not in the model.*neck\.1\.refine"):
        load_mmdet_checkpoint(baseline, state)

    retina = dict(state)
    retina["bbox_head.retina_cls.weight"] = torch.zeros(720, 256, 3, 3)
    with pytest.raises(ValueError, match=r"bbox_head\.retina_cls\.weight"):
        load_mmdet_checkpoint(libra_r50, retina)

    with pytest.raises(ValueError, match="must be a dict"):
        load_mmdet_checkpoint(libra_r50, [1, 2])


@pytest.mark.parametrize("override", [{"fpn_channels": 0}, {"fc_channels": -4}, {"rpn_pre_nms_top_n_train": -1},
                                      {"roi_batch_size": 2.5}, {"max_per_img": True}])
def test_non_positive_widths_and_counts_are_refused_before_building(override):
    """From Python too, not only the command line: a zero width would fail deep inside a module."""
    key = next(iter(override))
    with pytest.raises(ValueError, match=f"{key}=.*expected an integer"):
        build_model("libra_faster_rcnn_r50_fpn", 3, **override)
