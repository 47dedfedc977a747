"""Tests of libra.roi_heads.roi_extractor: FPN level rule and per-level RoIAlign."""
import pytest
import torch

from libra.roi_heads.roi_extractor import MultiLevelRoIExtractor, map_rois_to_levels

torchvision_ops = pytest.importorskip("torchvision.ops")

STRIDES = (4, 8, 16, 32)


def _square_rois(sizes, batch_index=0.0, x0=10.0, y0=20.0):
    return torch.tensor([[batch_index, x0, y0, x0 + s, y0 + s] for s in sizes], dtype=torch.float32)


def test_level_assignment():
    rois = _square_rois([50, 111, 113, 223, 225, 447, 449, 1000])
    assert map_rois_to_levels(rois, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # non-square: the geometric mean side decides (sqrt(56 * 448) = 158.4 -> level 1)
    assert map_rois_to_levels(torch.tensor([[0.0, 0.0, 0.0, 56.0, 448.0]]), 4).tolist() == [1]
    # degenerate boxes go to the finest level, fewer levels clamp
    assert map_rois_to_levels(torch.tensor([[0.0, 5.0, 5.0, 5.0, 5.0]]), 4).tolist() == [0]
    assert map_rois_to_levels(_square_rois([1000]), 2).tolist() == [1]


def _features(batch=2, channels=3, image_size=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, image_size // s, image_size // s, generator=generator) for s in STRIDES
    ] + [torch.randn(batch, channels, image_size // 64, image_size // 64, generator=generator)]  # P6, ignored


def test_output_equals_roi_align_on_the_right_level():
    feats = _features()
    generator = torch.Generator().manual_seed(1)
    sizes = torch.tensor([20, 50, 111, 113, 150, 223, 225, 300, 447, 449, 600, 1000] * 2, dtype=torch.float32)
    k = sizes.shape[0]
    x1 = torch.rand(k, generator=generator) * 200 - 20
    y1 = torch.rand(k, generator=generator) * 200 - 20
    aspect = torch.rand(k, generator=generator) + 0.5
    widths, heights = sizes * aspect.sqrt(), sizes / aspect.sqrt()
    batch_index = torch.randint(0, 2, (k,), generator=generator).float()
    rois = torch.stack([batch_index, x1, y1, x1 + widths, y1 + heights], dim=1)
    rois = rois[torch.randperm(k, generator=generator)]  # levels interleaved

    extractor = MultiLevelRoIExtractor()
    out = extractor(feats, rois)
    assert out.shape == (k, 3, 7, 7)

    levels = map_rois_to_levels(rois, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    for i in range(k):
        level = int(levels[i])
        expected = torchvision_ops.roi_align(
            feats[level], rois[i : i + 1], 7, spatial_scale=1.0 / STRIDES[level], sampling_ratio=0, aligned=True
        )
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5), f"roi {i} (level {level})"


def test_gradient_reaches_features():
    feats = [f.requires_grad_(True) for f in _features(batch=1, channels=2)]
    rois = _square_rois([40, 150, 300, 600])
    MultiLevelRoIExtractor()(feats, rois).sum().backward()
    for level in range(4):
        assert feats[level].grad is not None and feats[level].grad.abs().sum() > 0
    assert feats[4].grad is None  # P6 is not used by the box head


def test_empty_rois_and_bad_input():
    feats = _features(channels=5)
    out = MultiLevelRoIExtractor()(feats, torch.zeros(0, 5))
    assert out.shape == (0, 5, 7, 7)
    with pytest.raises(ValueError, match="rois"):
        MultiLevelRoIExtractor()(feats, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="feature maps"):
        MultiLevelRoIExtractor()(feats[:3], _square_rois([50]))
