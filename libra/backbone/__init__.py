"""Backbones: bottleneck ResNet / ResNeXt with frozen BN statistics (SPEC.md section 1)."""

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
