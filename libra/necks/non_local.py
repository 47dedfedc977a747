"""Embedded-Gaussian non-local block (Wang et al., 2018), the refiner of the Balanced
Feature Pyramid (paper Sec. 3.2, Eq. 4).

For every position i of a map f (positions flattened to N = H*W):

    f'_i = f_i + W_out * sum_j softmax_j(theta(f_i)^T phi(f_j)) g(f_j)          (Eq. 4)

theta, phi, g and W_out (``conv_out``) are 1x1 convs with bias. Eq. 4 as printed has no
output projection; the released model (and this block) applies the 1x1 ``conv_out`` before
the residual add, which is what lets the block start as the identity.

Choices of the released Libra R-CNN configuration (MMDetection's BFP builds mmcv's
``NonLocal2d(in_channels, reduction=1, use_scale=False)``, embedded-Gaussian mode):
- inter channels = in_channels (``reduction=1``);
- NO 1/sqrt(C) scaling of theta^T phi before the softmax;
- no normalisation layer, no sub-sampling.
- Init: theta, phi, g ~ N(0, 0.01) with zero bias; ``conv_out`` weight and bias zero, so the
  block is exactly the identity at the start of training. Note: this differs from some
  MMDetection versions: in mmdet v1.x / early v2.x, BalancedFeaturePyramid.init_weights
  re-initialised every Conv2d it contained (the non-local convs included) with Xavier-uniform
  after the non-local block had initialised itself, so those models did not start from an
  identity block; later versions (init_cfg based) keep the non-local block's own init, as here.
  Only training from scratch is affected; loading a checkpoint overwrites all of it.

Memory: the attention matrix is ``[B, N, N]``; at P4 of an 800x1333 image (50x84) that is
4200^2 floats, about 70 MB per image.

Depends on torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block with a residual connection.

    Args:
        in_channels: channels C of the input map.
        reduction: inter channels = ``in_channels // reduction`` (1 for Libra R-CNN).

    Shapes:
        input ``[B, C, H, W]`` -> output ``[B, C, H, W]``.
    """

    def __init__(self, in_channels: int = 256, reduction: int = 1) -> None:
        super().__init__()
        if in_channels <= 0 or reduction <= 0 or in_channels // reduction == 0:
            raise ValueError(
                f"NonLocal2d needs in_channels > 0 and 1 <= reduction <= in_channels, "
                f"got in_channels={in_channels}, reduction={reduction}"
            )
        self.in_channels = in_channels
        self.inter_channels = in_channels // reduction
        self.g = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.conv_out = nn.Conv2d(self.inter_channels, in_channels, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """theta / phi / g ~ N(0, 0.01), bias 0; conv_out all zero (identity block)."""
        for conv in (self.g, self.theta, self.phi):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"NonLocal2d expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        batch, _, height, width = x.shape
        # Flatten positions: queries [B, N, C'], keys and values [B, C', N] / [B, N, C'].
        theta_x = self.theta(x).flatten(2).transpose(1, 2)
        phi_x = self.phi(x).flatten(2)
        g_x = self.g(x).flatten(2).transpose(1, 2)
        # Eq. 4: pairwise affinity theta(f_i)^T phi(f_j), softmax over j (no 1/sqrt(C) scaling).
        attention = torch.softmax(torch.bmm(theta_x, phi_x), dim=-1)  # [B, N, N]
        y = torch.bmm(attention, g_x)  # [B, N, C']
        y = y.transpose(1, 2).reshape(batch, self.inter_channels, height, width)
        return x + self.conv_out(y)
