"""Mask R-CNN's mask branch: the FCN mask head, its loss and its test-time probabilities.

Shapes (MMDetection ``configs/_base_/models/mask-rcnn_r50_fpn.py``, the mask branch of the
paper's Libra Mask R-CNN, Sec. 4, Table 8):

    mask RoI features [R, 256, 14, 14]   (``mask_roi_extractor``: RoIAlign 14x14, sampling_ratio 0,
                                           aligned, FPN level rule of the box branch)
    -> 4 x (conv3x3 256 + ReLU)          [R, 256, 14, 14]
    -> deconv 2x2 stride 2 (256) + ReLU  [R, 256, 28, 28]
    -> conv1x1 C                         [R, C, 28, 28] logits, one mask per foreground class

Training uses the positive RoIs only (or all sampled RoIs with 0/1 weights, see
:func:`mask_loss`): the target of a RoI is its matched gt mask cropped to the RoI and resized
to 28x28 (``libra.masks.mask_targets``), the loss is per-pixel binary cross-entropy on the
channel of the gt class. At test time the head runs on the final detections (boxes in
resized-image coordinates), :func:`mask_probs_for_labels` takes the sigmoid of the detected
class's channel, and ``libra.masks.paste_masks_in_image`` pastes it into the original image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from libra.layers import ConvNormReLU

from libra.roi_heads.roi_extractor import MultiLevelRoIExtractor

__all__ = ["FCNMaskHead", "mask_loss", "mask_probs_for_labels", "mask_roi_extractor", "select_class_masks"]

# MMDetection `mask-rcnn_r50_fpn.py`: `mask_roi_extractor.roi_layer=dict(type='RoIAlign',
# output_size=14, sampling_ratio=0)`, `train_cfg.rcnn.mask_size=28`.
MASK_ROI_SIZE: int = 14
MASK_SIZE: int = 28


def mask_roi_extractor(featmap_strides: tuple[int, ...] = (4, 8, 16, 32), finest_scale: float = 56.0) -> MultiLevelRoIExtractor:
    """The mask branch's RoI extractor: 14x14 RoIAlign (adaptive sampling, ``aligned=True``) on
    the FPN level chosen by the box branch's rule (``finest_scale`` 56 over P2..P5)."""
    return MultiLevelRoIExtractor(
        output_size=MASK_ROI_SIZE, featmap_strides=featmap_strides, sampling_ratio=0, finest_scale=finest_scale
    )


class FCNMaskHead(nn.Module):
    """The Mask R-CNN FCN mask head: ``[R, in_channels, 14, 14] -> [R, C, 28, 28]`` logits.

    Parameters (names chosen so MMDetection checkpoints map by prefix only:
    ``roi_head.mask_head.<name>`` -> ``<this module's prefix>.<name>``, no other rename):

    - ``convs.{0-3}.conv.{weight,bias}``: ``[256, 256, 3, 3]`` / ``[256]`` (``convs.{i}.gn.*`` and
      no conv bias with ``norm='GN'``),
    - ``upsample.{weight,bias}``: ``ConvTranspose2d(256, 256, 2, stride=2)``, weight ``[256, 256, 2, 2]``,
    - ``conv_logits.{weight,bias}``: ``[C, 256, 1, 1]`` / ``[C]`` (``[1, ...]`` when class-agnostic).

    Init as MMDetection's ``FCNMaskHead``: convs, deconv and ``conv_logits`` kaiming_normal
    (``mode='fan_out'``, ReLU gain), biases 0.

    Args:
        in_channels: channels of the pooled features (256, the FPN width).
        conv_channels: width of the convs and the deconv (``conv_out_channels=256``).
        num_convs: number of 3x3 convs (4).
        num_classes: C foreground classes (80 COCO, 1203 LVIS); background has no mask.
        class_agnostic: one mask channel shared by all classes instead of C.
        norm: None (plain convs with bias, the default head) or ``'GN'``.
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int = 256,
        conv_channels: int = 256,
        num_convs: int = 4,
        num_classes: int = 80,
        class_agnostic: bool = False,
        norm: str | None = None,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes, background excluded), got {num_classes}")
        if norm not in ("GN", None):
            raise ValueError(f"norm must be 'GN' or None, got {norm!r}")
        if norm == "GN" and conv_channels % num_groups != 0:
            raise ValueError(f"num_groups ({num_groups}) must divide conv_channels ({conv_channels})")
        if num_convs < 0 or in_channels < 1 or conv_channels < 1:
            raise ValueError(f"need num_convs >= 0 and positive widths, got {num_convs}, {in_channels}, {conv_channels}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.convs = nn.ModuleList(
            [ConvNormReLU(in_channels if i == 0 else conv_channels, conv_channels, norm, num_groups) for i in range(num_convs)]
        )
        upsample_in = conv_channels if num_convs > 0 else in_channels
        self.upsample = nn.ConvTranspose2d(upsample_in, conv_channels, kernel_size=2, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.conv_logits = nn.Conv2d(conv_channels, 1 if class_agnostic else num_classes, 1)
        for layer in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    @property
    def num_mask_channels(self) -> int:
        return 1 if self.class_agnostic else self.num_classes

    def features(self, x: Tensor) -> Tensor:
        """x: ``[R, in_channels, S, S]`` -> the upsampled features ``[R, conv_channels, 2S, 2S]`` that
        ``conv_logits`` reads."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FCNMaskHead expects [R, {self.in_channels}, S, S] features, got {tuple(x.shape)}")
        for conv in self.convs:
            x = conv(x)
        return self.relu(self.upsample(x))

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[R, in_channels, S, S]`` (S = 14) -> mask logits ``[R, C, 2S, 2S]`` (``[R, 1, ...]``
        class-agnostic)."""
        return self.conv_logits(self.features(x))

    def class_logits(self, x: Tensor, labels: Tensor) -> Tensor:
        """The logits of one class per RoI: ``forward(x)[r, labels[r]]`` as ``[R, 2S, 2S]``, without
        computing the other C - 1 channels (``conv_logits`` is 1x1, so the channel is the dot product
        of the features with that class's filter). With LVIS's 1203 classes this saves the
        ``[R, 1203, 28, 28]`` tensor (1.1 GB at 300 detections) that only one channel per RoI is read of.

        Args:
            x: ``[R, in_channels, S, S]`` RoI features.
            labels: ``[R]`` int64 class per RoI in ``[0, C-1]`` (clamped, like ``select_class_masks``;
                ignored class-agnostic).
        """
        features = self.features(x)
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [R] = [{features.shape[0]}], got {tuple(labels.shape)}")
        index = labels.to(device=features.device, dtype=torch.int64).clamp(0, self.num_mask_channels - 1)
        weight = self.conv_logits.weight[:, :, 0, 0].index_select(0, index)  # [R, conv_channels]
        bias = self.conv_logits.bias.index_select(0, index)  # [R]
        return torch.einsum("rchw,rc->rhw", features, weight.to(features.dtype)) + bias.to(features.dtype)[:, None, None]


def select_class_masks(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """The mask channel of each RoI's class.

    Args:
        mask_logits: ``[R, C, M, M]`` (or ``[R, 1, M, M]`` class-agnostic: channel 0 for all).
        labels: ``[R]`` int64 classes in ``[0, C-1]``. Other labels (background C) are clamped so
            the gather stays valid without a host check; such rows are meaningless and need zero
            weight in a loss.

    Returns:
        ``[R, M, M]`` in the dtype of ``mask_logits``.
    """
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be [R, C, M, M], got {tuple(mask_logits.shape)}")
    if labels.shape != mask_logits.shape[:1]:
        raise ValueError(f"labels must be [R] = [{mask_logits.shape[0]}], got {tuple(labels.shape)}")
    num_rois, channels, height, width = mask_logits.shape
    if channels == 1:
        return mask_logits[:, 0]
    index = labels.to(device=mask_logits.device, dtype=torch.int64).clamp(0, channels - 1)
    index = index.view(num_rois, 1, 1, 1).expand(num_rois, 1, height, width)
    return mask_logits.gather(1, index).squeeze(1)


def mask_loss(
    mask_logits: Tensor,
    mask_targets: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    loss_weight: float = 1.0,
) -> Tensor:
    """Per-pixel binary cross-entropy on the channel of each RoI's gt class.

    MMDetection ``FCNMaskHead.loss_mask = CrossEntropyLoss(use_mask=True, loss_weight=1.0)``: BCE
    with logits, mean over positive RoIs x M x M. Other channels get no gradient.

    Args:
        mask_logits: ``[R, C, M, M]`` head output (any float dtype; the loss is float32).
        mask_targets: ``[R, M, M]`` 0/1 targets (``libra.masks.mask_targets``).
        labels: ``[R]`` gt class of each RoI in ``[0, C-1]``.
        weights: optional ``[R]`` 0/1 mask of the RoIs that count (e.g. ``SampledRoIs.positive``
            when the head ran on every sampled RoI); the mean is over ``max(sum(weights), 1)``
            RoIs. None: every row counts (the head ran on the positives only).
        loss_weight: multiplier (1).

    Returns:
        Scalar float32 loss; 0 but connected to the graph when there is no positive RoI.
    """
    if mask_targets.shape != (mask_logits.shape[0], *mask_logits.shape[2:]):
        raise ValueError(
            f"mask_targets must be [R, M, M] = {[mask_logits.shape[0], *mask_logits.shape[2:]]}, got {list(mask_targets.shape)}"
        )
    logits = select_class_masks(mask_logits, labels).float()
    if logits.shape[0] == 0:
        return mask_logits.sum().float() * 0.0
    per_roi = F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits), reduction="none").mean(dim=(1, 2))
    if weights is None:
        return per_roi.mean() * loss_weight
    if weights.shape != per_roi.shape:
        raise ValueError(f"weights must be [R] = [{per_roi.shape[0]}], got {tuple(weights.shape)}")
    weights = weights.to(per_roi)
    return (per_roi * weights).sum() / weights.sum().clamp(min=1.0) * loss_weight


def mask_probs_for_labels(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Test time: sigmoid of each detection's class channel, ``[D, C, M, M] -> [D, M, M]`` float32
    (what ``libra.masks.paste_masks_in_image`` takes)."""
    return select_class_masks(mask_logits, labels).float().sigmoid()
