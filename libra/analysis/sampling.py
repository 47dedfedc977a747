"""The R-CNN stage's training candidates of one image, and three ways of choosing its negatives.

Shared by the Fig. 3 histogram (:mod:`libra.analysis.neg_iou`) and the Fig. 6 drawing
(:mod:`libra.analysis.samples`). Everything here runs outside the training loop, on a model in
eval mode (batch-norm with its running statistics), and never changes the model.

1. :func:`training_proposals`: the model's own RPN proposals with the *training* settings
   (``rpn_pre_nms_top_n_train`` / ``rpn_post_nms_top_n_train``), which are what the R-CNN
   sampler sees during training;
2. :func:`roi_candidates`: steps 1-2 of :meth:`libra.roi_heads.RoIHead.sample` (gt boxes join the
   proposals, max-IoU assignment with the head's own assigner, a gt is its own positive, empty
   proposal slots ignored), keeping what ``sample`` throws away: every candidate's IoU with its
   nearest gt;
3. :func:`sample_with`: libra's sampler (:func:`libra.samplers.sample_pos_neg`) with the head's
   batch size and positive fraction, as random sampling (Eq. 1) or IoU-balanced sampling (Eq. 2);
4. :func:`hard_negatives`: the OHEM-style hard negatives of paper Sec. 3.1 / Fig. 3: the
   candidate negatives with the highest classification loss under the model (its own loss
   module, background label), as many as random sampling takes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from libra.samplers import InstanceBalancedPosSampler, IoUBalancedNegSampler, RandomSampler, sample_pos_neg

# IoU-balanced sampling as the Libra R-CNN config uses it when the model itself samples randomly
# (MMDetection `libra-faster-rcnn_r50_fpn_1x_coco`: `train_cfg.rcnn.sampler.neg_sampler`
# IoUBalancedNegSampler floor_thr=-1 floor_fraction=0 num_bins=3; floor_thr -1 becomes 0 after the
# first call, see libra/samplers/iou_balanced_neg_sampler.py).
DEFAULT_IOU_BALANCED = {"num_bins": 3, "floor_thr": 0.0, "floor_fraction": 0.0}

SAMPLERS = ("random", "iou_balanced")


@dataclass
class RoICandidates:
    """The R-CNN candidates of one image (``N = G + P``: the G gt boxes first, then P proposal slots).

    Attributes:
        boxes: ``[N, 4]`` candidate boxes (resized image coordinates).
        gt_inds: ``[N]`` int64 assignment: -1 ignored (or an empty proposal slot), 0 negative,
            ``i + 1`` positive of gt ``i``.
        max_overlaps: ``[N]`` float IoU of each candidate with its nearest gt (0 without gts).
        labels: ``[N]`` int64 gt label of positives, -1 otherwise.
        gt_boxes: ``[G, 4]``; gt_labels: ``[G]``.
    """

    boxes: Tensor
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor

    @property
    def negatives(self) -> Tensor:
        """``[N]`` bool: the candidate negatives (assigned gt index 0)."""
        return self.gt_inds == 0


@contextmanager
def _rpn_training_settings(rpn: nn.Module) -> Iterator[None]:
    """Let the RPN propose with its training settings (its mode only selects the top-n counts:
    the RPN head is convolutions without batch-norm or dropout)."""
    was_training = rpn.training
    rpn.train(True)
    try:
        yield
    finally:
        rpn.train(was_training)


@torch.no_grad()
def image_features(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Backbone + neck of a two-stage detector: ``[B, 3, H, W] -> [P2, .., P6]``, each ``[B, C, H_l, W_l]``."""
    return model.neck(model.backbone(images))


@torch.no_grad()
def training_proposals(model: nn.Module, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]):
    """The RPN's proposals with its training top-n settings (:class:`libra.structures.Proposals`,
    ``boxes [B, P, 4]``, ``valid [B, P]``); no loss is computed (no targets are passed)."""
    if not hasattr(model, "rpn") or not hasattr(model, "roi_head"):
        raise ValueError(f"{type(model).__name__} has no RPN and R-CNN stage; these figures need a two-stage detector")
    with _rpn_training_settings(model.rpn):
        proposals = model.rpn.predict(list(features), [tuple(s) for s in image_sizes])
    return proposals


@torch.no_grad()
def roi_candidates(roi_head: nn.Module, proposal_boxes: Tensor, proposal_valid: Tensor, target: dict) -> RoICandidates:
    """Steps 1-2 of :meth:`RoIHead.sample` for one image (:meth:`RoIHead.assign`), with the IoUs kept.

    Args:
        roi_head: the model's :class:`~libra.roi_heads.RoIHead` (its ``assign`` is used).
        proposal_boxes: ``[P, 4]``; proposal_valid: ``[P]`` bool.
        target: ``{"boxes": [G, 4], "labels": [G], "ignore_boxes": [Gi, 4] (optional)}``.
    """
    gt_boxes = target["boxes"].to(device=proposal_boxes.device, dtype=proposal_boxes.dtype)
    gt_labels = target["labels"].to(proposal_boxes.device)
    ignore = target.get("ignore_boxes")
    if ignore is not None:
        ignore = ignore.to(device=proposal_boxes.device, dtype=proposal_boxes.dtype)
    candidates, (gt_inds, max_overlaps, labels) = roi_head.assign(
        proposal_boxes, proposal_valid.bool(), gt_boxes, gt_labels, ignore
    )  # the head's own steps 1-2 (RoIHead.assign), gts first
    return RoICandidates(candidates, gt_inds, max_overlaps, labels, gt_boxes, gt_labels)


def sampler_settings(roi_head: nn.Module, sampler: str, iou_balanced: dict | None = None) -> dict:
    """The ``sample_pos_neg`` keyword arguments of ``sampler`` for this head.

    ``'random'``: random positives and negatives (the Faster R-CNN baseline, Eq. 1).
    ``'iou_balanced'``: instance-balanced positives and IoU-balanced negatives (Libra R-CNN,
    Sec. 3.1, Eq. 2) with the head's own settings when it samples that way, else ``iou_balanced``
    (default :data:`DEFAULT_IOU_BALANCED`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    common = {"num": roi_head.batch_size, "pos_fraction": roi_head.positive_fraction}
    if sampler == "random":
        return {**common, "pos_sampler": RandomSampler(), "neg_sampler": RandomSampler()}
    if iou_balanced is None:
        iou_balanced = iou_balanced_settings(roi_head)
    return {**common, "pos_sampler": InstanceBalancedPosSampler(), "neg_sampler": IoUBalancedNegSampler(**iou_balanced)}


def iou_balanced_settings(roi_head: nn.Module) -> dict:
    """``num_bins`` / ``floor_thr`` / ``floor_fraction`` of the head's IoU-balanced negative sampler,
    or :data:`DEFAULT_IOU_BALANCED` when it samples negatives otherwise."""
    sampler = roi_head.neg_sampler
    if isinstance(sampler, IoUBalancedNegSampler):
        return {"num_bins": sampler.num_bins, "floor_thr": sampler.floor_thr, "floor_fraction": sampler.floor_fraction}
    return dict(DEFAULT_IOU_BALANCED)


@torch.no_grad()
def sample_with(
    candidates: RoICandidates, settings: dict, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(positive [N], negative [N])`` bool masks chosen by libra's sampler with ``settings``
    (:func:`sampler_settings`)."""
    return sample_pos_neg(
        candidates.gt_inds, candidates.max_overlaps, labels=candidates.labels, generator=generator, **settings
    )


def per_sample_cls_loss(cls_loss: nn.Module, logits: Tensor, labels: Tensor) -> Tensor:
    """``[K]`` classification loss of each row under the model's own loss module.

    Every libra classification loss is ``loss_weight * sum_i(w_i * l_i) / avg_factor`` (its
    re-weighting factors, e.g. LGR-CE's rho, are detached), so with all weights 1 and
    ``avg_factor = 1`` the gradient with respect to ``w_i`` is exactly ``loss_weight * l_i``.

    Args:
        logits: ``[K, C + 1]`` (background last); labels: ``[K]`` int64.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0)
    with torch.enable_grad():
        weight = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device, requires_grad=True)
        total = cls_loss(logits.detach(), labels, weight, 1.0)
        (per_sample,) = torch.autograd.grad(total, weight)
    return per_sample.detach()


@torch.no_grad()
def hard_negatives(
    roi_head: nn.Module, features: Sequence[Tensor], image_index: int, candidates: RoICandidates, num: int | Tensor
) -> tuple[Tensor, Tensor]:
    """The ``num`` candidate negatives with the highest classification loss (OHEM-style hard mining).

    Args:
        roi_head: the model's RoI head (extractor, box head and classification loss are used).
        features: pyramid levels ``[B, C, H_l, W_l]`` of the batch.
        image_index: this image's index in the batch.
        candidates: this image's :class:`RoICandidates`.
        num: how many to take (the number random sampling takes).

    Returns:
        ``(mask [N] bool, loss [N])``: the chosen negatives and every candidate's background loss
        (0 for non-negatives).
    """
    negative = candidates.negatives
    index = torch.nonzero(negative).squeeze(1)
    loss = candidates.max_overlaps.new_zeros(negative.shape[0])
    mask = torch.zeros_like(negative)
    if index.numel() == 0:
        return mask, loss
    boxes = candidates.boxes[index]
    rois = torch.cat([boxes.new_full((boxes.shape[0], 1), float(image_index)), boxes], dim=1)
    logits, _ = roi_head.box_head(roi_head.roi_extractor(list(features), rois))
    background = torch.full((index.numel(),), roi_head.num_classes, dtype=torch.int64, device=logits.device)
    loss[index] = per_sample_cls_loss(roi_head.cls_loss, logits.float(), background).to(loss.dtype)
    k = min(int(num), index.numel())
    top = loss[index].topk(k).indices
    mask[index[top]] = True
    return mask, loss
