"""Named detector configurations as plain dicts, and ``build_model`` to assemble them.

Presets (each default cites the MMDetection config it comes from; expected COCO numbers and
their protocols are in the README):

- ``faster_rcnn_r50_fpn``: the baseline, MMDetection ``faster-rcnn_r50_fpn_1x_coco`` (37.4 box AP
  end to end): random samplers, FPN, L1 box loss, softmax CE.
- ``libra_faster_rcnn_r50_fpn``: MMDetection ``libra-faster-rcnn_r50_fpn_1x_coco`` (the conference
  version, 38.3 AP): IoU-balanced negatives + instance-balanced positives (paper Sec. 3.1), FPN +
  balanced feature pyramid with a non-local refiner at P4 (Sec. 3.2), balanced L1 loss
  (Sec. 3.3.1), and the RPN negatives capped at 5 x #positives (``train_cfg.rpn.sampler.neg_pos_ub=5``).
- ``libra_faster_rcnn_r50_fpn_lgr``: the journal version: LGR-L1 (Eq. 11-14) and LGR-CE
  (Eq. 15-19, alpha 0.8, gamma 1.0, Table 7) instead of balanced L1 and CE.
- ``faster_rcnn_r101_fpn``, ``libra_faster_rcnn_r101_fpn``, ``libra_faster_rcnn_x101_64x4d_fpn``;
  ``libra_faster_rcnn_x101_64x4d_fpn_dcn`` (Table 1's 47.2 AP row: deformable convolutions in c3-c5,
  4conv1fc GN head).
- ``retinanet_r50_fpn``: one-stage RetinaNet, MMDetection ``retinanet_r50_fpn_1x_coco``: FPN P3..P7
  (conv extra levels on C5), RetinaNet head, sigmoid focal loss, L1 box loss, no sampling.
- ``libra_retinanet_r50_fpn``: MMDetection ``libra-retinanet_r50_fpn_1x_coco`` (paper Table 2): + balanced
  feature pyramid refined at P4 (``refine_level=1``) and balanced L1 with beta 0.11; RetinaNet has no
  sampler, so IoU-balanced sampling does not apply (paper Sec. 4.1.3).
- ``retinanet_r101_fpn``, ``retinanet_x101_64x4d_fpn``, ``libra_retinanet_r101_fpn``,
  ``libra_retinanet_x101_64x4d_fpn``.
- ``rpn_r50_fpn`` (and ``rpn_r101_fpn``): the standalone proposal model, MMDetection
  ``rpn_r50_fpn_1x_coco`` (paper Table 2): 2000 candidates per level before NMS, 1000 proposals.
- ``libra_rpn_r50_fpn``: "Libra RPN" (Table 2); the paper gives no config, the choice (balanced
  feature pyramid, negatives capped at 5 x positives, balanced L1 with beta 0.11) is argued at
  ``_LIBRA_RPN`` below.
- ``fast_rcnn_r50_fpn``, ``libra_fast_rcnn_r50_fpn``: the R-CNN stage alone on pre-computed
  proposals (MMDetection ``fast-rcnn_r50_fpn_1x_coco`` / ``libra-fast-rcnn_r50_fpn_1x_coco``), the
  protocol of the paper's ablations; ``TABLE3_ABLATION`` applied to ``fast_rcnn_r50_fpn`` is Table 3.
- ``mask_rcnn_r50_fpn``: Mask R-CNN, MMDetection ``mask-rcnn_r50_fpn_1x_coco`` (box 38.2 / mask 34.7;
  paper Table 8: 37.1 / 34.1): Faster R-CNN plus the FCN mask branch (4 x conv3x3 256, deconv,
  28 x 28 per-class masks, BCE); ``mask_rcnn_r101_fpn``, ``mask_rcnn_x101_64x4d_fpn``.
- ``libra_mask_rcnn_r50_fpn``: Libra Mask R-CNN (paper Sec. 4.1.5, Table 8: 39.5 / 35.3): the Libra
  R-CNN components of ``libra_faster_rcnn_r50_fpn`` (the conference losses: balanced L1 + CE) plus the
  same mask branch; ``libra_mask_rcnn_r50_fpn_lgr`` with the journal's LGR-L1 + LGR-CE instead (the
  paper does not say which Table 8 used).
- LVIS v1 (paper Sec. 4.2, Table 9; 1203 classes; test: score > 0.001, 300 detections per image;
  trained with repeat factor sampling, see ``libra.recipes``): ``mask_rcnn_r50_fpn_lvis`` (22.0 mask
  AP, APr 10.7, box 22.3), ``libra_mask_rcnn_r50_fpn_lvis`` (class-balanced positives, Sec. 3.1 last
  paragraph, + the Libra components: 23.3, 14.5, 23.9) and ``libra_mask_rcnn_r50_fpn_lvis_bcr`` (+
  bucketed class re-weighting of a sigmoid classifier, Sec. 3.3.3, scored with sigmoids: 25.0,
  16.8, 25.8). BCR needs the training set's class frequencies: ``build_model(...,
  class_image_counts=dataset.image_counts_per_class())``. The two Libra LVIS presets use the
  conference box loss (balanced L1; CE or BCR for classes); ``libra_mask_rcnn_r50_fpn_lvis_lgr``
  (LGR-L1 + LGR-CE) and ``libra_mask_rcnn_r50_fpn_lvis_bcr_lgr`` (LGR-L1 + BCR) are the journal's
  losses (the paper does not say which Table 9 used).

A preset's ``detector`` (``'faster_rcnn'``, ``'mask_rcnn'``, ``'retinanet'``, ``'rpn'`` or ``'fast_rcnn'``) says which
composition :func:`build_model` assembles; each detector has its own keys (a RetinaNet preset has no
``rpn_*``, ``roi_*``, sampler or box-head keys, a Fast R-CNN preset no ``rpn_*`` keys, an RPN preset
only backbone, neck and ``rpn_*`` keys), and the detector itself cannot be overridden.

Every component is a keyword override of :func:`build_model`, so the paper's ablation
(Table 3) is a list of flags, see ``TABLE3_ABLATION``::

    build_model("faster_rcnn_r50_fpn", 80, sampler="iou_balanced", neck="bfp", box_loss="lgr_l1")

Overrides (any key of a preset dict):

- ``backbone``: ``'resnet50' | 'resnet101' | 'resnext101_64x4d'`` or an ``nn.Module`` returning
  4 feature maps and exposing ``out_channels`` (e.g. a tiny backbone for tests).
- ``sampler``: ``'random'`` or ``'iou_balanced'`` (IoU-balanced negatives + instance-balanced
  positives, as in MMDetection's Libra config); ``pos_sampler`` / ``neg_sampler`` override each
  half (``'random' | 'instance_balanced' | 'class_balanced'`` and ``'random' | 'iou_balanced'``);
  ``num_bins``, ``floor_thr``, ``floor_fraction`` configure the IoU-balanced sampler.
  ``rpn_sampler`` is the same switch for the RPN's anchors (``'random'`` in every paper config).
- ``neck``: ``'fpn' | 'bfp' | 'pafpn' | 'bpafpn'``; ``refine_type``: ``'non_local' | 'conv' | None``;
  ``refine_level``; ``fpn_channels``; ``fpn_start_level`` (0: from C2), ``fpn_num_outs`` (5),
  ``fpn_extra_levels`` (``'max_pool' | 'on_input' | 'on_output'``, see :mod:`libra.necks.fpn`).
- ``box_loss``: ``'smooth_l1' | 'l1' | 'balanced_l1' | 'lgr_l1'`` with ``box_loss_alpha``,
  ``box_loss_gamma``, ``box_loss_beta`` and ``box_loss_weight`` (paper Table 6; alpha and gamma
  apply to balanced L1 / LGR-L1, beta to all but L1); ``rpn_box_loss`` and ``rpn_box_loss_beta``
  (with ``rpn_box_loss_alpha``, ``rpn_box_loss_gamma``) for the RPN (``'l1'`` in every paper config
  but Libra RPN's).
- ``cls_loss``: ``'ce' | 'lgr_ce' | 'sigmoid_ce' | 'bcr'`` with ``lgr_ce_alpha``, ``lgr_ce_gamma``;
  ``'bcr'`` is bucketed class re-weighting (Eq. 20-23) with ``bcr_s`` (S buckets, 10), ``bcr_t``
  (temperature t, 0.025) and ``bcr_a`` (turning point a, 0.5), the keys of the paper's Table 10;
  a sigmoid loss (``'sigmoid_ce'``, ``'bcr'``) makes the test-time scores per-class sigmoids
  (paper Sec. 3.3.3). ``bcr_samples``: ``'all'`` (Eq. 20 for every sampled RoI, the default) or
  ``'foreground'`` (background RoIs keep weight 1 on every class, as in equalization loss).
- Mask R-CNN presets: ``mask_conv_channels`` (256), ``mask_num_convs`` (4), ``mask_class_agnostic``,
  ``mask_loss_weight`` (1.0) and the test-time ``mask_thr`` (0.5).
- ``box_head``: ``'shared2fc' | '4conv1fc'``; ``fc_channels``.
- backbone: ``frozen_stages``, ``backbone_norm`` (``'frozen' | 'bn'``), ``width_per_group``,
  ``stage_blocks`` (e.g. ``(1, 1, 1, 1)``), ``dcn`` (None or ``{"type": "DCN" | "DCNv2",
  "deform_groups": 1, "fallback_on_stride": False}``) and ``stage_with_dcn`` (4 bools, c2..c5), all
  for the named ResNets.
- ``rpn_neg_pos_ub``, ``rpn_batch_size``, ``roi_batch_size``.
- ``roi_sampling_ratio``: bilinear samples per bin side of the box RoI extractor's RoIAlign (0 or -1:
  adaptive, MMDetection v2/v3; 2: MMDetection v1's ``sample_num=2``, the paper's ablations).
- ``roi_match_low_quality``: the R-CNN assigner's low-quality matches (``RoIHead(match_low_quality=...)``,
  min_pos_iou 0.5): False for Faster / Fast R-CNN, True for Mask R-CNN, as MMDetection's
  ``train_cfg.rcnn.assigner`` of ``faster-rcnn_r50_fpn.py`` / ``mask-rcnn_r50_fpn.py``.
- ``ignore_iof_thr``: -1 (MMDetection's ``train_cfg.{rpn,rcnn}.assigner.ignore_iof_thr=-1``: crowd /
  difficult boxes are left out of training); a value such as 0.5 makes them ignore regions.
- test settings: ``score_thr``, ``nms_thr``, ``max_per_img``, ``rpn_pre_nms_top_n_train``,
  ``rpn_pre_nms_top_n_test``, ``rpn_post_nms_top_n_train``, ``rpn_post_nms_top_n_test``, ``rpn_nms_thr``.
- RetinaNet presets: the backbone and neck keys above, ``ignore_iof_thr``, ``box_loss`` (with its
  parameters; beta 0.11), ``head_channels`` / ``head_stacked_convs`` (the towers), ``focal_alpha`` /
  ``focal_gamma``, and the test settings ``pre_nms_top_n_test`` (pairs per level), ``score_thr``,
  ``nms_thr``, ``max_per_img``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import nn

from libra.anchor_generator import AnchorGenerator
from libra.backbone import build_resnet, load_pretrained
from libra.dense_heads import RegionProposalNetwork, RetinaHead, RetinaNetDenseHead, RPNHead
from libra.dense_heads.retina_head import RETINANET_ANCHOR_RATIOS, RETINANET_ANCHOR_SCALES
from libra.detectors import Detector, FastRCNN, FasterRCNN, MaskRCNN, ProposalNetwork, RetinaNet
from libra.losses import (
    BCR_SAMPLES,
    BalancedL1Loss,
    BCRSigmoidCrossEntropyLoss,
    CrossEntropyLoss,
    L1Loss,
    LGRCrossEntropyLoss,
    LGRL1Loss,
    SigmoidCrossEntropyLoss,
    SigmoidFocalLoss,
    SmoothL1Loss,
)
from libra.necks import FPN, PAFPN, BalancedFeaturePyramid, neck_strides
from libra.samplers import (
    ClassBalancedPosSampler,
    InstanceBalancedPosSampler,
    IoUBalancedNegSampler,
    RandomSampler,
)
from libra.roi_heads import (
    FCNMaskHead,
    MaskRoIHead,
    MultiLevelRoIExtractor,
    RoIHead,
    Shared2FCBoxHead,
    Shared4Conv1FCBoxHead,
    mask_roi_extractor,
)

_BASELINE: dict[str, Any] = {
    "detector": "faster_rcnn",  # the composition build_model assembles (libra.detectors)
    "backbone": "resnet50",
    "frozen_stages": 1,  # model.backbone.frozen_stages=1: stem and layer1
    # "frozen": BN statistics fixed (model.backbone.norm_eval=True, the ImageNet-pretrained recipe);
    # "bn": trainable statistics, which a backbone trained from scratch needs (the synthetic recipe).
    "backbone_norm": "frozen",
    "width_per_group": None,  # None: the named backbone's (64 for ResNet, 4 for ResNeXt 64x4d)
    "stage_blocks": None,  # None: the depth's, e.g. (3, 4, 6, 3); (1, 1, 1, 1) for a shallow net
    # Deformable convolutions in the backbone (MMDetection's DCN configs: model.backbone.dcn =
    # dict(type='DCN', deform_groups=1, fallback_on_stride=False), stage_with_dcn=(False, True,
    # True, True)); None: plain convs.
    "dcn": None,
    "stage_with_dcn": None,
    "neck": "fpn",
    "fpn_channels": 256,
    "fpn_start_level": 0,
    "fpn_num_outs": 5,
    "fpn_extra_levels": "max_pool",
    "refine_type": "non_local",
    "refine_level": 2,
    # Crowd / difficult boxes: with a threshold in (0, 1], candidates covered more than this by one
    # are neither positive nor negative (both stages); -1 leaves them out, as MMDetection does.
    "ignore_iof_thr": -1.0,
    # RPN (model.rpn_head, train_cfg.rpn, test_cfg.rpn)
    "rpn_batch_size": 256,
    "rpn_sampler": "random",
    "rpn_neg_pos_ub": -1,
    "rpn_box_loss": "l1",
    "rpn_box_loss_alpha": 0.5,
    "rpn_box_loss_gamma": 1.5,
    "rpn_box_loss_beta": 1.0,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_train": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_thr": 0.7,
    # R-CNN (model.roi_head, train_cfg.rcnn, test_cfg.rcnn)
    "roi_batch_size": 512,
    # train_cfg.rcnn.assigner.match_low_quality: False in faster-rcnn_r50_fpn.py (and Fast R-CNN's),
    # True in mask-rcnn_r50_fpn.py (with min_pos_iou=0.5, RoIHead's default): RoIHead(match_low_quality=...).
    "roi_match_low_quality": False,
    # bbox_roi_extractor.roi_layer.sampling_ratio=0 (v2/v3; adaptive): the box RoI extractor's
    # MultiLevelRoIExtractor(sampling_ratio=...). MMDetection v1 (the paper's ablations) used
    # sample_num=2: the recipe "v1" of libra.recipes sets it.
    "roi_sampling_ratio": 0,
    "sampler": "random",
    "pos_sampler": None,  # None: follow ``sampler``
    "neg_sampler": None,
    "num_bins": 3,
    "floor_thr": 0.0,
    "floor_fraction": 0.0,
    "box_head": "shared2fc",
    "fc_channels": 1024,
    "box_loss": "l1",
    "box_loss_alpha": 0.5,
    "box_loss_gamma": 1.5,
    "box_loss_beta": 1.0,
    "box_loss_weight": 1.0,
    "cls_loss": "ce",
    "lgr_ce_alpha": 0.8,
    "lgr_ce_gamma": 1.0,
    # Bucketed class re-weighting (cls_loss="bcr", paper Sec. 3.3.3): S buckets, temperature t and
    # turning point a of Eq. 22-23 ("We set S as 10, a as 0.5 and t as 0.025"; Table 10 varies t, S).
    "bcr_s": 10,
    "bcr_t": 0.025,
    "bcr_a": 0.5,
    # Which samples BCR re-weights (BCRSigmoidCrossEntropyLoss(samples=...)): "all" is Eq. 20 as
    # written, for every sampled RoI (background ones too); "foreground" exempts background RoIs, as
    # equalization loss (the paper's ref. [53]) exempts background proposals. README "LVIS" says why
    # the presets keep "all".
    "bcr_samples": "all",
    "score_thr": 0.05,
    "nms_thr": 0.5,
    "max_per_img": 100,
}

_LIBRA: dict[str, Any] = {
    **_BASELINE,
    "neck": "bfp",
    "rpn_neg_pos_ub": 5,
    "sampler": "iou_balanced",
    "box_loss": "balanced_l1",
}

# RetinaNet (MMDetection retinanet_r50_fpn_1x_coco; backbone as above: model.backbone frozen_stages=1,
# norm_eval=True). Only the keys a one-stage detector reads.
_RETINANET: dict[str, Any] = {
    "detector": "retinanet",
    "backbone": "resnet50",
    "frozen_stages": 1,
    "backbone_norm": "frozen",
    "width_per_group": None,
    "stage_blocks": None,
    "dcn": None,
    "stage_with_dcn": None,
    # model.neck: FPN(start_level=1, add_extra_convs='on_input', num_outs=5): P3..P7, P6 a 3x3
    # stride-2 conv on C5, P7 one on P6 without a ReLU in between (relu_before_extra_convs=False).
    "neck": "fpn",
    "fpn_channels": 256,
    "fpn_start_level": 1,
    "fpn_num_outs": 5,
    "fpn_extra_levels": "on_input",
    # libra-retinanet_r50_fpn_1x_coco: model.neck[1] BFP(num_levels=5, refine_level=1,
    # refine_type='non_local'): P3..P7 gathered at P4.
    "refine_type": "non_local",
    "refine_level": 1,
    "ignore_iof_thr": -1.0,  # train_cfg.assigner.ignore_iof_thr=-1
    # model.bbox_head: feat_channels=256, stacked_convs=4; loss_cls FocalLoss(alpha=0.25, gamma=2.0)
    "head_channels": 256,
    "head_stacked_convs": 4,
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    # model.bbox_head.loss_bbox: L1Loss; libra-retinanet_r50_fpn_1x_coco: BalancedL1Loss(alpha=0.5,
    # gamma=1.5, beta=0.11) (beta is unused by L1)
    "box_loss": "l1",
    "box_loss_alpha": 0.5,
    "box_loss_gamma": 1.5,
    "box_loss_beta": 0.11,
    "box_loss_weight": 1.0,
    # test_cfg: nms_pre=1000 (pairs per level), score_thr=0.05, nms iou_threshold=0.5, max_per_img=100
    "pre_nms_top_n_test": 1000,
    "score_thr": 0.05,
    "nms_thr": 0.5,
    "max_per_img": 100,
}

_LIBRA_RETINANET: dict[str, Any] = {**_RETINANET, "neck": "bfp", "box_loss": "balanced_l1"}

# The standalone RPN (MMDetection rpn_r50_fpn_1x_coco): backbone + FPN + the RPN of Faster R-CNN,
# trained alone; test_cfg.rpn nms_pre=2000 (per level), max_per_img=1000, nms 0.7. Only the keys a
# proposal model reads (its proposals are not used in training, so there are no train top-n keys).
_RPN_KEYS = (
    "backbone", "frozen_stages", "backbone_norm", "width_per_group", "stage_blocks", "dcn", "stage_with_dcn",
    "neck", "fpn_channels",
    "fpn_start_level", "fpn_num_outs", "fpn_extra_levels", "refine_type", "refine_level", "ignore_iof_thr",
    "rpn_batch_size", "rpn_sampler", "rpn_neg_pos_ub", "rpn_box_loss", "rpn_box_loss_alpha", "rpn_box_loss_gamma",
    "rpn_box_loss_beta", "rpn_nms_thr", "num_bins", "floor_thr", "floor_fraction",
)
_RPN: dict[str, Any] = {
    "detector": "rpn",
    **{key: _BASELINE[key] for key in _RPN_KEYS},
    "rpn_pre_nms_top_n_test": 2000,
    "rpn_post_nms_top_n_test": 1000,
}

# "Libra RPN" (paper Table 2, AR@100 52.1 vs 42.5): the paper gives no config, so this preset applies
# the balancing components that exist for an RPN, each as in the Libra configs of MMDetection:
# - the balanced feature pyramid on the FPN (Sec. 3.2; libra-faster-rcnn neck[1], refined at P4);
# - negatives capped at 5 x positives (libra-faster-rcnn train_cfg.rpn.sampler.neg_pos_ub=5): with
#   few gts most of the 256 anchors per image are easy negatives;
# - balanced L1 for the anchor regression (Sec. 3.3.1, alpha 0.5, gamma 1.5) with beta 0.11, the
#   value libra-retinanet_r50_fpn_1x_coco uses for its anchor deltas, which like the RPN's are not
#   normalised (stds 1; the R-CNN's beta 1.0 belongs to deltas divided by stds 0.1 / 0.2).
# IoU-balanced sampling is left out: the RPN's negatives have IoU < 0.3 with every gt, below the
# range the IoU bins split (paper Fig. 3 concerns R-CNN negatives); ``rpn_sampler='iou_balanced'``
# turns it on. README "Standalone RPN" gives the synthetic-data measurements of each component.
_LIBRA_RPN: dict[str, Any] = {
    **_RPN,
    "neck": "bfp",
    "rpn_neg_pos_ub": 5,
    "rpn_box_loss": "balanced_l1",
    "rpn_box_loss_beta": 0.11,
}

# Fast R-CNN (MMDetection fast-rcnn_r50_fpn_1x_coco): the R-CNN stage of Faster R-CNN on
# pre-computed proposals, the protocol of the paper's ablations (Sec. 4.1.4, Tables 3-7). All the
# keys of the two-stage presets except the RPN's.
_FAST_RCNN: dict[str, Any] = {
    "detector": "fast_rcnn",
    **{key: value for key, value in _BASELINE.items() if key != "detector" and not key.startswith("rpn_")},
}
# libra-fast-rcnn_r50_fpn_1x_coco: the Libra R-CNN components of the R-CNN stage.
_LIBRA_FAST_RCNN: dict[str, Any] = {**_FAST_RCNN, "neck": "bfp", "sampler": "iou_balanced", "box_loss": "balanced_l1"}

# Mask R-CNN (MMDetection mask-rcnn_r50_fpn_1x_coco, configs/_base_/models/mask-rcnn_r50_fpn.py):
# Faster R-CNN's keys plus model.roi_head.mask_head = FCNMaskHead(num_convs=4, in_channels=256,
# conv_out_channels=256, loss_mask=CrossEntropyLoss(use_mask=True, loss_weight=1.0)) and
# test_cfg.rcnn.mask_thr_binary=0.5; mask_roi_extractor RoIAlign 14x14 and train_cfg.rcnn.mask_size=28
# are fixed (libra.roi_heads.mask_head).
_MASK_RCNN: dict[str, Any] = {
    **_BASELINE,
    "detector": "mask_rcnn",
    "roi_match_low_quality": True,  # train_cfg.rcnn.assigner.match_low_quality=True, min_pos_iou=0.5
    "mask_conv_channels": 256,
    "mask_num_convs": 4,
    "mask_class_agnostic": False,
    "mask_loss_weight": 1.0,
    "mask_thr": 0.5,
}
# Libra Mask R-CNN (paper Sec. 4.1.5): the Libra R-CNN components of _LIBRA and the same mask branch.
_LIBRA_MASK_RCNN: dict[str, Any] = {
    **_MASK_RCNN,
    "neck": "bfp",
    "rpn_neg_pos_ub": 5,
    "sampler": "iou_balanced",
    "box_loss": "balanced_l1",
}
# LVIS v1 test settings (paper Sec. 4.2: "The output threshold for objects is set as 0.001";
# MMDetection mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1: test_cfg.rcnn max_per_img=300, the LVIS
# evaluation's 300 detections per image).
LVIS_TEST_SETTINGS: dict[str, Any] = {"score_thr": 0.001, "max_per_img": 300}

PRESETS: dict[str, dict[str, Any]] = {
    "faster_rcnn_r50_fpn": dict(_BASELINE),
    "libra_faster_rcnn_r50_fpn": dict(_LIBRA),
    "libra_faster_rcnn_r50_fpn_lgr": {**_LIBRA, "box_loss": "lgr_l1", "cls_loss": "lgr_ce"},
    "faster_rcnn_r101_fpn": {**_BASELINE, "backbone": "resnet101"},
    "libra_faster_rcnn_r101_fpn": {**_LIBRA, "backbone": "resnet101"},
    "libra_faster_rcnn_x101_64x4d_fpn": {**_LIBRA, "backbone": "resnext101_64x4d"},
    # Paper Table 1's strongest row (47.2 AP on COCO test-dev): ResNeXt-64x4d-101 with deformable
    # convolutions (DCN v1 in the 3x3 convs of c3-c5, MMDetection's DCN configs) and the 4conv1fc
    # GN box head of the Table 1 protocol (Sec. 4.1.3: 2x schedule, multi-scale 640-800 training,
    # frozen BN; train.py --schedule 2x --multi-scale). The protocol's ATSS-style constraint of
    # proposal centres inside the gt boxes is not implemented (README).
    "libra_faster_rcnn_x101_64x4d_fpn_dcn": {
        **_LIBRA, "backbone": "resnext101_64x4d", "box_head": "4conv1fc",
        "dcn": {"type": "DCN", "deform_groups": 1, "fallback_on_stride": False},
        "stage_with_dcn": (False, True, True, True),
    },
    "retinanet_r50_fpn": dict(_RETINANET),
    "libra_retinanet_r50_fpn": dict(_LIBRA_RETINANET),
    "retinanet_r101_fpn": {**_RETINANET, "backbone": "resnet101"},
    "retinanet_x101_64x4d_fpn": {**_RETINANET, "backbone": "resnext101_64x4d"},
    "libra_retinanet_r101_fpn": {**_LIBRA_RETINANET, "backbone": "resnet101"},
    "libra_retinanet_x101_64x4d_fpn": {**_LIBRA_RETINANET, "backbone": "resnext101_64x4d"},
    "rpn_r50_fpn": dict(_RPN),
    "libra_rpn_r50_fpn": dict(_LIBRA_RPN),
    "rpn_r101_fpn": {**_RPN, "backbone": "resnet101"},
    "fast_rcnn_r50_fpn": dict(_FAST_RCNN),
    "libra_fast_rcnn_r50_fpn": dict(_LIBRA_FAST_RCNN),
    "mask_rcnn_r50_fpn": dict(_MASK_RCNN),
    "libra_mask_rcnn_r50_fpn": dict(_LIBRA_MASK_RCNN),
    "mask_rcnn_r101_fpn": {**_MASK_RCNN, "backbone": "resnet101"},
    "mask_rcnn_x101_64x4d_fpn": {**_MASK_RCNN, "backbone": "resnext101_64x4d"},
    # Paper Table 9 (LVIS v1 val, repeat factor sampling): the Mask R-CNN baseline ...
    "mask_rcnn_r50_fpn_lvis": {**_MASK_RCNN, **LVIS_TEST_SETTINGS},
    # ... Libra Mask R-CNN with class-balanced positives ("we first sample an equal number of
    # positive samples for each class, then adopt the instance balanced sampling to samples of each
    # class", Sec. 3.1) and IoU-balanced negatives ...
    "libra_mask_rcnn_r50_fpn_lvis": {**_LIBRA_MASK_RCNN, **LVIS_TEST_SETTINGS, "pos_sampler": "class_balanced"},
    # ... and with bucketed class re-weighting (Sec. 3.3.3; sigmoid classifier, sigmoid scores at test).
    "libra_mask_rcnn_r50_fpn_lvis_bcr": {
        **_LIBRA_MASK_RCNN, **LVIS_TEST_SETTINGS, "pos_sampler": "class_balanced", "cls_loss": "bcr",
    },
    # The Libra Mask R-CNN presets above use the conference version's losses (balanced L1, Sec. 3.3.1;
    # CE or BCR); the paper does not say whether Tables 8-9 used those or the journal's LGR losses
    # (LGR-L1, Eq. 11-14, and LGR-CE, Eq. 15-19, alpha 0.8, gamma 1.0 as libra_faster_rcnn_r50_fpn_lgr).
    # With BCR only the box loss changes (LGR-CE is a softmax loss, BCR a sigmoid one).
    "libra_mask_rcnn_r50_fpn_lgr": {**_LIBRA_MASK_RCNN, "box_loss": "lgr_l1", "cls_loss": "lgr_ce"},
    "libra_mask_rcnn_r50_fpn_lvis_lgr": {
        **_LIBRA_MASK_RCNN, **LVIS_TEST_SETTINGS, "pos_sampler": "class_balanced", "box_loss": "lgr_l1",
        "cls_loss": "lgr_ce",
    },
    "libra_mask_rcnn_r50_fpn_lvis_bcr_lgr": {
        **_LIBRA_MASK_RCNN, **LVIS_TEST_SETTINGS, "pos_sampler": "class_balanced", "box_loss": "lgr_l1",
        "cls_loss": "bcr",
    },
}

# The paper's Table 3 (ResNet-50 FPN, COCO val2017): each row adds one component to the baseline,
# whose box loss is smooth L1 (beta 1): Table 6 lists "Baseline 35.9" apart from "L1 loss (1.0)
# 36.4". The paper ran these rows as Fast R-CNN on the same pre-computed proposals (Sec. 4.1.4):
# apply them to ``fast_rcnn_r50_fpn`` with a proposals file for the paper's protocol; applied to the
# end-to-end ``faster_rcnn_r50_fpn`` they are the same components, not the same numbers.
TABLE3_ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("baseline (35.9 AP)", {"box_loss": "smooth_l1"}),
    ("+ IoU-balanced sampling (36.8)", {"sampler": "iou_balanced", "box_loss": "smooth_l1"}),
    ("+ balanced feature pyramid (37.7)", {"sampler": "iou_balanced", "neck": "bfp", "box_loss": "smooth_l1"}),
    ("+ LGR-L1 (38.5)", {"sampler": "iou_balanced", "neck": "bfp", "box_loss": "lgr_l1"}),
    (
        "+ LGR-CE (39.0)",
        {"sampler": "iou_balanced", "neck": "bfp", "box_loss": "lgr_l1", "cls_loss": "lgr_ce"},
    ),
]

# The values a key with fixed choices takes (the command line's ``choices`` come from here too).
CHOICES: dict[str, tuple] = {
    "detector": ("faster_rcnn", "mask_rcnn", "retinanet", "rpn", "fast_rcnn"),
    "backbone": ("resnet50", "resnet101", "resnext101_64x4d"),
    "backbone_norm": ("frozen", "bn"),
    "sampler": ("random", "iou_balanced"),
    "rpn_sampler": ("random", "iou_balanced"),
    "pos_sampler": (None, "random", "instance_balanced", "class_balanced"),
    "neg_sampler": (None, "random", "iou_balanced"),
    "neck": ("fpn", "bfp", "pafpn", "bpafpn"),
    "fpn_extra_levels": ("max_pool", "on_input", "on_output"),
    "refine_type": ("non_local", "conv", None),
    "box_loss": ("smooth_l1", "l1", "balanced_l1", "lgr_l1"),
    "rpn_box_loss": ("smooth_l1", "l1", "balanced_l1", "lgr_l1"),
    "cls_loss": ("ce", "lgr_ce", "sigmoid_ce", "bcr"),
    "bcr_samples": BCR_SAMPLES,
    "box_head": ("shared2fc", "4conv1fc"),
}

# The sampler modules each sampler name builds (libra.samplers). A new sampler is one file there
# plus one entry here; from Python, an ``nn.Module`` with the sampler interface can be passed as
# ``pos_sampler`` / ``neg_sampler`` directly (``build_model(..., neg_sampler=MySampler())``).
POS_SAMPLERS: dict[str, type[nn.Module]] = {
    "random": RandomSampler,
    "instance_balanced": InstanceBalancedPosSampler,
    "class_balanced": ClassBalancedPosSampler,
}
NEG_SAMPLERS: dict[str, type[nn.Module]] = {"random": RandomSampler, "iou_balanced": IoUBalancedNegSampler}

# Keys that also take a module (Python only; a checkpoint records names).
_MODULE_KEYS = ("backbone", "pos_sampler", "neg_sampler")

# Integer keys and their smallest value (widths and counts: a zero would fail deep inside a module).
_MIN_INT: dict[str, int] = {
    "fpn_channels": 1, "fpn_num_outs": 1, "fc_channels": 1, "head_channels": 1, "head_stacked_convs": 1, "num_bins": 1,
    "rpn_batch_size": 1, "roi_batch_size": 1, "rpn_pre_nms_top_n_train": 1, "rpn_pre_nms_top_n_test": 1,
    "rpn_post_nms_top_n_train": 1, "rpn_post_nms_top_n_test": 1, "pre_nms_top_n_test": 1, "max_per_img": 1,
    "mask_conv_channels": 1, "mask_num_convs": 0, "width_per_group": 1, "fpn_start_level": 0, "refine_level": 0,
    "frozen_stages": -1, "bcr_s": 2, "rpn_neg_pos_ub": -1, "roi_sampling_ratio": -1,
}
# Number keys with a range: probabilities / IoUs in [0, 1], and the BCR temperature t > 0 (Eq. 23).
_UNIT_FLOATS = ("score_thr", "nms_thr", "rpn_nms_thr", "mask_thr", "floor_fraction", "focal_alpha", "bcr_a")
_POSITIVE_FLOATS = ("bcr_t", "box_loss_beta", "rpn_box_loss_beta", "box_loss_alpha", "rpn_box_loss_alpha")
# Keys whose preset default is None but whose values have a type.
_NONE_DEFAULT_KINDS = {"width_per_group": "int", "stage_blocks": "4 ints", "dcn": "dcn", "stage_with_dcn": "4 bools"}
_DCN_TYPES = ("DCN", "DCNv2")

# The detector class each ``detector`` value builds (its ``iou_types`` say what it outputs).
DETECTOR_CLASSES: dict[str, type[Detector]] = {
    "faster_rcnn": FasterRCNN,
    "mask_rcnn": MaskRCNN,
    "retinanet": RetinaNet,
    "rpn": ProposalNetwork,
    "fast_rcnn": FastRCNN,
}


def available_presets() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(PRESETS)


def check_setting(key: str, value: Any, default: Any) -> Any:
    """``value`` of preset key ``key`` checked and normalised (a JSON list becomes a tuple, a whole
    float an int), or a ValueError that says what the key takes. The one validator of preset keys:
    :func:`preset_config` (so ``build_model``), ``--set`` and the dedicated flags all go through it."""
    shown = f"(preset default {default!r})"
    if key in _MODULE_KEYS and isinstance(value, nn.Module):
        return value
    choices = CHOICES.get(key)
    none_ok = (default is None and key not in _NONE_DEFAULT_KINDS) or (choices is not None and None in choices)
    none_ok = none_ok or key in _NONE_DEFAULT_KINDS
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if none_ok:
            return None
        raise ValueError(f"expected a value, not None {shown}")
    if choices is not None:
        if isinstance(value, str) and value in choices:
            return value
        listed = ", ".join("null" if c is None else str(c) for c in choices)
        module = " or a module" if key in _MODULE_KEYS else ""
        raise ValueError(f"expected one of {listed}{module} {shown}")
    kind = _NONE_DEFAULT_KINDS.get(key)
    if kind is None:
        kind = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int) else
                "float" if isinstance(default, float) else "str" if isinstance(default, str) else None)
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false {shown}")
        return value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {shown}")
        if key in _MIN_INT and value < _MIN_INT[key]:
            raise ValueError(f"expected an integer >= {_MIN_INT[key]} {shown}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"expected a finite number {shown}")
        if key in _UNIT_FLOATS and not 0.0 <= value <= 1.0:
            raise ValueError(f"expected a number in [0, 1] {shown}")
        if key in _POSITIVE_FLOATS and not value > 0:
            raise ValueError(f"expected a number > 0 {shown}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string {shown}")
        return value
    if kind == "4 ints":
        if not (
            isinstance(value, (list, tuple))
            and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        ):
            raise ValueError(f"expected null or 4 integers >= 1, e.g. [1, 1, 1, 1] {shown}")
        return tuple(value)
    if kind == "4 bools":
        if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, bool) for v in value)):
            raise ValueError(f"expected null or 4 booleans (stages c2..c5), e.g. [false, true, true, true] {shown}")
        return tuple(value)
    if kind == "dcn":
        if (
            not isinstance(value, dict)
            or value.get("type") not in _DCN_TYPES
            or set(value) - {"type", "deform_groups", "fallback_on_stride"}
            or not isinstance(value.get("deform_groups", 1), int) or isinstance(value.get("deform_groups", 1), bool)
            or value.get("deform_groups", 1) < 1
            or not isinstance(value.get("fallback_on_stride", False), bool)
        ):
            raise ValueError(
                'expected null or {"type": "DCN" or "DCNv2", "deform_groups": int >= 1, "fallback_on_stride": bool} '
                f"{shown}"
            )
        return {"type": value["type"], "deform_groups": value.get("deform_groups", 1),
                "fallback_on_stride": value.get("fallback_on_stride", False)}
    return value


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The complete, validated config of a model: preset ``name`` with ``overrides`` applied (a new
    dict). Every key is the constructor argument it feeds (module docstring); the result is what a
    checkpoint records (``model_config``) and what :func:`build_model` builds.

    Raises:
        ValueError: one line naming the preset, key or value that is not accepted, and what is.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"unknown preset {name!r}; {hint}available presets: {', '.join(available_presets())}")
    defaults = PRESETS[name]
    config = dict(defaults)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(config), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown key(s) {unknown} for the {config['detector']} preset {name}{hint}; valid keys: {', '.join(sorted(config))}"
        )
    if overrides.get("detector", config["detector"]) != config["detector"]:
        # The other detector's keys are not in this preset: pick a preset of that detector.
        others = sorted(n for n, c in PRESETS.items() if c["detector"] == overrides["detector"])
        raise ValueError(
            f"detector={overrides['detector']!r} cannot override the {config['detector']} preset {name!r}; "
            f"choose a preset of that detector ({', '.join(others) or 'none'})"
        )
    for key, value in overrides.items():
        try:
            config[key] = check_setting(key, value, defaults[key])
        except ValueError as error:
            raise ValueError(f"{key}={value!r}: {error}") from None
    _check_combination(config)
    return config


def _check_combination(config: dict[str, Any]) -> None:
    """Keys that are valid alone but not together (one line naming both)."""
    if config.get("neck") in ("pafpn", "bpafpn") and (config["fpn_start_level"] != 0 or config["fpn_extra_levels"] != "max_pool"):
        raise ValueError("the PAFPN neck supports only fpn_start_level=0 and fpn_extra_levels='max_pool'")
    if config.get("stage_with_dcn") is not None and any(config["stage_with_dcn"]) and config.get("dcn") is None:
        raise ValueError("stage_with_dcn names deformable stages but dcn is null: set dcn={\"type\": \"DCN\"} too")
    if config["fpn_start_level"] > 3:
        raise ValueError(f"fpn_start_level={config['fpn_start_level']}: a ResNet has 4 stages (C2..C5), choose 0..3")
    used = 4 - config["fpn_start_level"]
    if config["fpn_num_outs"] < used:
        raise ValueError(
            f"fpn_num_outs={config['fpn_num_outs']} is fewer than the {used} backbone maps the FPN uses from "
            f"fpn_start_level={config['fpn_start_level']}"
        )
    if config.get("neck") in ("bfp", "bpafpn") and config["refine_level"] >= config["fpn_num_outs"]:
        raise ValueError(f"refine_level={config['refine_level']} must name one of the fpn_num_outs={config['fpn_num_outs']} levels")
    if config["detector"] in ("faster_rcnn", "mask_rcnn", "fast_rcnn") and config["fpn_num_outs"] < 4:
        raise ValueError(f"fpn_num_outs={config['fpn_num_outs']}: the RoI extractor pools from 4 pyramid levels")


def preset_iou_types(name: str) -> tuple[str, ...]:
    """What the detector of preset ``name`` outputs (its class's ``iou_types``, e.g. ``("bbox", "segm")``
    for Mask R-CNN), without building it: the engine decodes masks only for a model that has ``"segm"``."""
    return tuple(DETECTOR_CLASSES[preset_config(name)["detector"]].iou_types)


def build_model(
    name: str,
    num_classes: int,
    pretrained: str | None = None,
    class_image_counts: Any = None,
    trust_pretrained: bool = False,
    **overrides: Any,
) -> Detector:
    """Assemble the detector of preset ``name``.

    Args:
        name: one of :func:`available_presets`.
        num_classes: C foreground classes (80 for COCO, 20 for VOC, 1203 for LVIS v1).
        pretrained: path to torchvision-format ImageNet backbone weights, or None (random init).
        class_image_counts: ``[C]`` training images per class (f_i of Eq. 21,
            ``dataset.image_counts_per_class()``), read by ``cls_loss='bcr'`` only. Without it a BCR
            model can be evaluated (its checkpoint holds the weights) but not trained.
        **overrides: any key of the preset (module docstring); a checkpoint's ``model_config``
            (the complete config) rebuilds the same model.

    Returns:
        A :class:`FasterRCNN`, :class:`MaskRCNN`, :class:`RetinaNet`, :class:`ProposalNetwork` or
        :class:`FastRCNN` (the preset's ``detector``) in training mode.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    config = preset_config(name, **overrides)
    backbone = _build_backbone(config, pretrained, trust_pretrained)
    neck = _build_neck(config, backbone)
    strides = neck_strides(neck)
    detector = config["detector"]
    if detector == "retinanet":
        return RetinaNet(backbone, neck, _build_retina_head(config, num_classes, strides))
    if detector == "fast_rcnn":
        return FastRCNN(backbone, neck, _build_roi_head(config, num_classes, strides, class_image_counts))
    rpn = _build_rpn(config, strides)
    if detector == "rpn":
        return ProposalNetwork(backbone, neck, rpn, num_classes)
    roi_head = _build_roi_head(config, num_classes, strides, class_image_counts)
    if detector == "mask_rcnn":
        return MaskRCNN(backbone, neck, rpn, roi_head)
    return FasterRCNN(backbone, neck, rpn, roi_head)


def _build_backbone(config: dict[str, Any], pretrained: str | None, trust: bool = False) -> nn.Module:
    backbone = config["backbone"]
    if isinstance(backbone, str):
        backbone = build_resnet(
            backbone,
            frozen_stages=config["frozen_stages"],
            norm_eval=config["backbone_norm"] == "frozen",
            width_per_group=config["width_per_group"],
            stage_blocks=config["stage_blocks"],
            dcn=config["dcn"],
            stage_with_dcn=config["stage_with_dcn"],
        )
        if pretrained is not None:
            load_pretrained(backbone, pretrained, trust=trust)
    elif not hasattr(backbone, "out_channels"):
        raise ValueError("a backbone module must expose out_channels (and out_strides, default 4, 8, 16, 32)")
    elif pretrained is not None:
        raise ValueError("pretrained weights can only be loaded into a named backbone")
    return backbone


def _build_neck(config: dict[str, Any], backbone: nn.Module) -> nn.Sequential:
    """FPN (or PAFPN) on the backbone's maps, then the balanced feature pyramid for ``bfp`` / ``bpafpn``."""
    kind, channels, num_outs = config["neck"], config["fpn_channels"], config["fpn_num_outs"]
    in_channels = list(backbone.out_channels)
    in_strides = tuple(getattr(backbone, "out_strides", (4, 8, 16, 32)))
    if kind in ("pafpn", "bpafpn"):
        pyramid: nn.Module = PAFPN(in_channels, channels, num_outs=num_outs, in_strides=in_strides)
    else:
        pyramid = FPN(
            in_channels,
            channels,
            num_outs=num_outs,
            start_level=config["fpn_start_level"],
            extra_levels=config["fpn_extra_levels"],
            in_strides=in_strides,
        )
    modules: list[nn.Module] = [pyramid]
    if kind in ("bfp", "bpafpn"):
        modules.append(
            BalancedFeaturePyramid(
                channels, num_levels=num_outs, refine_level=config["refine_level"], refine_type=config["refine_type"]
            )
        )
    return nn.Sequential(*modules)


def _build_rpn(config: dict[str, Any], strides: tuple[int, ...]) -> RegionProposalNetwork:
    pos_sampler, neg_sampler = _samplers(config, config["rpn_sampler"], None, None)
    box_loss = _box_loss(
        config["rpn_box_loss"],
        alpha=config["rpn_box_loss_alpha"],
        gamma=config["rpn_box_loss_gamma"],
        beta=config["rpn_box_loss_beta"],
    )
    # A standalone RPN has no train top-n keys (its training proposals are never computed).
    train_top_n = {
        f"{kind}_nms_top_n_train": config.get(f"rpn_{kind}_nms_top_n_train", default)
        for kind, default in (("pre", 2000), ("post", 1000))
    }
    # Anchors of scale 8 x the stride on every level the neck outputs (MMDetection
    # rpn_head.anchor_generator: scales=[8], ratios=[0.5, 1.0, 2.0], strides = the FPN's).
    anchor_generator = AnchorGenerator(strides)
    return RegionProposalNetwork(
        RPNHead(config["fpn_channels"], num_anchors=anchor_generator.num_anchors),
        anchor_generator,
        batch_size=config["rpn_batch_size"],
        pos_sampler=pos_sampler,
        neg_sampler=neg_sampler,
        neg_pos_ub=config["rpn_neg_pos_ub"],
        box_loss=box_loss,
        pre_nms_top_n_test=config["rpn_pre_nms_top_n_test"],
        post_nms_top_n_test=config["rpn_post_nms_top_n_test"],
        nms_thr=config["rpn_nms_thr"],
        ignore_iof_thr=config["ignore_iof_thr"],
        **train_top_n,
    )


def _build_retina_head(config: dict[str, Any], num_classes: int, strides: tuple[int, ...]) -> RetinaNetDenseHead:
    # octave_base_scale=4, scales_per_octave=3: scales 4 * 2^(i/3) of the stride; ratios 0.5, 1, 2;
    # strides the neck's (8, 16, 32, 64, 128) for P3..P7 (model.bbox_head.anchor_generator.strides).
    anchor_generator = AnchorGenerator(strides, RETINANET_ANCHOR_RATIOS, RETINANET_ANCHOR_SCALES)
    head = RetinaHead(
        num_classes,
        config["fpn_channels"],
        anchor_generator.num_anchors,
        feat_channels=config["head_channels"],
        stacked_convs=config["head_stacked_convs"],
    )
    box_loss = _box_loss(
        config["box_loss"],
        alpha=config["box_loss_alpha"],
        gamma=config["box_loss_gamma"],
        beta=config["box_loss_beta"],
        loss_weight=config["box_loss_weight"],
    )
    return RetinaNetDenseHead(
        head,
        anchor_generator,
        ignore_iof_thr=config["ignore_iof_thr"],
        cls_loss=SigmoidFocalLoss(alpha=config["focal_alpha"], gamma=config["focal_gamma"]),
        box_loss=box_loss,
        score_thr=config["score_thr"],
        pre_nms_top_n_test=config["pre_nms_top_n_test"],
        nms_thr=config["nms_thr"],
        max_per_img=config["max_per_img"],
    )


def _box_loss(kind: str, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, loss_weight: float = 1.0) -> nn.Module:
    """The box regression loss ``kind`` with the paper's Table 6 parameters."""
    if kind == "l1":
        return L1Loss(loss_weight=loss_weight)
    if kind == "smooth_l1":
        return SmoothL1Loss(beta=beta, loss_weight=loss_weight)
    if kind == "balanced_l1":
        return BalancedL1Loss(alpha=alpha, gamma=gamma, beta=beta, loss_weight=loss_weight)
    return LGRL1Loss(alpha=alpha, gamma=gamma, beta=beta, loss_weight=loss_weight)


def _samplers(
    config: dict[str, Any], sampler: str, pos_sampler: str | nn.Module | None, neg_sampler: str | nn.Module | None
) -> tuple[nn.Module, nn.Module]:
    """(positive, negative) sampler modules: ``sampler='iou_balanced'`` means MMDetection's Libra pair
    (instance-balanced positives, IoU-balanced negatives); ``pos_sampler`` / ``neg_sampler`` (a name
    or a module) replace either half."""
    balanced = sampler == "iou_balanced"
    pos = pos_sampler or ("instance_balanced" if balanced else "random")
    neg = neg_sampler or ("iou_balanced" if balanced else "random")
    if isinstance(pos, str):
        pos = POS_SAMPLERS[pos]()
    if isinstance(neg, str):
        neg_class = NEG_SAMPLERS[neg]
        if neg_class is IoUBalancedNegSampler:
            neg = IoUBalancedNegSampler(config["num_bins"], config["floor_thr"], config["floor_fraction"])
        else:
            neg = neg_class()
    return pos, neg


def _cls_loss(config: dict[str, Any], num_classes: int, class_image_counts: Any) -> nn.Module:
    kind = config["cls_loss"]
    if kind == "ce":
        return CrossEntropyLoss()
    if kind == "sigmoid_ce":
        return SigmoidCrossEntropyLoss()
    if kind == "lgr_ce":
        return LGRCrossEntropyLoss(alpha=config["lgr_ce_alpha"], gamma=config["lgr_ce_gamma"])
    # Bucketed class re-weighting (Eq. 20-23) with the preset's S, a, t.
    if class_image_counts is None:
        return BCRSigmoidCrossEntropyLoss.without_frequencies(num_classes, samples=config["bcr_samples"])
    counts = torch.as_tensor(class_image_counts, dtype=torch.int64).reshape(-1)
    if counts.numel() != num_classes:
        raise ValueError(f"class_image_counts has {counts.numel()} entries but the model has {num_classes} classes")
    return BCRSigmoidCrossEntropyLoss.from_image_counts(
        counts, config["bcr_s"], a=config["bcr_a"], t=config["bcr_t"], samples=config["bcr_samples"]
    )


def _build_roi_head(
    config: dict[str, Any], num_classes: int, strides: tuple[int, ...], class_image_counts: Any = None
) -> RoIHead:
    channels = config["fpn_channels"]
    if config["box_head"] == "shared2fc":
        box_head: nn.Module = Shared2FCBoxHead(channels, 7, config["fc_channels"], num_classes)
    else:
        box_head = Shared4Conv1FCBoxHead(
            channels, 7, conv_channels=channels, fc_channels=config["fc_channels"], num_classes=num_classes
        )
    box_loss = _box_loss(
        config["box_loss"],
        alpha=config["box_loss_alpha"],
        gamma=config["box_loss_gamma"],
        beta=config["box_loss_beta"],
        loss_weight=config["box_loss_weight"],
    )
    cls_loss = _cls_loss(config, num_classes, class_image_counts)

    pos_sampler, neg_sampler = _samplers(config, config["sampler"], config["pos_sampler"], config["neg_sampler"])
    box_kwargs: dict[str, Any] = dict(
        ignore_iof_thr=config["ignore_iof_thr"],
        match_low_quality=config["roi_match_low_quality"],
        batch_size=config["roi_batch_size"],
        positive_fraction=0.25,
        pos_sampler=pos_sampler,
        neg_sampler=neg_sampler,
        cls_loss=cls_loss,
        box_loss=box_loss,
        score_thr=config["score_thr"],
        nms_thr=config["nms_thr"],
        max_per_img=config["max_per_img"],
    )
    # RoIs are pooled from the first 4 levels the neck outputs (MMDetection
    # bbox_roi_extractor.featmap_strides=[4, 8, 16, 32] for P2..P5), whatever they are.
    roi_strides = strides[:4]
    box_extractor = MultiLevelRoIExtractor(7, roi_strides, sampling_ratio=config["roi_sampling_ratio"])
    if config["detector"] != "mask_rcnn":
        return RoIHead(box_head, num_classes, box_extractor, **box_kwargs)
    mask_head = FCNMaskHead(
        in_channels=channels,
        conv_channels=config["mask_conv_channels"],
        num_convs=config["mask_num_convs"],
        num_classes=num_classes,
        class_agnostic=config["mask_class_agnostic"],
    )
    return MaskRoIHead(
        box_head,
        num_classes,
        box_extractor,
        mask_head=mask_head,
        mask_roi_extractor=mask_roi_extractor(roi_strides),
        mask_loss_weight=config["mask_loss_weight"],
        mask_thr=config["mask_thr"],
        **box_kwargs,
    )
