"""ResNet / ResNeXt backbone for the detector (He et al. 2016; Xie et al. 2017 for ResNeXt).

What this file provides
- ``ResNet(depth, groups, width_per_group, frozen_stages, norm_eval)``: the bottleneck ResNet
  of He et al. in "pytorch" style (the stride-2 of a downsampling block sits on its 3x3 conv,
  not on the first 1x1 conv), returning the four stage outputs ``[C2, C3, C4, C5]``
  (strides 4, 8, 16, 32; channels 256, 512, 1024, 2048). With ``groups > 1`` it is ResNeXt.
- Factories ``resnet50()``, ``resnet101()``, ``resnext101_64x4d()`` and ``build_resnet(name)``.
- ``load_pretrained(backbone, path)``: loads a torchvision-format ImageNet checkpoint.

Training conventions (MMDetection `configs/_base_/models/faster-rcnn_r50_fpn.py`, `model.backbone`:
`frozen_stages=1, norm_eval=True, style='pytorch'`)
- The stem (``conv1``, ``bn1``) and ``layer1`` are frozen (``frozen_stages=1``): their
  parameters have ``requires_grad=False``. Frozen stages are also kept in eval mode.
- Every BN layer normalises with its frozen ImageNet statistics (``FrozenBatchNorm2d``,
  ``norm_eval=True``); its affine weight / bias stay trainable outside the frozen stages.
  ``model.train()`` therefore never changes a running statistic.

Parameter and buffer names equal torchvision's ``resnet50()`` (minus ``fc``), e.g.
``conv1.weight``, ``bn1.running_mean``, ``layer2.0.conv2.weight``, ``layer2.0.downsample.0.weight``,
``layer2.0.downsample.1.weight``, so ImageNet weights and the ``backbone.*`` part of an
MMDetection checkpoint load without renaming.

Depends on torch only (``FrozenBatchNorm2d`` lives beside this file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .frozen_batch_norm import FrozenBatchNorm2d

# Blocks per stage (layer1..layer4) for each supported depth.
_STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def _make_norm(num_features: int, norm_eval: bool) -> nn.Module:
    """Frozen-statistics BN (the default), or a regular BN when statistics should train."""
    if norm_eval:
        return FrozenBatchNorm2d(num_features)
    return nn.BatchNorm2d(num_features)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided, grouped) -> 1x1 expand, plus the identity / projection shortcut.

    ``width = int(planes * width_per_group / 64) * groups`` channels run through the 3x3 conv:
    ``planes`` for ResNet (groups 1, width 64) and e.g. ``4 * 64 = 256`` for the first stage of
    ResNeXt-101 64x4d. The block outputs ``planes * 4`` channels.

    Shapes: ``[B, in_channels, H, W] -> [B, 4 * planes, ceil(H / stride), ceil(W / stride)]``.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm_eval: bool = True,
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = _make_norm(width, norm_eval)
        # "pytorch" style: the stride is on the 3x3 conv (the "caffe" style puts it on conv1).
        self.conv2 = nn.Conv2d(
            width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False
        )
        self.bn2 = _make_norm(width, norm_eval)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = _make_norm(out_channels, norm_eval)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut; named "downsample.0" (conv) and "downsample.1" (BN) as in torchvision.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                _make_norm(out_channels, norm_eval),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet / ResNeXt feature extractor returning ``[C2, C3, C4, C5]``.

    Args:
        depth: 50, 101 or 152.
        groups: groups of every 3x3 conv (1 for ResNet, 64 for ResNeXt-101 64x4d).
        width_per_group: channels per group of the first stage's 3x3 conv (64 for ResNet, 4 for 64x4d).
        frozen_stages: -1 freezes nothing, 0 the stem (conv1, bn1), k >= 1 the stem and layer1..layer{k}.
            Frozen parameters get ``requires_grad=False`` and frozen modules stay in eval mode.
        norm_eval: True (default) uses ``FrozenBatchNorm2d`` everywhere, so running statistics never
            change; False uses ``nn.BatchNorm2d`` whose statistics train in the unfrozen stages.
        stage_blocks: bottlenecks per stage; default the depth's (``(3, 4, 6, 3)`` for 50). Fewer
            blocks give a shallower network with the same widths, strides and parameter names
            (``layerK.0`` ...), e.g. ``(1, 1, 1, 1)`` for quick training from scratch.

    Attributes:
        out_channels: ``[256, 512, 1024, 2048]``, channels of C2..C5.
        out_strides: ``[4, 8, 16, 32]``, strides of C2..C5 with respect to the input.

    Shapes:
        input ``[B, 3, H, W]``; output ``C_k`` is ``[B, out_channels[k-2], H_k, W_k]`` with
        ``H_k = ceil(H / 2**k)`` (every stride-2 layer rounds up).
    """

    def __init__(
        self,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        stage_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(
                f"frozen_stages must be in [-1, 4] (-1 none, 0 stem, k stem + layer1..k), got {frozen_stages}"
            )
        if groups < 1 or width_per_group < 1:
            raise ValueError(f"groups and width_per_group must be >= 1, got {groups}, {width_per_group}")
        self.depth = depth
        self.groups = groups
        self.width_per_group = width_per_group
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        # Stem: 7x7/2 conv + BN + ReLU + 3x3/2 max pool -> stride 4, 64 channels.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _make_norm(64, norm_eval)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        blocks = _STAGE_BLOCKS[depth] if stage_blocks is None else tuple(int(n) for n in stage_blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"stage_blocks must be 4 positive block counts, got {stage_blocks}")
        in_channels = 64
        self.out_channels: list[int] = []
        self.out_strides: list[int] = [4, 8, 16, 32]
        for stage_index, (planes, num_blocks, stride) in enumerate(
            zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1
        ):
            stage_blocks = []
            for block_index in range(num_blocks):
                stage_blocks.append(
                    Bottleneck(
                        in_channels,
                        planes,
                        stride=stride if block_index == 0 else 1,
                        groups=groups,
                        width_per_group=width_per_group,
                        norm_eval=norm_eval,
                    )
                )
                in_channels = planes * Bottleneck.expansion
            self.add_module(f"layer{stage_index}", nn.Sequential(*stage_blocks))
            self.out_channels.append(in_channels)

        self._init_weights()
        self._freeze_stages()

    def _init_weights(self) -> None:
        # Kaiming-normal (fan_out, ReLU gain) for convs, identity BN; overwritten by load_pretrained.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = []
        if self.frozen_stages >= 0:
            modules += [self.conv1, self.bn1]
        for stage_index in range(1, self.frozen_stages + 1):
            modules.append(getattr(self, f"layer{stage_index}"))
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        """Switch mode, but keep the frozen stages in eval mode (their BN must not update)."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` normalised images -> ``[C2, C3, C4, C5]`` (see class docstring)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet expects images of shape [B, 3, H, W], got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs: list[Tensor] = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs


def resnet50(frozen_stages: int = 1, norm_eval: bool = True) -> ResNet:
    """ResNet-50: blocks (3, 4, 6, 3)."""
    return ResNet(50, frozen_stages=frozen_stages, norm_eval=norm_eval)


def resnet101(frozen_stages: int = 1, norm_eval: bool = True) -> ResNet:
    """ResNet-101: blocks (3, 4, 23, 3)."""
    return ResNet(101, frozen_stages=frozen_stages, norm_eval=norm_eval)


def resnext101_64x4d(frozen_stages: int = 1, norm_eval: bool = True) -> ResNet:
    """ResNeXt-101 64x4d: ResNet-101 layout, 3x3 convs with 64 groups of 4 channels (first stage)."""
    return ResNet(101, groups=64, width_per_group=4, frozen_stages=frozen_stages, norm_eval=norm_eval)




_ARCHITECTURES = {  # name -> (depth, groups, width_per_group)
    "resnet50": (50, 1, 64),
    "resnet101": (101, 1, 64),
    "resnext101_64x4d": (101, 64, 4),
}


def build_resnet(
    name: str,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    width_per_group: int | None = None,
    stage_blocks: Sequence[int] | None = None,
) -> ResNet:
    """Build a backbone by name: ``'resnet50'``, ``'resnet101'`` or ``'resnext101_64x4d'``.

    ``width_per_group`` and ``stage_blocks`` (see :class:`ResNet`) default to the named network's.
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_ARCHITECTURES)}")
    depth, groups, width = _ARCHITECTURES[name]
    return ResNet(
        depth,
        groups=groups,
        width_per_group=width if width_per_group is None else width_per_group,
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
        stage_blocks=stage_blocks,
    )


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(backbone: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a torchvision-format ImageNet checkpoint into ``backbone`` (in place; also returned).

    The file may hold a plain state_dict or a dict with the state_dict under ``'state_dict'`` or
    ``'model'``; a ``'module.'`` prefix (from DataParallel) is stripped and ``fc.*`` (the ImageNet
    classifier) is ignored. ``num_batches_tracked`` may be absent (old checkpoints). Every other key
    must match by name and shape, otherwise a ValueError lists the missing, unexpected and
    mismatched keys. ``requires_grad`` flags (frozen stages) are not touched.
    """
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):
        for container_key in ("state_dict", "model"):
            if container_key in checkpoint and isinstance(checkpoint[container_key], Mapping):
                state_dict = checkpoint[container_key]
                break
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{os.fspath(path)!r} does not hold a state_dict (got {type(state_dict).__name__}); "
            "save one with torch.save(model.state_dict(), path)"
        )

    cleaned: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("fc."):
            continue
        cleaned[key] = value

    expected = backbone.state_dict()
    missing = [k for k in expected if k not in cleaned and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in cleaned if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in cleaned.items()
        if k in expected and isinstance(v, Tensor) and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_format_keys(mismatched)}")
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit this backbone; "
            + "; ".join(problems)
            + ". Hint: expected a torchvision-format ResNet state_dict (keys like 'conv1.weight', "
            "'layer1.0.conv1.weight'); check that the depth / ResNeXt groups match the checkpoint, and "
            "load a full MMDetection detector checkpoint with libra.mmdet_checkpoint.load_mmdet_checkpoint instead."
        )
    backbone.load_state_dict(cleaned, strict=True)
    return backbone
