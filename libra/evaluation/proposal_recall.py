"""Proposal recall (AR@100 / AR@300 / AR@1000), class-agnostic, averaged over IoU 0.5:0.95.

Computed with pycocotools' COCOeval with ``useCats = 0`` and ``maxDets = [100, 300, 1000]``:
for each IoU threshold in 0.5, 0.55, ..., 0.95 the top-k proposals of each image are greedily
matched to the gts (crowd gts ignored), recall = matched / gts, and AR@k is the mean of the
recall over the 10 thresholds (paper Table 2: Libra RPN 52.1 / 58.3 / 62.5).
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


class ProposalRecallEvaluator:
    """Average recall of class-agnostic proposals.

    Args:
        coco_gt: ground truth (``COCO``, JSON path or dict).
        max_dets: proposal budgets k of AR@k.
        area: report the recall over all gt sizes (``'all'``); ``'small' | 'medium' | 'large'`` also work.
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
        keys = [f"AR@{m}" for m in self.max_dets]
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
        for m, key in enumerate(keys):
            r = recall[:, :, a, m]
            valid = r[r > -1]
            out[key] = float(valid.mean()) if valid.size else -1.0
        if self.verbose:
            print("proposal recall: " + "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    def per_class_results(self) -> dict[str, list[dict]]:
        """Proposal recall is class-agnostic: no per-class rows (the interface of the other evaluators)."""
        return {}

