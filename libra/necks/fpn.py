"""Feature Pyramid Network (Lin et al., 2017), the baseline neck (SPEC.md section 1, "FPN").

``[C2, C3, C4, C5]`` from the backbone become ``[P2, P3, P4, P5, P6]``, all with
``out_channels`` (256) channels:

1. Laterals: a 1x1 conv maps every C_l to 256 channels.
2. Top-down: from the coarsest level down, the coarser lateral is nearest-upsampled to the
   finer lateral's exact size and added to it. Upsampling to the exact size (not by a factor
   of 2) keeps odd sizes working: C_{l+1} is ceil(C_l / 2), so twice it can exceed C_l by one.
3. Outputs: a 3x3 conv on every merged lateral gives P2..P5.
4. Extra levels (P6): ``max_pool2d(kernel 1, stride 2)`` of the last output, i.e. subsampling
   P5 by 2 (rounding up), no parameters.

Init: Xavier-uniform weights, zero biases (SPEC.md section 1).

Submodule names ``lateral_convs.{i}`` and ``fpn_convs.{i}`` match MMDetection's
``neck.0.lateral_convs.{i}.conv.*`` / ``neck.0.fpn_convs.{i}.conv.*`` after dropping ``.conv``.

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


class FPN(nn.Module):
    """Feature pyramid: ``[C2..C5] -> [P2..P(num_outs+1)]`` (default ``[P2..P6]``).

    Args:
        in_channels: channels of the backbone maps, finest first (ResNet: 256, 512, 1024, 2048).
        out_channels: channels of every output level (256).
        num_outs: number of outputs; levels beyond ``len(in_channels)`` come from stride-2 max pooling.

    Shapes:
        input ``feats[i]``: ``[B, in_channels[i], H_i, W_i]`` with ``H_{i+1} = ceil(H_i / 2)``;
        output ``outs[i]``: ``[B, out_channels, H_i, W_i]``; extra level ``i`` is ``ceil(H_{i-1} / 2)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024, 2048),
        out_channels: int = 256,
        num_outs: int = 5,
    ) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be >= the number of inputs ({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(channels, out_channels, kernel_size=1) for channels in self.in_channels
        )
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in self.in_channels
        )
        xavier_uniform_conv_init(self)

    def top_down(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Laterals plus the top-down pathway: returns the merged laterals, finest first (before the 3x3 convs)."""
        laterals = [conv(feat) for conv, feat in zip(self.lateral_convs, feats)]
        for level in range(len(laterals) - 1, 0, -1):
            finer = laterals[level - 1]
            laterals[level - 1] = finer + F.interpolate(laterals[level], size=finer.shape[-2:], mode="nearest")
        return laterals

    def add_extra_levels(self, outs: list[Tensor]) -> list[Tensor]:
        """Append parameter-free coarser levels (P6): ``max_pool2d(kernel 1, stride 2)`` of the last one."""
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[C2, C3, C4, C5] -> [P2, P3, P4, P5, P6]`` (see class docstring for shapes)."""
        check_feature_list(feats, self.in_channels, type(self).__name__)
        merged = self.top_down(feats)
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, merged)]
        return self.add_extra_levels(outs)
