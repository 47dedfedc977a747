"""Tests of libra.roi_heads.box_head: shapes, initialisation, key names, class-delta selection."""
import math

import pytest
import torch
from torch import nn

from libra.roi_heads.box_head import Shared2FCBoxHead, Shared4Conv1FCBoxHead, select_class_deltas


def test_shared2fc_shapes_and_keys():
    torch.manual_seed(0)
    head = Shared2FCBoxHead(num_classes=80)
    cls_logits, box_deltas = head(torch.randn(3, 256, 7, 7))
    assert cls_logits.shape == (3, 81) and box_deltas.shape == (3, 320)
    shapes = {name: tuple(p.shape) for name, p in head.state_dict().items()}
    assert shapes == {
        "shared_fcs.0.weight": (1024, 12544),
        "shared_fcs.0.bias": (1024,),
        "shared_fcs.1.weight": (1024, 1024),
        "shared_fcs.1.bias": (1024,),
        "fc_cls.weight": (81, 1024),
        "fc_cls.bias": (81,),
        "fc_reg.weight": (320, 1024),
        "fc_reg.bias": (320,),
    }
    empty_cls, empty_deltas = head(torch.zeros(0, 256, 7, 7))
    assert empty_cls.shape == (0, 81) and empty_deltas.shape == (0, 320)


def test_shared2fc_init_statistics():
    torch.manual_seed(0)
    head = Shared2FCBoxHead(num_classes=80)
    assert head.fc_reg.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert head.fc_cls.weight.std().item() == pytest.approx(0.01, rel=0.05)
    for fc in head.shared_fcs:
        bound = math.sqrt(6 / (fc.in_features + fc.out_features))  # Xavier uniform
        assert fc.weight.abs().max().item() <= bound
        assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for module in (*head.shared_fcs, head.fc_cls, head.fc_reg):
        assert module.bias.abs().max().item() == 0.0


def test_shared4conv1fc_structure_and_shapes():
    torch.manual_seed(0)
    head = Shared4Conv1FCBoxHead(num_classes=20)
    group_norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == 4 and all(gn.num_groups == 32 and gn.num_channels == 256 for gn in group_norms)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert len(head.shared_fcs) == 1 and head.shared_fcs[0].out_features == 1024
    assert "shared_convs.0.gn.weight" in head.state_dict() and "shared_convs.3.conv.weight" in head.state_dict()
    cls_logits, box_deltas = head(torch.randn(2, 256, 7, 7))
    assert cls_logits.shape == (2, 21) and box_deltas.shape == (2, 80)
    assert head.fc_reg.weight.std().item() == pytest.approx(0.001, rel=0.05)

    plain = Shared4Conv1FCBoxHead(num_classes=20, norm=None)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="norm"):
        Shared4Conv1FCBoxHead(norm="BN")


def test_select_class_deltas():
    num_rois, num_classes = 5, 3
    box_deltas = torch.arange(num_rois * 4 * num_classes, dtype=torch.float32).view(num_rois, 4 * num_classes)
    labels = torch.tensor([2, 0, 1, 1, 2])
    selected = select_class_deltas(box_deltas, labels)
    assert selected.shape == (num_rois, 4)
    for k in range(num_rois):
        c = int(labels[k])
        assert torch.equal(selected[k], box_deltas[k, 4 * c : 4 * c + 4])
    # background label (C) stays a valid gather (rows get zero weight in the loss)
    assert select_class_deltas(box_deltas, torch.full((num_rois,), num_classes)).shape == (num_rois, 4)
    # gradient flows only into the selected columns
    deltas = box_deltas.clone().requires_grad_(True)
    select_class_deltas(deltas, labels).sum().backward()
    assert deltas.grad.sum().item() == num_rois * 4 and deltas.grad[0, 8:12].tolist() == [1.0] * 4
    # class-agnostic deltas are returned as they are
    assert torch.equal(select_class_deltas(box_deltas[:, :4], labels), box_deltas[:, :4])
    with pytest.raises(ValueError, match="labels"):
        select_class_deltas(box_deltas, labels[:3])
