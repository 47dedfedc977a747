"""The model config record and the detector interface (issue 16).

- a user's preset value is honoured or refused in one line, never replaced by a recipe default;
- strides come from the neck: anchors and RoI extractors follow ``fpn_start_level``, and a
  composition whose pieces disagree is refused at build time;
- the resolved config is recorded in checkpoints and rebuilds the model (also for checkpoints
  written before configs were recorded);
- every detector is driven through ``loss(batch)`` / ``predict(batch)``;
- a sampler module passes through ``build_model`` without editing any libra file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyBackbone
from torch import nn

from libra.anchor_generator import AnchorGenerator
from libra.data import collate
from libra.dense_heads import RegionProposalNetwork, RPNHead
from libra.detectors import FasterRCNN
from libra.engine.builders import DataError
from libra.engine.checkpoint import checkpoint_model_config, make_checkpoint
from libra.engine.cli import build_detector
from libra.engine.loading import load_detector
from libra.necks import FPN, neck_strides
from libra.presets import PRESETS, build_model, check_setting, preset_config
from libra.roi_heads import MultiLevelRoIExtractor, RoIHead, Shared2FCBoxHead
from libra.samplers import RandomSampler
from libra.structures import Batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402  (the script's argument resolution, in-process)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(stage_blocks=(1, 1, 1, 1), width_per_group=8, fpn_channels=16, fc_channels=32, backbone_norm="bn")


def resolve(*argv: str):
    return train.resolve_args(train.build_parser().parse_args(["--work-dir", "unused", *argv]))


# ------------------------------------------------------------------ item 1: the user's value wins
def test_set_backbone_values_are_honoured_over_the_recipe():
    """The synthetic recipe sets frozen_stages=-1 and one block per stage; --set must win."""
    args = resolve("--set", "frozen_stages=2", "--set", "stage_blocks=[2,2,2,2]", "--set", "width_per_group=8")
    assert args.model_config["frozen_stages"] == 2 and args.model_config["stage_blocks"] == (2, 2, 2, 2)
    model = build_detector(args, num_classes=4)
    assert [len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    frozen = [all(not p.requires_grad for p in getattr(model.backbone, f"layer{i}").parameters()) for i in (1, 2, 3)]
    assert frozen == [True, True, False]  # stem + layer1 + layer2 frozen


def test_recipe_defaults_apply_when_the_user_gives_nothing():
    config = resolve().model_config
    assert (config["frozen_stages"], config["stage_blocks"], config["backbone_norm"]) == (-1, (1, 1, 1, 1), "bn")
    assert config["fpn_channels"] == 128 and config["roi_batch_size"] == 128


def test_v1_recipe_layers_on_any_dataset_and_the_user_still_wins():
    from libra.recipes import recipe

    v2, v1 = recipe("coco", "fast_rcnn"), recipe("coco", "fast_rcnn", "v1")
    assert (v2["grad_clip"], v2["warmup_ratio"], v2["overrides"]) == (0.0, 0.001, {})
    assert (v1["grad_clip"], v1["warmup_ratio"]) == (35.0, pytest.approx(1 / 3))
    assert v1["overrides"] == {"roi_sampling_ratio": 2, "roi_match_low_quality": True}
    assert recipe("coco", "retinanet", "v1")["overrides"] == {} and recipe("coco", "rpn", "v1")["grad_clip"] == 35.0
    assert recipe("synthetic", "faster_rcnn", "v1")["overrides"]["fpn_channels"] == 128  # the dataset's keys stay
    with pytest.raises(ValueError, match="no recipe version 'v3'"):
        recipe("coco", "fast_rcnn", "v3")
    args = resolve("--recipe", "v1", "--warmup-ratio", "0.5", "--grad-clip", "0", "--set", "roi_sampling_ratio=-1")
    assert (args.warmup_ratio, args.grad_clip, args.model_config["roi_sampling_ratio"]) == (0.5, 0.0, -1)
    assert args.model_config["roi_match_low_quality"] is True
    with pytest.raises(DataError, match="roi_sampling_ratio=-2: expected an integer >= -1"):
        resolve("--set", "roi_sampling_ratio=-2")


def test_dedicated_flag_and_set_agree_or_are_refused():
    assert resolve("--frozen-stages", "2", "--set", "frozen_stages=2").model_config["frozen_stages"] == 2
    with pytest.raises(DataError) as error:
        resolve("--frozen-stages", "1", "--set", "frozen_stages=2")
    message = str(error.value)
    assert "--frozen-stages 1" in message and "--set frozen_stages=2" in message and "\n" not in message


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("frozen_stages=x", "expected an integer"),
        ("stage_blocks=[1,1]", "4 integers"),
        ("score_thr=1.5", "[0, 1]"),
        ("rpn_batch_size=0", ">= 1"),
        ("sampler=ohem", "expected one of random, iou_balanced"),
        ("frozen_stage=1", "did you mean frozen_stages"),
    ],
)
def test_bad_set_values_are_one_line_errors(item, fragment):
    with pytest.raises(DataError) as error:
        resolve("--set", item)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_one_validator_for_python_and_command_line():
    """build_model refuses what --set refuses, with the same words."""
    with pytest.raises(ValueError, match=r"rpn_batch_size=0: expected an integer >= 1"):
        preset_config("faster_rcnn_r50_fpn", rpn_batch_size=0)
    assert check_setting("stage_blocks", [1, 2, 3, 4], None) == (1, 2, 3, 4)
    assert check_setting("score_thr", 1, 0.05) == 1.0 and isinstance(check_setting("score_thr", 1, 0.05), float)


# ------------------------------------------------------------------ item 2: strides from the neck
@pytest.mark.parametrize("start_level, strides", [(0, (4, 8, 16, 32, 64)), (1, (8, 16, 32, 64, 128))])
def test_anchor_and_roi_strides_follow_the_neck(start_level, strides):
    model = build_model("faster_rcnn_r50_fpn", num_classes=3, fpn_start_level=start_level, **SMALL)
    assert neck_strides(model.neck) == strides
    assert model.rpn.anchor_generator.strides == strides
    assert model.roi_head.roi_extractor.featmap_strides == strides[:4]
    model.eval()
    with torch.no_grad():
        detections = model(torch.randn(1, 3, 128, 160), [(128, 160)])
    assert detections[0]["boxes"].shape[1] == 4
    # The feature maps really have these strides.
    features = model.neck(model.backbone(torch.randn(1, 3, 128, 128)))
    assert [128 // f.shape[-1] for f in features] == [min(s, 128) for s in strides]


def test_mask_and_retinanet_strides_follow_the_neck():
    mask = build_model("mask_rcnn_r50_fpn", num_classes=3, fpn_start_level=1, mask_conv_channels=8, **SMALL)
    assert mask.roi_head.mask_roi_extractor.featmap_strides == (8, 16, 32, 64)
    retina = build_model("retinanet_r50_fpn", num_classes=3, fpn_start_level=0, head_channels=8,
                         **{k: v for k, v in SMALL.items() if k != "fc_channels"})
    assert retina.dense_head.anchor_generator.strides == (4, 8, 16, 32, 64)


def test_a_composition_whose_strides_disagree_is_refused():
    neck = nn.Sequential(FPN([16, 32, 64, 128], 16, num_outs=5, start_level=1, extra_levels="on_input"))
    rpn = RegionProposalNetwork(RPNHead(16, 3), AnchorGenerator((4, 8, 16, 32, 64)))
    roi_head = RoIHead(Shared2FCBoxHead(16, 7, 32, 3), 3, MultiLevelRoIExtractor(7, (8, 16, 32, 64)))
    with pytest.raises(ValueError, match=r"anchors use strides \(4, 8, 16, 32, 64\) but the neck outputs maps of strides \(8, 16"):
        FasterRCNN(TinyBackbone(), neck, rpn, roi_head)
    rpn = RegionProposalNetwork(RPNHead(16, 3), AnchorGenerator((8, 16, 32, 64, 128)))
    bad_roi = RoIHead(Shared2FCBoxHead(16, 7, 32, 3), 3, MultiLevelRoIExtractor(7, (4, 8, 16, 32)))
    with pytest.raises(ValueError, match="roi extractor use strides"):
        FasterRCNN(TinyBackbone(), neck, rpn, bad_roi)
    FasterRCNN(TinyBackbone(), neck, rpn, roi_head)  # consistent: builds


def test_pieces_that_cannot_go_together_are_refused():
    with pytest.raises(ValueError, match="fpn_num_outs=3 is fewer than the 4 backbone maps"):
        preset_config("faster_rcnn_r50_fpn", fpn_num_outs=3)
    with pytest.raises(ValueError, match="refine_level=5"):
        preset_config("libra_faster_rcnn_r50_fpn", refine_level=5)


# ------------------------------------------------------------------ item 6: sampler modules
class EveryCandidateSampler(nn.Module):
    """A user's negative sampler, written outside libra: takes the first ``num_expected`` candidates."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, candidates, num_expected, *, gt_inds=None, max_overlaps=None, labels=None, generator=None):
        self.calls += 1
        rank = torch.cumsum(candidates.long(), 0) - 1
        return candidates & (rank < num_expected)


def test_a_sampler_module_passes_through_build_model():
    sampler = EveryCandidateSampler()
    model = build_model("faster_rcnn_r50_fpn", num_classes=3, neg_sampler=sampler, **SMALL)
    assert model.roi_head.neg_sampler is sampler and isinstance(model.roi_head.pos_sampler, RandomSampler)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0]])
    batch = Batch(torch.randn(1, 3, 96, 96), [(96, 96)], targets=[{"boxes": boxes, "labels": torch.tensor([1])}])
    losses = model.loss(batch)
    assert sampler.calls == 1 and torch.isfinite(losses["loss_cls"])
    # The deterministic sampler takes the first candidates: the same RoIs every time.
    samples = [model.roi_head.sample(model.rpn.predict(model.neck(model.backbone(batch.images)), [(96, 96)]),
                                     batch.targets) for _ in range(1)]
    assert samples[0].rows_per_image == (min(512, 1 + model.rpn.post_nms_top_n["train"]),)


def test_sampler_names_build_the_papers_samplers():
    model = build_model("libra_mask_rcnn_r50_fpn_lvis", num_classes=3, mask_conv_channels=8, **SMALL)
    assert type(model.roi_head.pos_sampler).__name__ == "ClassBalancedPosSampler"
    assert type(model.roi_head.neg_sampler).__name__ == "IoUBalancedNegSampler"
    assert model.roi_head.neg_sampler.num_bins == PRESETS["libra_mask_rcnn_r50_fpn_lvis"]["num_bins"]


# ------------------------------------------------------------------ item 5: one interface
def test_forward_batch_and_tensor_api_agree():
    torch.manual_seed(0)
    model = build_model("libra_faster_rcnn_r50_fpn", num_classes=3, score_thr=0.0, **SMALL).eval()
    images = [(torch.randn(3, 96, 128), {"image_id": 7, "ori_shape": (192, 256)}),
              (torch.randn(3, 64, 96), {"image_id": 8, "ori_shape": (64, 96)})]
    batch = collate(images)
    assert batch.image_sizes == [(96, 128), (64, 96)] and batch.original_sizes == [(192, 256), (64, 96)]
    assert batch.image_ids == [7, 8] and batch.images.shape == (2, 3, 96, 128)
    with torch.no_grad():
        by_predict = model.predict(batch)
        by_forward = model(batch)
        by_tensors = model(batch.images, batch.image_sizes, original_sizes=batch.original_sizes)
    for a, b, c in zip(by_predict, by_forward, by_tensors):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["boxes"], c["boxes"])
    assert by_predict[0]["boxes"][:, 2].max() > 128  # rescaled to the 256-wide original


def test_proposal_capability_is_declared():
    assert build_model("rpn_r50_fpn", 3, **{k: v for k, v in SMALL.items() if k != "fc_channels"}).makes_proposals
    fast = build_model("fast_rcnn_r50_fpn", 3, **SMALL)
    assert not fast.makes_proposals and fast.takes_proposals
    with pytest.raises(ValueError, match="makes no proposals of its own"):
        fast.predict_proposals(Batch(torch.zeros(1, 3, 64, 64), [(64, 64)]))


# ------------------------------------------------------------------ item 4: the config record
def test_checkpoint_records_the_config_and_rebuilds_the_model(tmp_path):
    config = preset_config("libra_faster_rcnn_r50_fpn", **SMALL, sampler="random")
    model = build_model("libra_faster_rcnn_r50_fpn", 3, **config)
    checkpoint = make_checkpoint(model, None, None, None, 1, 10, "libra_faster_rcnn_r50_fpn", 3,
                                 class_names=("a", "b", "c"), model_config=config)
    path = tmp_path / "epoch_1.pth"
    torch.save(checkpoint, path)
    assert checkpoint_model_config(torch.load(path, weights_only=False)) == config
    loaded = load_detector(path, overrides={"score_thr": 0.3})
    assert loaded.config == {**config, "score_thr": 0.3} and loaded.class_names == ("a", "b", "c")
    assert loaded.model.roi_head.score_thr == 0.3 and type(loaded.model.roi_head.neg_sampler).__name__ == "RandomSampler"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_checkpoint_without_a_config_resolves_its_command_line():
    """Checkpoints of earlier versions recorded the command line: preset, overrides, backbone flags."""
    legacy = {"model_name": "libra_faster_rcnn_r50_fpn", "args": {
        "model": "libra_faster_rcnn_r50_fpn", "overrides": {"fpn_channels": 128, "score_thr": 0.0},
        "frozen_stages": -1, "backbone_norm": "bn", "width_per_group": 64, "stage_blocks": [1, 1, 1, 1]}}
    config = checkpoint_model_config(legacy)
    assert config == preset_config(
        "libra_faster_rcnn_r50_fpn", fpn_channels=128, score_thr=0.0, frozen_stages=-1, backbone_norm="bn",
        width_per_group=64, stage_blocks=(1, 1, 1, 1),
    )


# ------------------------------------------------------------------ issue 20: the DCN preset
def test_dcn_preset_builds_and_trains_a_step():
    """Table 1's ResNeXt-64x4d-101-DCN row: deformable conv2 in c3-c5 (offset convs zero-initialised,
    so a fresh model is the plain ResNeXt), 4conv1fc GN head; one training step on small widths."""
    torch.manual_seed(0)
    small = dict(stage_blocks=(1, 1, 1, 1), width_per_group=1, fpn_channels=32, fc_channels=16, backbone_norm="bn")
    model = build_model("libra_faster_rcnn_x101_64x4d_fpn_dcn", num_classes=3, **small)
    kinds = [type(getattr(model.backbone, f"layer{i}")[0].conv2).__name__ for i in range(1, 5)]
    assert kinds == ["Conv2d", "DeformConv2dPack", "DeformConv2dPack", "DeformConv2dPack"]
    assert model.backbone.layer3[0].conv2.groups == 64  # ResNeXt keeps its grouped 3x3
    assert "backbone.layer4.0.conv2.conv_offset.weight" in model.state_dict()
    batch = Batch(torch.randn(1, 3, 96, 96), [(96, 96)],
                  targets=[{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}])
    losses = model.loss(batch)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert model.backbone.layer2[0].conv2.conv_offset.weight.grad is not None
    plain = build_model("libra_faster_rcnn_x101_64x4d_fpn", 3, **small)
    assert not any("conv_offset" in k for k in plain.state_dict())


def test_dcn_settings_are_validated():
    with pytest.raises(DataError, match="DCNv2"):
        resolve("--model", "libra_faster_rcnn_r50_fpn", "--set", 'dcn={"type": "DCNv3"}')
    config = resolve("--model", "libra_faster_rcnn_r50_fpn", "--set", 'dcn={"type": "DCNv2"}',
                     "--set", "stage_with_dcn=[false,false,true,true]").model_config
    assert config["dcn"] == {"type": "DCNv2", "deform_groups": 1, "fallback_on_stride": False}
    assert config["stage_with_dcn"] == (False, False, True, True)
    with pytest.raises(ValueError, match="dcn is null"):
        preset_config("faster_rcnn_r50_fpn", stage_with_dcn=(False, True, True, True))
