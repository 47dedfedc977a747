"""Backbones: bottleneck ResNet / ResNeXt with frozen BN statistics.

The settings are MMDetection's (`configs/_base_/models/faster-rcnn_r50_fpn.py`:
`model.backbone` `frozen_stages=1, norm_eval=True, style='pytorch'`).
"""

from .frozen_batch_norm import FrozenBatchNorm2d
from .resnet import (
    Bottleneck,
    ResNet,
    build_resnet,
    load_pretrained,
    resnet50,
    resnet101,
    resnext101_64x4d,
)

__all__ = [
    "Bottleneck",
    "FrozenBatchNorm2d",
    "ResNet",
    "build_resnet",
    "load_pretrained",
    "resnet50",
    "resnet101",
    "resnext101_64x4d",
]
