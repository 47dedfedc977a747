"""Tests of libra.roi_heads.mask_head: FCN mask head shapes, parameter names and init, the mask
loss on the gt class's channel, test-time probabilities and the 14x14 mask RoI extractor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libra.masks import mask_targets, paste_masks_in_image
from libra.roi_heads.mask_head import (
    FCNMaskHead,
    mask_loss,
    mask_probs_for_labels,
    mask_roi_extractor,
    select_class_masks,
)
from libra.roi_heads.roi_extractor import MultiLevelRoIExtractor

pytestmark = pytest.mark.usefixtures("single_thread")


def test_head_shapes_and_class_agnostic():
    torch.manual_seed(0)
    head = FCNMaskHead(num_classes=5)
    x = torch.randn(3, 256, 14, 14)
    assert head(x).shape == (3, 5, 28, 28)
    assert head(x[:0]).shape == (0, 5, 28, 28)
    agnostic = FCNMaskHead(num_classes=5, class_agnostic=True)
    assert agnostic(x).shape == (3, 1, 28, 28) and agnostic.num_mask_channels == 1
    small = FCNMaskHead(in_channels=8, conv_channels=16, num_convs=2, num_classes=3)
    assert small(torch.randn(2, 8, 7, 7)).shape == (2, 3, 14, 14)
    with pytest.raises(ValueError, match=r"\[R, 256, S, S\]"):
        head(torch.randn(2, 128, 14, 14))
    with pytest.raises(ValueError, match="num_classes"):
        FCNMaskHead(num_classes=0)
    with pytest.raises(ValueError, match="norm"):
        FCNMaskHead(norm="BN")


def test_parameter_names_follow_mmdetection_fcn_mask_head():
    head = FCNMaskHead(num_classes=80)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected = {f"convs.{i}.conv.weight": (256, 256, 3, 3) for i in range(4)}
    expected.update({f"convs.{i}.conv.bias": (256,) for i in range(4)})
    expected.update({"upsample.weight": (256, 256, 2, 2), "upsample.bias": (256,),
                     "conv_logits.weight": (80, 256, 1, 1), "conv_logits.bias": (80,)})
    assert shapes == expected
    # An mmdet checkpoint's roi_head.mask_head.* loads after stripping the prefix only.
    mmdet = {f"roi_head.mask_head.{k}": torch.randn(s) for k, s in expected.items()}
    head.load_state_dict({k[len("roi_head.mask_head."):]: v for k, v in mmdet.items()})
    assert torch.equal(head.conv_logits.weight, mmdet["roi_head.mask_head.conv_logits.weight"])
    assert isinstance(head.upsample, nn.ConvTranspose2d) and head.upsample.stride == (2, 2)
    gn = FCNMaskHead(num_classes=3, norm="GN")
    keys = set(gn.state_dict())
    assert "convs.0.gn.weight" in keys and "convs.0.conv.bias" not in keys


def test_init_is_kaiming_fan_out_with_zero_biases():
    torch.manual_seed(0)
    head = FCNMaskHead(num_classes=80)
    for name, param in head.named_parameters():
        if name.endswith("bias"):
            assert param.abs().max() == 0, name
    # kaiming_normal(fan_out, relu): std = sqrt(2 / fan_out), fan_out = size(0) * kernel area.
    layers = [head.convs[i].conv for i in range(4)] + [head.upsample, head.conv_logits]
    for layer in layers:
        weight = layer.weight
        fan_out = weight.shape[0] * weight[0, 0].numel()
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
        assert weight.mean().abs().item() < 0.1 * math.sqrt(2.0 / fan_out)


def test_mask_loss_is_bce_on_the_gt_class_channel():
    torch.manual_seed(1)
    logits = torch.randn(4, 3, 28, 28, requires_grad=True)
    targets = (torch.rand(4, 28, 28) > 0.5).float()
    labels = torch.tensor([2, 0, 1, 2])
    loss = mask_loss(logits, targets, labels)
    chosen = logits[torch.arange(4), labels]
    expected = F.binary_cross_entropy_with_logits(chosen, targets)  # mean over R x 28 x 28
    torch.testing.assert_close(loss, expected)
    loss.backward()
    other = torch.ones(4, 3, dtype=torch.bool)
    other[torch.arange(4), labels] = False
    assert logits.grad[other].abs().max() == 0  # other channels get no gradient
    assert logits.grad[~other].abs().min() > 0
    # Other channels' logits do not change the loss.
    changed = logits.detach().clone()
    changed[other] += 100.0
    torch.testing.assert_close(mask_loss(changed, targets, labels), loss.detach())
    # loss_weight scales.
    torch.testing.assert_close(mask_loss(logits, targets, labels, loss_weight=2.0), 2 * loss.detach())


def test_mask_loss_weights_mean_over_positives_and_zero_positives():
    torch.manual_seed(2)
    logits = torch.randn(5, 2, 28, 28, requires_grad=True)
    targets = (torch.rand(5, 28, 28) > 0.5).float()
    labels = torch.tensor([1, 0, 2, 1, 2])  # 2 = background in the negative rows
    positive = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    weighted = mask_loss(logits, targets, labels, weights=positive)
    keep = positive.bool()
    torch.testing.assert_close(weighted, mask_loss(logits[keep], targets[keep], labels[keep]))
    weighted.backward()
    assert logits.grad[~keep].abs().max() == 0
    # No positives: zero, finite, still connected to the graph.
    logits.grad = None
    zero = mask_loss(logits, targets, labels, weights=torch.zeros(5))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert logits.grad.abs().max() == 0
    head = FCNMaskHead(in_channels=4, conv_channels=8, num_convs=1, num_classes=2)
    empty = mask_loss(head(torch.zeros(0, 4, 14, 14)), torch.zeros(0, 28, 28), torch.zeros(0, dtype=torch.int64))
    assert empty.item() == 0.0
    empty.backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in head.parameters())
    with pytest.raises(ValueError, match="mask_targets"):
        mask_loss(logits, targets[:, :14], labels)
    with pytest.raises(ValueError, match="weights"):
        mask_loss(logits, targets, labels, weights=torch.ones(3))


def test_mask_loss_half_precision_logits_give_float32():
    logits = torch.randn(2, 3, 28, 28).half()
    loss = mask_loss(logits, torch.ones(2, 28, 28), torch.tensor([0, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_probs_for_labels_and_select():
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 28, 28).half()
    labels = torch.tensor([3, 0, 2])
    probs = mask_probs_for_labels(logits, labels)
    assert probs.dtype == torch.float32 and probs.shape == (3, 28, 28)
    torch.testing.assert_close(probs, logits.float()[torch.arange(3), labels].sigmoid())
    agnostic = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(select_class_masks(agnostic, labels), agnostic[:, 0])
    with pytest.raises(ValueError, match="labels"):
        select_class_masks(logits, labels[:2])


def test_mask_roi_extractor_is_14x14_with_the_box_level_rule():
    extractor = mask_roi_extractor()
    assert isinstance(extractor, MultiLevelRoIExtractor)
    assert extractor.output_size == 14 and extractor.sampling_ratio == 0 and extractor.featmap_strides == (4, 8, 16, 32)
    feats = [torch.randn(1, 256, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    rois = torch.tensor([[0.0, 0, 0, 30, 30], [0.0, 0, 0, 60, 60]])
    assert extractor(feats, rois).shape == (2, 256, 14, 14)


def test_training_and_test_path_fit_together():
    """A head overfits one mask: targets from mask_targets, loss, then paste the prediction back."""
    torch.manual_seed(4)
    mask = torch.zeros(1, 40, 40, dtype=torch.uint8)
    mask[0, 10:30, 12:28] = 1
    mask[0, 10:18, 12:20] = 0  # an L shape
    rois = torch.tensor([[0.0, 8, 6, 32, 34]])
    targets = mask_targets([mask], torch.tensor([0]), rois)
    head = FCNMaskHead(in_channels=4, conv_channels=16, num_convs=1, num_classes=2)
    features = torch.randn(1, 4, 14, 14)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(150):
        optimizer.zero_grad()
        loss = mask_loss(head(features), targets, torch.tensor([1]))
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    probs = mask_probs_for_labels(head(features), torch.tensor([1]))
    pasted = paste_masks_in_image(probs.detach(), rois[:, 1:], (40, 40))[0]
    iou = (pasted & mask[0].bool()).sum() / (pasted | mask[0].bool()).sum()
    assert iou > 0.9
