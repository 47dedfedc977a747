"""LVIS v1 box and mask AP with the federated rules, built on pycocotools' COCOeval.

Method (how it relates to the official ``lvis`` API, ``LVISEval``):
  1. Detections: at most ``max_dets_per_image`` (300) per image over all categories, highest
     scores first (the official ``LVISResults(max_dets=300)``).
  2. Federated filtering: a category is evaluated on an image only if the image is in its
     positive set (the category has a gt there) or negative set (``neg_category_ids``).
     Detections of any other category on that image are dropped before COCOeval sees them
     (the official code does the same filtering of ``dt``).
  3. ``not_exhaustive_category_ids``: on such an image, detections of that category that match
     no gt are ignored (not false positives). This is done by subclassing COCOeval and
     marking unmatched detections as ignored in ``evaluateImg`` (the official code sets
     ``dt_ig`` for them in the same way).
  4. COCOeval then runs with ``maxDets=[300]`` and the usual IoU thresholds 0.5:0.95, 101
     recall points and area ranges. AP = mean over categories with gts (precision > -1);
     APr / APc / APf = the same mean over categories of frequency 'r' / 'c' / 'f' (a category
     without ``frequency`` is grouped by its ``image_count``, else in no group, with a warning:
     ``libra.coco_api.frequency_groups``, the dataset's rule too).
  5. Masks (``"segm"`` in ``iou_types``): the same steps with mask IoU (COCOeval
     ``iouType='segm'``) on RLEs of the detections' ``masks`` [D, H0, W0] bool; the same top-300
     detections per image are kept for boxes and masks. Mask metrics are named with the prefix
     ``segm_`` (``segm_AP``, ..., ``segm_APr``); box metrics keep their names.
The ``lvis`` package is not a dependency, so agreement with it is by construction of the
rules above, not checked in the tests. Metrics are fractions in [0, 1] (-1 when undefined,
e.g. APr when no rare category has a gt in the evaluated images).
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra.coco_api import frequency_groups

from .coco_evaluator import (
    METRIC_PREFIXES,
    COCOEvaluator,
    as_coco_api,
    check_iou_types,
    check_segm_ground_truth,
    detections_to_coco_results,
    detections_to_segm_results,
)

LVIS_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class FederatedCOCOeval(COCOeval):
    """COCOeval whose unmatched detections of not-exhaustive (image, category) pairs are ignored."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, not_exhaustive: Mapping[int, set[int]], iou_type: str = "bbox") -> None:
        super().__init__(coco_gt, coco_dt, iouType=iou_type)
        self.not_exhaustive = not_exhaustive

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802 (pycocotools' name)
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        if result is None or catId not in self.not_exhaustive.get(imgId, ()):
            return result
        unmatched = result["dtMatches"] == 0  # [T, D]: no gt at that IoU threshold
        result["dtIgnore"] = np.logical_or(result["dtIgnore"], unmatched)
        return result


class LVISEvaluator(COCOEvaluator):
    """Federated LVIS box AP (AP, AP50, AP75, APs, APm, APl, APr, APc, APf) and, with ``"segm"``,
    mask AP (``segm_AP``, ..., ``segm_APf``).

    Collects results like `COCOEvaluator` (``reset``, ``state_dict``, ``merge``, ``results``
    are inherited); ``update`` keeps the top ``max_dets_per_image`` per image and ``evaluate``
    applies the federated rules.

    Args:
        lvis_gt: LVIS ground truth (a pycocotools ``COCO`` over the LVIS JSON, a JSON
            path or a dict); images need ``neg_category_ids`` / ``not_exhaustive_category_ids``.
        label_to_cat_id: contiguous label -> LVIS category id.
        iou_types: ``("bbox",)``, ``("bbox", "segm")`` or ``("segm",)``.
        max_dets_per_image: 300 for LVIS.
    """

    def __init__(
        self,
        lvis_gt: COCO | str | Path | dict,
        label_to_cat_id: Sequence[int],
        iou_types: Sequence[str] = ("bbox",),
        max_dets_per_image: int = 300,
        verbose: bool = True,
    ) -> None:
        self.iou_types = check_iou_types(iou_types, ("bbox", "segm"), type(self).__name__)
        self.lvis_gt = as_coco_api(lvis_gt)
        check_segm_ground_truth(self.lvis_gt, self.iou_types, type(self).__name__)
        self.label_to_cat_id = [int(c) for c in label_to_cat_id]
        self.max_dets_per_image = int(max_dets_per_image)
        self.verbose = verbose
        self.image_ids: list[int] = []
        self.detections: list[dict] = []  # bbox results
        self.segm_detections: list[dict] = []  # segm results (RLE)
        self.coco_eval: FederatedCOCOeval | None = None  # of the last IoU type evaluated
        self.coco_evals: dict[str, FederatedCOCOeval] = {}
        # Federated sets per image.
        self.pos_cats: dict[int, set[int]] = defaultdict(set)
        for ann in self.lvis_gt.dataset["annotations"]:
            self.pos_cats[int(ann["image_id"])].add(int(ann["category_id"]))
        self.neg_cats = {int(i): set(int(c) for c in info.get("neg_category_ids", [])) for i, info in self.lvis_gt.imgs.items()}
        # Frequency groups of APr / APc / APf, by the dataset's rule (a warning names categories without one).
        self.frequency_groups = frequency_groups(self.lvis_gt)
        self.not_exhaustive = {
            int(i): set(int(c) for c in info.get("not_exhaustive_category_ids", [])) for i, info in self.lvis_gt.imgs.items()
        }

    @property
    def coco_gt(self) -> COCO:  # the ground truth under COCOEvaluator's name (used by its helpers)
        return self.lvis_gt

    def update(self, image_ids: Iterable[int], detections: Sequence[Mapping]) -> None:
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(detections):
            raise ValueError(f"got {len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            if image_id not in self.lvis_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the LVIS ground truth")
            results = detections_to_coco_results(image_id, det, self.label_to_cat_id)
            # The top max_dets_per_image by (rounded) score, stable: the same rows for boxes and masks.
            order = sorted(range(len(results)), key=lambda i: -results[i]["score"])[: self.max_dets_per_image]
            self.image_ids.append(image_id)
            if "bbox" in self.iou_types:
                self.detections.extend(results[i] for i in order)
            if "segm" in self.iou_types:
                self.segm_detections.extend(
                    detections_to_segm_results(image_id, det, self.label_to_cat_id, self._image_size(image_id), keep=order)
                )

    def federated_detections(self, iou_type: str = "bbox") -> list[dict]:
        """Detections whose category is in the image's positive or negative set (step 2)."""
        return [
            d for d in (self.detections if iou_type == "bbox" else self.segm_detections)
            if d["category_id"] in self.pos_cats.get(d["image_id"], ()) or d["category_id"] in self.neg_cats.get(d["image_id"], ())
        ]

    def evaluate(self) -> dict[str, float]:
        """Federated metrics of every IoU type: ``AP ... APf`` (boxes), ``segm_AP ... segm_APf`` (masks)."""
        image_ids = sorted(set(self.image_ids)) or sorted(self.lvis_gt.getImgIds())
        metrics: dict[str, float] = {}
        self.coco_evals = {}
        for iou_type in self.iou_types:
            prefix = METRIC_PREFIXES[iou_type]
            metrics.update({prefix + k: v for k, v in self._evaluate_federated(iou_type, image_ids).items()})
        return metrics

    def _evaluate_federated(self, iou_type: str, image_ids: Sequence[int]) -> dict[str, float]:
        detections = [dict(d) for d in self.federated_detections(iou_type)]  # loadRes adds keys: copies
        if not detections:
            if self.verbose:
                kind = "mask " if iou_type == "segm" else ""
                print(f"LVISEvaluator: no {kind}detections (after federated filtering); every {METRIC_PREFIXES[iou_type]}AP is 0")
            return {k: 0.0 for k in LVIS_METRIC_NAMES}
        with contextlib.redirect_stdout(io.StringIO()):
            lvis_dt = self.lvis_gt.loadRes(detections)
        coco_eval = FederatedCOCOeval(self.lvis_gt, lvis_dt, self.not_exhaustive, iou_type=iou_type)
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.params.maxDets = [self.max_dets_per_image]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        self.coco_eval = self.coco_evals[iou_type] = coco_eval
        precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
        cat_ids = list(coco_eval.params.catIds)

        def mean_ap(p: np.ndarray) -> float:
            valid = p[p > -1]
            return float(valid.mean()) if valid.size else -1.0

        iou_thrs = coco_eval.params.iouThrs
        out = {
            "AP": mean_ap(precision[:, :, :, 0, -1]),
            "AP50": mean_ap(precision[np.isclose(iou_thrs, 0.5), :, :, 0, -1]),
            "AP75": mean_ap(precision[np.isclose(iou_thrs, 0.75), :, :, 0, -1]),
            "APs": mean_ap(precision[:, :, :, 1, -1]),
            "APm": mean_ap(precision[:, :, :, 2, -1]),
            "APl": mean_ap(precision[:, :, :, 3, -1]),
        }
        groups = self.frequency_groups
        undefined = []
        for group in ("r", "c", "f"):
            ks = [k for k, c in enumerate(cat_ids) if groups.get(int(c)) == group]
            out[f"AP{group}"] = mean_ap(precision[:, :, ks, 0, -1]) if ks else -1.0
            if out[f"AP{group}"] < 0:
                undefined.append(f"AP{group}")
        if self.verbose:
            print(f"LVIS federated {iou_type}: " + "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
            if undefined:
                print(f"  {', '.join(undefined)} = -1 (n/a): no category of that frequency group has ground truth in the "
                      "evaluated images" + (" (categories without a group are counted in AP only)" if any(
                          g is None for g in groups.values()) else ""))
        return out

    def _gt_api(self) -> COCO:
        return self.lvis_gt
