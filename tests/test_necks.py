"""Tests for libra.necks: FPN, PAFPN, NonLocal2d and the Balanced Feature Pyramid (Sec. 3.2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from libra.necks import FPN, PAFPN, BalancedFeaturePyramid, NonLocal2d

torch.set_num_threads(1)

IN_CHANNELS = [8, 16, 32, 64]
# Level sizes a ResNet gives for a 100x150 input: C2..C5 (each ceil of the previous / 2).
ODD_SIZES = [(25, 38), (13, 19), (7, 10), (4, 5)]


def _backbone_like_feats(sizes=ODD_SIZES, channels=IN_CHANNELS, batch: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, h, w, generator=generator) for c, (h, w) in zip(channels, sizes)]


def _pyramid(sizes, channels: int, batch: int = 2, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, channels, h, w, generator=generator, dtype=dtype) for h, w in sizes]


# ---------------------------------------------------------------- hand-written oracles (explicit loops)


def _nearest_loop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Legacy 'nearest': output cell (i, j) copies input (floor(i * h / H), floor(j * w / W))."""
    batch, channels, h, w = x.shape
    out = x.new_empty(batch, channels, *size)
    for i in range(size[0]):
        for j in range(size[1]):
            src_i = min(math.floor(i * h / size[0]), h - 1)
            src_j = min(math.floor(j * w / size[1]), w - 1)
            out[:, :, i, j] = x[:, :, src_i, src_j]
    return out


def _adaptive_max_loop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive max pooling: window of cell i is [floor(i*h/H), ceil((i+1)*h/H))."""
    batch, channels, h, w = x.shape
    out = x.new_empty(batch, channels, *size)
    for i in range(size[0]):
        r0, r1 = (i * h) // size[0], -((-(i + 1) * h) // size[0])
        for j in range(size[1]):
            c0, c1 = (j * w) // size[1], -((-(j + 1) * w) // size[1])
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].amax(dim=(2, 3))
    return out


def _bfp_by_hand(feats, refine_level: int, refine=lambda f: f) -> list[torch.Tensor]:
    """Eq. 3 gather + average, ``refine``, then scatter-add, with explicit loops."""
    target = tuple(feats[refine_level].shape[-2:])
    total = torch.zeros_like(feats[refine_level])
    for level, feat in enumerate(feats):
        if level < refine_level:
            total = total + _adaptive_max_loop(feat, target)
        elif level > refine_level:
            total = total + _nearest_loop(feat, target)
        else:
            total = total + feat
    balanced = refine(total / len(feats))
    outs = []
    for level, feat in enumerate(feats):
        size = tuple(feat.shape[-2:])
        if level < refine_level:
            outs.append(feat + _nearest_loop(balanced, size))
        elif level > refine_level:
            outs.append(feat + _adaptive_max_loop(balanced, size))
        else:
            outs.append(feat + balanced)
    return outs


def _non_local_by_hand(block: NonLocal2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 in float64: x + W_out (softmax_j(theta_i^T phi_j) g_j) + b_out, per image."""
    x = x.double()

    def conv1x1(conv, feat):  # [C_in, N] -> [C_out, N]
        return conv.weight.double().flatten(1) @ feat + conv.bias.double()[:, None]

    outs = []
    for image in x:
        channels, h, w = image.shape
        flat = image.reshape(channels, h * w)
        theta, phi, g = conv1x1(block.theta, flat), conv1x1(block.phi, flat), conv1x1(block.g, flat)
        logits = theta.T @ phi  # [N, N]; row i holds theta_i^T phi_j, no 1/sqrt(C)
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        y = g @ weights.T  # [C', N]: column i = sum_j w_ij g_j
        outs.append((flat + conv1x1(block.conv_out, y)).reshape(channels, h, w))
    return torch.stack(outs)


# ---------------------------------------------------------------- FPN


def test_fpn_shapes_for_odd_sizes_and_p6_is_strided_max_pool() -> None:
    fpn = FPN(IN_CHANNELS, out_channels=16, num_outs=5)
    feats = _backbone_like_feats()
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, h, w) for h, w in ODD_SIZES + [(2, 3)]]
    torch.testing.assert_close(outs[4], F.max_pool2d(outs[3], kernel_size=1, stride=2), rtol=0, atol=0)
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2], rtol=0, atol=0)


def test_fpn_top_down_matches_hand_computation() -> None:
    fpn = FPN(IN_CHANNELS, out_channels=16)
    feats = _backbone_like_feats()
    outs = fpn(feats)
    with torch.no_grad():
        lat = [conv(f) for conv, f in zip(fpn.lateral_convs, feats)]
        merged5 = lat[3]
        merged4 = lat[2] + _nearest_loop(merged5, ODD_SIZES[2])
        merged3 = lat[1] + _nearest_loop(merged4, ODD_SIZES[1])
        torch.testing.assert_close(outs[3], fpn.fpn_convs[3](merged5))
        torch.testing.assert_close(outs[2], fpn.fpn_convs[2](merged4))
        torch.testing.assert_close(outs[1], fpn.fpn_convs[1](merged3))


def test_fpn_module_names_init_and_bad_input() -> None:
    fpn = FPN()
    names = set(dict(fpn.named_parameters()))
    assert {"lateral_convs.0.weight", "lateral_convs.3.bias", "fpn_convs.3.weight"} <= names
    assert tuple(fpn.lateral_convs[3].weight.shape) == (256, 2048, 1, 1)
    assert all(torch.count_nonzero(conv.bias) == 0 for conv in [*fpn.lateral_convs, *fpn.fpn_convs])
    bound = math.sqrt(6.0 / (256 * 9 + 256 * 9))  # Xavier-uniform bound of a 3x3 256->256 conv
    assert fpn.fpn_convs[0].weight.abs().max() <= bound
    assert fpn.fpn_convs[0].weight.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="4 feature maps"):
        FPN(IN_CHANNELS, 16)(_backbone_like_feats()[:3])
    with pytest.raises(ValueError, match="input 1"):
        FPN(IN_CHANNELS, 16)(_backbone_like_feats(channels=[8, 17, 32, 64]))


@pytest.mark.parametrize("relu", [False, True])
def test_fpn_from_c3_with_conv_extra_levels_on_input(relu: bool) -> None:
    """RetinaNet's neck (MMDetection libra-retinanet_r50_fpn_1x_coco: start_level=1,
    add_extra_convs='on_input', 5 outputs P3..P7): P6 = 3x3 s2 conv of C5, P7 = 3x3 s2 conv of
    P6 with no ReLU between them (relu_before_extra_convs=False), unless asked for."""
    fpn = FPN(IN_CHANNELS, 16, num_outs=5, start_level=1, extra_levels="on_input", relu_before_extra_convs=relu)
    feats = _backbone_like_feats()
    outs = fpn(feats)
    assert len(fpn.lateral_convs) == 3 and len(fpn.fpn_convs) == 5
    assert tuple(fpn.fpn_convs[3].weight.shape) == (16, IN_CHANNELS[-1], 3, 3)  # on C5
    assert tuple(fpn.fpn_convs[4].weight.shape) == (16, 16, 3, 3)
    assert {"fpn_convs.3.weight", "fpn_convs.4.bias"} <= set(dict(fpn.named_parameters()))
    sizes = ODD_SIZES[1:] + [((ODD_SIZES[-1][0] + 1) // 2, (ODD_SIZES[-1][1] + 1) // 2)]
    sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    assert [tuple(o.shape[-2:]) for o in outs] == sizes
    with torch.no_grad():
        p6 = fpn.fpn_convs[3](feats[3])
        torch.testing.assert_close(outs[3], p6)
        torch.testing.assert_close(outs[4], fpn.fpn_convs[4](F.relu(p6) if relu else p6))
        # the used levels are an FPN over C3..C5 alone
        plain = FPN(IN_CHANNELS[1:], 16, num_outs=3)
        plain.load_state_dict({k: v for k, v in fpn.state_dict().items() if not k.startswith(("fpn_convs.3", "fpn_convs.4"))})
        for mine, reference in zip(outs[:3], plain(feats[1:])):
            torch.testing.assert_close(mine, reference)


def test_fpn_conv_extra_levels_on_output_and_bad_settings() -> None:
    fpn = FPN(IN_CHANNELS, 16, num_outs=6, extra_levels="on_output")
    feats = _backbone_like_feats()
    outs = fpn(feats)
    assert len(outs) == 6 and tuple(fpn.fpn_convs[4].weight.shape) == (16, 16, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(outs[4], fpn.fpn_convs[4](outs[3]))
        torch.testing.assert_close(outs[5], fpn.fpn_convs[5](outs[4]))
    with pytest.raises(ValueError, match="extra_levels"):
        FPN(IN_CHANNELS, 16, extra_levels="on_lateral")
    with pytest.raises(ValueError, match="start_level"):
        FPN(IN_CHANNELS, 16, start_level=4)


# ---------------------------------------------------------------- PAFPN


def test_pafpn_shapes_and_bottom_up_path() -> None:
    pafpn = PAFPN(IN_CHANNELS, out_channels=16, num_outs=5)
    feats = _backbone_like_feats()
    outs = pafpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, h, w) for h, w in ODD_SIZES + [(2, 3)]]
    assert len(pafpn.downsample_convs) == 3 and len(pafpn.pafpn_convs) == 3
    assert pafpn.downsample_convs[0].stride == (2, 2)
    # Oracle: an FPN with the same lateral / fpn weights gives N2..N5; rebuild P2, P3, P6 from them.
    fpn = FPN(IN_CHANNELS, out_channels=16)
    fpn.load_state_dict(pafpn.state_dict(), strict=False)
    with torch.no_grad():
        n = fpn(feats)
        n3 = n[1] + pafpn.downsample_convs[0](n[0])
        torch.testing.assert_close(outs[0], n[0])
        torch.testing.assert_close(outs[1], pafpn.pafpn_convs[0](n3))
    torch.testing.assert_close(outs[4], F.max_pool2d(outs[3], 1, stride=2), rtol=0, atol=0)


def test_pafpn_real_sizes_and_balanced_pafpn_composition() -> None:
    sizes = [(104, 152), (52, 76), (26, 38), (13, 19)]  # 416x608 input
    neck = torch.nn.Sequential(PAFPN(IN_CHANNELS, 16), BalancedFeaturePyramid(16))
    outs = neck(_backbone_like_feats(sizes=sizes, batch=1))
    assert [tuple(o.shape[-2:]) for o in outs] == sizes + [(7, 10)]


# ---------------------------------------------------------------- Balanced Feature Pyramid


def test_bfp_parameter_count_and_refine_types() -> None:
    assert sum(p.numel() for p in BalancedFeaturePyramid(256).parameters()) == 263_168
    assert sum(p.numel() for p in BalancedFeaturePyramid(256, refine_type="conv").parameters()) == 590_080
    assert sum(p.numel() for p in BalancedFeaturePyramid(256, refine_type=None).parameters()) == 0
    names = set(dict(BalancedFeaturePyramid(256).named_parameters()))
    assert names == {f"refine.{c}.{p}" for c in ("g", "theta", "phi", "conv_out") for p in ("weight", "bias")}
    with pytest.raises(ValueError, match="refine_type"):
        BalancedFeaturePyramid(256, refine_type="attention")
    with pytest.raises(ValueError, match="refine_level"):
        BalancedFeaturePyramid(256, num_levels=5, refine_level=5)


@pytest.mark.parametrize(
    "sizes",
    [
        [(104, 152), (52, 76), (26, 38), (13, 19), (7, 10)],  # P2..P6 of a 416x608 input
        [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)],  # P2..P6 of 100x150: odd everywhere
        [(30, 41), (17, 19), (9, 11), (5, 4), (3, 2)],  # not multiples of each other at all
    ],
)
@pytest.mark.parametrize("refine_type", ["non_local", "conv", None])
def test_bfp_output_shapes_equal_input_shapes(sizes, refine_type) -> None:
    bfp = BalancedFeaturePyramid(8, refine_type=refine_type)
    feats = _pyramid(sizes, 8, batch=1)
    outs = bfp(feats)
    assert [o.shape for o in outs] == [f.shape for f in feats]


@pytest.mark.parametrize("refine_level", [2, 1])
def test_bfp_without_refine_equals_hand_gather_average_scatter(refine_level: int) -> None:
    sizes = [(17, 23), (9, 12), (5, 6), (3, 3), (2, 2)]
    feats = _pyramid(sizes, 4)
    outs = BalancedFeaturePyramid(4, refine_level=refine_level, refine_type=None)(feats)
    expected = _bfp_by_hand(feats, refine_level)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp)
    # The residual is not zero: each level really received information from the others.
    assert all((o - f).abs().max() > 0 for o, f in zip(outs, feats))


def test_bfp_default_non_local_starts_as_identity_refinement() -> None:
    feats = _pyramid([(26, 38), (13, 19), (7, 10), (4, 5), (2, 3)], 8)
    outs = BalancedFeaturePyramid(8)(feats)
    plain = BalancedFeaturePyramid(8, refine_type=None)(feats)
    for out, exp in zip(outs, plain):
        assert torch.equal(out, exp)


def test_non_local_init() -> None:
    block = NonLocal2d(256)
    assert block.inter_channels == 256
    assert torch.count_nonzero(block.conv_out.weight) == 0 and torch.count_nonzero(block.conv_out.bias) == 0
    for conv in (block.g, block.theta, block.phi):
        assert torch.count_nonzero(conv.bias) == 0
        assert abs(conv.weight.std().item() - 0.01) < 0.001


def _randomise(block: NonLocal2d, scale: float) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for conv in (block.g, block.theta, block.phi, block.conv_out):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * scale)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)


def test_non_local_with_nonzero_conv_out_matches_float64_eq4() -> None:
    block = NonLocal2d(8)
    _randomise(block, scale=0.5)
    x = torch.randn(2, 8, 3, 5)
    out = block(x)
    expected = _non_local_by_hand(block, x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert (out - x).abs().max() > 1e-2  # conv_out is active
    # Attention is far from uniform, so a 1/sqrt(C) scaling of theta^T phi would have been detected.
    with torch.no_grad():
        block.theta.weight.mul_(1 / math.sqrt(8))
        block.theta.bias.mul_(1 / math.sqrt(8))
    assert (block(x) - out).abs().max() > 1e-3


def test_bfp_with_active_non_local_equals_hand_pipeline() -> None:
    bfp = BalancedFeaturePyramid(8)
    _randomise(bfp.refine, scale=0.3)
    feats = _pyramid([(13, 19), (7, 10), (4, 5), (2, 3), (1, 2)], 8, batch=2)
    outs = bfp(feats)
    expected = _bfp_by_hand(
        [f.double() for f in feats], 2, refine=lambda f: _non_local_by_hand(bfp.refine, f)
    )
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-5)


def test_bfp_gradients_reach_refine_and_inputs() -> None:
    bfp = BalancedFeaturePyramid(8)
    feats = [f.requires_grad_() for f in _pyramid([(13, 19), (7, 10), (4, 5), (2, 3), (1, 2)], 8)]
    sum(o.square().sum() for o in bfp(feats)).backward()
    assert bfp.refine.conv_out.weight.grad.abs().max() > 0  # conv_out learns from the zero start
    assert all(f.grad is not None and f.grad.abs().max() > 0 for f in feats)


def test_bfp_bad_input_raises_value_error() -> None:
    bfp = BalancedFeaturePyramid(8)
    with pytest.raises(ValueError, match="5 maps"):
        bfp(_pyramid([(8, 8), (4, 4), (2, 2), (1, 1)], 8))
    with pytest.raises(ValueError, match="level 0"):
        bfp(_pyramid([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], 4))
