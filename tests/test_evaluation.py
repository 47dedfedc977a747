"""Tests of libra.evaluation against pycocotools and hand-computed values."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra.data.coco import load_coco_api
from libra.evaluation import (
    COCOEvaluator,
    LVISEvaluator,
    ProposalRecallEvaluator,
    VOCEvaluator,
    average_precision,
    build_evaluator,
)

torch.set_num_threads(1)

# Ground truth: 3 images, categories with non-contiguous ids 2 ("a") and 7 ("b"); small, medium, large boxes.
GT_BOXES = {  # image_id: list of (category_id, [x1, y1, x2, y2])
    1: [(2, [10, 10, 60, 70]), (7, [100, 120, 300, 330]), (2, [200, 20, 220, 36])],
    2: [(7, [5, 5, 25, 30]), (7, [40, 40, 140, 100])],
    3: [(2, [0, 0, 400, 300])],
}
LABEL_TO_CAT = [2, 7]


def _gt_dict(crowd: tuple[int, list[float]] | None = None) -> dict:
    images = [{"id": i, "width": 500, "height": 400, "file_name": f"{i}.png"} for i in GT_BOXES]
    anns = []
    for image_id, objs in GT_BOXES.items():
        for cat, (x1, y1, x2, y2) in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if crowd is not None:
        image_id, (x1, y1, x2, y2) = crowd
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 2,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 1})
    return {"images": images, "annotations": anns, "categories": [{"id": 2, "name": "a"}, {"id": 7, "name": "b"}]}


def _perfect_detections() -> dict[int, dict]:
    out = {}
    for image_id, objs in GT_BOXES.items():
        out[image_id] = {
            "boxes": torch.tensor([b for _, b in objs], dtype=torch.float32),
            "scores": torch.linspace(0.9, 0.5, len(objs)),
            "labels": torch.tensor([LABEL_TO_CAT.index(c) for c, _ in objs]),
        }
    return out


def _shifted_detections() -> dict[int, dict]:
    dets = _perfect_detections()
    rng = np.random.default_rng(0)
    for image_id, det in dets.items():
        shift = torch.from_numpy(rng.uniform(-8, 8, size=tuple(det["boxes"].shape))).float()
        extra_box = torch.tensor([[300.0, 300.0, 380.0, 390.0]])
        det["boxes"] = torch.cat([det["boxes"] + shift, extra_box])  # plus a false positive
        det["scores"] = torch.cat([torch.from_numpy(rng.uniform(0.3, 1.0, size=len(shift))).float(), torch.tensor([0.95])])
        det["labels"] = torch.cat([det["labels"], torch.tensor([1])])
    return dets


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_coco_perfect_detections_give_ap_one():
    evaluator = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=False)
    dets = _perfect_detections()
    evaluator.update(list(dets), list(dets.values()))
    metrics = evaluator.evaluate()
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for key, value in metrics.items():
        assert value == pytest.approx(1.0), key
    results = evaluator.results()
    assert len(results) == 6 and {r["category_id"] for r in results} == {2, 7}
    first = [r for r in results if r["image_id"] == 1 and r["category_id"] == 7][0]
    assert first["bbox"] == [100.0, 120.0, 200.0, 210.0]  # [x, y, w, h]


def test_coco_shifted_detections_match_pycocotools_directly():
    dets = _shifted_detections()
    evaluator = COCOEvaluator(_gt_dict(crowd=(2, [300, 200, 400, 300])), LABEL_TO_CAT, verbose=False)
    evaluator.update(list(dets), list(dets.values()))
    ours = evaluator.evaluate()

    # Independent pycocotools run on hand-written result entries.
    gt = COCO()
    gt.dataset = _gt_dict(crowd=(2, [300, 200, 400, 300]))
    _quiet(gt.createIndex)
    results = []
    for image_id, det in dets.items():
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": LABEL_TO_CAT[label],
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    dt = _quiet(gt.loadRes, results)
    coco_eval = COCOeval(gt, dt, "bbox")
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    _quiet(coco_eval.summarize)
    expected = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], coco_eval.stats[:6]))
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=2e-3), key  # results are rounded to 3 decimals
    assert 0.2 < ours["AP"] < 0.95  # a non-trivial value


def test_coco_merge_equals_single_evaluator_and_empty_is_zero(capsys):
    dets = _shifted_detections()
    whole = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=False)
    whole.update(list(dets), list(dets.values()))
    part_a = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=False)
    part_b = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=False)
    part_a.update([1], [dets[1]])
    part_b.update([2, 3], [dets[2], dets[3]])
    part_a.merge(part_b.state_dict())
    assert part_a.evaluate() == whole.evaluate()

    empty = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=True)
    no_dets = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    empty.update([1, 2], [no_dets, no_dets])
    assert empty.evaluate() == {k: 0.0 for k in ["AP", "AP50", "AP75", "APs", "APm", "APl"]}
    assert "no detections" in capsys.readouterr().out

    verbose = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=True)
    verbose.update([1], [dets[1]])
    verbose.evaluate()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out
    with pytest.raises(ValueError, match="image id 99"):
        verbose.update([99], [dets[1]])
    with pytest.raises(ValueError, match="labels must be in"):
        verbose.update([1], [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([2])}])


def test_coco_evaluates_only_seen_images():
    # Perfect detections on image 3 only: evaluated on the images passed to update, AP is 1.
    dets = _perfect_detections()
    evaluator = COCOEvaluator(_gt_dict(), LABEL_TO_CAT, verbose=False)
    evaluator.update([3], [dets[3]])
    assert evaluator.evaluate()["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- VOC
def test_voc_map_hand_computed():
    # One class; image 1: gts g1, g2 and a difficult gd; image 2: gt g3 -> 3 non-difficult gts.
    gt = {
        1: {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float32),
            "labels": np.array([0, 0, 0]), "difficult": np.array([False, False, True])},
        2: {"boxes": np.array([[0, 0, 20, 20]], np.float32), "labels": np.array([0]), "difficult": np.array([False])},
    }
    evaluator = VOCEvaluator(gt, ["thing"], verbose=False)
    # Detections by score: 0.9 hits g1 (TP); 0.8 duplicates g1 (FP); 0.75 hits the difficult gd
    # (ignored); 0.7 hits g3 (TP); 0.6 hits g2 (TP).
    evaluator.update([1, 2], [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [50, 50, 60, 60], [20, 20, 40, 40]]),
         "scores": torch.tensor([0.9, 0.8, 0.75, 0.6]), "labels": torch.tensor([0, 0, 0, 0])},
        {"boxes": torch.tensor([[0.0, 0, 20, 20]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([0])},
    ])
    # TP, FP, TP, TP -> recall 1/3, 1/3, 2/3, 1 ; precision 1, 1/2, 2/3, 3/4.
    # Area: 1/3 * 1 + 1/3 * 0.75 + 1/3 * 0.75 = 0.8333.
    # 11-point: thresholds 0, .1, .2, .3 -> 1 ; .4 ... 1.0 (7 of them) -> 0.75 ; (4 + 5.25) / 11.
    metrics = evaluator.evaluate()
    assert metrics["mAP"] == pytest.approx((1 + 0.75 + 0.75) / 3)
    assert metrics["mAP_07"] == pytest.approx((4 + 7 * 0.75) / 11)
    assert evaluator.per_class["thing"]["num_gts"] == 3


def test_voc_evaluator_from_a_coco_api_equals_the_ground_truth_dict_one():
    """Evaluators take the ground truth as a COCO object: difficult VOC objects travel as iscrowd."""
    gt = {
        1: {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float32),
            "labels": np.array([0, 1, 0]), "difficult": np.array([False, False, True])},
        2: {"boxes": np.array([[0, 0, 20, 20]], np.float32), "labels": np.array([1]), "difficult": np.array([False])},
    }
    coco_dict = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
        "annotations": [
            {"id": k, "image_id": image_id, "category_id": (7, 9)[int(label)], "iscrowd": int(difficult),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "area": 1.0}
            for k, (image_id, b, label, difficult) in enumerate(
                (i, b, l, d) for i, g in gt.items() for b, l, d in zip(g["boxes"], g["labels"], g["difficult"])
            )
        ],
    }
    detections = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [21, 20, 40, 41]]), "scores": torch.tensor([0.9, 0.8, 0.7]),
         "labels": torch.tensor([0, 0, 1])},
        {"boxes": torch.tensor([[0.0, 0, 20, 20], [1, 1, 19, 19]]), "scores": torch.tensor([0.6, 0.5]), "labels": torch.tensor([1, 1])},
    ]
    direct = VOCEvaluator(gt, ["a", "b"], verbose=False)
    built = build_evaluator("voc", coco_dict, [7, 9], ("bbox",), verbose=False)
    assert isinstance(built, VOCEvaluator) and built.class_names == ["a", "b"]
    for evaluator in (direct, built):
        evaluator.update([1, 2], detections)
    assert built.evaluate() == direct.evaluate()


def test_build_evaluator_follows_protocol_and_iou_types():
    gt = _gt_dict()
    assert isinstance(build_evaluator("coco", gt, LABEL_TO_CAT, ("bbox",), verbose=False), COCOEvaluator)
    assert isinstance(build_evaluator("voc", gt, LABEL_TO_CAT, ("proposal",), verbose=False), ProposalRecallEvaluator)
    assert isinstance(build_evaluator("lvis", _lvis_gt(), [1, 2, 3], ("bbox",), verbose=False), LVISEvaluator)
    # ("bbox", "segm") needs a segmentation on every gt annotation: this gt has boxes only.
    with pytest.raises(ValueError, match=r"iou_type 'segm' needs a 'segmentation'.*annotation 1 of image 1 has none"):
        build_evaluator("coco", gt, LABEL_TO_CAT, ("bbox", "segm"), verbose=False)
    with pytest.raises(ValueError, match="VOC mAP evaluates boxes only"):
        build_evaluator("voc", gt, LABEL_TO_CAT, ("bbox", "segm"), verbose=False)
    with pytest.raises(ValueError, match="protocol"):
        build_evaluator("kitti", gt, LABEL_TO_CAT, ("bbox",), verbose=False)
    # With segmentations (a box polygon per annotation) COCO and LVIS evaluate boxes and masks.
    for protocol, truth, label_to_cat in (("coco", _gt_dict(), LABEL_TO_CAT), ("lvis", _lvis_gt(), [1, 2, 3])):
        for ann in truth["annotations"]:
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        evaluator = build_evaluator(protocol, truth, label_to_cat, ("bbox", "segm"), verbose=False)
        assert isinstance(evaluator, LVISEvaluator if protocol == "lvis" else COCOEvaluator)
        assert evaluator.iou_types == ("bbox", "segm")


def test_evaluation_does_not_import_the_data_package():
    """Evaluators and datasets are decoupled: libra.evaluation never imports libra.data."""
    import subprocess
    import sys

    code = "import sys, libra.evaluation; print(any(m.startswith('libra.data') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_voc_average_precision_helper_and_class_mean():
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5]), "area") == pytest.approx(0.75)
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5]), "11point") == pytest.approx((6 + 5 * 0.5) / 11)
    assert average_precision(np.zeros(0), np.zeros(0), "area") == 0.0
    # Two classes: one perfect, one missed; a third class without gts is left out of the mean.
    gt = {1: {"boxes": np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32), "labels": np.array([0, 1]),
              "difficult": np.array([False, False])}}
    evaluator = VOCEvaluator(gt, ["a", "b", "c"], verbose=False)
    evaluator.update([1], [{"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
                            "labels": torch.tensor([0, 2])}])
    metrics = evaluator.evaluate()
    assert metrics["mAP"] == pytest.approx(0.5) and metrics["mAP_07"] == pytest.approx(0.5)
    other = VOCEvaluator(gt, ["a", "b", "c"], verbose=False)
    other.merge(evaluator.state_dict())
    assert other.evaluate() == metrics


# ---------------------------------------------------------------- LVIS federated
def _lvis_gt() -> dict:
    def ann(i, image_id, cat, box):
        x1, y1, x2, y2 = box
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}

    return {
        "images": [
            {"id": 1, "width": 200, "height": 200, "neg_category_ids": [2], "not_exhaustive_category_ids": []},
            {"id": 2, "width": 200, "height": 200, "neg_category_ids": [], "not_exhaustive_category_ids": [2]},
            {"id": 3, "width": 200, "height": 200, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        ],
        "annotations": [ann(1, 1, 1, [10, 10, 110, 110]), ann(2, 2, 2, [20, 20, 120, 120]), ann(3, 3, 3, [50, 50, 150, 150])],
        "categories": [{"id": 1, "name": "one", "frequency": "f"}, {"id": 2, "name": "two", "frequency": "c"},
                       {"id": 3, "name": "three", "frequency": "r"}],
    }


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


LVIS_DETS = {
    # image 1: TP of cat 1 (0.9); cat 3 is neither positive nor negative here -> dropped (0.95);
    # cat 2 is negative here -> FP (0.5).
    1: _det([[10, 10, 110, 110], [0, 0, 50, 50], [100, 100, 190, 190]], [0.9, 0.95, 0.5], [0, 2, 1]),
    # image 2: cat 2 is not exhaustive: the unmatched 0.9 detection is ignored, 0.8 is a TP.
    2: _det([[150, 150, 190, 190], [20, 20, 120, 120]], [0.9, 0.8], [1, 1]),
    # image 3: cat 1 is negative here -> FP above the TP (0.95); cat 3 TP (0.6).
    3: _det([[0, 0, 60, 60], [50, 50, 150, 150]], [0.95, 0.6], [0, 2]),
}


def test_lvis_federated_rules_on_tiny_case():
    evaluator = LVISEvaluator(_lvis_gt(), [1, 2, 3], verbose=False)
    evaluator.update(list(LVIS_DETS), list(LVIS_DETS.values()))
    metrics = evaluator.evaluate()
    # Per category: cat 1 AP 0.5 (FP on the negative image outranks the TP), cat 2 AP 1.0
    # (not-exhaustive FP ignored, negative-image FP ranks below the TP), cat 3 AP 1.0 (image-1
    # detection dropped).
    assert metrics["APf"] == pytest.approx(0.5)
    assert metrics["APc"] == pytest.approx(1.0)
    assert metrics["APr"] == pytest.approx(1.0)
    assert metrics["AP"] == pytest.approx(2.5 / 3)

    # Plain COCOeval on the same detections (no federated rules) gives 0.5 for every category.
    gt = load_coco_api(copy.deepcopy(_lvis_gt()))
    for a in gt.dataset["annotations"]:
        a["iscrowd"] = 0
    plain = COCOEvaluator(gt, [1, 2, 3], verbose=False)
    plain.update(list(LVIS_DETS), list(LVIS_DETS.values()))
    assert plain.evaluate()["AP"] == pytest.approx(0.5)


def test_lvis_keeps_top_300_per_image():
    evaluator = LVISEvaluator(_lvis_gt(), [1, 2, 3], verbose=False)
    boxes = torch.tensor([[10.0, 10, 110, 110]]).repeat(305, 1)
    scores = torch.linspace(0.01, 1.0, 305)
    evaluator.update([1], [{"boxes": boxes, "scores": scores, "labels": torch.zeros(305, dtype=torch.int64)}])
    kept = [d["score"] for d in evaluator.detections]
    assert len(kept) == 300 and min(kept) > float(scores[4]) - 1e-5


# ---------------------------------------------------------------- proposal recall
def test_proposal_recall_hand_made():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "x"}, {"id": 5, "name": "y"}]}
    # Proposal 0 equals gt A (IoU 1). Proposal 100 (the 101st) covers gt B with IoU 0.62, i.e. it
    # matches at thresholds 0.50, 0.55, 0.60 only. 99 junk boxes in between match nothing.
    junk = [[70.0 + (i % 3), 70.0, 90.0, 90.0] for i in range(99)]
    proposals = torch.tensor([[0.0, 0, 10, 10]] + junk + [[20.0, 20, 30, 26.2]])
    evaluator = ProposalRecallEvaluator(gt, verbose=False)
    evaluator.update([1], [proposals])
    metrics = evaluator.evaluate()
    # AR@100: only A is recalled at every threshold -> 0.5. AR@300: (10 + 3) / 20 = 0.65.
    assert metrics["AR@100"] == pytest.approx(0.5)
    assert metrics["AR@300"] == pytest.approx(0.65)
    assert metrics["AR@1000"] == pytest.approx(0.65)
    # Dict input with explicit scores reorders the proposals: B's proposal first.
    evaluator = ProposalRecallEvaluator(gt, max_dets=(1, 100), verbose=False)
    scores = torch.zeros(len(proposals))
    scores[-1] = 1.0
    evaluator.update([1], [{"proposals": proposals, "proposal_scores": scores}])
    metrics = evaluator.evaluate()
    assert metrics["AR@1"] == pytest.approx(0.15) and math.isclose(metrics["AR@100"], 0.65, rel_tol=1e-9)
    assert set(metrics) == {"AR@1", "AR@100", "AR@1_mmdet", "AR@100_mmdet"}


def _iou64(a, b):
    """IoU of two (x1, y1, x2, y2) boxes in float64 (Python floats), widths x2 - x1."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_mmdetection_recall_against_a_float64_hand_computation():
    """AR@k_mmdet is MMDetection's eval_recalls (greedy by IoU, scores only cut the top k), AR@k
    COCOeval's (score order per threshold); a case where they differ, computed by hand in float64."""
    def ann(i, image, box, crowd=0):
        x1, y1, x2, y2 = box
        return {"id": i, "image_id": image, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd}

    A, B, C, D, E, F = (0, 0, 10, 10), (5, 0, 15, 10), (20, 20, 40, 40), (0, 0, 50, 50), (50, 50, 60, 60), (70, 70, 80, 80)
    gt = {"images": [{"id": i, "width": 100, "height": 100} for i in (1, 2, 3)],
          "annotations": [ann(1, 1, A), ann(2, 1, B), ann(3, 2, C), ann(4, 2, D, crowd=1), ann(5, 3, E), ann(6, 3, F)],
          "categories": [{"id": 1, "name": "x"}]}
    p0, p1 = (1, 0, 13, 10), (1, 0, 11, 10)  # image 1, p0 scored higher
    iou = {(g, p): _iou64(g, p) for g in (A, B) for p in (p0, p1)}
    assert [round(iou[key], 3) for key in ((A, p0), (B, p0), (A, p1), (B, p1))] == [0.692, 0.571, 0.818, 0.429]
    thresholds = [0.5 + 0.05 * i for i in range(10)]
    num_gts = 5  # A, B, C, E, F (D is a crowd box)
    # MMDetection: image 1 pairs A with p1 (0.818, the highest IoU), then B with p0 (0.571); image 2 has
    # no proposal (C: 0); image 3 pairs E with its exact copy (1.0) and F is left without one (-1).
    mmdet_ious = [iou[A, p1], iou[B, p0], 0.0, 1.0, -1.0]
    expected_mmdet = sum(sum(v >= t for v in mmdet_ious) / num_gts for t in thresholds) / 10
    # COCOeval: p0 takes A while 0.692 >= t (A's better proposal p1 then finds A taken and B below t);
    # for t >= 0.70 p0 matches nothing and p1 takes A; E is matched at every threshold.
    expected_coco = sum((1 + (iou[A, p0] >= t or iou[A, p1] >= t)) / num_gts for t in thresholds) / 10
    assert expected_mmdet == pytest.approx(0.38) and expected_coco == pytest.approx(0.34)
    # Top 1 per image: p0 only in image 1; MMDetection pairs A with p0 (0.692), B gets -1.
    expected_mmdet_1 = sum(sum(v >= t for v in [iou[A, p0], -1.0, 0.0, 1.0, -1.0]) / num_gts for t in thresholds) / 10

    evaluator = ProposalRecallEvaluator(gt, max_dets=(1, 100), verbose=False)
    evaluator.update([1, 2, 3], [
        {"proposals": torch.tensor([p1, p0], dtype=torch.float32), "scores": torch.tensor([0.8, 0.9])},
        torch.zeros(0, 4),
        torch.tensor([E], dtype=torch.float32),
    ])
    metrics = evaluator.evaluate()
    assert metrics["AR@100_mmdet"] == pytest.approx(expected_mmdet, abs=1e-12)
    assert metrics["AR@100"] == pytest.approx(expected_coco, abs=1e-12)
    assert metrics["AR@1_mmdet"] == pytest.approx(expected_mmdet_1, abs=1e-12) == pytest.approx(0.28)
    # Split across two evaluators (two processes) and merged: the same numbers.
    first, second = (ProposalRecallEvaluator(gt, max_dets=(1, 100), verbose=False) for _ in range(2))
    first.update([1], [{"proposals": torch.tensor([p1, p0]), "scores": torch.tensor([0.8, 0.9])}])
    second.update([2, 3], [torch.zeros(0, 4), torch.tensor([E], dtype=torch.float32)])
    first.merge(second.state_dict())
    assert first.evaluate() == pytest.approx(metrics)
