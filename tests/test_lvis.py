"""LVIS as the paper ran it (Sec. 4.2, Tables 9-10): the LVIS recipe (repeat factor sampling 0.001,
short sides 640..800 step 32, score > 0.001 and 300 detections), the three LVIS presets
(class-balanced positives, Libra components, bucketed class re-weighting with sigmoid scoring),
the class-frequency cache BCR reads, and a few training iterations + federated box / mask AP on
the real_mini LVIS files.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TinyBackbone
from libra.data import LVISDetection, RepeatFactorSampler
from libra.data.class_counts import cached_class_image_counts
from libra.data.transforms import DetectionTransform
from libra.losses import BCRSigmoidCrossEntropyLoss, bucketed_class_weights
from libra.presets import build_model, preset_config
from libra.structures import Proposals

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import eval as eval_script  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

REAL_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_mini"
needs_real_mini = pytest.mark.skipif(not REAL_MINI.is_dir(), reason=f"real_mini data not found at {REAL_MINI}")
LVIS_PRESETS = ("mask_rcnn_r50_fpn_lvis", "libra_mask_rcnn_r50_fpn_lvis", "libra_mask_rcnn_r50_fpn_lvis_bcr")


def tiny(preset: str, num_classes: int, **overrides):
    torch.manual_seed(0)
    settings = dict(backbone=TinyBackbone(), fpn_channels=32, fc_channels=64, roi_batch_size=64, rpn_batch_size=64,
                    rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                    mask_conv_channels=16)
    settings.update(overrides)
    return build_model(preset, num_classes, **settings)


# ------------------------------------------------------------------------------ recipe
def test_lvis_recipe_is_the_papers():
    args = train.resolve_args(train.build_parser().parse_args(
        ["--dataset", "lvis", "--data-root", "/nonexistent", "--model", "libra_mask_rcnn_r50_fpn_lvis"]
    ))
    assert args.repeat_factor_sampling is True and args.repeat_threshold == 0.001
    assert args.repeat_rounding == "ceil"  # MMDetection's ClassBalancedDataset (README "LVIS")
    assert args.multi_scale is True and args.multi_scale_range == (640, 800) and args.multi_scale_step == 32
    assert args.min_size == 800 and args.max_size == 1333 and args.epochs == 12 and args.lr_steps == (8, 11)
    assert args.model_config["score_thr"] == 0.001 and args.model_config["max_per_img"] == 300
    # A COCO preset on LVIS gets the same test settings; flags turn the defaults off.
    args = train.resolve_args(train.build_parser().parse_args(
        ["--dataset", "lvis", "--data-root", "/x", "--model", "faster_rcnn_r50_fpn", "--no-repeat-factor-sampling",
         "--no-multi-scale"]
    ))
    assert args.model_config["score_thr"] == 0.001 and args.model_config["max_per_img"] == 300
    assert args.repeat_factor_sampling is False and args.multi_scale_range is None
    stochastic = train.resolve_args(train.build_parser().parse_args(
        ["--dataset", "lvis", "--data-root", "/x", "--repeat-rounding", "stochastic"]
    ))
    assert stochastic.repeat_rounding == "stochastic"
    coco = train.resolve_args(train.build_parser().parse_args(["--dataset", "coco", "--data-root", "/x"]))
    assert coco.repeat_factor_sampling is False and coco.multi_scale is False
    coco = train.resolve_args(train.build_parser().parse_args(["--dataset", "coco", "--data-root", "/x", "--multi-scale"]))
    assert coco.multi_scale_range == (640, 800) and coco.multi_scale_step == 1  # the COCO range: every integer


def test_lvis_multi_scale_draws_the_six_short_sides():
    transform = DetectionTransform(train=True, min_size=800, max_size=1333, multi_scale_range=(640, 800), multi_scale_step=32)
    assert transform.multiscale_choices() == [640, 672, 704, 736, 768, 800]
    from libra.data.transforms import sample_generator

    drawn = set()
    image = torch.zeros(3, 100, 150)
    for key in range(60):
        _, _, meta = transform(image, {}, sample_generator(0, key))
        drawn.add(meta["img_shape"][0])
    assert drawn == {640, 672, 704, 736, 768, 800}
    with pytest.raises(ValueError, match="multi_scale_step"):
        DetectionTransform(multi_scale_step=0)


# ------------------------------------------------------------------------------ presets
def test_lvis_presets_are_table_9s_models():
    base, libra, bcr = (preset_config(name) for name in LVIS_PRESETS)
    for config in (base, libra, bcr):
        assert config["detector"] == "mask_rcnn" and config["score_thr"] == 0.001 and config["max_per_img"] == 300
    assert base["sampler"] == "random" and base["neck"] == "fpn" and base["cls_loss"] == "ce"
    assert libra["pos_sampler"] == "class_balanced" and libra["sampler"] == "iou_balanced"
    assert libra["neck"] == "bfp" and libra["box_loss"] == "balanced_l1" and libra["cls_loss"] == "ce"
    assert {**bcr, "cls_loss": "ce"} == libra and bcr["cls_loss"] == "bcr"
    assert (bcr["bcr_s"], bcr["bcr_t"], bcr["bcr_a"]) == (10, 0.025, 0.5)  # "S as 10, a as 0.5 and t as 0.025"
    model = tiny("libra_mask_rcnn_r50_fpn_lvis", 1203)
    assert model.roi_head.box_head.fc_cls.weight.shape[0] == 1204
    assert model.roi_head.mask_head.conv_logits.weight.shape[0] == 1203
    assert type(model.roi_head.pos_sampler).__name__ == "ClassBalancedPosSampler"
    assert type(model.roi_head.neg_sampler).__name__ == "IoUBalancedNegSampler"
    assert model.roi_head.score_thr == 0.001 and model.roi_head.max_per_img == 300
    with pytest.raises(ValueError, match="bcr_s"):
        preset_config("libra_mask_rcnn_r50_fpn_lvis_bcr", bcr_s=1)
    with pytest.raises(ValueError, match="bcr_t"):
        preset_config("libra_mask_rcnn_r50_fpn_lvis_bcr", bcr_t=0.0)


def test_bcr_weights_come_from_the_counts_and_table_10_keys():
    counts = torch.tensor([1, 3, 10, 40, 200, 1000, 5000])
    model = tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 7, class_image_counts=counts)
    loss = model.roi_head.cls_loss
    assert isinstance(loss, BCRSigmoidCrossEntropyLoss) and model.roi_head.use_sigmoid
    assert torch.equal(loss.class_weights, bucketed_class_weights(counts, 10, 0.5, 0.025))
    # Table 10: t and S are preset keys (--set bcr_t=... --set bcr_s=...), one name everywhere.
    from libra.engine.cli import parse_set_overrides

    overrides = parse_set_overrides(["bcr_t=0.05", "bcr_s=5"], "libra_mask_rcnn_r50_fpn_lvis_bcr")
    assert overrides == {"bcr_t": 0.05, "bcr_s": 5}
    other = tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 7, class_image_counts=counts, **overrides)
    assert torch.equal(other.roi_head.cls_loss.class_weights, bucketed_class_weights(counts, 5, 0.5, 0.05))
    # Table 10's rows are BCR on the Mask R-CNN baseline: the same switch on the baseline preset.
    base = tiny("mask_rcnn_r50_fpn_lvis", 7, class_image_counts=counts, cls_loss="bcr")
    assert isinstance(base.roi_head.cls_loss, BCRSigmoidCrossEntropyLoss)
    with pytest.raises(ValueError, match="class_image_counts has 3 entries but the model has 7 classes"):
        tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 7, class_image_counts=[1, 2, 3])


def test_bcr_samples_key_reaches_the_loss_and_presets_keep_eq_20_as_written():
    counts = torch.tensor([1, 3, 10, 40, 200, 1000, 5000])
    for preset in ("libra_mask_rcnn_r50_fpn_lvis_bcr", "mask_rcnn_r50_fpn_lvis", "libra_mask_rcnn_r50_fpn_lvis"):
        assert preset_config(preset)["bcr_samples"] == "all"
    model = tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 7, class_image_counts=counts)
    assert model.roi_head.cls_loss.samples == "all"
    from libra.engine.cli import parse_set_overrides

    overrides = parse_set_overrides(["bcr_samples=foreground"], "libra_mask_rcnn_r50_fpn_lvis_bcr")
    assert tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 7, class_image_counts=counts, **overrides).roi_head.cls_loss.samples == "foreground"
    assert tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 7, bcr_samples="foreground").roi_head.cls_loss.samples == "foreground"
    with pytest.raises(ValueError, match="bcr_samples='background': expected one of all, foreground"):
        preset_config("libra_mask_rcnn_r50_fpn_lvis_bcr", bcr_samples="background")


def test_bcr_without_frequencies_evaluates_but_refuses_to_train():
    model = tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 4)
    image = torch.randn(1, 3, 64, 64)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="needs the training set's class frequencies.*class_image_counts"):
        model(image, [(64, 64)], [target])
    state = tiny("libra_mask_rcnn_r50_fpn_lvis_bcr", 4, class_image_counts=[1, 5, 50, 500]).state_dict()
    model.load_state_dict(state)  # a trained checkpoint's weights: training works again
    assert torch.equal(model.roi_head.cls_loss.class_weights, state["roi_head.cls_loss.class_weights"])
    assert torch.isfinite(sum(v for k, v in model(image, [(64, 64)], [target]).items() if k.startswith("loss")))


def test_sigmoid_scoring_end_to_end():
    """BCR's sigmoid classifier scores detections with per-class sigmoids (no softmax over classes):
    the top detection's score is the largest sigmoid of a foreground logit of a valid proposal."""
    for preset, scoring in (("libra_mask_rcnn_r50_fpn_lvis_bcr", "sigmoid"), ("libra_mask_rcnn_r50_fpn_lvis", "softmax")):
        model = tiny(preset, 5, class_image_counts=[1, 2, 30, 400, 5000], score_thr=0.0)
        model.eval()
        seen = {}
        model.roi_head.box_head.register_forward_hook(lambda module, inputs, output: seen.update(logits=output[0]))
        predict = model.rpn.predict  # the proposals the RoI head scores
        model.rpn.predict = lambda *args: seen.setdefault("proposals", predict(*args))
        with torch.no_grad():
            output = model(torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(4)), [(96, 96)])[0]
        logits, valid = seen["logits"], seen["proposals"].valid.reshape(-1)
        probs = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=1)
        assert output["scores"].shape[0] > 0
        assert output["scores"][0].item() == pytest.approx(probs[valid, :5].max().item(), rel=1e-5), preset
        assert output["masks"].shape[0] == output["scores"].shape[0]


def test_class_balanced_positives_give_a_rare_class_its_quota():
    """libra_mask_rcnn_r50_fpn_lvis samples positives class-balanced (Sec. 3.1): a class with 1 of 9
    gts gets about half of the positive slots, against its ~11% share under random sampling."""
    boxes = torch.tensor([[float(10 + 30 * (i % 3)), float(10 + 30 * (i // 3)), float(35 + 30 * (i % 3)), float(35 + 30 * (i // 3))]
                          for i in range(9)])
    labels = torch.tensor([0] * 8 + [1])
    jitter = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, -1]])
    proposals = (boxes[:, None, :] + jitter[None]).reshape(1, -1, 4)
    proposals = Proposals(proposals, torch.ones(1, 45), torch.ones(1, 45, dtype=torch.bool))
    target = [{"boxes": boxes, "labels": labels}]
    shares = {}
    for preset in ("libra_mask_rcnn_r50_fpn_lvis", "mask_rcnn_r50_fpn_lvis"):
        model = tiny(preset, 2, roi_batch_size=16)  # 4 positive slots per image
        rare = []
        for seed in range(30):
            model.roi_head.generator = torch.Generator().manual_seed(seed)
            samples = model.roi_head.sample(proposals, target)
            positive = samples.positive.bool()
            assert int(positive.sum()) == 4
            rare.append(int((samples.labels[positive] == 1).sum()))
        shares[preset] = sum(rare) / len(rare)
    # class quota round(4 / 2) + 1 = 3 per class, then cut to 4 uniformly: 2 expected
    assert shares["libra_mask_rcnn_r50_fpn_lvis"] > 1.5
    assert shares["mask_rcnn_r50_fpn_lvis"] < 1.0  # 10 of 54 positives: 0.74 expected


# ------------------------------------------------------------------------------ class counts cache
def _write_lvis(root: Path, annotations: list[dict], name: str = "lvis_v1_train.json") -> Path:
    images = []
    for image_id in (1, 2, 3):
        path = root / "train2017" / f"{image_id:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            Image.fromarray(np.full((48, 64, 3), 60 * image_id, np.uint8)).save(path)
        images.append({"id": image_id, "width": 64, "height": 48, "neg_category_ids": [], "not_exhaustive_category_ids": [],
                       "coco_url": f"http://images.cocodataset.org/train2017/{image_id:012d}.jpg"})
    categories = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "c"},
                  {"id": 3, "name": "c", "frequency": "r"}]
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _ann(ann_id: int, image_id: int, category: int) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": [4, 4, 20, 20], "area": 400,
            "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]}


def test_class_frequency_cache_is_recomputed_when_the_annotation_file_changes(tmp_path, monkeypatch):
    anns = [_ann(1, 1, 1), _ann(2, 2, 1), _ann(3, 3, 1), _ann(4, 1, 2)]
    ann_file = _write_lvis(tmp_path, anns)
    cache = tmp_path / "work" / "class_image_counts.json"
    dataset = LVISDetection(tmp_path, ann_file, train=True)
    assert cached_class_image_counts(dataset, cache).tolist() == [3, 1, 0]
    saved = json.loads(cache.read_text())
    assert saved["counts"] == [3, 1, 0] and saved["annotation_file"]["size"] == ann_file.stat().st_size
    # The same file: read from the cache (the dataset is not asked to count again).
    monkeypatch.setattr(LVISDetection, "image_counts_per_class", lambda self: pytest.fail("counted again"))
    assert cached_class_image_counts(LVISDetection(tmp_path, ann_file, train=True), cache).tolist() == [3, 1, 0]
    monkeypatch.undo()
    # The annotation file changes (a class-3 instance added): counted again, cache rewritten.
    _write_lvis(tmp_path, anns + [_ann(5, 2, 3)])
    stat = ann_file.stat()
    os.utime(ann_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a distinct mtime even on coarse clocks
    changed = LVISDetection(tmp_path, ann_file, train=True)
    assert cached_class_image_counts(changed, cache).tolist() == [3, 1, 1]
    assert json.loads(cache.read_text())["counts"] == [3, 1, 1]


def test_repeat_factor_sampling_is_what_an_lvis_run_builds(tmp_path):
    # class 2 in 1 of 3 images: f = 1/3, threshold 0.5 -> r = sqrt(1.5) for image 1
    ann_file = _write_lvis(tmp_path, [_ann(1, 1, 1), _ann(2, 2, 1), _ann(3, 3, 1), _ann(4, 1, 2)])
    dataset = LVISDetection(tmp_path, ann_file, train=True)
    from libra.engine.builders import build_train_loader

    loader, batches = build_train_loader(dataset, 1, 0, 0, 1, seed=0, repeat_factor_sampling=True, repeat_threshold=0.5)
    sampler = batches.sampler
    assert isinstance(sampler, RepeatFactorSampler)
    assert sampler.repeat_factors.tolist() == pytest.approx([1.5 ** 0.5, 1.0, 1.0])
    assert sampler.rounding == "stochastic"
    # The recipe's default (train.py --repeat-rounding ceil): image 1 twice every epoch.
    _, batches = build_train_loader(dataset, 1, 0, 0, 1, seed=0, repeat_factor_sampling=True, repeat_threshold=0.5,
                                    repeat_rounding="ceil")
    for epoch in range(3):
        batches.set_epoch(epoch)
        assert len(batches) == 4 and sorted(i for batch in batches for i, *_ in batch) == [0, 0, 1, 2]


# ------------------------------------------------------------------------------ real_mini end to end
@pytest.fixture(scope="module")
def lvis_root(tmp_path_factory):
    """real_mini's LVIS files in the layout of --dataset lvis (lvis_v1_{train,val}.json + images)."""
    if not REAL_MINI.is_dir():
        pytest.skip(f"real_mini data not found at {REAL_MINI}")
    root = tmp_path_factory.mktemp("lvis")
    (root / "lvis_v1_train.json").symlink_to(REAL_MINI / "lvis" / "lvis_v1_minitrain.json")
    (root / "lvis_v1_val.json").symlink_to(REAL_MINI / "lvis" / "lvis_v1_minival.json")
    for image in (REAL_MINI / "coco" / "images").iterdir():
        (root / image.name).symlink_to(image)
    return root


@needs_real_mini
def test_real_mini_lvis_polygons_become_masks_of_the_resized_flipped_image():
    from pycocotools.coco import COCO

    ann_file = REAL_MINI / "lvis" / "lvis_v1_minitrain.json"
    dataset = LVISDetection(REAL_MINI / "coco" / "images", ann_file, train=True, min_size=200, max_size=300, flip_prob=1.0)
    dataset.set_with_masks(True)
    coco = COCO(str(ann_file))
    for index, record in enumerate(dataset.records):
        image, target = dataset[(index, 0)]
        assert target["flip"] and target["masks"].shape == (len(target["boxes"]), *image.shape[-2:])
        h, w = target["img_shape"]
        # the same masks as pycocotools' annToMask, resized (nearest) and mirrored like the image
        expected = torch.from_numpy(np.stack([coco.annToMask(coco.anns[a]) for a in record.ann_ids]))
        expected = torch.nn.functional.interpolate(expected[None].float(), size=(h, w), mode="nearest")[0].flip(-1)
        assert torch.equal(target["masks"].float(), expected)


TINY_LVIS = [
    "--dataset", "lvis", "--min-size", "128", "--max-size", "192", "--no-multi-scale", "--stage-blocks", "1", "1", "1", "1",
    "--width-per-group", "8", "--backbone-norm", "bn", "--frozen-stages", "-1", "--set", "fpn_channels=32",
    "--set", "fc_channels=32", "--set", "mask_conv_channels=16", "--set", "roi_batch_size=32",
    "--set", "rpn_post_nms_top_n_train=64", "--set", "rpn_pre_nms_top_n_test=64", "--set", "rpn_post_nms_top_n_test=32",
    "--batch-size", "2", "--epochs", "1", "--workers", "0", "--threads", "1", "--log-interval", "1", "--warmup-iters", "1",
    "--optimizer", "adamw", "--lr", "1e-4", "--check-images", "none",
]


@needs_real_mini
@pytest.mark.parametrize("preset", LVIS_PRESETS)
def test_lvis_presets_train_and_evaluate_on_real_mini(preset, lvis_root, tmp_path, capsys):
    work = tmp_path / preset
    assert train.main(["--model", preset, "--data-root", str(lvis_root), *TINY_LVIS, "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "3 training images, 1203 classes" in out
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)  # 3 images (repeat factors 1), batch 2
    assert all("loss_mask" in r for r in steps)
    metrics = json.loads((work / "metrics.json").read_text())
    for prefix in ("", "segm_"):
        assert {f"{prefix}{name}" for name in ("AP", "AP50", "AP75", "APr", "APc", "APf")} <= set(metrics)
        assert all(-1.0 <= metrics[f"{prefix}{name}"] <= 1.0 for name in ("AP", "APr", "APc", "APf"))
    config = json.loads((work / "config.json").read_text())
    assert config["repeat_factor_sampling"] is True and config["model_config"]["score_thr"] == 0.001
    if preset.endswith("_bcr"):
        counts = json.loads((work / "class_image_counts.json").read_text())
        assert counts["num_classes"] == 1203 and sum(counts["counts"]) == 6  # 2 persons, bus, car, ... in 3 images
        # eval.py rebuilds the BCR model without the training set: the class weights come from the checkpoint.
        assert eval_script.main(["--checkpoint", str(work / "epoch_1.pth"), "--threads", "1", "--workers", "0",
                                 "--check-images", "none"]) == 0
        evaluated = json.loads((work / "eval_epoch_1" / "metrics.json").read_text())
        assert evaluated == pytest.approx(metrics)
        assert (work / "eval_epoch_1" / "segm_detections.json").is_file()
