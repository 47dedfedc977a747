"""Tests of the analysis figures (libra/analysis, analyze.py).

Unit tests check each figure's numbers against a direct computation (histogram counts, the error
analysis bins of hand-made detections, the closed forms of Fig. 5); one tiny training (a
subprocess of train.py, 2 iterations on 64 px synthetic images) gives the checkpoint, log and
detections on which every analyze.py command runs end to end, in-process.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TinyBackbone
from libra.analysis.error_analysis import analyze_errors, category_groups, load_results
from libra.analysis.loss_curves import classification_curve, loss_curves, regression_curve
from libra.analysis.neg_iou import NegativeIoUs, iou_histogram, share_above
from libra.analysis.sampling import (
    hard_negatives,
    image_features,
    per_sample_cls_loss,
    roi_candidates,
    sample_with,
    sampler_settings,
    training_proposals,
)
from libra.coco_api import load_coco_api
from libra.losses import BalancedL1Loss, CrossEntropyLoss, LGRCrossEntropyLoss, LGRL1Loss, SmoothL1Loss
from libra.presets import build_model
from libra.samplers import iou_balanced_neg_sample, random_sample

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_detector(preset: str = "libra_faster_rcnn_r50_fpn", **overrides):
    settings = dict(backbone=TinyBackbone(), fpn_channels=32, fc_channels=64, roi_batch_size=64, rpn_batch_size=64,
                    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=100,
                    rpn_post_nms_top_n_test=100)
    settings.update(overrides)
    torch.manual_seed(0)
    return build_model(preset, 3, **settings).eval()


def one_image():
    images = torch.randn(1, 3, 96, 128)
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 30.0, 120.0, 90.0]]),
              "labels": torch.tensor([0, 2]), "img_shape": (96, 128), "image_id": 7}
    return images, [target]


# ------------------------------------------------------------------ Fig. 3: histogram
def test_histogram_counts_equal_a_direct_count_of_sampler_output():
    generator = torch.Generator().manual_seed(3)
    ious = torch.rand(400, generator=generator) * 0.5
    ious[:60] = 0.0  # IoU-0 negatives (the IoU-balanced sampler's floor set)
    ious[60:70] = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.4999])  # bin edges
    negatives = torch.ones(400, dtype=torch.bool)
    negatives[::7] = False
    edges = [round(0.05 * i, 2) for i in range(11)]
    for chosen in (random_sample(negatives, 90, generator),
                   iou_balanced_neg_sample(negatives, torch.cat([ious, torch.ones(1)])[:400], 90, generator=generator)):
        assert int(chosen.sum()) == 90
        picked = ious[chosen].tolist()
        direct = [sum(1 for v in picked if lo <= v < hi) for lo, hi in zip(edges[:-1], edges[1:])]
        assert iou_histogram(ious[chosen], edges) == direct
        assert sum(direct) == 90
        assert share_above(ious[chosen], 0.05) == pytest.approx(sum(1 for v in picked if v > 0.05) / 90)
    found = NegativeIoUs()
    found.add("random", ious[:10])
    found.add("hard", torch.tensor([0.3, 0.06, 0.01]))
    summary = found.summary()
    assert summary["methods"]["random"]["counts"][0] == 10  # ten zeros
    assert summary["methods"]["hard"]["counts"] == [1, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    assert summary["methods"]["hard"]["share_above_threshold"] == pytest.approx(2 / 3)
    assert summary["methods"]["iou_balanced"]["count"] == 0


def test_candidates_and_samplers_reproduce_the_roi_heads_own_sample():
    """roi_candidates + sample_with (the head's settings, same seed) choose exactly the RoIs that
    RoIHead.sample chooses, so the figure shows what training samples."""
    model = tiny_detector()
    images, targets = one_image()
    features = image_features(model, images)
    proposals = training_proposals(model, features, [(96, 128)])
    assert proposals.boxes.shape[1] > 64  # the training top-n (200), not the test one, was used
    head = model.roi_head
    candidates = roi_candidates(head, proposals.boxes[0], proposals.valid[0], targets[0])
    for name in ("random", "iou_balanced"):
        head.generator = torch.Generator().manual_seed(11)
        settings = sampler_settings(head, name)
        head.pos_sampler, head.neg_sampler = settings["pos_sampler"], settings["neg_sampler"]
        own = head.sample(proposals, targets)
        positive, negative = sample_with(candidates, sampler_settings(head, name), torch.Generator().manual_seed(11))
        mine = sorted(map(tuple, candidates.boxes[positive | negative].tolist()))
        expected = sorted(map(tuple, own.rois[own.sampled > 0, 1:].tolist()))
        assert mine == expected, name
        assert int(positive.sum()) == int(own.positive.sum())
    # every negative's IoU is its IoU with the nearest gt, below the negative threshold
    from libra.boxes import box_iou

    nearest = box_iou(candidates.boxes, candidates.gt_boxes).max(dim=1).values
    assert torch.allclose(candidates.max_overlaps[2:], nearest[2:])
    assert bool((candidates.max_overlaps[candidates.negatives] < 0.5).all())


def test_hard_negatives_are_the_top_loss_negatives():
    model = tiny_detector()
    images, targets = one_image()
    features = image_features(model, images)
    proposals = training_proposals(model, features, [(96, 128)])
    candidates = roi_candidates(model.roi_head, proposals.boxes[0], proposals.valid[0], targets[0])
    chosen, loss = hard_negatives(model.roi_head, features, 0, candidates, 20)
    negatives = candidates.negatives
    assert int(chosen.sum()) == 20 and bool((chosen <= negatives).all())
    assert float(loss[chosen].min()) >= float(loss[negatives & ~chosen].max())
    # the per-sample loss is the module's own: plain CE, and rho * CE for LGR-CE
    logits = torch.randn(6, 4)
    labels = torch.tensor([3, 0, 1, 3, 2, 3])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(per_sample_cls_loss(CrossEntropyLoss(), logits, labels), ce, atol=1e-6)
    q = 1 - logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    b = math.exp(1.0 / 0.8) - 1
    rho = 0.8 * torch.log1p(b * q) / (q + 1e-6)
    assert torch.allclose(per_sample_cls_loss(LGRCrossEntropyLoss(), logits, labels), rho * ce, atol=1e-5)


# ------------------------------------------------------------------ Fig. 8: error analysis
def error_case():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a", "supercategory": "x"}, {"id": 2, "name": "b", "supercategory": "x"},
                         {"id": 3, "name": "c", "supercategory": "y"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 10, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 3, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 60, 20, 20], "area": 400, "iscrowd": 0}]}
    detections = [  # all labelled "a", by decreasing score
        ([10, 10, 20, 20], 0.9),   # correct (gt 1)
        ([50, 50, 20, 20], 0.85),  # on the "b" object: a confusion within super-category x
        ([10, 60, 20, 20], 0.8),   # on the "c" object: a confusion with another super-category
        ([85, 85, 10, 10], 0.75),  # background
        ([11, 11, 20, 20], 0.7),   # duplicate of the correct one
        ([70, 14, 20, 20], 0.6),   # mislocalised on gt 2 (IoU 0.31: >= 0.1, < 0.5)
    ]
    results = [{"image_id": 1, "category_id": 1, "bbox": box, "score": score} for box, score in detections]
    return load_coco_api(gt), results


def test_error_analysis_puts_each_hand_made_error_in_its_bin():
    coco_gt, results = error_case()
    coco_dt = load_results(coco_gt, results)
    groups = category_groups(coco_gt)
    assert groups == {1: "x", 2: "x", 3: "y"}
    # Category "a", 2 gts; 101 recall points, half of them (51) at recall <= 0.5. At IoU 0.75 / 0.5 only
    # the first detection is correct: precision 1 up to recall 0.5. From Loc on, the mislocalised one
    # reaches recall 1 with precision 2 / (detections still counted as false positives + 2).
    fp = analyze_errors(coco_gt, coco_dt, groups, duplicates="fp")["per_category"]["a"]["ap"]
    expected_fp = {"C75": 51, "C50": 51, "Loc": 51 + 50 * 2 / 6, "Sim": 51 + 50 * 2 / 5, "Oth": 51 + 50 * 2 / 4,
                   "BG": 101, "FN": 101}
    for error_type, value in expected_fp.items():
        assert fp[error_type] * 101 == pytest.approx(value), error_type
    loc = analyze_errors(coco_gt, coco_dt, groups, duplicates="loc")["per_category"]["a"]["ap"]
    expected_loc = {**expected_fp, "Loc": 51 + 50 * 2 / 5, "Sim": 51 + 50 * 2 / 4, "Oth": 51 + 50 * 2 / 3}
    for error_type, value in expected_loc.items():
        assert loc[error_type] * 101 == pytest.approx(value), error_type
    # One group: the "c" confusion is removed with the "b" one (Sim = Oth); each alone: Sim = Loc.
    one = analyze_errors(coco_gt, coco_dt, category_groups(coco_gt, "one"))["per_category"]["a"]["ap"]
    assert one["Sim"] == pytest.approx(one["Oth"]) == pytest.approx(fp["Oth"])
    alone = analyze_errors(coco_gt, coco_dt, category_groups(coco_gt, "class"))["per_category"]["a"]["ap"]
    assert alone["Sim"] == pytest.approx(alone["Loc"])


def test_error_analysis_c75_c50_equal_cocoeval_ap75_ap50_and_bad_results_are_refused(tmp_path):
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    coco_gt, results = error_case()
    results += [{"image_id": 1, "category_id": 2, "bbox": [51, 49, 20, 20], "score": 0.5},
                {"image_id": 1, "category_id": 3, "bbox": [12, 63, 20, 20], "score": 0.4}]
    coco_dt = load_results(coco_gt, results)
    analysis = analyze_errors(coco_gt, coco_dt)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert analysis["overall"]["ap"]["C50"] == pytest.approx(evaluator.stats[1])
    assert analysis["overall"]["ap"]["C75"] == pytest.approx(evaluator.stats[2])
    assert analysis["overall"]["ap"]["FN"] == 1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    with pytest.raises(ValueError, match="image ids \\[99\\]"):
        load_results(coco_gt, bad)
    with pytest.raises(ValueError, match="results file not found"):
        load_results(coco_gt, tmp_path / "missing.json")
    empty = analyze_errors(coco_gt, load_results(coco_gt, []))
    assert empty["overall"]["ap"]["C50"] == 0.0 and empty["overall"]["ap"]["FN"] == 1.0


# ------------------------------------------------------------------ Fig. 5: loss curves
@pytest.mark.parametrize("alpha, gamma", [(0.5, 1.5), (0.3, 1.0)])
def test_fig5_curves_match_the_closed_forms(alpha, gamma):
    b = math.exp(gamma / alpha) - 1  # Eq. 10
    points = torch.tensor([0.1, 0.5, 0.9, 1.5, 2.0], dtype=torch.float64)
    values, grads = regression_curve(BalancedL1Loss(alpha, gamma, 1.0), points)
    for x, value, grad in zip(points.tolist(), values.tolist(), grads.tolist()):
        if x < 1:  # Eq. 8 and 9
            assert grad == pytest.approx(alpha * math.log(b * x + 1))
            assert value == pytest.approx(alpha / b * (b * x + 1) * math.log(b * x + 1) - alpha * x)
        else:
            assert grad == pytest.approx(gamma)
            assert value == pytest.approx(gamma * x + gamma / b - alpha)
    smooth_values, smooth_grads = regression_curve(SmoothL1Loss(1.0), points)
    assert smooth_grads.tolist() == pytest.approx([0.1, 0.5, 0.9, 1.0, 1.0])  # Eq. 12
    assert smooth_values.tolist() == pytest.approx([0.005, 0.125, 0.405, 1.0, 1.5])  # Eq. 11
    _, lgr_grads = regression_curve(LGRL1Loss(alpha, gamma, 1.0), points)
    assert lgr_grads.tolist() == pytest.approx(grads.tolist(), rel=1e-4)  # Eq. 14: the balanced L1 gradient
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    _, ce_grads = classification_curve(CrossEntropyLoss(), q)
    assert ce_grads.tolist() == pytest.approx(q.tolist())  # Eq. 17
    _, lgr_ce = classification_curve(LGRCrossEntropyLoss(0.8, 1.0), q)
    b_ce = math.exp(1.0 / 0.8) - 1
    assert lgr_ce.tolist() == pytest.approx([0.8 * math.log(b_ce * v + 1) for v in q.tolist()], rel=1e-4)  # Eq. 18-19
    data = loss_curves(alpha, gamma, 1.0, points=11)  # |x| = 0, 0.2, ..., 2.0
    curve = data["regression"][f"balanced L1 (alpha={alpha:g}, gamma={gamma:g})"]
    assert curve["gradient"][2] == pytest.approx(alpha * math.log(b * 0.4 + 1))
    assert curve["gradient"][5] == pytest.approx(gamma) == pytest.approx(alpha * math.log(b + 1))  # Eq. 10 at |x| = 1
    assert data["regression"]["smooth L1 (beta=1)"]["loss"][3] == pytest.approx(0.5 * 0.6 ** 2)


# ------------------------------------------------------------------ BFP and curves units
def test_pyramid_features_need_a_bfp_and_recover_the_balanced_feature():
    from libra.analysis.bfp import magnitude, pyramid_features

    images = torch.randn(1, 3, 64, 96)
    features = pyramid_features(tiny_detector(refine_type=None), images)
    assert len(features["before"]) == len(features["after"]) == 5
    # without a refiner f' = f (Eq. 3): the plain average of the levels resized to P4
    assert torch.allclose(features["integrated"], features["refined"])
    resized = [F.adaptive_max_pool2d(f, (4, 6)) if i < 2 else F.interpolate(f, size=(4, 6), mode="nearest")
               for i, f in enumerate(features["before"])]
    assert torch.allclose(features["refined"], sum(resized) / 5, atol=1e-5)
    assert magnitude(features["before"][0]).shape == (1, 16, 24)
    assert features["level_names"] == ["P2", "P3", "P4", "P5", "P6"] and features["refine_level"] == 2
    with pytest.raises(ValueError, match="FPN \\+ BalancedFeaturePyramid"):
        pyramid_features(tiny_detector("faster_rcnn_r50_fpn"), images)
    torch.manual_seed(0)
    retina = build_model("libra_retinanet_r50_fpn", 3, backbone=TinyBackbone(), fpn_channels=32, head_channels=32).eval()
    with torch.no_grad():  # the non-local block starts as the identity (zero output conv): give it weights
        for parameter in retina.neck[1].refine.parameters():
            parameter.normal_(0.0, 0.1)
    features = pyramid_features(retina, images)  # BFP at P4 over P3..P7 (refine level 1)
    assert features["level_names"] == ["P3", "P4", "P5", "P6", "P7"]
    resized = [F.adaptive_max_pool2d(f, (4, 6)) if i < 1 else F.interpolate(f, size=(4, 6), mode="nearest")
               for i, f in enumerate(features["before"])]
    assert torch.allclose(features["integrated"], sum(resized) / 5, atol=1e-5)  # the refiner's input is Eq. 3's f
    assert not torch.allclose(features["integrated"], features["refined"])  # the non-local block changed it


def test_training_curves_and_plot_losses(tmp_path):
    from libra.analysis.training_curves import curve_data
    from libra.engine.metric_logger import plot_losses

    records = [{"mode": "train", "iter": i, "loss": 2 / i, "loss_cls": 1 / i, "lr": 0.01 * min(1, i / 3), "acc": 90.0}
               for i in range(1, 8)] + [{"mode": "val", "iter": 7, "AP": 0.2, "AP50": 0.4, "epoch": 1}, {"junk": 1}]
    data = curve_data(records)
    assert sorted(data["losses"]) == ["loss", "loss_cls"] and len(data["losses"]["loss"]) == 7
    assert data["metrics"] == {"AP": [[7, 0.2]], "AP50": [[7, 0.4]]} and data["lr"][0] == [1, pytest.approx(0.01 / 3)]
    out = plot_losses(records, tmp_path / "losses.png")
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (800, 480)
    assert plot_losses([{"mode": "val", "iter": 1, "AP": 0.3}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ------------------------------------------------------------------ end to end
TINY = [
    "--synthetic-image-size", "64", "--min-size", "64", "--max-size", "64", "--synthetic-num-train", "4",
    "--synthetic-num-val", "4", "--width-per-group", "8", "--set", "fpn_channels=32", "--set", "fc_channels=64",
    "--set", "roi_batch_size=32", "--set", "rpn_batch_size=64", "--workers", "0", "--threads", "1",
    "--log-interval", "1", "--warmup-iters", "5",
]


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LIBRA_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-iteration training (2 epochs of one batch of 4) with its final evaluation: checkpoint, log.jsonl,
    detections.json."""
    root = tmp_path_factory.mktemp("analysis")
    result = run_train(*TINY, "--data-root", str(root / "data"), "--work-dir", str(root / "run"), "--max-iters", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def checkpoint_of(run: Path) -> str:
    return str(run / (run / "last_checkpoint").read_text().strip())


@pytest.fixture(scope="module")
def analyze_module():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("analyze")


def check_outputs(png: Path, json_path: Path | None = None) -> dict:
    assert png.is_file() and png.stat().st_size > 2000 and png.read_bytes()[:8] == PNG_MAGIC
    assert not list(png.parent.glob(".*.tmp"))  # atomic writes leave no temporary behind
    return json.loads((json_path or png.with_suffix(".json")).read_text())


def test_every_command_runs_end_to_end(tiny_run, analyze_module, tmp_path, capsys):
    checkpoint = checkpoint_of(tiny_run)
    out = tmp_path / "out"
    main = analyze_module.main

    assert main(["neg-iou", "--checkpoint", checkpoint, "--images", "2", "--out-dir", str(out), "--threads", "1"]) == 0
    data = check_outputs(out / "fig3_neg_iou.png")
    assert data["images"] == 2
    for method in ("random", "iou_balanced", "hard"):
        entry = data["methods"][method]
        assert entry["count"] > 0 and sum(entry["counts"]) == entry["count"]  # every negative has IoU < 0.5
    assert data["methods"]["hard"]["count"] == data["methods"]["random"]["count"]
    assert "hard negatives" in capsys.readouterr().out

    assert main(["samples", "--checkpoint", checkpoint, "--images", "1", "--out-dir", str(out), "--threads", "1"]) == 0
    data = check_outputs(out / "fig6_samples.png")
    assert set(data["images"][0]["samplers"]) == {"random", "iou_balanced"}
    assert len(data["images"][0]["samplers"]["random"]["negatives"]) > 0

    assert main(["bfp", "--checkpoint", checkpoint, "--out-dir", str(out), "--threads", "1"]) == 0
    data = check_outputs(out / "fig4_bfp.png")
    assert [level["name"] for level in data["levels"]] == ["P2", "P3", "P4", "P5", "P6"]

    assert main(["loss-curves", "--checkpoint", checkpoint, "--out-dir", str(out)]) == 0
    data = check_outputs(out / "fig5_loss_curves.png")
    assert data["parameters"]["alpha"] == 0.5 and data["configured_losses"]["box_loss"] == "balanced_l1"

    detections = str(tiny_run / "detections.json")
    data_root = str(tiny_run.parent / "data")
    # the ground truth of the run the results belong to (its config.json: the tiny synthetic data)
    assert main(["errors", "--results", detections, detections, "--labels", "A", "B", "--out-dir", str(out)]) == 0
    data = check_outputs(out / "fig8_errors_overall.png", out / "fig8_errors.json")
    assert [r["label"] for r in data["results"]] == ["A", "B"]
    assert data["results"][0]["overall"]["ap"] == data["results"][1]["overall"]["ap"]
    assert data["results"][0]["groups"] == {"rectangle": "shape", "ellipse": "shape", "triangle": "shape", "cross": "shape"}
    assert (out / "fig8_errors_group_shape.png").stat().st_size > 2000
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert data["results"][0]["overall"]["ap"]["C50"] == pytest.approx(metrics["AP50"], abs=1e-6)
    gt_file = str(Path(data_root) / "annotations" / "instances_val.json")
    assert main(["errors", "--results", detections, "--gt", gt_file, "--groups", "class", "--duplicates", "loc",
                 "--out-dir", str(out / "by_class")]) == 0
    data = check_outputs(out / "by_class" / "fig8_errors_overall.png", out / "by_class" / "fig8_errors.json")
    assert sorted(data["results"][0]["by_group"]) == ["cross", "ellipse", "rectangle", "triangle"]
    assert data["results"][0]["duplicates"] == "loc"

    assert main(["curves", "--work-dir", str(tiny_run), "--out-dir", str(out)]) == 0
    data = check_outputs(out / "curves.png")
    assert len(data["losses"]["loss"]) == 2 and "AP" in data["metrics"]


def test_commands_refuse_bad_input_with_one_line(tiny_run, analyze_module, tmp_path, capsys):
    main = analyze_module.main
    cases = [
        (["errors", "--results", str(tmp_path / "none.json"), "--gt", str(tmp_path / "gt.json")], "--gt: annotation file not found"),
        (["curves", "--work-dir", str(tmp_path)], "no training log"),
        (["neg-iou", "--checkpoint", str(tmp_path / "missing.pth")], "checkpoint not found"),
        (["samples", "--checkpoint", checkpoint_of(tiny_run), "--index", "99"], "outside the split"),
        (["neg-iou", "--checkpoint", checkpoint_of(tiny_run), "--no-such-flag"], "unrecognized arguments"),
        (["loss-curves", "--alpha", "-1"], "alpha must be > 0"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 1, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0], (argv, errors)


def test_tensorboard_flag(tmp_path, analyze_module, capsys):  # analyze_module: the repository on sys.path
    from libra.analysis.tensorboard import TENSORBOARD_HINT, TensorBoardLog

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        # Refused with one line before any file is read or written (in-process: it stops before training).
        train = importlib.import_module("train")
        code = train.main([*TINY, "--data-root", str(tmp_path / "data"), "--work-dir", str(tmp_path / "run"),
                           "--max-iters", "1", "--tensorboard"])
        captured = capsys.readouterr()
        assert code == 1
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {TENSORBOARD_HINT}"], captured.err[-2000:]
        assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
        return
    from libra.engine.metric_logger import JSONLinesLog

    log = TensorBoardLog(JSONLinesLog(tmp_path / "log.jsonl"))
    log.write({"mode": "train", "iter": 1, "loss": 1.5, "lr": 0.01})
    log.write({"mode": "val", "iter": 1, "AP": 0.25})
    log.close()
    assert [r["iter"] for r in log.read()] == [1, 1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
