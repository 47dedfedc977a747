"""Detection evaluators: COCO (pycocotools), Pascal VOC (numpy), LVIS (federated) and proposal recall.

``build_evaluator(protocol, coco_gt, label_to_cat_id, iou_types)`` picks one from the dataset's
protocol (``'coco'``, ``'lvis'``, ``'voc'``) and the model's IoU types. Evaluators read nothing from
``libra.data``: the ground truth arrives as a pycocotools ``COCO`` object.

Every evaluator has ``update(image_ids, detections)``, ``evaluate() -> dict[str, float]``
(fractions in [0, 1]) and plain-list state (``state_dict()`` / ``merge(other_or_state)``) so
that per-rank results can be all-gathered and merged on rank 0. Detection boxes are in ORIGINAL
image coordinates.
"""

from .build import PROTOCOLS, build_evaluator
from .coco_evaluator import COCO_METRIC_NAMES, COCOEvaluator, detections_to_coco_results
from .lvis_evaluator import LVIS_METRIC_NAMES, FederatedCOCOeval, LVISEvaluator
from .proposal_recall import ProposalRecallEvaluator
from .voc_evaluator import VOCEvaluator, average_precision

__all__ = [
    "build_evaluator", "PROTOCOLS", "COCOEvaluator", "VOCEvaluator", "LVISEvaluator", "ProposalRecallEvaluator", "FederatedCOCOeval",
    "detections_to_coco_results", "average_precision", "COCO_METRIC_NAMES", "LVIS_METRIC_NAMES",
]
