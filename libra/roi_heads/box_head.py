"""R-CNN box heads: classification and class-specific box regression per RoI.

Both heads map pooled RoI features [K, 256, 7, 7] to
``cls_logits [K, C+1]`` (background is the LAST column, index C) and
``box_deltas [K, 4C]`` (4 deltas per foreground class, class c in columns 4c..4c+3).
"""
from __future__ import annotations

from torch import Tensor, nn

from libra.layers import ConvNormReLU

__all__ = ["Shared2FCBoxHead", "Shared4Conv1FCBoxHead", "select_class_deltas"]


def select_class_deltas(box_deltas: Tensor, labels: Tensor) -> Tensor:
    """Pick the 4 deltas of each RoI's class.

    Args:
        box_deltas: [K, 4C] class-specific deltas (or [K, 4] class-agnostic, returned as is).
        labels: [K] int64 class of each RoI. Labels outside [0, C-1] (e.g. background C)
            are clamped so that the gather stays valid without a host check; their rows are
            meaningless and must get zero weight in the loss.

    Returns:
        [K, 4].
    """
    if box_deltas.dim() != 2 or box_deltas.shape[1] % 4 != 0:
        raise ValueError(f"box_deltas must be [K, 4C], got shape {tuple(box_deltas.shape)}")
    if labels.shape != box_deltas.shape[:1]:
        raise ValueError(f"labels must be [K] = [{box_deltas.shape[0]}], got shape {tuple(labels.shape)}")
    num_rois = box_deltas.shape[0]
    num_classes = box_deltas.shape[1] // 4
    if num_classes == 1:
        return box_deltas
    index = labels.long().clamp(0, num_classes - 1).view(num_rois, 1, 1).expand(num_rois, 1, 4)
    return box_deltas.view(num_rois, num_classes, 4).gather(1, index).squeeze(1)


def _init_predictors(fc_cls: nn.Linear, fc_reg: nn.Linear) -> None:
    # MMDetection BBoxHead init: fc_cls N(0, 0.01), fc_reg N(0, 0.001), biases 0.
    nn.init.normal_(fc_cls.weight, std=0.01)
    nn.init.zeros_(fc_cls.bias)
    nn.init.normal_(fc_reg.weight, std=0.001)
    nn.init.zeros_(fc_reg.bias)


def _init_fc(fc: nn.Linear) -> None:
    nn.init.xavier_uniform_(fc.weight)
    nn.init.zeros_(fc.bias)


class Shared2FCBoxHead(nn.Module):
    """Two shared fully connected layers, then the classifier and box regressor.

    flatten(256*7*7) -> fc 1024 -> ReLU -> fc 1024 -> ReLU -> {fc_cls (C+1), fc_reg (4C)}.
    Submodule names match the released mmdet checkpoints
    (``roi_head.bbox_head.shared_fcs.{0,1}``, ``fc_cls``, ``fc_reg``).

    Args:
        in_channels: channels of the pooled features.
        roi_size: side of the pooled features.
        fc_channels: width of the shared fcs.
        num_classes: C foreground classes.
    """

    def __init__(self, in_channels: int = 256, roi_size: int = 7, fc_channels: int = 1024, num_classes: int = 80):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes, background excluded), got {num_classes}")
        self.in_channels = in_channels
        self.roi_size = roi_size
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(in_channels * roi_size * roi_size, fc_channels), nn.Linear(fc_channels, fc_channels)]
        )
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        self.relu = nn.ReLU(inplace=True)
        for fc in self.shared_fcs:
            _init_fc(fc)
        _init_predictors(self.fc_cls, self.fc_reg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [K, in_channels, roi_size, roi_size] -> (cls_logits [K, C+1], box_deltas [K, 4C])."""
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = self.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class Shared4Conv1FCBoxHead(nn.Module):
    """Four shared 3x3 convs (with GroupNorm), one shared fc, then classifier and regressor.

    4 x (conv3x3 256 -> GN(32) -> ReLU) -> flatten -> fc 1024 -> ReLU -> {fc_cls, fc_reg}.
    This is the "4conv-fc head with group normalization" of the paper's main results
    (Sec. 4.1.3, Table 1).

    Args:
        in_channels: channels of the pooled features.
        roi_size: side of the pooled features.
        conv_channels: width of the shared convs.
        fc_channels: width of the shared fc.
        num_classes: C foreground classes.
        norm: 'GN' or None (plain convs with bias).
        num_groups: GroupNorm groups; must divide conv_channels.
    """

    def __init__(
        self,
        in_channels: int = 256,
        roi_size: int = 7,
        conv_channels: int = 256,
        fc_channels: int = 1024,
        num_classes: int = 80,
        norm: str | None = "GN",
        num_groups: int = 32,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes, background excluded), got {num_classes}")
        if norm not in ("GN", None):
            raise ValueError(f"norm must be 'GN' or None, got {norm!r}")
        if norm == "GN" and conv_channels % num_groups != 0:
            raise ValueError(f"num_groups ({num_groups}) must divide conv_channels ({conv_channels})")
        self.in_channels = in_channels
        self.roi_size = roi_size
        self.num_classes = num_classes
        self.shared_convs = nn.ModuleList(
            [ConvNormReLU(in_channels if i == 0 else conv_channels, conv_channels, norm, num_groups) for i in range(4)]
        )
        self.shared_fcs = nn.ModuleList([nn.Linear(conv_channels * roi_size * roi_size, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        self.relu = nn.ReLU(inplace=True)
        _init_fc(self.shared_fcs[0])
        _init_predictors(self.fc_cls, self.fc_reg)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [K, in_channels, roi_size, roi_size] -> (cls_logits [K, C+1], box_deltas [K, 4C])."""
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = self.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)
