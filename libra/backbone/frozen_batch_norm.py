"""Batch normalisation with frozen statistics.

Detection trains with 2 images per GPU, far too few for reliable batch statistics, so
the backbone keeps the ImageNet running mean / variance fixed for the whole training
(MMDetection `configs/_base_/models/faster-rcnn_r50_fpn.py`: `model.backbone.norm_eval=True`
with `norm_cfg=dict(type='BN', requires_grad=True)`, i.e. frozen statistics, affine parameters
trainable in unfrozen stages). This module is that layer: it always normalises with
``running_mean`` / ``running_var``, whatever ``train()`` / ``eval()`` says, so no mode
switch anywhere can update or use batch statistics.

The affine ``weight`` and ``bias`` are ordinary ``nn.Parameter`` objects: the backbone
sets ``requires_grad = False`` on them in frozen stages and leaves them trainable elsewhere.

The buffer and parameter names (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``) equal ``nn.BatchNorm2d``'s, so an ImageNet state_dict written by
torchvision (or an MMDetection checkpoint) loads 1:1. ``num_batches_tracked`` is never used;
it exists only so that the key sets match, and it is filled with 0 when an old checkpoint
(saved before PyTorch had that buffer) lacks it.

Depends on torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, per channel.

    Args:
        num_features: number of channels C.
        eps: added to the variance; 1e-5 as in ``nn.BatchNorm2d`` (and the pretrained weights).

    Shapes:
        input ``[B, C, H, W]`` -> output ``[B, C, H, W]`` (same dtype as the input).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        # Kept only for state_dict compatibility with nn.BatchNorm2d; never read.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm2d expects [B, {self.num_features}, H, W], got {tuple(x.shape)}"
            )
        # Fold the statistics into one scale and shift per channel (a single fused
        # multiply-add over the feature map instead of four elementwise passes).
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints saved before PyTorch 0.4.1 (e.g. the original torchvision ImageNet
        # ResNets) have no num_batches_tracked; it carries no information, so supply it.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
