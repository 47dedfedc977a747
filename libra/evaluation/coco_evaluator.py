"""COCO box and mask AP with pycocotools' COCOeval.

The evaluator only collects results as plain Python lists (`state_dict` / `merge`), so in
multi-GPU evaluation each rank fills its own evaluator, the trainer all-gathers the states and
rank 0 merges them and calls `evaluate`.

Detections are expected in ORIGINAL image coordinates, boxes ``[x1, y1, x2, y2]``; they are
written as COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``. With
``"segm"`` in ``iou_types`` each detection dict also holds ``masks`` ``[D, H0, W0]`` bool (the
original image's size), written as ``{"image_id", "category_id", "segmentation": RLE, "score"}``
(RLE counts as str) and reported under the same names prefixed ``segm_`` (``segm_AP``, ...);
the box metrics keep their names.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from libra.coco_api import load_coco_api as as_coco_api
from libra.masks import InvalidMaskError, MaskWarning, check_segmentation, encode_rle

COCO_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Metric-name prefix per IoU type: box metrics keep the plain names.
METRIC_PREFIXES: dict[str, str] = {"bbox": "", "segm": "segm_"}


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


def detections_to_segm_results(
    image_id: int, detection: Mapping, label_to_cat_id: Sequence[int], image_size: tuple[int, int] | None = None,
    keep: Sequence[int] | None = None,
) -> list[dict]:
    """One image's detection dict (``masks [D, H0, W0]`` bool, ``scores [D]``, ``labels [D]``) -> COCO
    ``segm`` result entries (RLE ``segmentation``, no ``bbox`` key: pycocotools' ``loadRes`` would
    take the entries for box results).

    Args:
        image_size: ``(H0, W0)`` the masks must have (the gt image's height and width).
        keep: indices of the detections to write (default all), in that order.
    """
    if "masks" not in detection:
        raise ValueError(f"image {image_id}: iou_types include 'segm' but the detection dict has no 'masks' [D, H, W]")
    masks = detection["masks"]
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    scores = _to_numpy(detection["scores"], np.float64).reshape(-1)
    labels = _to_numpy(detection["labels"], np.int64).reshape(-1)
    if masks.ndim != 3 or not (masks.shape[0] == len(scores) == len(labels)):
        raise ValueError(
            f"image {image_id}: masks must be [D, H, W] with D = {len(scores)} (scores) = {len(labels)} (labels), "
            f"got shape {masks.shape}"
        )
    if image_size is not None and masks.shape[0] and tuple(masks.shape[1:]) != tuple(image_size):
        raise ValueError(
            f"image {image_id}: masks are {masks.shape[1]} x {masks.shape[2]} but the image is {image_size[0]} x {image_size[1]}; "
            "paste them into the original image"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_to_cat_id)):
        raise ValueError(f"image {image_id}: labels must be in [0, {len(label_to_cat_id) - 1}], got {labels.min()}..{labels.max()}")
    if keep is not None:
        keep = np.asarray(keep, np.int64)
        masks, scores, labels = masks[keep], scores[keep], labels[keep]
    cat_ids = np.asarray(label_to_cat_id, np.int64)[labels] if len(labels) else np.zeros(0, np.int64)
    return [
        {"image_id": int(image_id), "category_id": int(c), "segmentation": rle, "score": round(float(s), 5)}
        for rle, s, c in zip(encode_rle(masks), scores.tolist(), cat_ids.tolist())
    ]


def check_iou_types(iou_types: Sequence[str], supported: Sequence[str], owner: str) -> tuple[str, ...]:
    """``iou_types`` as a tuple, or a ValueError naming what ``owner`` can evaluate."""
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    unknown = [t for t in iou_types if t not in supported]
    if not iou_types or unknown or len(set(iou_types)) != len(iou_types):
        raise ValueError(f"{owner} evaluates iou_types {list(supported)}, got {list(iou_types)}")
    return iou_types


def segm_ground_truth_problems(coco_gt: COCO) -> list[tuple[dict, str]]:
    """``[(annotation, why its segmentation cannot be evaluated), ...]`` over the annotations of the
    ground truth's images: none, an empty or malformed polygon, a polygon outside the image, an
    RLE of another size or whose run lengths do not add up (:func:`libra.masks.check_segmentation`,
    the training pipeline's checks). Nothing is decoded and pycocotools sees none of it."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskWarning)  # parts dropped only in non-strict checks
        for ann in coco_gt.dataset.get("annotations", []):
            info = coco_gt.imgs.get(ann.get("image_id"))
            if info is None:  # not an image of the ground truth: COCOeval never reads it
                continue
            try:
                check_segmentation(ann.get("segmentation"), info.get("height", 0), info.get("width", 0),
                                   ann.get("image_id"), ann.get("id"), strict=True)
            except (InvalidMaskError, TypeError, ValueError) as error:
                reason = str(error).split("invalid segmentation: ", 1)[-1]
                problems.append((ann, reason))
    return problems


def check_segm_ground_truth(coco_gt: COCO, iou_types: Sequence[str], owner: str) -> None:
    """'segm' needs a valid ``segmentation`` on every ground-truth annotation (COCOeval rasterises
    them with pycocotools, which raises TypeErrors on malformed polygons and loops for hours on an
    RLE claiming billions of pixels): refuse, in one line naming the first bad annotation, before
    pycocotools sees any. ``libra.data`` drops such annotations from an evaluation split with a
    warning (as training drops them) before the evaluator is built."""
    if "segm" not in iou_types:
        return
    problems = segm_ground_truth_problems(coco_gt)
    if not problems:
        return
    ann, reason = problems[0]
    more = f" ({len(problems) - 1} more annotations have the same problem or another)" if len(problems) > 1 else ""
    if reason == "no segmentation" or not ann.get("segmentation"):
        raise ValueError(
            f"{owner}: iou_type 'segm' needs a 'segmentation' (polygons or RLE) in every ground-truth annotation; "
            f"annotation {ann.get('id')} of image {ann.get('image_id')} has none{more}"
        )
    raise ValueError(
        f"{owner}: iou_type 'segm' needs a valid segmentation in every ground-truth annotation; annotation "
        f"{ann.get('id')} of image {ann.get('image_id')} has an invalid one ({reason}){more}: fix or remove it"
    )


def run_cocoeval(coco_eval: COCOeval, image_ids: Sequence[int], verbose: bool) -> None:
    """evaluate + accumulate (quiet) and summarize (printed when ``verbose``)."""
    coco_eval.params.imgIds = list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # progress chatter of pycocotools
        coco_eval.evaluate()
        coco_eval.accumulate()
    if verbose:
        coco_eval.summarize()  # prints the standard table
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.summarize()


class COCOEvaluator:
    """COCO AP (AP, AP50, AP75, APs, APm, APl; fractions in [0, 1], -1 where undefined).

    Args:
        coco_gt: ground truth (``COCO`` object, instances JSON path or dict).
        label_to_cat_id: contiguous label -> COCO category id (``dataset.label_to_cat_id``).
        iou_types: what to evaluate: ``("bbox",)`` (the detector's boxes), ``("bbox", "segm")``
            (boxes and ``masks``; mask metrics are named ``segm_AP``, ...) or ``("segm",)``.
        verbose: print pycocotools' standard 12-line table (one per IoU type) in `evaluate`.
    """

    supported_iou_types: tuple[str, ...] = ("bbox", "segm")

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
        check_segm_ground_truth(self.coco_gt, self.iou_types, type(self).__name__)
        self.verbose = verbose
        self.image_ids: list[int] = []
        self.detections: list[dict] = []  # bbox results
        self.segm_detections: list[dict] = []  # segm results (RLE)
        self.coco_eval: COCOeval | None = None  # of the last IoU type evaluated
        self.coco_evals: dict[str, COCOeval] = {}

    def reset(self) -> None:
        self.image_ids, self.detections, self.segm_detections, self.coco_eval, self.coco_evals = [], [], [], None, {}

    def _image_size(self, image_id: int) -> tuple[int, int]:
        info = self.coco_gt.imgs[image_id]
        return int(info["height"]), int(info["width"])

    def update(self, image_ids: Iterable[int], detections: Sequence[Mapping]) -> None:
        """Add one batch: ``detections[i]`` (boxes in original coords) belongs to ``image_ids[i]``."""
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(detections):
            raise ValueError(f"got {len(image_ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground-truth annotation file")
            bbox = detections_to_coco_results(image_id, det, self.label_to_cat_id) if "bbox" in self.iou_types else []
            segm = (
                detections_to_segm_results(image_id, det, self.label_to_cat_id, self._image_size(image_id))
                if "segm" in self.iou_types else []
            )
            self.image_ids.append(image_id)
            self.detections.extend(bbox)
            self.segm_detections.extend(segm)

    def state_dict(self) -> dict:
        """Plain-list state (picklable, for ``all_gather_object``)."""
        return {
            "image_ids": list(self.image_ids), "detections": list(self.detections), "segm_detections": list(self.segm_detections),
        }

    def merge(self, other: "COCOEvaluator | Mapping") -> None:
        """Add another evaluator's (or `state_dict`'s) results, e.g. from other ranks."""
        state = other.state_dict() if hasattr(other, "state_dict") else other
        self.image_ids.extend(int(i) for i in state["image_ids"])
        self.detections.extend(state["detections"])
        self.segm_detections.extend(state.get("segm_detections", []))

    def results(self, iou_type: str | None = None) -> list[dict]:
        """COCO results JSON list (to dump into the work directory) of ``iou_type`` (default: the
        first of ``iou_types``, i.e. the boxes when they are evaluated)."""
        iou_type = iou_type or self.iou_types[0]
        if iou_type not in self.iou_types:
            raise ValueError(f"{type(self).__name__} collects {list(self.iou_types)}, not {iou_type!r}")
        return list(self.detections if iou_type == "bbox" else self.segm_detections)

    def _results_for_eval(self, iou_type: str) -> list[dict]:
        # loadRes adds keys (area, id, iscrowd; for boxes a polygon) to the entries it gets: copies.
        return [dict(d) for d in (self.detections if iou_type == "bbox" else self.segm_detections)]

    def evaluate(self) -> dict[str, float]:
        """Metrics of every IoU type: box ``AP, AP50, AP75, APs, APm, APl`` and mask ``segm_AP``, ...."""
        image_ids = sorted(set(self.image_ids)) or sorted(self.coco_gt.getImgIds())
        metrics: dict[str, float] = {}
        self.coco_evals = {}
        for iou_type in self.iou_types:
            prefix = METRIC_PREFIXES[iou_type]
            results = self._results_for_eval(iou_type)
            if not results:
                if self.verbose:
                    print(f"COCOEvaluator: no {'mask ' if prefix else ''}detections; every {prefix}AP is 0")
                metrics.update({prefix + k: 0.0 for k in COCO_METRIC_NAMES})
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = self.coco_gt.loadRes(results)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
            if self.verbose and len(self.iou_types) > 1:
                print(f"COCO {iou_type}:")
            run_cocoeval(coco_eval, image_ids, self.verbose)
            self.coco_eval = self.coco_evals[iou_type] = coco_eval
            metrics.update({prefix + k: float(v) for k, v in zip(COCO_METRIC_NAMES, coco_eval.stats[:6])})
        return metrics

    def per_class_results(self) -> dict[str, list[dict]]:
        """Per-class AP of the last :meth:`evaluate`, per IoU type: one row per class in label order,
        ``{"label", "category_id", "name", "num_gts", "AP", "AP50"}``, read from COCOeval's precision
        array (IoU thresholds x recall points x categories x areas x max detections) at area "all"
        and the largest max-detections: AP is the mean over thresholds 0.50:0.95 and recall points,
        AP50 the mean at IoU 0.5. A class without ground truth in the evaluated images has -1 (and
        is left out of the overall AP, so the overall AP is the mean of the other rows' AP)."""
        return {iou_type: per_class_rows(coco_eval, self.label_to_cat_id, self._gt_api())
                for iou_type, coco_eval in self.coco_evals.items()}

    def _gt_api(self) -> COCO:
        return self.coco_gt


def per_class_rows(coco_eval: COCOeval, label_to_cat_id: Sequence[int], coco_gt: COCO) -> list[dict]:
    """The rows of :meth:`COCOEvaluator.per_class_results` from an accumulated ``coco_eval``."""
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    cat_index = {int(c): k for k, c in enumerate(coco_eval.params.catIds)}
    image_ids = list(coco_eval.params.imgIds)
    rows = []
    for label, cat_id in enumerate(label_to_cat_id):
        k = cat_index.get(int(cat_id))
        values = precision[:, :, k, 0, -1] if k is not None else np.full((1, 1), -1.0)
        valid, valid50 = values[values > -1], values[0][values[0] > -1]
        num_gts = len(coco_gt.getAnnIds(imgIds=image_ids, catIds=[int(cat_id)], iscrowd=False))
        rows.append({
            "label": label,
            "category_id": int(cat_id),
            "name": str(coco_gt.cats[int(cat_id)].get("name", cat_id)),
            "num_gts": num_gts,
            "AP": float(valid.mean()) if valid.size else -1.0,
            "AP50": float(valid50.mean()) if valid50.size else -1.0,
        })
    return rows

