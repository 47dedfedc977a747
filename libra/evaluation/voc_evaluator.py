"""Pascal VOC mAP@0.5 (numpy), with the VOC07 11-point and the all-points (area) AP.

Matching follows the VOC devkit: per class, detections of all images sorted by decreasing
score; each takes the unmatched-or-matched ground truth of highest IoU in its image; IoU
> 0.5 with a not-yet-matched gt is a TP, with an already matched gt a FP (duplicate), with
a "difficult" gt neither (ignored); IoU <= 0.5 is a FP. Recall is over non-difficult gts.

Boxes are continuous ``[x1, y1, x2, y2]`` (see `libra.data.voc`: XML ``[xmin-1, ymin-1, xmax,
ymax]``), so the plain IoU here equals the devkit's "+1" IoU on raw XML coordinates.

mAP averages the classes that have at least one non-difficult gt in the evaluated images
(the devkit would give NaN for the others). Values are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .coco_evaluator import _to_numpy


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] IoU of boxes a [N, 4] and b [M, 4] (no +1)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "area") -> float:
    """AP from a recall/precision curve (detections in decreasing score order).

    ``'area'``: area under the precision envelope (VOC2010+ "all points");
    ``'11point'``: mean over recall thresholds 0, 0.1, ..., 1 of the best precision at
    recall >= threshold (VOC2007).
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if method == "11point":
        total = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            reached = precision[recall >= t]
            total += float(reached.max()) if reached.size else 0.0
        return total / 11.0
    if method != "area":
        raise ValueError(f"method must be 'area' or '11point', got {method!r}")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (non-increasing)
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


class VOCEvaluator:
    """VOC detection mAP at one IoU threshold (0.5).

    Args:
        ground_truth: ``{image_id: {"boxes" [G,4], "labels" [G] (0..C-1), "difficult" [G] bool}}``
            in original image coordinates (``VOCDetection.ground_truth()``).
        class_names: C names (used for the per-class table).
        iou_threshold: a detection matches when IoU > iou_threshold.
        verbose: print the per-class AP table in `evaluate`.
    """

    def __init__(
        self,
        ground_truth: Mapping[int, Mapping[str, np.ndarray]],
        class_names: Sequence[str],
        iou_threshold: float = 0.5,
        verbose: bool = True,
    ) -> None:
        self.ground_truth = {}
        for image_id, gt in ground_truth.items():
            boxes = _to_numpy(gt["boxes"], np.float64).reshape(-1, 4)
            labels = _to_numpy(gt["labels"], np.int64).reshape(-1)
            difficult = _to_numpy(gt.get("difficult", np.zeros(len(labels), bool)), bool).reshape(-1)
            if not len(boxes) == len(labels) == len(difficult):
                raise ValueError(f"ground truth of image {image_id}: boxes, labels, difficult lengths differ")
            self.ground_truth[int(image_id)] = (boxes, labels, difficult)
        self.class_names = list(class_names)
        self.label_to_cat_id = list(range(1, len(self.class_names) + 1))  # from_coco_api sets the file's ids
        self.iou_threshold = float(iou_threshold)
        self.verbose = verbose
        self.image_ids: list[int] = []
        # Detections as plain rows (image_id, label, score, x1, y1, x2, y2) for easy all-gather.
        self.detections: list[tuple] = []
        self.per_class: dict[str, dict[str, float]] = {}

    @classmethod
    def from_coco_api(
        cls,
        coco_gt,
        label_to_cat_id: Sequence[int],
        class_names: Sequence[str] | None = None,
        iou_threshold: float = 0.5,
        verbose: bool = True,
    ) -> "VOCEvaluator":
        """The same evaluator from a COCO-format ground truth (``iscrowd = 1`` marks a difficult object).

        Args:
            coco_gt: a pycocotools ``COCO`` (boxes ``[x, y, w, h]``), a JSON path or a dict.
            label_to_cat_id: contiguous label -> category id.
            class_names: C names; default the categories' names.
        """
        from .coco_evaluator import as_coco_api

        api = as_coco_api(coco_gt)
        cat_to_label = {int(c): label for label, c in enumerate(label_to_cat_id)}
        ground_truth = {}
        for image_id in api.getImgIds():
            anns = [a for a in api.imgToAnns.get(image_id, []) if int(a["category_id"]) in cat_to_label]
            boxes = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            ground_truth[int(image_id)] = {
                "boxes": boxes,
                "labels": np.asarray([cat_to_label[int(a["category_id"])] for a in anns], np.int64),
                "difficult": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool),
            }
        if class_names is None:
            class_names = [str(api.cats[int(c)].get("name", c)) for c in label_to_cat_id]
        evaluator = cls(ground_truth, class_names, iou_threshold=iou_threshold, verbose=verbose)
        evaluator.label_to_cat_id = [int(c) for c in label_to_cat_id]
        return evaluator

    def reset(self) -> None:
        self.image_ids, self.detections, self.per_class = [], [], {}

    def update(self, image_ids: Iterable[int], detections: Sequence[Mapping]) -> None:
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(detections):
            raise ValueError(f"got {len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            if image_id not in self.ground_truth:
                raise ValueError(f"image id {image_id} has no ground truth in this evaluator")
            boxes = _to_numpy(det["boxes"], np.float64).reshape(-1, 4)
            scores = _to_numpy(det["scores"], np.float64).reshape(-1)
            labels = _to_numpy(det["labels"], np.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: boxes, scores and labels lengths differ")
            self.image_ids.append(image_id)
            for b, s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
                self.detections.append((image_id, int(c), float(s), *b))

    def state_dict(self) -> dict:
        return {"image_ids": list(self.image_ids), "detections": list(self.detections)}

    def merge(self, other: "VOCEvaluator | Mapping") -> None:
        state = other.state_dict() if hasattr(other, "state_dict") else other
        self.image_ids.extend(int(i) for i in state["image_ids"])
        self.detections.extend(tuple(d) for d in state["detections"])

    def _class_curve(self, label: int, image_ids: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(recall, precision, number of non-difficult gts) of one class."""
        gts = {}
        num_pos = 0
        for image_id in image_ids:
            boxes, labels, difficult = self.ground_truth[image_id]
            keep = labels == label
            gts[image_id] = (boxes[keep], difficult[keep], np.zeros(int(keep.sum()), bool))
            num_pos += int((~difficult[keep]).sum())
        image_set = set(image_ids)
        dets = [d for d in self.detections if d[1] == label and d[0] in image_set]
        # Stable sort by decreasing score (ties keep insertion order, like the devkit's argsort).
        order = sorted(range(len(dets)), key=lambda i: -dets[i][2])
        tp = np.zeros(len(dets))
        fp = np.zeros(len(dets))
        for rank, i in enumerate(order):
            image_id = dets[i][0]
            gt_boxes, gt_difficult, matched = gts[image_id]
            if len(gt_boxes) == 0:
                fp[rank] = 1
                continue
            ious = iou_matrix(np.asarray([dets[i][3:]], np.float64), gt_boxes)[0]
            best = int(np.argmax(ious))
            if ious[best] > self.iou_threshold:
                if gt_difficult[best]:
                    continue  # neither TP nor FP
                if not matched[best]:
                    matched[best] = True
                    tp[rank] = 1
                else:
                    fp[rank] = 1
            else:
                fp[rank] = 1
        counted = (tp + fp) > 0  # drop detections matched to difficult gts
        tp, fp = np.cumsum(tp[counted]), np.cumsum(fp[counted])
        recall = tp / max(num_pos, 1)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return recall, precision, num_pos

    def evaluate(self) -> dict[str, float]:
        """{'mAP': area-method mAP@0.5, 'mAP_07': 11-point mAP@0.5}; per-class values in ``self.per_class``."""
        image_ids = sorted(set(self.image_ids)) or sorted(self.ground_truth)
        aps, aps07 = [], []
        self.per_class = {}
        for label, name in enumerate(self.class_names):
            recall, precision, num_pos = self._class_curve(label, image_ids)
            if num_pos == 0:
                continue
            ap, ap07 = average_precision(recall, precision, "area"), average_precision(recall, precision, "11point")
            self.per_class[name] = {"AP": ap, "AP_07": ap07, "num_gts": num_pos}
            aps.append(ap)
            aps07.append(ap07)
        result = {"mAP": float(np.mean(aps)) if aps else 0.0, "mAP_07": float(np.mean(aps07)) if aps07 else 0.0}
        if self.verbose:
            print(f"{'class':<14}{'gts':>6}{'AP':>8}{'AP_07':>8}")
            for name, v in self.per_class.items():
                print(f"{name:<14}{v['num_gts']:>6}{v['AP']:>8.4f}{v['AP_07']:>8.4f}")
            print(f"{'mAP':<14}{'':>6}{result['mAP']:>8.4f}{result['mAP_07']:>8.4f}")
        return result

    def per_class_results(self) -> dict[str, list[dict]]:
        """Per-class AP@0.5 of the last :meth:`evaluate` (``{"bbox": rows}``, rows in label order:
        ``{"label", "name", "num_gts", "AP", "AP_07"}``; -1 for a class without ground truth)."""
        rows = []
        for label, name in enumerate(self.class_names):
            values = self.per_class.get(name, {"AP": -1.0, "AP_07": -1.0, "num_gts": 0})
            rows.append({"label": label, "name": name, "num_gts": int(values["num_gts"]),
                         "AP": float(values["AP"]), "AP_07": float(values["AP_07"])})
        return {"bbox": rows}

    def results(self, iou_type: str | None = None) -> list[dict]:
        """The collected detections in the COCO results format (``bbox`` [x, y, w, h]; category ids
        of the COCO view of the ground truth when built by :meth:`from_coco_api`, else label + 1)."""
        if iou_type not in (None, "bbox"):
            raise ValueError(f"VOCEvaluator collects boxes only, not {iou_type!r}")
        cat_ids = self.label_to_cat_id
        return [
            {"image_id": int(image_id), "category_id": int(cat_ids[label]), "score": round(float(score), 5),
             "bbox": [round(v, 3) for v in (x1, y1, x2 - x1, y2 - y1)]}
            for image_id, label, score, x1, y1, x2, y2 in self.detections
        ]

