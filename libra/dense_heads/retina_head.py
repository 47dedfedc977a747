"""RetinaNet's dense head (Lin et al. 2017, the paper's ref. [37]; defaults from the MMDetection
config ``retinanet_r50_fpn_1x_coco``: ``model.bbox_head``, ``train_cfg``, ``test_cfg``).

Two pieces, as for the RPN:

- :class:`RetinaHead`: two towers of 4 x (3x3 conv + ReLU), one for classification and one for
  box regression, then a 3x3 conv to ``A * C`` class logits (sigmoid, no background class) and
  one to ``A * 4`` box deltas. The same head runs on every pyramid level P3..P7.
- :class:`RetinaNetDenseHead`: anchors (9 per location: 3 octave scales x 3 ratios), training
  targets, the loss, and the test-time detections.

Training: each anchor is assigned by max IoU (>= 0.5 positive, < 0.4 negative, in between
ignored; each gt also takes its best anchors, ``min_pos_iou=0``). There is no sampling: every
positive and negative anchor counts (paper Sec. 3.3.2: ~100k locations per image contribute to
the gradient, which is why the focal loss down-weights the easy ones). The classification loss
(sigmoid focal loss) sums over all counted anchors and classes, the box loss (L1; balanced L1
with beta 0.11 for Libra RetinaNet, paper Sec. 4.1.3 / Table 2) over the positives' 4 deltas, both
divided by the number of positives, counted per image as ``max(#pos_i, 1)`` and summed
(MMDetection v2 ``AnchorHead``). Anchors in another image's padding are invalid for an image
(``valid_flags``): never assigned, never counted. Everything runs on the device: no ``.item()``,
no boolean indexing, no ``nonzero()``.

Test, per image and level: the (anchor, class) PAIRS with sigmoid score > 0.05, the top 1000
pairs by score (not the anchors ranked by their best class: one anchor may contribute several
classes), decoded and clipped to the image; over all levels, boxes of zero width or height are
dropped, then class-wise NMS 0.5 and the best 100 are kept
(``test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(iou_threshold=0.5),
max_per_img=100)``). The pair selection is one ``topk`` per level for the whole batch; only the
final thresholding and NMS look at each image, because their outputs vary in size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from libra.anchor_generator import AnchorGenerator
from libra.box_coder import DeltaXYWHBoxCoder
from libra.boxes import clip_boxes_per_image
from libra.losses.basic import L1Loss
from libra.losses.focal_loss import SigmoidFocalLoss
from libra.max_iou_assigner import MaxIoUAssigner
from libra.ops import batched_nms

from .anchor_outputs import assign_anchors, concat_levels, flatten_level

# retinanet_r50_fpn_1x_coco: model.bbox_head.anchor_generator octave_base_scale=4,
# scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128].
RETINANET_ANCHOR_SCALES = tuple(4 * 2 ** (i / 3) for i in range(3))
RETINANET_ANCHOR_RATIOS = (0.5, 1.0, 2.0)
RETINANET_ANCHOR_STRIDES = (8, 16, 32, 64, 128)


class RetinaHead(nn.Module):
    """Class logits and box deltas for every anchor of every pyramid level.

    Args:
        num_classes: C foreground classes (no background output: sigmoid per class).
        in_channels: channels of the pyramid features (256).
        num_anchors: anchors per location ``A`` (9).
        feat_channels: channels of the tower convs (256, ``model.bbox_head.feat_channels``).
        stacked_convs: convs per tower (4, ``model.bbox_head.stacked_convs``).
        prior_prob: initial foreground probability of every class logit (0.01, Lin et al. Sec. 4.1).

    Submodules (names match MMDetection's ``bbox_head.*`` keys without the ConvModule ``.conv``):
    ``cls_convs.{i}``, ``reg_convs.{i}`` (3x3 + ReLU), ``retina_cls`` (3x3, ``A * C`` outputs,
    channel ``a * C + c``), ``retina_reg`` (3x3, ``A * 4`` outputs, channel ``a * 4 + (dx, dy, dw, dh)``).
    Init N(0, 0.01) and bias 0, except the ``retina_cls`` bias ``-ln((1 - prior_prob) / prior_prob)``
    (= -4.595): every anchor starts as background with probability 0.99, so the ~100k easy
    negatives do not swamp the first iterations with a huge loss.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        num_anchors: int = 9,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors

        def tower() -> nn.ModuleList:
            return nn.ModuleList(
                nn.Conv2d(in_channels if i == 0 else feat_channels, feat_channels, kernel_size=3, padding=1)
                for i in range(stacked_convs)
            )

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.retina_cls = nn.Conv2d(feat_channels, num_anchors * num_classes, kernel_size=3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, num_anchors * 4, kernel_size=3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run both towers on every level.

        Args:
            features: per level ``[B, in_channels, H_l, W_l]``.

        Returns:
            ``(cls_logits, deltas)``: per level ``[B, A * C, H_l, W_l]`` and ``[B, A * 4, H_l, W_l]``.
        """
        cls_logits, deltas = [], []
        for feature in features:
            cls_hidden, reg_hidden = feature, feature
            for conv in self.cls_convs:
                cls_hidden = torch.relu(conv(cls_hidden))
            for conv in self.reg_convs:
                reg_hidden = torch.relu(conv(reg_hidden))
            cls_logits.append(self.retina_cls(cls_hidden))
            deltas.append(self.retina_reg(reg_hidden))
        return cls_logits, deltas


class RetinaNetDenseHead(nn.Module):
    """Anchors + :class:`RetinaHead` + training targets + loss + detections.

    Args:
        head: the predictor.
        anchor_generator: default strides (8, 16, 32, 64, 128) (P3..P7), ratios (0.5, 1, 2),
            scales 4 * 2^(i/3), i = 0, 1, 2 (times the stride: 32 to 813 px).
        pos_iou_thr, neg_iou_thr, min_pos_iou: assigner thresholds (0.5, 0.4, 0.0;
            ``train_cfg.assigner``); each gt also takes all anchors tied at its best IoU.
        ignore_iof_thr: anchors covered more than this by an ignore (crowd) box are neither
            positive nor negative; -1 (``train_cfg.assigner.ignore_iof_thr=-1``) disables it.
        cls_loss: ``forward(logits[B, N, C], labels[B, N], weight[B, N], avg_factor)``; default
            the sigmoid focal loss (alpha 0.25, gamma 2).
        box_loss: ``forward(pred[B, N, 4], target, weight[B, N], avg_factor)`` on the positives;
            default L1 (``model.bbox_head.loss_bbox=L1Loss``); balanced L1 (beta 0.11) for Libra.
        score_thr: test-time minimum sigmoid score of a pair (0.05).
        pre_nms_top_n_test: test-time pairs kept per image and level (1000, ``test_cfg.nms_pre``).
        nms_thr: IoU of the class-wise NMS (0.5).
        max_per_img: kept after NMS (100).

    Box deltas are not normalised (``bbox_coder`` means 0, stds 1); anchors crossing the image
    border are kept (``allowed_border=-1``).
    """

    def __init__(
        self,
        head: RetinaHead,
        anchor_generator: AnchorGenerator | None = None,
        *,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.4,
        min_pos_iou: float = 0.0,
        ignore_iof_thr: float = -1.0,
        cls_loss: nn.Module | None = None,
        box_loss: nn.Module | None = None,
        score_thr: float = 0.05,
        pre_nms_top_n_test: int = 1000,
        nms_thr: float = 0.5,
        max_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.anchor_generator = (
            anchor_generator
            if anchor_generator is not None
            else AnchorGenerator(RETINANET_ANCHOR_STRIDES, RETINANET_ANCHOR_RATIOS, RETINANET_ANCHOR_SCALES)
        )
        if head.num_anchors != self.anchor_generator.num_anchors:
            raise ValueError(
                f"RetinaNet head predicts {head.num_anchors} anchors per location but the anchor generator "
                f"makes {self.anchor_generator.num_anchors}; build both with the same ratios/scales"
            )
        self.head = head
        self.num_classes = head.num_classes
        self.box_coder = DeltaXYWHBoxCoder()
        self.assigner = MaxIoUAssigner(
            pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=True, ignore_iof_thr=ignore_iof_thr
        )
        self.cls_loss = cls_loss if cls_loss is not None else SigmoidFocalLoss()
        self.box_loss = box_loss if box_loss is not None else L1Loss()
        self.score_thr = score_thr
        self.pre_nms_top_n_test = pre_nms_top_n_test
        self.nms_thr = nms_thr
        self.max_per_img = max_per_img

    # ------------------------------------------------------------------ loss / predict
    def loss(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]], targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """``{"loss_cls", "loss_bbox"}`` scalars of a batch.

        Args:
            features: pyramid levels ``[B, C_f, H_l, W_l]``, one per anchor stride (P3..P7).
            image_sizes: ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": [G, 4], "labels": [G], "ignore_boxes": [Gi, 4] (optional)}``.
        """
        anchors, logits, deltas, valid = concat_levels(self.anchor_generator, features, image_sizes, *self._outputs(features))
        return self.loss_by_feat(anchors, logits, deltas, targets, valid)

    @torch.no_grad()
    def predict(self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}`` in resized image coordinates."""
        anchors, logits, deltas = self._outputs(features)
        return self.predict_by_feat(anchors, logits, deltas, image_sizes)

    def _outputs(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level anchors ``[N_l, 4]``, class logits ``[B, N_l, C]`` and deltas ``[B, N_l, 4]``."""
        if len(features) != len(self.anchor_generator.strides):
            raise ValueError(
                f"got {len(features)} feature levels for anchor strides {self.anchor_generator.strides}"
            )
        cls_logits, deltas = self.head(features)
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(feature_sizes, device=features[0].device, dtype=torch.float32)
        # Scores and boxes in float32 even under autocast (fp16 cannot hold 1333 px to 1 px).
        flat = [flatten_level(c.float(), d.float(), self.num_classes) for c, d in zip(cls_logits, deltas)]
        return anchors, [f[0] for f in flat], [f[1] for f in flat]

    # ------------------------------------------------------------------ loss
    def loss_by_feat(
        self,
        anchors: Tensor,
        cls_logits: Tensor,
        deltas: Tensor,
        targets: Sequence[dict[str, Tensor]],
        valid: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Focal loss over every counted anchor and class + the box loss over the positives.

        Args:
            anchors: ``[N, 4]`` anchors of all levels (the same for every image).
            cls_logits: ``[B, N, C]`` class logits.
            deltas: ``[B, N, 4]`` predicted deltas.
            targets: per image dicts with ``boxes`` ``[G, 4]``, ``labels`` ``[G]``, optional ``ignore_boxes``.
            valid: ``[B, N]`` bool, anchors inside each image's own padded extent
                (:meth:`AnchorGenerator.valid_flags`); None: all anchors are valid.

        Returns:
            ``{"loss_cls": scalar, "loss_bbox": scalar}``, both divided by
            ``sum_i max(#positives_i, 1)``.
        """
        labels, counted, positives, delta_targets, num_positives = [], [], [], [], []
        background = self.num_classes
        for target, assignment in zip(targets, assign_anchors(self.assigner, anchors, targets, valid)):
            gt_boxes = target["boxes"]
            positive = assignment.gt_inds > 0
            # No sampler: negatives (0) and positives count; ignored and invalid anchors (-1) do not.
            counted.append((assignment.gt_inds >= 0).to(cls_logits.dtype))
            labels.append(torch.where(positive, assignment.labels, torch.full_like(assignment.labels, background)))
            delta_targets.append(self.box_coder.encode_matched(anchors, gt_boxes, assignment.gt_inds - 1, positive))
            positives.append(positive.to(cls_logits.dtype))
            num_positives.append(positive.sum().clamp(min=1))  # MMDetection v2: max(#pos, 1) per image

        avg_factor = torch.stack(num_positives).sum().to(cls_logits.dtype)
        loss_cls = self.cls_loss(cls_logits, torch.stack(labels), torch.stack(counted), avg_factor)
        loss_bbox = self.box_loss(deltas, torch.stack(delta_targets), torch.stack(positives), avg_factor)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    # ------------------------------------------------------------------ test
    @torch.no_grad()
    def predict_by_feat(
        self,
        anchors: Sequence[Tensor],
        cls_logits: Sequence[Tensor],
        deltas: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Top (anchor, class) pairs per level, decode, clip, then class-wise NMS per image.

        Args:
            anchors: per level ``[N_l, 4]``.
            cls_logits: per level ``[B, N_l, C]``.
            deltas: per level ``[B, N_l, 4]``.
            image_sizes: ``(h, w)`` per image (boxes are clipped to it, not to the padded batch).

        Returns:
            Per image ``{"boxes": [D, 4], "scores": [D], "labels": [D] int64}``, ``D <=
            max_per_img``, sorted by decreasing score, in resized image coordinates.
        """
        num_classes = self.num_classes
        level_scores, level_boxes, level_labels = [], [], []
        for level_anchors, level_logits, level_deltas in zip(anchors, cls_logits, deltas):
            # Pair index p = anchor * C + class over the flattened [N_l, C] scores. Taking the top
            # k pairs above the threshold equals taking the top k pairs and then thresholding.
            scores = level_logits.sigmoid().flatten(1)  # [B, N_l * C]
            k = min(self.pre_nms_top_n_test, scores.shape[1])  # static: no host sync
            top_scores, top_pairs = scores.topk(k, dim=1)  # [B, k]
            anchor_index = torch.div(top_pairs, num_classes, rounding_mode="floor")
            top_deltas = level_deltas.gather(1, anchor_index[..., None].expand(-1, -1, 4))
            level_boxes.append(self.box_coder.decode(level_anchors[anchor_index], top_deltas))  # [B, k, 4]
            level_scores.append(top_scores)
            level_labels.append(top_pairs - anchor_index * num_classes)
        scores = torch.cat(level_scores, dim=1)  # [B, K]
        labels = torch.cat(level_labels, dim=1)
        boxes = clip_boxes_per_image(torch.cat(level_boxes, dim=1), image_sizes)  # [B, K, 4]
        keep_mask = (
            (scores > self.score_thr) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        )

        detections = []
        for index in range(scores.shape[0]):
            image_boxes = boxes[index][keep_mask[index]]
            image_scores = scores[index][keep_mask[index]]
            image_labels = labels[index][keep_mask[index]]
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_thr)[: self.max_per_img]
            detections.append({"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]})
        return detections
