"""MMDetection checkpoint import for every key layout of the released checkpoints.

Fake MMDetection state_dicts are made from a libra model with the INVERSE renaming, written
here independently of the loader from the released checkpoints' key names: single-neck models
(``faster-rcnn_r50_fpn_1x_coco``, ``faster-rcnn_r50_pafpn_1x_coco``, the GN ``4conv1fc`` head,
``retinanet_r50_fpn_1x_coco``) have ``neck.X``, a list of necks (``libra-faster-rcnn_r50_fpn_1x_coco``,
PAFPN + BFP, ``libra-retinanet_r50_fpn_1x_coco``) has ``neck.0.X`` / ``neck.1.X``; RetinaNet's head
is ``bbox_head.*``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from conftest import TinyBackbone
from libra.mmdet_checkpoint import convert_mmdet_state_dict, load_mmdet_checkpoint
from libra.presets import PRESETS, build_model

NUM_CLASSES = 5
# A named ResNet keeps the backbone.* key names; one block per stage and 32-channel neck / heads keep it cheap.
SMALL = {"backbone": "resnet50", "stage_blocks": (1, 1, 1, 1), "fpn_channels": 32}
# the head width key of each detector's presets
HEAD_CHANNELS = {
    "faster_rcnn": {"fc_channels": 32}, "retinanet": {"head_channels": 32},
    "mask_rcnn": {"fc_channels": 32, "mask_conv_channels": 32},
}

# layout id -> (preset, overrides, MMDetection holds ONE neck, i.e. without a Sequential index)
LAYOUTS = {
    "faster_rcnn_r50_fpn": ("faster_rcnn_r50_fpn", {}, True),
    "libra_faster_rcnn_r50_fpn": ("libra_faster_rcnn_r50_fpn", {}, False),
    "pafpn": ("faster_rcnn_r50_fpn", {"neck": "pafpn"}, True),
    "bpafpn": ("faster_rcnn_r50_fpn", {"neck": "bpafpn"}, False),
    "4conv1fc_gn": ("faster_rcnn_r50_fpn", {"box_head": "4conv1fc"}, True),
    "libra_4conv1fc_gn": ("libra_faster_rcnn_r50_fpn", {"box_head": "4conv1fc"}, False),
    "libra_conv_refine": ("libra_faster_rcnn_r50_fpn", {"refine_type": "conv"}, False),
    "retinanet_r50_fpn": ("retinanet_r50_fpn", {}, True),
    "libra_retinanet_r50_fpn": ("libra_retinanet_r50_fpn", {}, False),
    "mask_rcnn_r50_fpn": ("mask_rcnn_r50_fpn", {}, True),
    "libra_mask_rcnn_r50_fpn": ("libra_mask_rcnn_r50_fpn", {}, False),
}


pytestmark = pytest.mark.usefixtures("single_thread")


def head_channels(preset: str) -> dict[str, int]:
    return HEAD_CHANNELS[PRESETS[preset]["detector"]]


def small(layout: str, seed: int = 0, **extra) -> nn.Module:
    preset, overrides, _ = LAYOUTS[layout]
    torch.manual_seed(seed)
    # score_thr 0: random weights still give detections to compare.
    return build_model(preset, NUM_CLASSES, score_thr=0.0, **{**SMALL, **head_channels(preset), **overrides, **extra})


def tiny(preset: str, num_classes: int = NUM_CLASSES, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        preset, num_classes, backbone=TinyBackbone((8, 8, 8, 8)), fpn_channels=32, **head_channels(preset), **overrides
    )


# ------------------------------------------------------------------ inverse mapping (test side)
def to_mmdet_key(key: str, single_neck: bool) -> str:
    """This project's key -> MMDetection's (released v2/v3 checkpoints)."""
    key = re.sub(r"^rpn\.head\.", "rpn_head.", key)
    key = re.sub(r"^roi_head\.box_head\.", "roi_head.bbox_head.", key)
    # RetinaNet: the predictor is bbox_head; its tower convs are ConvModules, retina_cls/reg plain convs.
    key = re.sub(r"^dense_head\.head\.((cls|reg)_convs\.\d+)\.(weight|bias)$", r"bbox_head.\1.conv.\3", key)
    key = re.sub(r"^dense_head\.head\.", "bbox_head.", key)
    # ConvModule wrappers (no norm) of FPN / PAFPN and of the non-local refiner's 1x1 convs.
    key = re.sub(r"^(neck\.0\.(lateral|fpn|downsample|pafpn)_convs\.\d+)\.(weight|bias)$", r"\1.conv.\3", key)
    key = re.sub(r"^(neck\.1\.refine\.(g|theta|phi|conv_out))\.(weight|bias)$", r"\1.conv.\3", key)
    # (neck.1.refine.conv.* of the 'conv' refiner and shared_convs.{i}.conv/gn.* of the GN head
    # are ConvModules whose names this project keeps.)
    if single_neck:
        assert not key.startswith("neck.1."), key
        key = re.sub(r"^neck\.0\.", "neck.", key)
    return key


def random_value(key: str, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random tensor shaped like ``value`` that keeps a forward pass finite."""
    if not value.is_floating_point():
        return torch.randint(0, 1000, value.shape, generator=generator, dtype=value.dtype)
    if key.endswith("running_var"):
        return torch.rand(value.shape, generator=generator) + 0.5
    if value.dim() == 1 and key.endswith("weight"):  # BN / GN scales
        return 1 + 0.1 * torch.randn(value.shape, generator=generator)
    scale = value[0].numel() ** -0.5 if value.dim() > 1 else 0.1
    return scale * torch.randn(value.shape, generator=generator)


def fake_mmdet(model: nn.Module, single_neck: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        mmdet_key = to_mmdet_key(key, single_neck)
        assert mmdet_key not in state, mmdet_key
        state[mmdet_key] = random_value(key, value, generator)
    return state


def fake_for(layout: str, model: nn.Module) -> dict[str, torch.Tensor]:
    return fake_mmdet(model, LAYOUTS[layout][2])


# ------------------------------------------------------------------------------- round trips
EXPECTED_KEYS = {
    "faster_rcnn_r50_fpn": {
        "neck.lateral_convs.3.conv.weight": (32, 2048, 1, 1),
        "neck.lateral_convs.0.conv.bias": (32,),
        "neck.fpn_convs.3.conv.weight": (32, 32, 3, 3),
        "roi_head.bbox_head.shared_fcs.1.weight": (32, 32),
    },
    "libra_faster_rcnn_r50_fpn": {
        "neck.0.lateral_convs.3.conv.weight": (32, 2048, 1, 1),
        "neck.0.fpn_convs.0.conv.bias": (32,),
        "neck.1.refine.g.conv.weight": (32, 32, 1, 1),
        "neck.1.refine.theta.conv.bias": (32,),
        "neck.1.refine.phi.conv.weight": (32, 32, 1, 1),
        "neck.1.refine.conv_out.conv.bias": (32,),
    },
    "pafpn": {
        "neck.lateral_convs.0.conv.weight": (32, 256, 1, 1),
        "neck.downsample_convs.0.conv.weight": (32, 32, 3, 3),
        "neck.downsample_convs.2.conv.bias": (32,),
        "neck.pafpn_convs.2.conv.weight": (32, 32, 3, 3),
    },
    "bpafpn": {
        "neck.0.downsample_convs.2.conv.weight": (32, 32, 3, 3),
        "neck.0.pafpn_convs.0.conv.bias": (32,),
        "neck.1.refine.conv_out.conv.weight": (32, 32, 1, 1),
    },
    "4conv1fc_gn": {
        "neck.fpn_convs.1.conv.weight": (32, 32, 3, 3),
        "roi_head.bbox_head.shared_convs.0.conv.weight": (32, 32, 3, 3),
        "roi_head.bbox_head.shared_convs.3.conv.weight": (32, 32, 3, 3),
        "roi_head.bbox_head.shared_convs.3.gn.weight": (32,),
        "roi_head.bbox_head.shared_convs.0.gn.bias": (32,),
        "roi_head.bbox_head.shared_fcs.0.weight": (32, 32 * 7 * 7),
    },
    "libra_4conv1fc_gn": {
        "neck.1.refine.theta.conv.weight": (32, 32, 1, 1),
        "roi_head.bbox_head.shared_convs.2.gn.weight": (32,),
    },
    "libra_conv_refine": {
        "neck.1.refine.conv.weight": (32, 32, 3, 3),
        "neck.1.refine.conv.bias": (32,),
    },
    # retinanet_r50_fpn_1x_coco: FPN from C3 (3 laterals), fpn_convs.3 on C5 (P6) and .4 on P6 (P7)
    "retinanet_r50_fpn": {
        "neck.lateral_convs.0.conv.weight": (32, 512, 1, 1),
        "neck.lateral_convs.2.conv.weight": (32, 2048, 1, 1),
        "neck.fpn_convs.2.conv.bias": (32,),
        "neck.fpn_convs.3.conv.weight": (32, 2048, 3, 3),
        "neck.fpn_convs.4.conv.weight": (32, 32, 3, 3),
        "neck.fpn_convs.4.conv.bias": (32,),
    },
    "libra_retinanet_r50_fpn": {
        "neck.0.lateral_convs.2.conv.weight": (32, 2048, 1, 1),
        "neck.0.fpn_convs.3.conv.weight": (32, 2048, 3, 3),
        "neck.0.fpn_convs.4.conv.bias": (32,),
        "neck.1.refine.theta.conv.weight": (32, 32, 1, 1),
        "neck.1.refine.conv_out.conv.bias": (32,),
    },
    # mask-rcnn_r50_fpn_1x_coco: Faster R-CNN's keys + roi_head.mask_head.* (FCNMaskHead, ConvModule convs)
    "mask_rcnn_r50_fpn": {
        "neck.lateral_convs.3.conv.weight": (32, 2048, 1, 1),
        "roi_head.mask_head.convs.0.conv.weight": (32, 32, 3, 3),
        "roi_head.mask_head.convs.3.conv.bias": (32,),
        "roi_head.mask_head.upsample.weight": (32, 32, 2, 2),
        "roi_head.mask_head.conv_logits.weight": (NUM_CLASSES, 32, 1, 1),
    },
    "libra_mask_rcnn_r50_fpn": {
        "neck.1.refine.g.conv.weight": (32, 32, 1, 1),
        "roi_head.mask_head.convs.2.conv.weight": (32, 32, 3, 3),
        "roi_head.mask_head.conv_logits.bias": (NUM_CLASSES,),
    },
}
BACKBONE_KEYS = {
    "backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.bn1.running_var": (64,),
    "backbone.layer1.0.downsample.1.running_var": (256,),
    "backbone.layer4.0.conv2.weight": (512, 512, 3, 3),
}
HEAD_KEYS = {
    "faster_rcnn": {
        "rpn_head.rpn_conv.weight": (256, 32, 3, 3),  # the RPN's 256 feature channels
        "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
        "rpn_head.rpn_reg.weight": (12, 256, 1, 1),
        "roi_head.bbox_head.fc_cls.weight": (NUM_CLASSES + 1, 32),
        "roi_head.bbox_head.fc_reg.weight": (4 * NUM_CLASSES, 32),
    },
    "mask_rcnn": {
        "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
        "roi_head.bbox_head.fc_cls.weight": (NUM_CLASSES + 1, 32),
        "roi_head.mask_head.upsample.bias": (32,),
    },
    "retinanet": {
        "bbox_head.cls_convs.0.conv.weight": (32, 32, 3, 3),
        "bbox_head.cls_convs.3.conv.bias": (32,),
        "bbox_head.reg_convs.0.conv.weight": (32, 32, 3, 3),
        "bbox_head.reg_convs.3.conv.bias": (32,),
        "bbox_head.retina_cls.weight": (9 * NUM_CLASSES, 32, 3, 3),  # A * C, no background
        "bbox_head.retina_cls.bias": (9 * NUM_CLASSES,),
        "bbox_head.retina_reg.weight": (9 * 4, 32, 3, 3),
        "bbox_head.retina_reg.bias": (36,),
    },
}
ABSENT_KEYS = {
    "faster_rcnn_r50_fpn": ["neck.0.", "neck.1.", "neck.downsample_convs.", "roi_head.bbox_head.shared_convs."],
    "libra_faster_rcnn_r50_fpn": ["neck.lateral_convs.", "neck.0.downsample_convs.", "neck.1.refine.conv."],
    "pafpn": ["neck.0.", "neck.downsample_convs.3.", "neck.pafpn_convs.3."],
    "bpafpn": ["neck.lateral_convs.", "neck.downsample_convs."],
    "4conv1fc_gn": ["neck.0.", "roi_head.bbox_head.shared_convs.0.conv.bias", "roi_head.bbox_head.shared_fcs.1."],
    "libra_4conv1fc_gn": ["neck.lateral_convs.", "roi_head.bbox_head.shared_convs.1.conv.bias"],
    "libra_conv_refine": ["neck.1.refine.theta.", "neck.1.refine.conv.conv."],
    "retinanet_r50_fpn": ["neck.0.", "neck.lateral_convs.3.", "neck.fpn_convs.5.", "rpn_head.", "roi_head.",
                          "bbox_head.retina_cls.conv.", "bbox_head.cls_convs.4."],
    "libra_retinanet_r50_fpn": ["neck.lateral_convs.", "neck.0.lateral_convs.3.", "rpn_head.", "bbox_head.retina_reg.conv."],
    "mask_rcnn_r50_fpn": ["neck.0.", "roi_head.mask_head.convs.4.", "roi_head.mask_head.conv_logits.conv.",
                          "roi_head.mask_head.upsample.conv."],
    "libra_mask_rcnn_r50_fpn": ["neck.lateral_convs.", "roi_head.mask_head.convs.0.weight"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fake_checkpoint_has_the_released_key_layout(layout):
    state = fake_for(layout, small(layout))
    detector = PRESETS[LAYOUTS[layout][0]]["detector"]
    for key, shape in {**BACKBONE_KEYS, **HEAD_KEYS[detector], **EXPECTED_KEYS[layout]}.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for prefix in ABSENT_KEYS[layout]:
        assert not any(key.startswith(prefix) for key in state), prefix


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def loaded(request):
    """(layout, fake MMDetection state_dict, model loaded from it with load_mmdet_checkpoint)."""
    layout = request.param
    model = small(layout, seed=0)
    state = fake_for(layout, model)
    assert load_mmdet_checkpoint(model, {"meta": {"epoch": 12}, "state_dict": state}) is model
    return layout, state, model


def test_every_tensor_lands_in_place(loaded):
    layout, state, model = loaded
    single_neck = LAYOUTS[layout][2]
    own = model.state_dict()
    assert {to_mmdet_key(key, single_neck) for key in own} == set(state)
    for key, value in own.items():
        expected = state[to_mmdet_key(key, single_neck)]
        assert value.dtype == expected.dtype and torch.equal(value, expected), key


def test_loaded_model_detects_like_its_own_state_dict(loaded):
    layout, state, model = loaded
    single_neck = LAYOUTS[layout][2]
    reference = small(layout, seed=123)
    reference.load_state_dict({key: state[to_mmdet_key(key, single_neck)] for key in reference.state_dict()})
    model.eval()
    reference.eval()
    images = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(images, [(64, 80)])[0]
        theirs = reference(images, [(64, 80)])[0]
    assert ours["boxes"].shape[0] > 0
    assert torch.isfinite(ours["scores"]).all()
    for name in ("boxes", "scores", "labels", "masks"):
        if name in theirs:
            assert torch.equal(ours[name], theirs[name]), name
    assert ("masks" in ours) == (PRESETS[LAYOUTS[layout][0]]["detector"] == "mask_rcnn")


@pytest.mark.parametrize(
    "mmdet_key, libra_key",
    [
        ("backbone.layer2.0.downsample.0.weight", "backbone.layer2.0.downsample.0.weight"),
        ("neck.lateral_convs.0.conv.weight", "neck.0.lateral_convs.0.weight"),
        ("neck.fpn_convs.3.conv.bias", "neck.0.fpn_convs.3.bias"),
        ("neck.downsample_convs.1.conv.weight", "neck.0.downsample_convs.1.weight"),
        ("neck.pafpn_convs.2.conv.bias", "neck.0.pafpn_convs.2.bias"),
        ("rpn_head.rpn_reg.bias", "rpn.head.rpn_reg.bias"),
        ("roi_head.bbox_head.shared_convs.1.conv.weight", "roi_head.box_head.shared_convs.1.conv.weight"),
        ("roi_head.bbox_head.shared_convs.1.gn.bias", "roi_head.box_head.shared_convs.1.gn.bias"),
        # RetinaNet
        ("neck.fpn_convs.4.conv.weight", "neck.0.fpn_convs.4.weight"),
        ("bbox_head.cls_convs.2.conv.weight", "dense_head.head.cls_convs.2.weight"),
        ("bbox_head.reg_convs.0.conv.bias", "dense_head.head.reg_convs.0.bias"),
        ("bbox_head.retina_cls.bias", "dense_head.head.retina_cls.bias"),
        ("bbox_head.retina_reg.weight", "dense_head.head.retina_reg.weight"),
        # unknown to every rule: kept (and then reported by the loader)
        ("neck.lateral_convs.0.gn.weight", "neck.0.lateral_convs.0.gn.weight"),
        # Mask R-CNN's mask head: kept, the names of libra.roi_heads.MaskRoIHead.mask_head
        ("roi_head.mask_head.convs.0.conv.weight", "roi_head.mask_head.convs.0.conv.weight"),
        ("roi_head.mask_head.upsample.weight", "roi_head.mask_head.upsample.weight"),
        ("roi_head.mask_head.conv_logits.bias", "roi_head.mask_head.conv_logits.bias"),
    ],
)
def test_single_neck_key_renames(mmdet_key, libra_key):
    assert convert_mmdet_state_dict({mmdet_key: torch.zeros(1)}) == {libra_key: torch.zeros(1)}


@pytest.mark.parametrize(
    "mmdet_key, libra_key",
    [
        ("neck.0.lateral_convs.2.conv.weight", "neck.0.lateral_convs.2.weight"),
        ("neck.0.downsample_convs.0.conv.bias", "neck.0.downsample_convs.0.bias"),
        ("neck.1.refine.theta.conv.weight", "neck.1.refine.theta.weight"),
        ("neck.1.refine.conv_out.conv.bias", "neck.1.refine.conv_out.bias"),
        ("neck.1.refine.conv.weight", "neck.1.refine.conv.weight"),
        ("roi_head.bbox_head.fc_cls.weight", "roi_head.box_head.fc_cls.weight"),
        ("neck.0.fpn_convs.3.conv.bias", "neck.0.fpn_convs.3.bias"),  # Libra RetinaNet's P6 conv
        ("bbox_head.cls_convs.3.conv.weight", "dense_head.head.cls_convs.3.weight"),
    ],
)
def test_list_of_necks_key_renames(mmdet_key, libra_key):
    assert convert_mmdet_state_dict({mmdet_key: torch.zeros(1)}) == {libra_key: torch.zeros(1)}


# ------------------------------------------------------------------------------------ errors
def test_bfp_checkpoint_into_plain_model_names_neck1_keys():
    state = fake_mmdet(tiny("libra_faster_rcnn_r50_fpn"), single_neck=False)
    with pytest.raises(ValueError) as info:
        load_mmdet_checkpoint(tiny("faster_rcnn_r50_fpn"), state)
    message = str(info.value)
    assert re.search(r"not in the model \(8\): neck\.1\.refine\.\w+\.conv\.(weight|bias) \(as neck\.1\.refine\.", message)
    assert "neck.1.refine.theta.conv.weight (as neck.1.refine.theta.weight)" in message
    assert "missing from the checkpoint" not in message
    assert "build the model with neck='bfp'" in message


def test_plain_checkpoint_into_libra_model_raises():
    state = fake_mmdet(tiny("faster_rcnn_r50_fpn"), single_neck=True)
    assert "neck.lateral_convs.0.conv.weight" in state
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(8\): neck\.1\.refine\.") as info:
        load_mmdet_checkpoint(tiny("libra_faster_rcnn_r50_fpn"), state)
    assert "not in the model" not in str(info.value)  # the single neck itself maps onto neck.0
    assert "build the model with neck='fpn'" in str(info.value)


@pytest.mark.parametrize(
    "source, target, hint",
    [
        (("faster_rcnn_r50_fpn", {"neck": "pafpn"}, True), ("faster_rcnn_r50_fpn", {}), "neck='pafpn'"),
        (("faster_rcnn_r50_fpn", {"neck": "bpafpn"}, False), ("libra_faster_rcnn_r50_fpn", {}), "neck='bpafpn'"),
        (("faster_rcnn_r50_fpn", {}, True), ("faster_rcnn_r50_fpn", {"neck": "pafpn"}), "neck='fpn'"),
        (("faster_rcnn_r50_fpn", {"box_head": "4conv1fc"}, True), ("faster_rcnn_r50_fpn", {}), "box_head='4conv1fc'"),
        (("faster_rcnn_r50_fpn", {}, True), ("faster_rcnn_r50_fpn", {"box_head": "4conv1fc"}), "box_head='shared2fc'"),
    ],
)
def test_other_layout_mismatches_raise_with_the_override(source, target, hint):
    (source_preset, source_overrides, single_neck), (target_preset, target_overrides) = source, target
    state = fake_mmdet(tiny(source_preset, **source_overrides), single_neck)
    with pytest.raises(ValueError, match="does not match the model") as info:
        load_mmdet_checkpoint(tiny(target_preset, **target_overrides), state)
    assert f"build the model with {hint}" in str(info.value)


def test_wrong_class_count_raises_with_num_classes_hint():
    state = fake_mmdet(tiny("libra_faster_rcnn_r50_fpn"), single_neck=False)
    voc = tiny("libra_faster_rcnn_r50_fpn", num_classes=20)
    with pytest.raises(
        ValueError,
        match=r"fc_cls\.weight: checkpoint \(6, 32\) vs model \(21, 32\).*build the model with num_classes=5",
    ):
        load_mmdet_checkpoint(voc, {"state_dict": state})


def test_module_prefix_and_file_checkpoints_load(tmp_path):
    model = tiny("faster_rcnn_r50_fpn", neck="pafpn")
    state = fake_mmdet(model, single_neck=True)
    load_mmdet_checkpoint(model, {"state_dict": {"module." + key: value for key, value in state.items()}})
    assert torch.equal(model.neck[0].downsample_convs[1].weight, state["neck.downsample_convs.1.conv.weight"])
    assert torch.equal(model.rpn.head.rpn_cls.bias, state["rpn_head.rpn_cls.bias"])

    path = tmp_path / "faster-rcnn_r50_pafpn_1x_coco.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": {k: 2 * v for k, v in state.items()}}, path)
    load_mmdet_checkpoint(model, path)
    assert torch.equal(model.neck[0].lateral_convs[2].bias, 2 * state["neck.lateral_convs.2.conv.bias"])


@pytest.mark.parametrize(
    "typo, correct, as_key",
    [
        ("neck.lateral_conv.1.conv.weight", "neck.lateral_convs.1.conv.weight", "neck.0.lateral_conv.1.conv.weight"),
        ("rpn_head.rpn_cls.weigth", "rpn_head.rpn_cls.weight", "rpn.head.rpn_cls.weigth"),
        ("roi_head.bbox_head.shared_fc.0.weight", "roi_head.bbox_head.shared_fcs.0.weight",
         "roi_head.box_head.shared_fc.0.weight"),
    ],
)
def test_key_typo_is_reported(typo, correct, as_key):
    model = tiny("faster_rcnn_r50_fpn")
    state = fake_mmdet(model, single_neck=True)
    state[typo] = state.pop(correct)
    missing = convert_mmdet_state_dict({correct: state[typo]}).popitem()[0]
    with pytest.raises(ValueError) as info:
        load_mmdet_checkpoint(model, state)
    message = str(info.value)
    assert f"missing from the checkpoint (1): {missing}" in message
    assert f"not in the model (1): {typo} (as {as_key})" in message


@pytest.mark.parametrize(
    "extra",
    [
        "neck.lateral_convs.0.gn.weight",  # a GN neck (gn-all configs)
        "neck.fpn_convs.4.conv.weight",  # RetinaNet's extra conv level
        "roi_head.mask_head.convs.0.conv.weight",  # Mask R-CNN
        "bbox_head.retina_cls.weight",  # RetinaNet
    ],
)
def test_unknown_keys_are_reported_not_dropped(extra):
    model = tiny("faster_rcnn_r50_fpn")
    state = fake_mmdet(model, single_neck=True)
    state[extra] = torch.zeros(32)
    with pytest.raises(ValueError, match=r"not in the model \(1\): " + re.escape(extra)):
        load_mmdet_checkpoint(model, state)


def test_mixed_neck_layouts_are_refused():
    state = fake_mmdet(tiny("faster_rcnn_r50_fpn"), single_neck=True)
    state["neck.1.refine.theta.conv.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ValueError, match=r"mixes single-neck keys \(neck\.fpn_convs\..*list-of-necks keys \(neck\.1\.refine\.theta"):
        load_mmdet_checkpoint(tiny("libra_faster_rcnn_r50_fpn"), state)


def test_two_keys_onto_one_name_are_refused():
    state = fake_mmdet(tiny("libra_faster_rcnn_r50_fpn"), single_neck=False)
    state["neck.0.lateral_convs.0.weight"] = state["neck.0.lateral_convs.0.conv.weight"].clone()
    with pytest.raises(ValueError, match=r"both map to 'neck\.0\.lateral_convs\.0\.weight'"):
        load_mmdet_checkpoint(tiny("libra_faster_rcnn_r50_fpn"), state)


# ------------------------------------------------------------------------------ RetinaNet
def test_libra_retinanet_release_file_loads(tmp_path):
    """A file named as the released one (``libra_retinanet_r50_fpn_1x_coco_20200205-804d94ce.pth``,
    mmdet v2: ``meta`` + ``state_dict``) with its key layout loads into the matching preset."""
    model = small("libra_retinanet_r50_fpn")
    state = fake_for("libra_retinanet_r50_fpn", model)
    path = tmp_path / "libra_retinanet_r50_fpn_1x_coco_20200205-804d94ce.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ["c"] * NUM_CLASSES}, "state_dict": state}, path)
    load_mmdet_checkpoint(model, path)
    assert torch.equal(model.dense_head.head.retina_cls.weight, state["bbox_head.retina_cls.weight"])
    assert torch.equal(model.dense_head.head.cls_convs[2].bias, state["bbox_head.cls_convs.2.conv.bias"])
    assert torch.equal(model.neck[0].fpn_convs[4].weight, state["neck.0.fpn_convs.4.conv.weight"])
    assert torch.equal(model.neck[1].refine.conv_out.weight, state["neck.1.refine.conv_out.conv.weight"])


@pytest.mark.parametrize(
    "source, target, hint",
    [
        ("retinanet_r50_fpn", "faster_rcnn_r50_fpn", "build it with a retinanet preset (retinanet_r50_fpn, libra_retinanet_r50_fpn)"),
        ("libra_faster_rcnn_r50_fpn", "libra_retinanet_r50_fpn", "build it with a faster_rcnn preset"),
        ("libra_retinanet_r50_fpn", "retinanet_r50_fpn", "build the model with neck='bfp'"),
        ("retinanet_r50_fpn", "libra_retinanet_r50_fpn", "build the model with neck='fpn'"),
    ],
)
def test_retinanet_mismatches_raise_with_the_preset_to_use(source, target, hint):
    state = fake_mmdet(tiny(source), single_neck=not source.startswith("libra"))
    with pytest.raises(ValueError, match="does not match the model") as info:
        load_mmdet_checkpoint(tiny(target), state)
    assert hint in str(info.value)


def test_retinanet_wrong_class_count_raises_with_num_classes_hint():
    state = fake_mmdet(tiny("retinanet_r50_fpn"), single_neck=True)
    with pytest.raises(
        ValueError,
        match=r"retina_cls\.weight: checkpoint \(45, 32, 3, 3\) vs model \(180, 32, 3, 3\).*"
        r"5 classes \(9 anchors per location\), the model 20: build the model with num_classes=5",
    ):
        load_mmdet_checkpoint(tiny("retinanet_r50_fpn", num_classes=20), state)


def test_not_a_dict_raises():
    with pytest.raises(ValueError, match="must be a dict"):
        load_mmdet_checkpoint(tiny("faster_rcnn_r50_fpn"), [1, 2])


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("faster_rcnn_r50_fpn", {}),
        ("libra_faster_rcnn_r50_fpn", {}),
        ("retinanet_r50_fpn", {}),
        ("libra_retinanet_r50_fpn", {}),
        ("libra_faster_rcnn_r101_fpn", {}),
        ("libra_faster_rcnn_x101_64x4d_fpn", {}),
    ],
)
def test_eval_guesses_the_preset_of_an_mmdet_checkpoint(preset, overrides):
    """eval.py --checkpoint <mmdet .pth> without --model builds the preset the keys describe."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    eval_script = importlib.import_module("eval")
    model = build_model(preset, 3, **overrides)
    # the checkpoint's own key layout (single neck unless there is a BFP)
    single = "neck.1.refine.g.weight" not in model.state_dict()
    state = {to_mmdet_key(k, single_neck=single): v for k, v in model.state_dict().items()}
    assert eval_script.guess_mmdet_preset(state) == preset


# ------------------------------------------------------------------ standalone RPN and Fast R-CNN
@pytest.mark.parametrize("preset", ["rpn_r50_fpn", "fast_rcnn_r50_fpn", "libra_fast_rcnn_r50_fpn"])
def test_rpn_and_fast_rcnn_checkpoints_load(preset):
    """rpn_r50_fpn_1x_coco (backbone, neck, rpn_head) and fast-rcnn_r50_fpn_1x_coco (no rpn_head)."""
    extra = {} if preset.startswith("rpn") else {"fc_channels": 32}
    model = build_model(preset, NUM_CLASSES, **SMALL, **extra)
    single = not preset.startswith("libra")
    state = fake_mmdet(model, single_neck=single)
    heads = {key.split(".")[0] for key in state}
    assert heads == ({"backbone", "neck", "rpn_head"} if preset.startswith("rpn") else {"backbone", "neck", "roi_head"})
    loaded = load_mmdet_checkpoint(build_model(preset, NUM_CLASSES, **SMALL, **extra), {"state_dict": state})
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[to_mmdet_key(key, single)]), key


@pytest.mark.parametrize("preset", ["rpn_r50_fpn", "libra_rpn_r50_fpn"])
def test_mmdet3_rpn_checkpoint_with_bbox_head_keys_loads_and_is_recognised(preset, tmp_path):
    """MMDetection 3.x saves the standalone RPN's head as bbox_head.rpn_{conv,cls,reg}.* (v2: rpn_head.*)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    eval_script = importlib.import_module("eval")
    model = build_model(preset, NUM_CLASSES, **SMALL)
    single = not preset.startswith("libra")
    v2 = fake_mmdet(model, single_neck=single)
    v3 = {re.sub(r"^rpn_head\.", "bbox_head.", key): value for key, value in v2.items()}
    assert {key for key in v3 if key.startswith("bbox_head.")} == {
        f"bbox_head.rpn_{name}.{kind}" for name in ("conv", "cls", "reg") for kind in ("weight", "bias")
    }
    assert not any(key.startswith("rpn_head.") for key in v3)
    assert eval_script.guess_mmdet_preset(v3) == preset
    path = tmp_path / "rpn_r50_fpn_1x_coco_mmdet3.pth"
    torch.save({"meta": {}, "state_dict": v3}, path)
    assert eval_script.read_checkpoint(str(path))[0] == "mmdet"
    loaded = load_mmdet_checkpoint(build_model(preset, NUM_CLASSES, **SMALL), {"state_dict": v3})
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, v2[to_mmdet_key(key, single)]), key
    # Both namings at once map two keys onto one name: refused.
    with pytest.raises(ValueError, match="both map to"):
        load_mmdet_checkpoint(model, {**v2, "bbox_head.rpn_cls.bias": v2["rpn_head.rpn_cls.bias"]})


def test_rpn_checkpoint_into_faster_rcnn_names_the_rpn_presets():
    state = fake_mmdet(build_model("rpn_r50_fpn", NUM_CLASSES, **SMALL), single_neck=True)
    with pytest.raises(ValueError, match=r"holds a rpn detector.*build it with a rpn preset \(rpn_r50_fpn, libra_rpn_r50_fpn\)"):
        load_mmdet_checkpoint(build_model("faster_rcnn_r50_fpn", NUM_CLASSES, **SMALL, fc_channels=32), state)


@pytest.mark.parametrize("preset", ["rpn_r50_fpn", "libra_rpn_r50_fpn", "rpn_r101_fpn", "fast_rcnn_r50_fpn", "libra_fast_rcnn_r50_fpn"])
def test_eval_guesses_rpn_and_fast_rcnn_checkpoints(preset):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    eval_script = importlib.import_module("eval")
    model = build_model(preset, 3, stage_blocks=None)
    state = {to_mmdet_key(k, single_neck="neck.1.refine.g.weight" not in model.state_dict()): v for k, v in model.state_dict().items()}
    assert eval_script.guess_mmdet_preset(state) == preset


# ------------------------------------------------------------------ DCN backbones (configs/dcn/*dconv-c3-c5*)
class BackboneOnly(nn.Module):
    """The ``backbone.*`` part of a detector: enough for the DCN backbone's keys."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def dcn_backbone(dcn_type: str) -> nn.Module:
    from libra.backbone import build_resnet

    dcn = {"type": dcn_type, "deform_groups": 1, "fallback_on_stride": False}
    return BackboneOnly(build_resnet("resnet50", stage_blocks=(1, 1, 1, 1), dcn=dcn, stage_with_dcn=(False, True, True, True)))


@pytest.mark.parametrize("dcn_type, offset_channels", [("DCN", 2 * 9), ("DCNv2", 3 * 9)])
def test_dcn_backbone_checkpoint_imports(dcn_type, offset_channels):
    """faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco (mmcv DeformConv2dPack) and its DCNv2 variant
    (ModulatedDeformConv2dPack, bias=False in the Bottleneck): the 3x3 conv2 of C3-C5 keeps
    ``conv2.weight`` and adds ``conv2.conv_offset.{weight,bias}``."""
    model = dcn_backbone(dcn_type)
    state = fake_mmdet(model, single_neck=True)
    expected = {  # MMDetection's names and shapes, written out here
        "backbone.layer1.0.conv2.weight": (64, 64, 3, 3),
        "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),
        "backbone.layer2.0.conv2.conv_offset.weight": (offset_channels, 128, 3, 3),
        "backbone.layer2.0.conv2.conv_offset.bias": (offset_channels,),
        "backbone.layer3.0.conv2.conv_offset.weight": (offset_channels, 256, 3, 3),
        "backbone.layer4.0.conv2.conv_offset.weight": (offset_channels, 512, 3, 3),
        "backbone.layer4.0.conv2.conv_offset.bias": (offset_channels,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    for key in ("backbone.layer1.0.conv2.conv_offset.weight", "backbone.layer2.0.conv2.bias",
                "backbone.layer2.0.conv2.conv.weight", "backbone.layer3.0.conv2.conv_offset.conv.weight"):
        assert key not in state, key
    assert convert_mmdet_state_dict(state).keys() == state.keys()  # backbone keys pass through unchanged
    fresh = dcn_backbone(dcn_type)
    assert load_mmdet_checkpoint(fresh, {"state_dict": state}) is fresh
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert fresh.backbone.layer3[0].conv2.conv_offset.weight.abs().sum() > 0
    with torch.no_grad():
        outputs = fresh.eval().backbone(torch.randn(1, 3, 64, 64))
    assert all(torch.isfinite(o).all() for o in outputs)


def test_dcn_checkpoint_into_a_plain_backbone_names_the_offset_convs():
    state = fake_mmdet(dcn_backbone("DCN"), single_neck=True)
    from libra.backbone import build_resnet

    plain = BackboneOnly(build_resnet("resnet50", stage_blocks=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"not in the model \(6\): backbone\.layer2\.0\.conv2\.conv_offset\.bias") as info:
        load_mmdet_checkpoint(plain, state)
    assert ("deformable convs in layer[2, 3, 4] (conv_offset with 18 channels): build the model with "
            "dcn={'type': 'DCN', 'deform_groups': 1}, stage_with_dcn=(False, True, True, True)") in str(info.value)
    state_v2 = fake_mmdet(dcn_backbone("DCNv2"), single_neck=True)
    with pytest.raises(ValueError, match=r"dcn=\{'type': 'DCNv2', 'deform_groups': 1\}"):
        load_mmdet_checkpoint(plain, state_v2)
    with pytest.raises(ValueError, match="the checkpoint's has none: build the model without dcn"):
        load_mmdet_checkpoint(dcn_backbone("DCN"), fake_mmdet(plain, single_neck=True))
