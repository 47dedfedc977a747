"""Feature Pyramid Network (Lin et al., 2017), the baseline neck.

``[C2, C3, C4, C5]`` from the backbone become ``[P2, P3, P4, P5, P6]``, all with
``out_channels`` (256) channels (MMDetection ``faster-rcnn_r50_fpn_1x_coco``:
``model.neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5)``):

1. Laterals: a 1x1 conv maps every used C_l (from ``start_level`` on) to 256 channels.
2. Top-down: from the coarsest level down, the coarser lateral is nearest-upsampled to the
   finer lateral's exact size and added to it. Upsampling to the exact size (not by a factor
   of 2) keeps odd sizes working: C_{l+1} is ceil(C_l / 2), so twice it can exceed C_l by one.
3. Outputs: a 3x3 conv on every merged lateral gives P2..P5.
4. Extra levels, until there are ``num_outs``:

   - ``'max_pool'`` (Faster R-CNN): ``max_pool2d(kernel 1, stride 2)`` of the last output, i.e.
     subsampling P5 by 2 (rounding up), no parameters;
   - ``'on_input'`` (RetinaNet, ``start_level=1``: P3..P7): a 3x3 stride-2 conv on the last used
     backbone map (C5) gives P6, further 3x3 stride-2 convs on the previous extra level give P7;
   - ``'on_output'``: the same, with the first extra conv on the last output (P5).

   Between extra convs there is no ReLU unless ``relu_before_extra_convs`` (MMDetection's
   ``relu_before_extra_convs=False`` for RetinaNet; torchvision and detectron2 put one there).

Init: Xavier-uniform weights, zero biases (MMDetection's FPN ``init_cfg``).

Submodule names ``lateral_convs.{i}`` and ``fpn_convs.{i}`` match MMDetection's
``neck.lateral_convs.{i}.conv.*`` / ``neck.fpn_convs.{i}.conv.*`` after dropping ``.conv``; extra
convs continue ``fpn_convs`` (RetinaNet: ``fpn_convs.3`` and ``fpn_convs.4``), as in MMDetection.

Depends on torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def xavier_uniform_conv_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Conv2d inside ``module``."""
    for submodule in module.modules():
        if isinstance(submodule, nn.Conv2d):
            nn.init.xavier_uniform_(submodule.weight)
            if submodule.bias is not None:
                nn.init.zeros_(submodule.bias)


def check_feature_list(feats: Sequence[Tensor], expected_channels: Sequence[int], owner: str) -> None:
    """Raise a ValueError unless ``feats`` is a list of 4-D maps with the expected channels."""
    if not isinstance(feats, (list, tuple)) or len(feats) != len(expected_channels):
        got = len(feats) if isinstance(feats, (list, tuple)) else type(feats).__name__
        raise ValueError(f"{owner} expects a list of {len(expected_channels)} feature maps, got {got}")
    for index, (feat, channels) in enumerate(zip(feats, expected_channels)):
        if feat.dim() != 4 or feat.shape[1] != channels:
            raise ValueError(
                f"{owner}: input {index} must be [B, {channels}, H, W], got {tuple(feat.shape)}"
            )


EXTRA_LEVELS = ("max_pool", "on_input", "on_output")


class FPN(nn.Module):
    """Feature pyramid: ``[C2..C5] -> [P(2+start_level)..]``, ``num_outs`` levels (default ``[P2..P6]``).

    Args:
        in_channels: channels of the backbone maps, finest first (ResNet: 256, 512, 1024, 2048).
        out_channels: channels of every output level (256).
        num_outs: number of outputs; levels beyond the used inputs come from ``extra_levels``.
        start_level: index of the first backbone map used (0: C2; 1: C3, as RetinaNet).
        extra_levels: ``'max_pool'``, ``'on_input'`` or ``'on_output'`` (module docstring).
        relu_before_extra_convs: apply ReLU to the input of each extra conv after the first.
        in_strides: stride of each backbone map (None: 4, 8, 16, ... as ResNet's C2..C5).

    Attributes:
        strides: stride of each output level (``in_strides[start_level:]``, then x2 per extra
            level: ``(4, 8, 16, 32, 64)`` by default, ``(8, .., 128)`` for RetinaNet's P3..P7). The
            anchor generator and the RoI extractors take their strides from here, so that they
            cannot disagree with the maps they run on.

    Shapes:
        input ``feats[i]``: ``[B, in_channels[i], H_i, W_i]`` with ``H_{i+1} = ceil(H_i / 2)``;
        output ``outs[j]``: ``[B, out_channels, H, W]`` of input level ``start_level + j``; an extra
        level is ``ceil(H / 2)`` of the one before.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024, 2048),
        out_channels: int = 256,
        num_outs: int = 5,
        start_level: int = 0,
        extra_levels: str = "max_pool",
        relu_before_extra_convs: bool = False,
        in_strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if in_strides is None:  # a ResNet's: C2, C3, ... at 4, 8, ...
            in_strides = [4 * 2**i for i in range(len(in_channels))]
        if len(in_strides) != len(in_channels):
            raise ValueError(f"got {len(in_strides)} in_strides {tuple(in_strides)} for {len(in_channels)} input maps")
        if not 0 <= start_level < len(in_channels):
            raise ValueError(f"start_level must be in [0, {len(in_channels) - 1}], got {start_level}")
        if extra_levels not in EXTRA_LEVELS:
            raise ValueError(f"extra_levels must be one of {EXTRA_LEVELS}, got {extra_levels!r}")
        used = list(in_channels)[start_level:]
        if num_outs < len(used):
            raise ValueError(f"num_outs ({num_outs}) must be >= the number of used inputs ({len(used)})")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.start_level = start_level
        self.extra_levels = extra_levels
        self.relu_before_extra_convs = relu_before_extra_convs
        used_strides = [int(stride) for stride in in_strides][start_level:]
        self.strides = tuple(used_strides + [used_strides[-1] * 2 ** (k + 1) for k in range(num_outs - len(used))])
        self.lateral_convs = nn.ModuleList(nn.Conv2d(channels, out_channels, kernel_size=1) for channels in used)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in used
        )
        if extra_levels != "max_pool":
            for index in range(num_outs - len(used)):
                channels = used[-1] if index == 0 and extra_levels == "on_input" else out_channels
                self.fpn_convs.append(nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1))
        xavier_uniform_conv_init(self)

    def top_down(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Laterals plus the top-down pathway over the used inputs: the merged laterals, finest first."""
        laterals = [conv(feat) for conv, feat in zip(self.lateral_convs, feats[self.start_level :])]
        for level in range(len(laterals) - 1, 0, -1):
            finer = laterals[level - 1]
            laterals[level - 1] = finer + F.interpolate(laterals[level], size=finer.shape[-2:], mode="nearest")
        return laterals

    def add_extra_levels(self, outs: list[Tensor], feats: Sequence[Tensor]) -> list[Tensor]:
        """Append the coarser levels beyond the inputs (``extra_levels``, module docstring)."""
        if self.extra_levels == "max_pool":
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
            return outs
        num_used = len(self.lateral_convs)
        source = feats[-1] if self.extra_levels == "on_input" else outs[-1]
        for index, conv in enumerate(self.fpn_convs[num_used:]):
            if index > 0:
                source = outs[-1]
                if self.relu_before_extra_convs:
                    source = F.relu(source)
            outs.append(conv(source))
        return outs

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[C2, C3, C4, C5] -> [P2, P3, P4, P5, P6]`` by default (see class docstring for shapes)."""
        check_feature_list(feats, self.in_channels, type(self).__name__)
        merged = self.top_down(feats)
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, merged)]
        return self.add_extra_levels(outs, feats)
