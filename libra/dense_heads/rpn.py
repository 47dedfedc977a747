"""Region Proposal Network, Faster R-CNN's first stage (Ren et al. 2015; defaults from the
MMDetection config ``faster-rcnn_r50_fpn_1x_coco``, ``model.rpn_head`` / ``train_cfg.rpn`` /
``test_cfg.rpn``).

Two pieces:

- :class:`RPNHead`: a shared 3x3 conv + ReLU followed by two 1x1 convs that predict, for
  each of the ``A`` anchors of every feature cell, one objectness logit (sigmoid) and four
  box deltas. The same head runs on every pyramid level P2..P6.
- :class:`RegionProposalNetwork`: anchors, training targets (max-IoU assignment + sampling,
  optionally with Libra's cap on negatives ``neg_pos_ub``), the loss, and the proposals handed
  to the R-CNN stage (or returned by a standalone proposal model). Its interface is the dense
  heads' one (as :class:`~libra.dense_heads.retina_head.RetinaNetDenseHead`'s): ``loss`` / ``predict`` /
  ``loss_and_predict`` on pyramid features, ``loss_by_feat`` / ``predict_by_feat`` underneath.

Everything that runs per training step stays on the device: no ``.item()``, no boolean
indexing and no ``nonzero()``. In particular the number of proposals is fixed per batch
(``min(post_nms_top_n, #candidates)``): slots that NMS suppressed, or whose box is empty,
are returned with ``valid = False`` instead of being cut away, which would need the host
to know how many survived. The R-CNN stage ignores invalid slots.

In a batch of differently sized images, the anchors that lie in the batch padding beyond an
image's own padded size are invalid for that image: never assigned, sampled or counted
(MMDetection's ``valid_flags``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from libra.anchor_generator import AnchorGenerator
from libra.box_coder import DeltaXYWHBoxCoder
from libra.boxes import clip_boxes_per_image
from libra.losses.basic import L1Loss, binary_cross_entropy_with_logits
from libra.max_iou_assigner import MaxIoUAssigner
from libra.ops import batched_nms
from libra.samplers import RandomSampler, sample_pos_neg
from libra.structures import Proposals

from .anchor_outputs import assign_anchors, concat_levels, flatten_level


class RPNHead(nn.Module):
    """Objectness and box-delta predictor shared by all pyramid levels.

    Args:
        in_channels: channels of the pyramid features (256 for FPN).
        num_anchors: anchors per feature cell ``A`` (3: ratios 0.5, 1, 2 at one scale).
        feat_channels: channels of the shared 3x3 conv.

    Submodules (names match MMDetection's ``rpn_head.*`` keys): ``rpn_conv`` (3x3),
    ``rpn_cls`` (1x1, ``A`` outputs), ``rpn_reg`` (1x1, ``4A`` outputs laid out as
    ``a * 4 + (dx, dy, dw, dh)``). All initialised N(0, 0.01), bias 0.
    """

    def __init__(self, in_channels: int = 256, num_anchors: int = 3, feat_channels: int = 256) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, kernel_size=3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, kernel_size=1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, kernel_size=1)
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run the head on every level.

        Args:
            features: per level ``[B, C, H_l, W_l]``.

        Returns:
            ``(objectness, deltas)``: per level ``[B, A, H_l, W_l]`` logits and
            ``[B, 4A, H_l, W_l]`` deltas.
        """
        objectness, deltas = [], []
        for feature in features:
            hidden = torch.relu(self.rpn_conv(feature))
            objectness.append(self.rpn_cls(hidden))
            deltas.append(self.rpn_reg(hidden))
        return objectness, deltas


class RegionProposalNetwork(nn.Module):
    """Anchors + :class:`RPNHead` + training targets + loss + proposals.

    Args:
        head: the predictor; default ``RPNHead(in_channels, anchor_generator.num_anchors)``.
        anchor_generator: default strides (4, 8, 16, 32, 64), ratios (0.5, 1, 2), scale 8.
        in_channels: pyramid channels, used only when ``head`` is None.
        pos_iou_thr, neg_iou_thr, min_pos_iou: assigner thresholds (0.7, 0.3, 0.3; each gt also
            takes its best anchors when that IoU >= min_pos_iou).
        ignore_iof_thr: anchors covered by more than this fraction by an ignore (crowd) box are
            neither positive nor negative.
        batch_size: anchors sampled per image for the loss (256).
        positive_fraction: at most this fraction of them positive (0.5).
        pos_sampler, neg_sampler: sampler modules (:mod:`libra.samplers`); None: random, both
            (MMDetection's ``train_cfg.rpn.sampler``).
        neg_pos_ub: Libra caps negatives at ``neg_pos_ub * max(1, #pos)`` (5,
            ``libra-faster-rcnn_r50_fpn_1x_coco: train_cfg.rpn.sampler.neg_pos_ub=5``); -1: no cap.
        box_loss: ``forward(pred, target, weight, avg_factor)`` on the positive anchors' deltas;
            default L1 (``loss_bbox=L1Loss``); balanced L1 (paper Sec. 3.3.1) plugs in here.
        pre_nms_top_n_train / _test: per level, candidates kept by score before NMS (2000 / 1000).
        post_nms_top_n_train / _test: proposals kept per image after NMS (1000 / 1000).
        nms_thr: IoU of the per-level NMS (0.7).
        generator: optional RNG for the sampler (None: the global one).

    Anchors crossing the image border are kept (MMDetection's ``allowed_border=-1``).
    """

    def __init__(
        self,
        head: RPNHead | None = None,
        anchor_generator: AnchorGenerator | None = None,
        *,
        in_channels: int = 256,
        pos_iou_thr: float = 0.7,
        neg_iou_thr: float = 0.3,
        min_pos_iou: float = 0.3,
        ignore_iof_thr: float = -1.0,
        batch_size: int = 256,
        positive_fraction: float = 0.5,
        pos_sampler: nn.Module | None = None,
        neg_sampler: nn.Module | None = None,
        neg_pos_ub: float = -1.0,
        box_loss: nn.Module | None = None,
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 1000,
        post_nms_top_n_test: int = 1000,
        nms_thr: float = 0.7,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator if anchor_generator is not None else AnchorGenerator()
        self.head = head if head is not None else RPNHead(in_channels, self.anchor_generator.num_anchors)
        if self.head.num_anchors != self.anchor_generator.num_anchors:
            raise ValueError(
                f"RPN head predicts {self.head.num_anchors} anchors per cell but the anchor generator "
                f"makes {self.anchor_generator.num_anchors}; build both with the same ratios/scales"
            )
        # RPN deltas are not normalised (means 0, stds 1).
        self.box_coder = DeltaXYWHBoxCoder()
        self.assigner = MaxIoUAssigner(
            pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=True, ignore_iof_thr=ignore_iof_thr
        )
        self.batch_size = batch_size
        self.positive_fraction = positive_fraction
        self.pos_sampler = pos_sampler if pos_sampler is not None else RandomSampler()
        self.neg_sampler = neg_sampler if neg_sampler is not None else RandomSampler()
        self.neg_pos_ub = neg_pos_ub
        self.box_loss = box_loss if box_loss is not None else L1Loss()
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thr = nms_thr
        self.generator = generator

    # ------------------------------------------------------------------ loss / predict
    def loss(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """``{"loss_rpn_cls", "loss_rpn_bbox"}`` scalars of a batch, without the proposals (a
        standalone RPN in training needs only its loss).

        Args:
            features: pyramid levels ``[B, C, H_l, W_l]``, one per anchor stride (P2..P6).
            image_sizes: ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": [G, 4], "labels": [G], "ignore_boxes": [Gi, 4] (optional)}``.
        """
        anchors, logits, deltas, valid = concat_levels(self.anchor_generator, features, image_sizes, *self._outputs(features))
        return self.loss_by_feat(anchors, logits, deltas, targets, valid)

    @torch.no_grad()
    def predict(self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]) -> Proposals:
        """Proposals of a batch with the settings of the current mode (train or test).

        Args:
            features, image_sizes: as in :meth:`loss`.
        """
        anchors, logits, deltas = self._outputs(features)
        return self.predict_by_feat(anchors, logits, deltas, image_sizes)

    def loss_and_predict(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]], targets: Sequence[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], Proposals]:
        """The losses and, from the same head outputs, the training proposals that the R-CNN stage
        samples its RoIs from (one head forward, as MMDetection's ``RPNHead.loss_and_predict``).

        Args:
            features, image_sizes, targets: as in :meth:`loss`.
        """
        anchors, logits, deltas = self._outputs(features)
        proposals = self.predict_by_feat(anchors, logits, deltas, image_sizes)
        all_anchors, all_logits, all_deltas, valid = concat_levels(
            self.anchor_generator, features, image_sizes, anchors, logits, deltas
        )
        return self.loss_by_feat(all_anchors, all_logits, all_deltas, targets, valid), proposals

    def _outputs(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level anchors ``[N_l, 4]``, objectness logits ``[B, N_l]`` and deltas ``[B, N_l, 4]``."""
        if len(features) != len(self.anchor_generator.strides):
            raise ValueError(f"got {len(features)} feature levels for anchor strides {self.anchor_generator.strides}")
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(
            [tuple(f.shape[-2:]) for f in features], device=features[0].device, dtype=torch.float32
        )
        # Boxes are decoded in float32 even under autocast (fp16 cannot hold 1333 px to 1 px).
        flat = [flatten_level(o.float(), d.float(), 1) for o, d in zip(objectness, deltas)]
        return anchors, [f[0].squeeze(-1) for f in flat], [f[1] for f in flat]

    # ------------------------------------------------------------------ proposals
    @torch.no_grad()
    def predict_by_feat(
        self,
        anchors: Sequence[Tensor],
        logits: Sequence[Tensor],
        deltas: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> Proposals:
        """Top-k per level, decode, clip, per-level NMS, top-k per image (all images at once).

        Args:
            anchors: per level ``[N_l, 4]``.
            logits: per level ``[B, N_l]`` objectness logits.
            deltas: per level ``[B, N_l, 4]``.
            image_sizes: ``(h, w)`` per image.

        Returns:
            :class:`Proposals` with ``P = min(post_nms_top_n, sum_l min(pre_nms_top_n, N_l))``.
        """
        mode = "train" if self.training else "test"
        pre_nms_top_n, post_nms_top_n = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        batch = logits[0].shape[0]
        num_levels = len(anchors)
        device = logits[0].device

        level_scores, level_boxes, level_ids = [], [], []
        for level, (level_anchors, level_logits, level_deltas) in enumerate(zip(anchors, logits, deltas)):
            k = min(pre_nms_top_n, level_logits.shape[1])  # static: no host sync
            top_logits, top_index = level_logits.detach().topk(k, dim=1)  # [B, k], sorted
            top_deltas = level_deltas.detach().gather(1, top_index[..., None].expand(-1, -1, 4))
            level_boxes.append(self.box_coder.decode(level_anchors[top_index], top_deltas))  # [B, k, 4]
            level_scores.append(top_logits.sigmoid())
            level_ids.append(torch.full((k,), level, dtype=torch.int64, device=device))
        scores = torch.cat(level_scores, dim=1)  # [B, K]
        boxes = clip_boxes_per_image(torch.cat(level_boxes, dim=1), image_sizes)  # [B, K, 4]
        num_candidates = scores.shape[1]

        # Empty boxes (w <= 0 or h <= 0 after clipping) are not removed, which would need a
        # host sync; they get score -inf so that they can never be kept below.
        nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        nms_scores = torch.where(nonempty, scores, torch.full_like(scores, float("-inf")))

        # One NMS for the whole batch: group = image * num_levels + level, so boxes of different
        # images or levels never suppress each other (MMDetection RPNHead: batched NMS 0.7 with
        # the level as the class, test_cfg.rpn.nms=dict(type="nms", iou_threshold=0.7)).
        image_ids = torch.arange(batch, device=device)[:, None] * num_levels
        groups = (image_ids + torch.cat(level_ids)[None, :]).reshape(-1)
        keep = batched_nms(boxes.reshape(-1, 4), nms_scores.reshape(-1), groups, self.nms_thr)
        kept = torch.zeros(batch * num_candidates, dtype=torch.bool, device=device)
        kept[keep] = True
        kept = kept.view(batch, num_candidates) & nonempty

        # Top proposals per image by score; slots past the survivors come out as -inf.
        ranked = torch.where(kept, scores, torch.full_like(scores, float("-inf")))
        num_proposals = min(post_nms_top_n, num_candidates)
        top_scores, top_index = ranked.topk(num_proposals, dim=1)  # [B, P]
        valid = torch.isfinite(top_scores)
        proposal_boxes = boxes.gather(1, top_index[..., None].expand(-1, -1, 4))
        proposal_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        return Proposals(proposal_boxes, proposal_scores, valid)

    # ------------------------------------------------------------------ loss
    def loss_by_feat(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        targets: Sequence[dict[str, Tensor]],
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """BCE on sampled anchors + the box loss on positive deltas, both over the sampled count.

        Args:
            anchors: ``[N, 4]`` anchors of all levels (same for every image).
            logits: ``[B, N]`` objectness logits.
            deltas: ``[B, N, 4]`` predicted deltas.
            targets: per image dicts with ``boxes`` ``[G, 4]``, ``labels`` ``[G]``, optional ``ignore_boxes``.
            valid: ``[B, N]`` bool, anchors inside each image's own padded extent
                (:meth:`AnchorGenerator.valid_flags`); None: all anchors are valid.

        Returns:
            ``{"loss_rpn_cls": scalar, "loss_rpn_bbox": scalar}``.
        """
        objectness_targets, sampled_masks, positive_masks, delta_targets, avg_factors = [], [], [], [], []
        for target, assignment in zip(targets, assign_anchors(self.assigner, anchors, targets, valid)):
            gt_boxes = target["boxes"]
            positive, negative = sample_pos_neg(
                assignment.gt_inds,
                assignment.max_overlaps,
                num=self.batch_size,
                pos_fraction=self.positive_fraction,
                pos_sampler=self.pos_sampler,
                neg_sampler=self.neg_sampler,
                neg_pos_ub=self.neg_pos_ub,
                labels=assignment.labels,
                generator=self.generator,
            )
            encoded = self.box_coder.encode_matched(anchors, gt_boxes, assignment.gt_inds - 1, positive)
            objectness_targets.append(positive.to(logits.dtype))
            sampled_masks.append((positive | negative).to(logits.dtype))
            positive_masks.append(positive.to(logits.dtype))
            delta_targets.append(encoded)
            # MMDetection counts at least one positive and one negative per image.
            avg_factors.append(positive.sum().clamp(min=1) + negative.sum().clamp(min=1))

        avg_factor = torch.stack(avg_factors).sum().to(logits.dtype)
        loss_cls = binary_cross_entropy_with_logits(
            logits, torch.stack(objectness_targets), torch.stack(sampled_masks), avg_factor
        )
        loss_bbox = self.box_loss(deltas, torch.stack(delta_targets), torch.stack(positive_masks), avg_factor)
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}
