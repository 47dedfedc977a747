"""COCO box AP with pycocotools' COCOeval.

The evaluator only collects results as plain Python lists (`state_dict` / `merge`), so in
multi-GPU evaluation each rank fills its own evaluator, the trainer all-gathers the states and
rank 0 merges them and calls `evaluate`.

Detections are expected in ORIGINAL image coordinates, boxes ``[x1, y1, x2, y2]``; they are
written as COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra.coco_api import load_coco_api as as_coco_api

COCO_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def detections_to_coco_results(
    image_id: int, detection: Mapping, label_to_cat_id: Sequence[int], boxes_key: str = "boxes"
) -> list[dict]:
    """One image's detection dict (``boxes [D,4]``, ``scores [D]``, ``labels [D]``) -> COCO result entries."""
    boxes = _to_numpy(detection[boxes_key], np.float64).reshape(-1, 4)
    scores = _to_numpy(detection["scores"], np.float64).reshape(-1)
    labels = _to_numpy(detection["labels"], np.int64).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(
            f"image {image_id}: boxes, scores and labels must have the same length, got {len(boxes)}, {len(scores)}, {len(labels)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_to_cat_id)):
        raise ValueError(f"image {image_id}: labels must be in [0, {len(label_to_cat_id) - 1}], got {labels.min()}..{labels.max()}")
    cat_ids = np.asarray(label_to_cat_id, np.int64)[labels] if len(labels) else np.zeros(0, np.int64)
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    return [
        {"image_id": int(image_id), "category_id": int(c), "bbox": [round(float(v), 3) for v in b], "score": round(float(s), 5)}
        for b, s, c in zip(xywh.tolist(), scores.tolist(), cat_ids.tolist())
    ]


def check_iou_types(iou_types: Sequence[str], supported: Sequence[str], owner: str) -> tuple[str, ...]:
    """``iou_types`` as a tuple, or a ValueError naming what ``owner`` can evaluate."""
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    unknown = [t for t in iou_types if t not in supported]
    if not iou_types or unknown:
        raise ValueError(f"{owner} evaluates iou_types {list(supported)}, got {list(iou_types)}")
    return iou_types


class COCOEvaluator:
    """COCO AP (AP, AP50, AP75, APs, APm, APl; fractions in [0, 1], -1 where undefined).

    Args:
        coco_gt: ground truth (``COCO`` object, instances JSON path or dict).
        label_to_cat_id: contiguous label -> COCO category id (``dataset.label_to_cat_id``).
        iou_types: what to evaluate; ``("bbox",)`` (the detector's boxes).
        verbose: print pycocotools' standard 12-line table in `evaluate`.
    """

    supported_iou_types: tuple[str, ...] = ("bbox",)

    def __init__(
        self,
        coco_gt: COCO | str | Path | dict,
        label_to_cat_id: Sequence[int],
        iou_types: Sequence[str] = ("bbox",),
        verbose: bool = True,
    ) -> None:
        self.iou_types = check_iou_types(iou_types, self.supported_iou_types, type(self).__name__)
        self.coco_gt = as_coco_api(coco_gt)
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        unknown = set(self.label_to_cat_id) - set(self.coco_gt.cats)
        if unknown:
            raise ValueError(f"label_to_cat_id has category ids not in the ground truth: {sorted(unknown)}")
        self.verbose = verbose
        self.image_ids: list[int] = []
        self.detections: list[dict] = []
        self.coco_eval: COCOeval | None = None

    def reset(self) -> None:
        self.image_ids, self.detections, self.coco_eval = [], [], None

    def update(self, image_ids: Iterable[int], detections: Sequence[Mapping]) -> None:
        """Add one batch: ``detections[i]`` (boxes in original coords) belongs to ``image_ids[i]``."""
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(detections):
            raise ValueError(f"got {len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground-truth annotation file")
            self.image_ids.append(image_id)
            self.detections.extend(detections_to_coco_results(image_id, det, self.label_to_cat_id))

    def state_dict(self) -> dict:
        """Plain-list state (picklable, for ``all_gather_object``)."""
        return {"image_ids": list(self.image_ids), "detections": list(self.detections)}

    def merge(self, other: "COCOEvaluator | Mapping") -> None:
        """Add another evaluator's (or `state_dict`'s) results, e.g. from other ranks."""
        state = other.state_dict() if hasattr(other, "state_dict") else other
        self.image_ids.extend(int(i) for i in state["image_ids"])
        self.detections.extend(state["detections"])

    def results(self) -> list[dict]:
        """COCO results JSON list (to dump into the work directory)."""
        return list(self.detections)

    def evaluate(self) -> dict[str, float]:
        image_ids = sorted(set(self.image_ids)) or sorted(self.coco_gt.getImgIds())
        if not self.detections:
            if self.verbose:
                print("COCOEvaluator: no detections; every AP is 0")
            return {k: 0.0 for k in COCO_METRIC_NAMES}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(list(self.detections))
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        with contextlib.redirect_stdout(io.StringIO()):  # progress chatter of pycocotools
            coco_eval.evaluate()
            coco_eval.accumulate()
        if self.verbose:
            coco_eval.summarize()  # prints the standard table
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.summarize()
        self.coco_eval = coco_eval
        return {k: float(v) for k, v in zip(COCO_METRIC_NAMES, coco_eval.stats[:6])}
