"""Small building blocks shared by several heads (so that no head imports another for them)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvNormReLU"]


class ConvNormReLU(nn.Module):
    """3x3 conv (no bias when normalised) + optional GroupNorm + ReLU: mmcv's ``ConvModule`` as the
    GN box head (``Shared4Conv1FCBoxHead``) and the FCN mask head use it.

    Named ``conv`` / ``gn`` so that state-dict keys read ``<i>.conv.weight`` and ``<i>.gn.weight``,
    the ``ConvModule`` layout of MMDetection's released GN box heads and ``FCNMaskHead``.

    Args:
        in_channels, out_channels: channels of the 3x3 conv.
        norm: ``"GN"`` for GroupNorm, None for none (the conv then has a bias).
        num_groups: GroupNorm groups (32).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str | None = None, num_groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm is None)
        self.gn = nn.GroupNorm(num_groups, out_channels) if norm == "GN" else None
        self.relu = nn.ReLU(inplace=True)
        # mmcv ConvModule init: kaiming_normal (fan_out, relu), bias 0; GN starts as the identity map.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return self.relu(x)
