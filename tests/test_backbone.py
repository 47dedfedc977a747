"""Tests for libra.backbone: ResNet / ResNeXt shapes, freezing, torchvision-compatible weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libra.backbone import (
    FrozenBatchNorm2d,
    ResNet,
    build_resnet,
    load_pretrained,
    resnet50,
    resnet101,
    resnext101_64x4d,
)

torch.set_num_threads(1)


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in module.named_buffers()}


def test_resnet50_output_shapes_and_strides() -> None:
    model = resnet50().eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert model.out_channels == [256, 512, 1024, 2048]
    assert model.out_strides == [4, 8, 16, 32]
    assert len(outs) == 4
    for out, channels, stride in zip(outs, model.out_channels, model.out_strides):
        assert out.shape == (2, channels, 64 // stride, 96 // stride)


def test_odd_input_rounds_up_at_every_stride() -> None:
    model = resnet50().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 65, 97))
    assert [tuple(o.shape[-2:]) for o in outs] == [(17, 25), (9, 13), (5, 7), (3, 4)]


def test_pytorch_style_stride_on_3x3_conv() -> None:
    model = resnet50()
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_resnext101_64x4d_block_widths() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = resnext101_64x4d()
    first = model.layer1[0]
    assert first.conv2.groups == 64
    assert first.conv1.out_channels == 256  # int(64 * 4 / 64) * 64
    assert tuple(first.conv2.weight.shape) == (256, 4, 3, 3)
    assert first.conv3.out_channels == 256
    last = model.layer4[0]
    assert last.conv2.groups == 64 and last.conv2.in_channels == 2048  # int(512 * 4 / 64) * 64
    assert [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)] == [3, 4, 23, 3]
    assert model.out_channels == [256, 512, 1024, 2048]


def test_depth_101_has_23_blocks_in_layer3() -> None:
    with torch.device("meta"):
        model = resnet101()
    assert len(model.layer3) == 23 and model.layer3[0].conv2.groups == 1


def test_frozen_stages_have_no_grad_and_bn_stats_never_change() -> None:
    model = resnet50()
    model.train()
    for name, param in model.named_parameters():
        frozen = name.startswith(("conv1.", "bn1.", "layer1."))
        assert param.requires_grad == (not frozen), name
    # Affine BN parameters of unfrozen stages are trainable; statistics are buffers.
    assert model.layer2[0].bn1.weight.requires_grad and model.layer2[0].bn1.bias.requires_grad
    assert isinstance(model.layer3[0].bn2, FrozenBatchNorm2d)
    assert not model.layer1.training and not model.bn1.training and model.layer2.training

    before = _buffers(model)
    outs = model(torch.randn(2, 3, 64, 64) * 3 + 1)
    sum(o.mean() for o in outs).backward()
    after = _buffers(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert model.conv1.weight.grad is None and model.layer1[0].conv2.weight.grad is None
    assert model.layer2[0].conv2.weight.grad is not None
    assert model.layer2[0].bn2.weight.grad is not None


def test_norm_eval_false_trains_stats_only_in_unfrozen_stages() -> None:
    model = ResNet(50, frozen_stages=1, norm_eval=False)
    assert isinstance(model.layer2[0].bn1, nn.BatchNorm2d)
    model.train()
    before = _buffers(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 3 + 1)
    after = _buffers(model)
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert torch.equal(before["bn1.running_var"], after["bn1.running_var"])
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])


def test_frozen_batch_norm_matches_eval_batch_norm() -> None:
    reference = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
        reference.bias.uniform_(-1, 1)
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(reference.state_dict())
    frozen.train()
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(frozen(x), reference(x))
    # Old checkpoints without num_batches_tracked still load strictly.
    old = {k: v for k, v in reference.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm2d(6).load_state_dict(old, strict=True)


def test_bad_input_and_unknown_name_raise_value_error() -> None:
    model = resnet50()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="resnet50"):
        build_resnet("resnet18")
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=34)
    assert isinstance(build_resnet("resnet50"), ResNet)


def test_state_dict_keys_and_shapes_equal_torchvision() -> None:
    models = pytest.importorskip("torchvision.models")
    pairs = [
        (resnet50, models.resnet50),
        (resnet101, models.resnet101),
        (resnext101_64x4d, models.resnext101_64x4d),
    ]
    for ours_factory, theirs_factory in pairs:
        with torch.device("meta"):
            ours = ours_factory().state_dict()
            theirs = {k: v for k, v in theirs_factory().state_dict().items() if not k.startswith("fc.")}
        assert list(ours.keys()) == list(theirs.keys()), ours_factory.__name__
        for key in ours:
            assert ours[key].shape == theirs[key].shape, key


def _randomised_torchvision_resnet50() -> nn.Module:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    reference = models.resnet50()
    # Non-trivial BN statistics and affine parameters, so a wrongly loaded BN would show.
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return reference.eval()


def test_load_torchvision_checkpoint_reproduces_torchvision_c5(tmp_path) -> None:
    reference = _randomised_torchvision_resnet50()
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(reference.state_dict(), path)

    model = load_pretrained(resnet50(), path).train()  # train mode must not matter
    assert not model.conv1.weight.requires_grad  # loading keeps the freezing
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        c5 = model(x)[-1]
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(y))))
    assert c5.abs().max() > 0
    torch.testing.assert_close(c5, expected, rtol=1e-4, atol=1e-4)


def test_load_pretrained_accepts_wrapped_old_style_checkpoint(tmp_path) -> None:
    reference = _randomised_torchvision_resnet50()
    state = {"module." + k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 1}}, path)
    model = load_pretrained(resnet50(), path)
    assert torch.equal(model.layer3[2].bn2.running_var, reference.layer3[2].bn2.running_var)


def test_load_pretrained_wrong_key_and_shape_raise_value_error(tmp_path) -> None:
    model = resnet50()
    state = dict(model.state_dict())
    state["layer1.0.convX.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "bad_key.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_pretrained(model, path)
    message = str(error.value)
    assert "layer1.0.convX.weight" in message and "layer1.0.conv1.weight" in message
    assert "missing" in message and "unexpected" in message

    state = dict(model.state_dict())
    state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight.*\(128, 128, 1, 1\)"):
        load_pretrained(model, path)


def test_stage_blocks_and_width_give_a_shallow_net_with_the_same_names() -> None:
    full = build_resnet("resnet50")
    shallow = build_resnet("resnet50", width_per_group=8, stage_blocks=(1, 1, 1, 1))
    assert [len(getattr(shallow, f"layer{k}")) for k in range(1, 5)] == [1, 1, 1, 1]
    # Same names as the first block of each full stage; widths follow width_per_group.
    assert set(shallow.state_dict()) < set(full.state_dict())
    assert shallow.layer1[0].conv2.out_channels == 8 and full.layer1[0].conv2.out_channels == 64
    outputs = shallow(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outputs] == shallow.out_channels == [256, 512, 1024, 2048]
    with pytest.raises(ValueError, match="stage_blocks"):
        build_resnet("resnet50", stage_blocks=(1, 1, 0, 1))
    with pytest.raises(ValueError, match="stage_blocks"):
        build_resnet("resnet50", stage_blocks=(1, 1, 1))


def test_presets_expose_backbone_norm_and_stage_blocks() -> None:
    from libra.presets import build_model

    model = build_model(
        "libra_faster_rcnn_r50_fpn", 3, backbone_norm="bn", frozen_stages=-1, stage_blocks=(1, 2, 1, 1)
    )
    norms = [m for m in model.backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert len(model.backbone.layer2) == 2
    assert all(p.requires_grad for p in model.backbone.parameters())
    default = build_model("faster_rcnn_r50_fpn", 3)
    assert all(type(m) is FrozenBatchNorm2d for m in default.backbone.modules() if "BatchNorm" in type(m).__name__)
    with pytest.raises(ValueError, match="backbone_norm"):
        build_model("faster_rcnn_r50_fpn", 3, backbone_norm="sync")
