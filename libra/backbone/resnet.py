"""ResNet / ResNeXt backbone for the detector (He et al. 2016; Xie et al. 2017 for ResNeXt).

What this file provides
- ``ResNet(depth, groups, width_per_group, frozen_stages, norm_eval)``: the bottleneck ResNet
  of He et al. in "pytorch" style (the stride-2 of a downsampling block sits on its 3x3 conv,
  not on the first 1x1 conv), returning the four stage outputs ``[C2, C3, C4, C5]``
  (strides 4, 8, 16, 32; channels 256, 512, 1024, 2048). With ``groups > 1`` it is ResNeXt.
- Factories ``resnet50()``, ``resnet101()``, ``resnext101_64x4d()`` and ``build_resnet(name)``.
- Deformable convolutions (``dcn``, ``stage_with_dcn``) as in MMDetection's DCN configs, e.g.
  ``configs/dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py``: ``dcn=dict(type='DCN', deform_groups=1,
  fallback_on_stride=False), stage_with_dcn=(False, True, True, True)`` makes the 3x3 conv2 of every
  bottleneck of C3-C5 a ``DeformConv2dPack`` (DCN v1, Dai et al. 2017; ``'DCNv2'``: the modulated
  ``ModulatedDeformConv2dPack`` of Zhu et al. 2019) with the plain conv's stride, padding and groups.
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
MMDetection checkpoint load without renaming. A DCN conv2 keeps ``layerX.Y.conv2.weight`` and adds
mmcv's ``layerX.Y.conv2.conv_offset.weight`` / ``.bias`` (its offset predictor), the names of an
MMDetection DCN checkpoint.

Depends on torch and ``libra.ops`` (``FrozenBatchNorm2d`` lives beside this file).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from libra.ops.deform_conv import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack

from .frozen_batch_norm import FrozenBatchNorm2d

# Blocks per stage (layer1..layer4) for each supported depth.
_STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


# MMDetection's dcn types (mmcv's registry: 'DCN' -> DeformConv2dPack, 'DCNv2' -> ModulatedDeformConv2dPack).
_DCN_TYPES: dict[str, type[DeformConv2d]] = {"DCN": DeformConv2dPack, "DCNv2": ModulatedDeformConv2dPack}
_DCN_KEYS = ("type", "deform_groups", "fallback_on_stride")
# stage_with_dcn when dcn is given without it: MMDetection's DCN configs use C3-C5.
DEFAULT_STAGE_WITH_DCN = (False, True, True, True)


def check_dcn(dcn: Mapping | None) -> dict | None:
    """Validate an MMDetection-style ``dcn`` dict; returns it with defaults filled in (or None).

    ``{"type": "DCN" | "DCNv2", "deform_groups": int >= 1 (default 1), "fallback_on_stride": bool
    (default False)}``; any other key is an error.
    """
    if dcn is None:
        return None
    if not isinstance(dcn, Mapping):
        raise ValueError(
            "dcn must be None or a dict like {'type': 'DCN', 'deform_groups': 1, 'fallback_on_stride': False}, "
            f"got {dcn!r}"
        )
    unknown = sorted(set(dcn) - set(_DCN_KEYS))
    if unknown:
        raise ValueError(f"dcn has unknown keys {unknown}; allowed: {list(_DCN_KEYS)}")
    if dcn.get("type") not in _DCN_TYPES:
        raise ValueError(
            f"dcn['type'] must be one of {sorted(_DCN_TYPES)} (DCN v1 / modulated DCN v2), got {dcn.get('type')!r}"
        )
    deform_groups = dcn.get("deform_groups", 1)
    if isinstance(deform_groups, bool) or not isinstance(deform_groups, int) or deform_groups < 1:
        raise ValueError(f"dcn['deform_groups'] must be a positive int, got {deform_groups!r}")
    fallback_on_stride = dcn.get("fallback_on_stride", False)
    if not isinstance(fallback_on_stride, bool):
        raise ValueError(f"dcn['fallback_on_stride'] must be a bool, got {fallback_on_stride!r}")
    return {"type": dcn["type"], "deform_groups": deform_groups, "fallback_on_stride": fallback_on_stride}


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

    ``dcn`` (a dict checked by :func:`check_dcn`) makes the 3x3 conv deformable, with the same
    stride, padding, dilation and groups: ``'DCN'`` a ``DeformConv2dPack``, ``'DCNv2'`` a
    ``ModulatedDeformConv2dPack``, both without bias and with ``deform_groups`` offset groups.
    ``fallback_on_stride=True`` keeps the plain conv: MMDetection's Bottleneck tests
    ``if not with_dcn or fallback_on_stride`` and so, despite the name, falls back in EVERY block
    (strided or not); the same is done here so that such a checkpoint has the same keys.

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
        dcn: Mapping | None = None,
    ) -> None:
        super().__init__()
        dcn = check_dcn(dcn)
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = _make_norm(width, norm_eval)
        # "pytorch" style: the stride is on the 3x3 conv (the "caffe" style puts it on conv1).
        if dcn is not None and not dcn["fallback_on_stride"]:
            self.conv2 = _DCN_TYPES[dcn["type"]](
                width, width, kernel_size=3, stride=stride, padding=1, groups=groups,
                deform_groups=dcn["deform_groups"], bias=False,
            )
        else:
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
        dcn: None (plain convs) or MMDetection's dict ``{"type": "DCN" | "DCNv2", "deform_groups": 1,
            "fallback_on_stride": False}``: the 3x3 conv2 of every bottleneck in the stages chosen by
            ``stage_with_dcn`` becomes deformable (see :class:`Bottleneck`). Its ``conv_offset`` is
            zero-initialised, so a fresh DCN v1 backbone computes what the plain one does with the
            same weights (a fresh DCN v2 conv has mask 0.5, MMDetection's initialisation).
        stage_with_dcn: 4 bools for layer1..layer4; default ``(False, True, True, True)`` (C3-C5,
            MMDetection's DCN configs) when ``dcn`` is given. Needs ``dcn`` if any is True.

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
        dcn: Mapping | None = None,
        stage_with_dcn: Sequence[bool] | None = None,
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
        self.dcn = check_dcn(dcn)
        if stage_with_dcn is None:
            stage_with_dcn = DEFAULT_STAGE_WITH_DCN if self.dcn is not None else (False,) * 4
        stage_with_dcn = tuple(stage_with_dcn)
        if len(stage_with_dcn) != 4 or not all(isinstance(flag, bool) for flag in stage_with_dcn):
            raise ValueError(f"stage_with_dcn must be 4 bools (layer1..layer4), got {stage_with_dcn!r}")
        if self.dcn is None and any(stage_with_dcn):
            raise ValueError(
                f"stage_with_dcn={stage_with_dcn} asks for deformable convs but dcn is None; "
                "pass dcn={'type': 'DCN', 'deform_groups': 1, 'fallback_on_stride': False}"
            )
        self.stage_with_dcn = stage_with_dcn

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
                        dcn=self.dcn if stage_with_dcn[stage_index - 1] else None,
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
            if isinstance(module, (nn.Conv2d, DeformConv2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The offset convs of DCN layers (plain nn.Conv2d above) start at zero, as in MMDetection's
        # ResNet.init_weights: a fresh deformable conv samples the regular grid.
        for module in self.modules():
            if isinstance(module, (DeformConv2dPack, ModulatedDeformConv2dPack)):
                module.init_offset()

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
    dcn: Mapping | None = None,
    stage_with_dcn: Sequence[bool] | None = None,
) -> ResNet:
    """Build a backbone by name: ``'resnet50'``, ``'resnet101'`` or ``'resnext101_64x4d'``.

    ``width_per_group`` and ``stage_blocks`` (see :class:`ResNet`) default to the named network's.
    ``dcn`` / ``stage_with_dcn`` (see :class:`ResNet`) add deformable convs, e.g. the DCN
    ResNeXt-101 64x4d of Libra R-CNN's best result: ``build_resnet("resnext101_64x4d",
    dcn={"type": "DCN", "deform_groups": 1, "fallback_on_stride": False})`` (C3-C5 by default).
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
        dcn=dcn,
        stage_with_dcn=stage_with_dcn,
    )


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(backbone: nn.Module, path: str | os.PathLike, trust: bool = False) -> nn.Module:
    """Load a torchvision-format ImageNet checkpoint into ``backbone`` (in place; also returned).

    The file may hold a plain state_dict or a dict with the state_dict under ``'state_dict'`` or
    ``'model'``; a ``'module.'`` prefix (from DataParallel) is stripped and ``fc.*`` (the ImageNet
    classifier) is ignored. ``num_batches_tracked`` may be absent (old checkpoints), and so may the
    ``conv_offset.*`` of a DCN backbone (ImageNet ResNets have none; they keep their zero
    initialisation, as MMDetection does). Every other key
    must match by name and shape, otherwise a ValueError lists the missing, unexpected and
    mismatched keys. ``requires_grad`` flags (frozen stages) are not touched.

    The file is read with ``torch.load(weights_only=True)`` (:mod:`libra.safe_load`): one holding
    Python objects beyond tensors and plain values is refused (``UntrustedCheckpointError``) unless
    ``trust``; a file that is no torch file raises a one-line ValueError.
    """
    from libra.safe_load import UntrustedCheckpointError, load_torch_file

    if not os.path.isfile(os.fspath(path)):
        raise ValueError(f"pretrained weights not found: {os.fspath(path)}")
    try:
        checkpoint = load_torch_file(path, trust=trust, what="pretrained weights file", trust_hint="--trust-checkpoint")
    except UntrustedCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file: one line
        text = " ".join(str(error).split())[:200]
        raise ValueError(f"cannot read pretrained weights {os.fspath(path)}: {type(error).__name__}: {text}") from None
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
    for key in expected:
        if ".conv_offset." in key and key not in cleaned:  # DCN offset predictors: keep them as they are
            cleaned[key] = expected[key]
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
