"""Proposal recall (AR@100 / AR@300 / AR@1000), class-agnostic, averaged over IoU 0.5:0.95, two ways.

``AR@k``: pycocotools' COCOeval with ``useCats = 0`` and ``maxDets = [100, 300, 1000]``: for each IoU
threshold in 0.5, 0.55, ..., 0.95 the top-k proposals of each image, in score order, each take the
best still unmatched gt at that threshold (crowd gts ignored); recall = matched / gts; AR@k is the
mean of the recall over the 10 thresholds.

``AR@k_mmdet``: MMDetection's recall (``CocoMetric.fast_eval_recall`` -> ``eval_recalls``), which
the paper's RPN numbers (Table 2: RPN 42.5 / 51.2 / 57.1, Libra RPN 52.1 / 58.3 / 62.5) and
MMDetection's model zoo report: per image, the gts are the boxes neither crowd nor ``ignore``; the
IoU matrix gts x top-k proposals (float32, no +1); G times, the gt whose best remaining proposal has
the highest IoU gets that IoU, and that gt's row and that proposal's column are removed (a gt left
without proposals gets -1); recall(thr) = #gt IoUs >= thr / #gts over the whole dataset; AR@k is the
mean over the same 10 thresholds. The matching ignores the scores (only the top-k cut uses them) and
does not depend on the threshold, so it can pair each gt with a better proposal than COCOeval's
score-ordered matching does, and AR@k_mmdet >= AR@k on the same proposals is typical.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco_evaluator import _to_numpy, as_coco_api


# MMDetection's IoU thresholds of proposal recall: np.linspace(.5, .95, 10).
RECALL_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def _iou_float32(gts: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """[G, P] IoU in float32, widths x2 - x1 (MMDetection's ``bbox_overlaps``, not the legacy +1)."""
    gts, proposals = gts.astype(np.float32), proposals.astype(np.float32)
    if len(gts) == 0 or len(proposals) == 0:
        return np.zeros((len(gts), len(proposals)), dtype=np.float32)
    area_gt = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    area_prop = (proposals[:, 2] - proposals[:, 0]) * (proposals[:, 3] - proposals[:, 1])
    width = np.maximum(np.minimum(gts[:, None, 2], proposals[None, :, 2]) - np.maximum(gts[:, None, 0], proposals[None, :, 0]), 0)
    height = np.maximum(np.minimum(gts[:, None, 3], proposals[None, :, 3]) - np.maximum(gts[:, None, 1], proposals[None, :, 1]), 0)
    overlap = width * height
    union = np.maximum(area_gt[:, None] + area_prop[None, :] - overlap, np.float32(1e-6))
    return (overlap / union).astype(np.float32)


def greedy_gt_ious(ious: np.ndarray) -> np.ndarray:
    """[G] IoU each gt gets from MMDetection's greedy matching of a [G, P] IoU matrix: G times, the gt
    whose best remaining proposal has the highest IoU takes it; both leave the matrix (-1)."""
    ious = ious.copy()
    gt_ious = np.zeros(ious.shape[0], dtype=np.float32)
    if ious.size == 0:
        return gt_ious  # no proposals: every gt gets 0
    for step in range(ious.shape[0]):
        best_proposal = ious.argmax(axis=1)
        best_iou = ious[np.arange(ious.shape[0]), best_proposal]
        gt = int(best_iou.argmax())
        gt_ious[step] = best_iou[gt]  # gt_ious is only counted, its order does not matter
        ious[gt, :] = -1
        ious[:, best_proposal[gt]] = -1
    return gt_ious


def mmdet_average_recall(
    gts: Sequence[np.ndarray], proposals: Sequence[np.ndarray], max_dets: Sequence[int],
    iou_thresholds: np.ndarray = RECALL_IOU_THRESHOLDS,
) -> dict[int, float]:
    """AR@k of MMDetection's ``eval_recalls`` (module docstring) for each k of ``max_dets``.

    Args:
        gts: per image ``[G, 4]`` (x1, y1, x2, y2) gt boxes, crowd / ignored ones already left out.
        proposals: per image ``[P, 4]`` proposals sorted by decreasing score.

    Returns:
        ``{k: AR}``; -1 when there is no gt at all.
    """
    total = sum(len(g) for g in gts)
    out = {}
    for k in max_dets:
        matched = [greedy_gt_ious(_iou_float32(g, p[:k])) for g, p in zip(gts, proposals)]
        values = np.concatenate(matched) if matched else np.zeros(0, dtype=np.float32)
        if total == 0:
            out[int(k)] = -1.0
            continue
        recalls = [(values >= threshold).sum() / float(total) for threshold in iou_thresholds]
        out[int(k)] = float(np.mean(recalls))
    return out


class ProposalRecallEvaluator:
    """Average recall of class-agnostic proposals: ``AR@k`` (COCOeval) and ``AR@k_mmdet``
    (MMDetection's recall, the paper's Table 2 and MMDetection's model zoo); module docstring.

    Args:
        coco_gt: ground truth (``COCO``, JSON path or dict).
        max_dets: proposal budgets k of AR@k.
        area: ``AR@k`` over all gt sizes (``'all'``); ``'small' | 'medium' | 'large'`` also work.
            ``AR@k_mmdet`` is always over all sizes, as MMDetection reports it.
    """

    def __init__(
        self,
        coco_gt: COCO | str | Path | dict,
        max_dets: Sequence[int] = (100, 300, 1000),
        area: str = "all",
        verbose: bool = True,
    ) -> None:
        self.coco_gt = as_coco_api(coco_gt)
        for ann in self.coco_gt.dataset.get("annotations", []):
            ann.setdefault("iscrowd", 0)
        self.max_dets = [int(m) for m in max_dets]
        self.area = area
        self.verbose = verbose
        self.image_ids: list[int] = []
        self.proposals: list[dict] = []
        self._any_cat_id = int(next(iter(sorted(self.coco_gt.cats)))) if self.coco_gt.cats else 1

    def reset(self) -> None:
        self.image_ids, self.proposals = [], []

    def update(self, image_ids: Iterable[int], proposals: Sequence) -> None:
        """Add proposals of a batch, in ORIGINAL image coordinates.

        ``proposals[i]`` is a Tensor/array [P, 4] (assumed sorted by decreasing score) or a dict
        with ``"proposals"`` (or ``"boxes"``) [P, 4] and optionally ``"proposal_scores"`` (or
        ``"scores"``) [P].
        """
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(proposals):
            raise ValueError(f"got {len(image_ids)} image ids but {len(proposals)} proposal sets")
        for image_id, item in zip(image_ids, proposals):
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            scores = None
            if isinstance(item, dict):
                boxes = item["proposals"] if "proposals" in item else item["boxes"]
                scores = item.get("proposal_scores", item.get("scores"))
            else:
                boxes = item
            boxes = _to_numpy(boxes, np.float64).reshape(-1, 4)
            if scores is None:
                # Rank order as the score: the first proposal is the most confident.
                scores = np.arange(len(boxes), 0, -1, dtype=np.float64)
            scores = _to_numpy(scores, np.float64).reshape(-1)
            if len(scores) != len(boxes):
                raise ValueError(f"image {image_id}: {len(boxes)} proposals but {len(scores)} scores")
            order = np.argsort(-scores, kind="stable")[: max(self.max_dets)]
            self.image_ids.append(image_id)
            for b, s in zip(boxes[order].tolist(), scores[order].tolist()):
                self.proposals.append({
                    "image_id": image_id, "category_id": self._any_cat_id,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s),
                })

    def state_dict(self) -> dict:
        return {"image_ids": list(self.image_ids), "proposals": list(self.proposals)}

    def merge(self, other: "ProposalRecallEvaluator | dict") -> None:
        state = other.state_dict() if hasattr(other, "state_dict") else other
        self.image_ids.extend(int(i) for i in state["image_ids"])
        self.proposals.extend(state["proposals"])

    def evaluate(self) -> dict[str, float]:
        keys = [f"AR@{m}" for m in self.max_dets] + [f"AR@{m}_mmdet" for m in self.max_dets]
        if not self.proposals:
            if self.verbose:
                print("ProposalRecallEvaluator: no proposals; every AR is 0")
            return {k: 0.0 for k in keys}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self.coco_gt.loadRes(list(self.proposals))
        coco_eval = COCOeval(self.coco_gt, dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(set(self.image_ids))
        coco_eval.params.useCats = 0
        coco_eval.params.maxDets = list(self.max_dets)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        recall = coco_eval.eval["recall"]  # [T, K=1, A, M]
        a = coco_eval.params.areaRngLbl.index(self.area)
        out = {}
        for m, key in enumerate(keys[: len(self.max_dets)]):
            r = recall[:, :, a, m]
            valid = r[r > -1]
            out[key] = float(valid.mean()) if valid.size else -1.0
        out.update(self._mmdet_recall())
        if self.verbose:
            print("proposal recall: " + "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def per_class_results(self) -> dict[str, list[dict]]:
        """Proposal recall is class-agnostic: no per-class rows (the interface of the other evaluators)."""
        return {}

    def _mmdet_recall(self) -> dict[str, float]:
        """``AR@k_mmdet`` over the evaluated images (MMDetection's ``fast_eval_recall``; all gt sizes)."""
        by_image: dict[int, list[list[float]]] = {image_id: [] for image_id in self.image_ids}
        for proposal in self.proposals:  # each image's proposals are stored by decreasing score
            x, y, w, h = proposal["bbox"]
            by_image[int(proposal["image_id"])].append([x, y, x + w, y + h])
        gts, proposals = [], []
        for image_id in sorted(by_image):
            boxes = [
                [ann["bbox"][0], ann["bbox"][1], ann["bbox"][0] + ann["bbox"][2], ann["bbox"][1] + ann["bbox"][3]]
                for ann in self.coco_gt.imgToAnns.get(image_id, [])
                if not ann.get("iscrowd", 0) and not ann.get("ignore", False)
            ]
            gts.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
            proposals.append(np.asarray(by_image[image_id], dtype=np.float64).reshape(-1, 4))
        recall = mmdet_average_recall(gts, proposals, self.max_dets)
        return {f"AR@{m}_mmdet": recall[m] for m in self.max_dets}
