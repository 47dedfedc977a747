"""Pick the evaluator from the dataset's protocol and the model's IoU types.

The dataset says how its benchmark is scored (``'coco'``, ``'lvis'`` federated, ``'voc'``) and
hands over its ground truth as a pycocotools ``COCO`` object; the model says what it outputs
(``iou_types``: ``'bbox'`` for detections, ``'proposal'`` for proposals; ``'segm'`` joins with
masks: ``("bbox", "segm")`` evaluates both, mask metrics prefixed ``segm_``), as torchvision's
detection references choose the evaluator with ``_get_iou_types``.
"""

from __future__ import annotations

from typing import Sequence

from .coco_evaluator import COCOEvaluator, as_coco_api
from .lvis_evaluator import LVISEvaluator
from .proposal_recall import ProposalRecallEvaluator
from .voc_evaluator import VOCEvaluator

PROTOCOLS = ("coco", "lvis", "voc")


def build_evaluator(
    protocol: str,
    coco_gt,
    label_to_cat_id: Sequence[int],
    iou_types: Sequence[str] = ("bbox",),
    class_names: Sequence[str] | None = None,
    verbose: bool = True,
):
    """An evaluator with ``update`` / ``evaluate`` / ``state_dict`` / ``merge``.

    Args:
        protocol: ``'coco'`` (COCOeval), ``'lvis'`` (federated COCOeval) or ``'voc'`` (mAP@0.5).
        coco_gt: the ground truth as a pycocotools ``COCO`` (or a JSON path or dict).
        label_to_cat_id: contiguous label -> category id.
        iou_types: ``("bbox",)``; ``("bbox", "segm")`` (COCO / LVIS: box and mask AP, the
            detections carry ``masks`` [D, H0, W0] bool; the ground truth needs segmentations);
            or ``("proposal",)`` (proposal recall AR@100/300/1000, any protocol).
        class_names: C names (VOC's per-class table).
        verbose: print the evaluator's table.
    """
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {PROTOCOLS}")
    if "proposal" in iou_types:
        if len(iou_types) > 1:
            raise ValueError(f"'proposal' is evaluated on its own, got iou_types {list(iou_types)}")
        return ProposalRecallEvaluator(as_coco_api(coco_gt), verbose=verbose)
    if protocol == "coco":
        return COCOEvaluator(coco_gt, label_to_cat_id, iou_types=iou_types, verbose=verbose)
    if protocol == "lvis":
        return LVISEvaluator(coco_gt, label_to_cat_id, iou_types=iou_types, verbose=verbose)
    if list(iou_types) != ["bbox"]:
        raise ValueError(f"VOC mAP evaluates boxes only, got iou_types {list(iou_types)}")
    return VOCEvaluator.from_coco_api(coco_gt, label_to_cat_id, class_names, verbose=verbose)
