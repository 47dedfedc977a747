"""Path Aggregation FPN (Liu et al., 2018, "PAFPN [40]" of the paper's Table 5).

PAFPN is the FPN of ``fpn.py`` followed by an extra bottom-up path that shortens the route
from fine, well-localised features to the coarse levels:

1. FPN laterals + top-down pathway + 3x3 ``fpn_convs``  ->  N2..N5 (intermediate outputs).
2. Bottom-up: ``N_{l+1} <- N_{l+1} + downsample_l(N_l)`` from the finest level upwards,
   ``downsample_l`` a 3x3 stride-2 conv (ceil(H/2), matching ResNet's level sizes).
3. Outputs: P2 = N2; P_l = ``pafpn_convs`` 3x3 conv of N_l for l = 3..5.
4. P6 = ``max_pool2d(P5, kernel 1, stride 2)``, as in the FPN.

All convs are plain convs with bias and no activation, Xavier-uniform init, zero bias.
Submodule names ``lateral_convs``, ``fpn_convs``, ``downsample_convs``, ``pafpn_convs`` match
MMDetection's PAFPN keys after dropping ``.conv``.

"Balanced PAFPN" (Table 5, 37.2 AP vs 36.3 for PAFPN) is the BFP applied on top of PAFPN's
outputs, exactly as it is applied on top of the FPN's:
``nn.Sequential(PAFPN(...), BalancedFeaturePyramid(...))``. The detector presets compose that
(neck ``'bpafpn'``); this file provides PAFPN only.

Depends on torch and the sibling ``fpn.py`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .fpn import FPN, check_feature_list, xavier_uniform_conv_init


class PAFPN(FPN):
    """FPN plus a bottom-up path aggregation: ``[C2..C5] -> [P2..P6]``, same contract as ``FPN``.

    Args:
        in_channels: channels of the backbone maps, finest first.
        out_channels: channels of every output level (256).
        num_outs: number of outputs; levels beyond ``len(in_channels)`` come from stride-2 max pooling.
        in_strides: stride of each backbone map; ``strides`` are the outputs' (as ``FPN``).

    Shapes:
        input ``feats[i]``: ``[B, in_channels[i], H_i, W_i]`` with ``H_{i+1} = ceil(H_i / 2)``
        (what a ResNet produces); output ``outs[i]``: ``[B, out_channels, H_i, W_i]``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024, 2048),
        out_channels: int = 256,
        num_outs: int = 5,
        in_strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, num_outs, in_strides=in_strides)
        num_inputs = len(self.in_channels)
        self.downsample_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
            for _ in range(num_inputs - 1)
        )
        self.pafpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in range(num_inputs - 1)
        )
        xavier_uniform_conv_init(self)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[C2, C3, C4, C5] -> [P2, P3, P4, P5, P6]`` (see class docstring for shapes)."""
        check_feature_list(feats, self.in_channels, type(self).__name__)
        merged = self.top_down(feats)
        inter = [conv(lateral) for conv, lateral in zip(self.fpn_convs, merged)]

        # Bottom-up path augmentation, finest level first.
        for level, downsample in enumerate(self.downsample_convs):
            reduced = downsample(inter[level])
            if reduced.shape[-2:] != inter[level + 1].shape[-2:]:
                raise ValueError(
                    f"PAFPN: level {level + 1} is {tuple(inter[level + 1].shape[-2:])} but the stride-2 "
                    f"conv of level {level} gives {tuple(reduced.shape[-2:])}; each level must be "
                    "ceil(previous / 2), as a ResNet produces"
                )
            inter[level + 1] = inter[level + 1] + reduced

        outs = [inter[0]] + [conv(feat) for conv, feat in zip(self.pafpn_convs, inter[1:])]
        return self.add_extra_levels(outs, feats)
