"""Backbones: bottleneck ResNet / ResNeXt with frozen BN statistics.

Deformable convolutions (``dcn``, ``stage_with_dcn``) follow MMDetection's DCN configs.
The settings are MMDetection's (`configs/_base_/models/faster-rcnn_r50_fpn.py`:
`model.backbone` `frozen_stages=1, norm_eval=True, style='pytorch'`).
"""

from .frozen_batch_norm import FrozenBatchNorm2d
from .resnet import (
    DEFAULT_STAGE_WITH_DCN,
    Bottleneck,
    ResNet,
    build_resnet,
    check_dcn,
    load_pretrained,
    resnet50,
    resnet101,
    resnext101_64x4d,
)

__all__ = [
    "DEFAULT_STAGE_WITH_DCN",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "ResNet",
    "build_resnet",
    "check_dcn",
    "load_pretrained",
    "resnet50",
    "resnet101",
    "resnext101_64x4d",
]
