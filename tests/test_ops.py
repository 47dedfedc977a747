"""Tests for libra.ops: RoIAlign and NMS (compiled kernels, pure-PyTorch references).

Oracles: torchvision.ops (independent implementation; those tests skip when it is
missing), hand-computed values, and the float64 references in libra/ops/*_reference.py.
Set LIBRA_REQUIRE_EXTENSION=1 (CI does) to fail instead of testing only the fallback.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import libra.ops
from libra.ops import RoIAlign, batched_nms, nms, nms_reference, roi_align, roi_align_reference

nms_module = importlib.import_module("libra.ops.nms")  # the submodule (libra.ops.nms is the function)

try:
    import torchvision.ops as tv_ops
except ImportError:  # the oracle tests skip; the reference tests still run
    tv_ops = None

needs_torchvision = pytest.mark.skipif(tv_ops is None, reason="torchvision not importable (oracle for these tests)")
needs_extension = pytest.mark.skipif(not libra.ops.EXTENSION_AVAILABLE, reason="libra._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _single_thread_rng():
    torch.manual_seed(0)


def random_rois(num_rois: int, num_images: int, height: int, width: int, dtype=torch.float64, scale: float = 1.0):
    """[K, 5] rois in image coordinates (= feature size / scale), partly outside the image,
    including tiny and zero-area boxes."""
    image_h, image_w = height / scale, width / scale
    xy = torch.rand(num_rois, 2, dtype=dtype) * torch.tensor([image_w, image_h], dtype=dtype) * 1.2 - 0.1 * image_w
    wh = torch.rand(num_rois, 2, dtype=dtype) * torch.tensor([image_w, image_h], dtype=dtype) * 0.6
    wh[: num_rois // 8] *= 0.01  # tiny
    wh[num_rois // 8 : num_rois // 8 + 2] = 0.0  # zero area
    batch = torch.randint(0, num_images, (num_rois, 1)).to(dtype)
    return torch.cat([batch, xy, xy + wh], dim=1)


def random_boxes(n: int, dtype=torch.float32, size: float = 100.0) -> torch.Tensor:
    """Clustered boxes (many overlaps) in [0, size]."""
    centres = torch.rand(max(n // 10, 1), 2) * size
    pick = torch.randint(0, centres.shape[0], (n,))
    centre = centres[pick] + torch.randn(n, 2) * size * 0.02
    half = (torch.rand(n, 2) * 0.1 + 0.05) * size
    return torch.cat([centre - half, centre + half], dim=1).to(dtype)


# ----------------------------------------------------------------------------- extension


def test_extension_loaded_when_built_or_required():
    built = list((Path(libra.ops.__file__).resolve().parents[1]).glob("_C*.so")) + list(
        (Path(libra.ops.__file__).resolve().parents[1]).glob("_C*.pyd")
    )
    if os.environ.get("LIBRA_REQUIRE_EXTENSION") == "1" or built:
        assert libra.ops.EXTENSION_AVAILABLE, f"libra._C exists or is required but failed to load: {libra.ops._extension.EXTENSION_ERROR}"
        assert torch.ops.libra.roi_align.default is not None
        assert torch._C._dispatch_has_kernel_for_dispatch_key("libra::roi_align", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("libra::nms", "CPU")
    else:
        pytest.skip("libra._C not built and LIBRA_REQUIRE_EXTENSION != 1")


@needs_extension
def test_extension_loads_when_libra_is_imported_before_torch():
    # libra._C links libc10/libtorch; importing it before torch must still work.
    code = "import libra.ops, sys; sys.exit(0 if libra.ops.EXTENSION_AVAILABLE else 1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- RoIAlign values


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("aligned, first_row", [(True, [4.5, 5.0, 5.5, 6.0]), (False, [7.5, 8.0, 8.5, 9.0])])
@pytest.mark.parametrize("use_reference", [False, True])
def test_roi_align_exact_values(sampling_ratio, aligned, first_row, use_reference):
    """5x5 image with value 5*y + x at pixel (y, x); box [1, 1, 3, 3], 4x4 bins.

    The image is linear in (y, x), so bilinear sampling is exact and the mean of
    samples placed symmetrically in a bin is the value at the bin centre, for any
    sampling ratio (0 gives ceil(2/4) = 1 sample, 2 gives 2x2).
    aligned: RoI = [1-0.5, 3-0.5] = [0.5, 2.5], bin 0.5, first-row centre y = 0.75 and
    x = 0.75, 1.25, 1.75, 2.25 -> 5*0.75 + x = 4.5, 5.0, 5.5, 6.0.
    unaligned: RoI = [1, 3], centre y = 1.25, x = 1.25..2.75 -> 7.5, 8.0, 8.5, 9.0.
    """
    image = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    rois = torch.tensor([[0, 1, 1, 3, 3]], dtype=torch.float32)
    centre_y = 0.75 if aligned else 1.25
    xs = [centre_y + 0.5 * i for i in range(4)]
    expected_row = [5 * centre_y + x for x in xs]
    assert expected_row == first_row  # the hand computation above
    if use_reference:
        out = roi_align_reference(image, rois, 1.0, 4, 4, sampling_ratio, aligned)
    else:
        out = roi_align(image, rois, 4, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(first_row), rtol=0, atol=1e-6)
    # every row is the first row shifted by 5 * 0.5 (bin height 0.5, 5 per row)
    torch.testing.assert_close(out[0, 0, 3], torch.tensor(first_row) + 7.5, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- RoIAlign vs torchvision


@needs_torchvision
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.125])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, spatial_scale):
    feats = torch.randn(2, 3, 13, 17, dtype=torch.float64, requires_grad=True)
    rois = random_rois(40, 2, 13, 17, scale=spatial_scale)
    out = roi_align(feats, rois, (5, 4), spatial_scale, sampling_ratio, aligned)
    expected = tv_ops.roi_align(feats, rois, (5, 4), spatial_scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, feats, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, feats, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@needs_torchvision
def test_roi_align_matches_torchvision_float32_fpn_like():
    feats = torch.randn(2, 8, 25, 38)
    rois = random_rois(64, 2, 25, 38, dtype=torch.float32, scale=1 / 32)
    out = roi_align(feats, rois, 7, 1 / 32, 0, True)
    expected = tv_ops.roi_align(feats, rois, 7, 1 / 32, 0, True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- RoIAlign vs reference


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_extension_matches_reference(dtype, aligned, sampling_ratio):
    feats = torch.randn(2, 4, 11, 9, dtype=dtype, requires_grad=True)
    rois = random_rois(30, 2, 22, 18, dtype=dtype, scale=0.5)
    out = torch.ops.libra.roi_align(feats, rois, 0.5, 3, 5, sampling_ratio, aligned)
    expected = roi_align_reference(feats, rois, 0.5, 3, 5, sampling_ratio, aligned)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, feats, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, feats, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_gradcheck(aligned):
    feats = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [0, -1.0, 2.0, 3.5, 8.0], [0, 2.0, 2.0, 2.5, 2.25]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, 3, 1.0, 0, aligned), (feats,))
    assert torch.autograd.gradcheck(lambda x: roi_align_reference(x, rois, 1.0, 3, 3, 2, aligned), (feats,))


@needs_extension
def test_roi_align_double_backward():
    feats = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [0, 1.0, 2.0, 3.5, 6.0]], dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x: roi_align(x, rois, 2, 1.0, 2, True), (feats,))


@needs_extension
def test_opcheck_all_ops():
    feats = torch.randn(2, 3, 10, 12, requires_grad=True)
    rois = random_rois(12, 2, 10, 12, dtype=torch.float32)
    torch.library.opcheck(torch.ops.libra.roi_align.default, (feats, rois, 1.0, 3, 4, 0, True))
    torch.library.opcheck(torch.ops.libra.roi_align.default, (feats, rois, 0.5, 2, 2, 2, False))
    grad = torch.randn(12, 3, 3, 4)
    torch.library.opcheck(torch.ops.libra._roi_align_backward.default, (grad, rois, 1.0, 3, 4, 2, 3, 10, 12, 0, True))
    boxes = random_boxes(200)
    torch.library.opcheck(torch.ops.libra.nms.default, (boxes, torch.rand(200), 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_low_precision_close_to_float32(dtype):
    feats = torch.randn(2, 4, 16, 20)
    rois = random_rois(20, 2, 16, 20, dtype=torch.float32, scale=0.25) * torch.tensor([1, 1, 1, 1, 1.0])
    low = feats.to(dtype).requires_grad_()
    high = low.detach().float().requires_grad_()
    out_low = roi_align(low, rois, 7, 0.25, 0, True)
    out_high = roi_align(high, rois, 7, 0.25, 0, True)
    assert out_low.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out_low.float(), out_high, rtol=tol, atol=tol)
    grad = torch.randn_like(out_high)
    out_low.backward(grad.to(dtype))
    out_high.backward(grad)
    assert low.grad.dtype == dtype
    torch.testing.assert_close(low.grad.float(), high.grad, rtol=tol, atol=tol)


def test_roi_align_empty_inputs():
    feats = torch.randn(2, 5, 8, 8, requires_grad=True)
    out = roi_align(feats, torch.zeros(0, 5), 7)
    assert out.shape == (0, 5, 7, 7)
    out.sum().backward()
    assert feats.grad is not None and feats.grad.shape == feats.shape and not feats.grad.any()
    assert roi_align(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], (2, 3)).shape == (0, 5, 2, 3)
    assert roi_align_reference(feats, torch.zeros(0, 5), 1.0, 7, 7, 0, True).shape == (0, 5, 7, 7)


@pytest.mark.parametrize("use_reference", [False, True])
def test_roi_align_nan_inf_and_bad_batch_index(use_reference):
    feats = torch.randn(2, 3, 8, 8, requires_grad=True)
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor(
        [
            [0, 1, 1, 5, 5],
            [0, nan, 1, 5, 5],
            [1, 1, 1, inf, 5],
            [nan, 1, 1, 5, 5],
            [5, 1, 1, 5, 5],  # batch index out of range
            [-1, 1, 1, 5, 5],
            [1, -inf, -inf, inf, inf],
            [1, 1e6, 1e6, 1e6 + 2, 1e6 + 2],  # far outside: zeros
        ]
    )
    if use_reference:
        out = roi_align_reference(feats, rois, 1.0, 2, 2, 0, True)
    else:
        out = roi_align(feats, rois, 2)
    assert torch.isfinite(out).all()
    assert out[0].abs().sum() > 0
    assert not out[1:].any()
    out.sum().backward()
    assert torch.isfinite(feats.grad).all()
    expected_grad = torch.autograd.grad(roi_align_reference(feats, rois[:1], 1.0, 2, 2, 0, True).sum(), feats)[0]
    torch.testing.assert_close(feats.grad, expected_grad)


def test_roi_align_non_contiguous_grad():
    feats = torch.randn(2, 4, 9, 9, requires_grad=True)
    rois = random_rois(10, 2, 9, 9, dtype=torch.float32)
    out = roi_align(feats, rois, 3, 1.0, 2, True)
    grad_t = torch.randn(3, 3, 4, 10).permute(3, 2, 1, 0)  # [10, 4, 3, 3], non-contiguous
    assert not grad_t.is_contiguous()
    (grad,) = torch.autograd.grad(out, feats, grad_t, retain_graph=True)
    (expected,) = torch.autograd.grad(out, feats, grad_t.contiguous())
    torch.testing.assert_close(grad, expected)
    (expanded,) = torch.autograd.grad(roi_align(feats, rois, 3, 1.0, 2, True).sum(), feats)
    (ones,) = torch.autograd.grad(roi_align(feats, rois, 3, 1.0, 2, True), feats, torch.ones(10, 4, 3, 3))
    torch.testing.assert_close(expanded, ones)


def test_roi_align_list_input_and_module():
    feats = torch.randn(2, 3, 12, 12)
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 7.0]]), torch.tensor([[0.0, 2.0, 9.0, 9.0], [3.0, 3.0, 4.0, 4.0]])]
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0], [1, 0.0, 2.0, 9.0, 9.0], [1, 3.0, 3.0, 4.0, 4.0]])
    expected = roi_align(feats, rois, (2, 3), 0.5, 0, True)
    torch.testing.assert_close(roi_align(feats, boxes, (2, 3), 0.5, 0, True), expected)
    module = RoIAlign((2, 3), spatial_scale=0.5, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(module(feats, rois), expected)
    assert "output_size=(2, 3)" in repr(module)


def test_roi_align_bad_input_raises_value_error():
    feats = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="rois"):
        roi_align(feats, torch.zeros(3, 4), 7)
    with pytest.raises(ValueError, match="input"):
        roi_align(feats[0], torch.zeros(3, 5), 7)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(feats, torch.zeros(3, 5), (7, 7, 7))
    # sampling_ratio=-1 is valid (adaptive, torchvision's default): see the tests below.


@needs_extension
def test_roi_align_op_called_directly_raises_runtime_error():
    # The wrappers raise ValueError; the ops themselves raise RuntimeError, like torchvision's.
    feats = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="rois"):
        torch.ops.libra.roi_align(feats, torch.zeros(3, 4), 1.0, 7, 7, 0, True)
    with pytest.raises(RuntimeError, match="dets"):
        torch.ops.libra.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)


# ----------------------------------------------------------------------------- RoIAlign adaptive sampling


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("use_reference", [False, True])
def test_roi_align_negative_sampling_ratio_is_adaptive(aligned, use_reference):
    """Any sampling_ratio <= 0 means adaptive (torchvision's default is -1): same as 0."""
    feats = torch.randn(2, 3, 13, 17, dtype=torch.float64, requires_grad=True)
    rois = random_rois(40, 2, 13, 17, scale=0.5)

    def pool(ratio):
        if use_reference:
            return roi_align_reference(feats, rois, 0.5, 5, 4, ratio, aligned)
        return roi_align(feats, rois, (5, 4), 0.5, ratio, aligned)

    expected = pool(0)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, feats, grad_out)
    for ratio in (-1, -5):
        out = pool(ratio)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(out, feats, grad_out)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@needs_torchvision
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_sampling_ratio_minus_one_matches_torchvision(aligned):
    feats = torch.randn(2, 3, 13, 17, dtype=torch.float64, requires_grad=True)
    rois = random_rois(40, 2, 13, 17, scale=0.25)
    out = roi_align(feats, rois, (5, 4), 0.25, -1, aligned)
    expected = tv_ops.roi_align(feats, rois, (5, 4), 0.25, -1, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    module_out = RoIAlign((5, 4), 0.25, -1, aligned)(feats, rois)
    module_expected = tv_ops.RoIAlign((5, 4), 0.25, -1, aligned)(feats, rois)
    torch.testing.assert_close(module_out, module_expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, feats, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, feats, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


@needs_extension
def test_opcheck_negative_sampling_ratio():
    feats = torch.randn(2, 3, 10, 12, requires_grad=True)
    rois = random_rois(12, 2, 10, 12, dtype=torch.float32)
    torch.library.opcheck(torch.ops.libra.roi_align.default, (feats, rois, 1.0, 3, 4, -1, True))
    grad = torch.randn(12, 3, 3, 4)
    torch.library.opcheck(torch.ops.libra._roi_align_backward.default, (grad, rois, 1.0, 3, 4, 2, 3, 10, 12, -1, False))


@needs_torchvision
@pytest.mark.parametrize("stride", [4, 8, 16, 32, 64])
def test_roi_align_cap_never_binds_inside_a_1333x800_image(stride):
    """The adaptive grid cap (64) leaves every RoI of a 1333x800 image at strides 4..64 with
    7x7 bins unchanged: at most ceil(1333 / 4 / 7) = 48 samples per bin side."""
    assert libra.ops.MAX_ADAPTIVE_SAMPLING_GRID == 64
    assert -(-1333 // (4 * 7)) == 48 <= 64
    height, width = -(-800 // stride), -(-1333 // stride)
    feats = torch.randn(1, 2, height, width, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 1333, 800], [0, 0, 0, 1333, 30], [0, 10.5, 3.25, 1300.75, 799.5]])
    for aligned in (True, False):
        out = roi_align(feats, rois, 7, 1 / stride, 0, aligned)
        expected = tv_ops.roi_align(feats, rois, 7, 1 / stride, -1, aligned)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, feats, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, feats, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@needs_torchvision
@pytest.mark.parametrize("use_reference", [False, True])
def test_roi_align_adaptive_grid_is_capped_at_64(use_reference):
    """A 300 px RoI in 2x2 bins wants ceil(149.5) = 150 samples per bin side; it gets 64,
    i.e. exactly torchvision's result with sampling_ratio=64."""
    feats = torch.randn(1, 2, 300, 300, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 299, 299], [0, 20.5, 10.25, 290.0, 280.75]], dtype=torch.float64)
    if use_reference:
        out = roi_align_reference(feats, rois, 1.0, 2, 2, 0, True)
    else:
        out = roi_align(feats, rois, 2, 1.0, 0, True)
    expected = tv_ops.roi_align(feats, rois, 2, 1.0, 64, True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, tv_ops.roi_align(feats, rois, 2, 1.0, -1, True), rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, feats, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, feats, grad_out)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def huge_rois() -> torch.Tensor:
    """Finite RoIs far bigger than any image; the last ones overflow to inf once scaled."""
    return torch.tensor(
        [
            [0, 1, 1, 5, 5],  # a normal RoI
            [0, 0, 0, 1e5, 1e5],
            [0, 0, 0, 1e9, 1e9],
            [0, 0, 0, 1e30, 1e30],
            [1, -1e30, -1e30, 1e30, 1e30],
            [1, -3e38, -3e38, 3e38, 3e38],  # roi size overflows float32 to inf
        ]
    )


@pytest.mark.parametrize("spatial_scale", [1.0, 4.0])  # 4.0: scaled coordinates overflow to +-inf
@pytest.mark.parametrize("use_reference", [False, True])
def test_roi_align_huge_rois_are_fast_and_finite(spatial_scale, use_reference):
    """Huge RoIs cost at most 64 x 64 samples per bin (they used to take unbounded time or
    memory). Their samples all lie off the map, so they pool zeros; a normal RoI next to
    them is unaffected."""
    import time

    feats = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = huge_rois()
    start = time.perf_counter()
    if use_reference:
        out = roi_align_reference(feats, rois, spatial_scale, 7, 7, 0, True)
    else:
        out = roi_align(feats, rois, 7, spatial_scale, 0, True)
    out.backward(torch.randn_like(out))
    assert time.perf_counter() - start < 20.0  # ~0.1 s; unbounded before the cap
    assert torch.isfinite(out).all() and torch.isfinite(feats.grad).all()
    assert not out[1:].any()
    expected = roi_align_reference(feats, rois[:1], spatial_scale, 7, 7, 0, True)
    torch.testing.assert_close(out[:1], expected)
    if not use_reference:
        torch.testing.assert_close(out, roi_align_reference(feats, rois, spatial_scale, 7, 7, 0, True))


def test_roi_align_autocast_computes_in_float32():
    feats = torch.randn(1, 4, 10, 10)
    rois = random_rois(6, 1, 10, 10, dtype=torch.float32)
    expected = roi_align(feats, rois, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(feats, rois, 3)
        out_low = roi_align(feats.bfloat16(), rois, 3)
    assert out.dtype == torch.float32 and out_low.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_low, roi_align(feats.bfloat16().float(), rois, 3).bfloat16())


@needs_extension
def test_roi_align_torch_compile():
    torch._dynamo.reset()
    feats = torch.randn(2, 3, 10, 12, requires_grad=True)
    rois = random_rois(8, 2, 10, 12, dtype=torch.float32)

    def pooled_sum(x, r):
        return (roi_align(x, r, 3, 1.0, 0, True) ** 2).sum()

    compiled = torch.compile(pooled_sum, backend="aot_eager", fullgraph=True)
    value = compiled(feats, rois)
    (grad,) = torch.autograd.grad(value, feats)
    expected = pooled_sum(feats, rois)
    (expected_grad,) = torch.autograd.grad(expected, feats)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------- NMS


@needs_torchvision
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(iou_threshold):
    boxes = random_boxes(600)
    scores = torch.rand(600)
    keep = nms(boxes, scores, iou_threshold)
    assert keep.dtype == torch.int64
    torch.testing.assert_close(keep, tv_ops.nms(boxes, scores, iou_threshold))
    assert 0 < keep.numel() < 600
    assert (scores[keep].diff() <= 0).all()


@needs_torchvision
def test_nms_ties_match_torchvision_and_reference():
    boxes = random_boxes(400)
    scores = torch.randint(0, 5, (400,)).float()  # many exact ties
    keep = nms(boxes, scores, 0.5)
    torch.testing.assert_close(keep, nms_reference(boxes, scores, 0.5))
    # torchvision's CPU kernel also sorts stably; the kept set must agree in any case.
    expected = tv_ops.nms(boxes, scores, 0.5)
    assert set(keep.tolist()) == set(expected.tolist())


def test_nms_ties_prefer_lower_index():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4 + [[50.0, 50, 60, 60]] * 2)
    scores = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.9, 0.9])
    for fn in (nms, nms_reference):
        assert fn(boxes, scores, 0.5).tolist() == [1, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [nms, nms_reference, lambda b, s, t: batched_nms(b, s, torch.zeros_like(s, dtype=torch.long), t)])
def test_nms_threshold_is_strict(dtype, fn):
    """A = [0,0,10,10] (area 100), B = [0,0,10,h] inside A: IoU = 10h / 100 = h / 10."""
    threshold = 0.5
    scores = torch.tensor([0.9, 0.8], dtype=dtype)

    def kept(h):
        boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, h]], dtype=dtype)
        return fn(boxes, scores, threshold).tolist()

    assert kept(10 * (threshold + 1e-5)) == [0]  # IoU = threshold + 1e-5: suppressed
    assert kept(10 * (threshold - 1e-5)) == [0, 1]  # IoU = threshold - 1e-5: kept
    assert kept(5.0) == [0, 1]  # IoU exactly 0.5 (exact in binary): not > threshold


@needs_extension
def test_nms_extension_matches_reference():
    for n, dtype in ((300, torch.float32), (500, torch.float64), (200, torch.float16)):
        boxes = random_boxes(n, dtype)
        scores = torch.rand(n)
        torch.testing.assert_close(torch.ops.libra.nms(boxes, scores, 0.6), nms_reference(boxes, scores, 0.6))


def test_nms_empty_and_nan():
    for fn in (nms, nms_reference):
        empty = fn(torch.zeros(0, 4), torch.zeros(0), 0.5)
        assert empty.shape == (0,) and empty.dtype == torch.int64
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
    nan, inf = float("nan"), float("inf")
    boxes = torch.tensor([[0, 0, 10, 10], [nan, 0, 10, 10], [0, 0, inf, 10], [1, 1, 10, 10], [-inf, -inf, inf, inf]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    keep = nms(boxes, scores, 0.5)
    assert keep.dtype == torch.int64 and keep[0] == 0
    assert 3 not in keep.tolist()  # IoU([0,0,10,10], [1,1,10,10]) = 0.81
    assert keep.tolist() == nms_reference(boxes, scores, 0.5).tolist()
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 1, 0, 1]), 0.5).tolist()[0] == 0


def test_nms_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="boxes"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.5)


@needs_torchvision
@pytest.mark.parametrize("ties", [False, True])
def test_batched_nms_matches_torchvision(ties):
    boxes = random_boxes(800)
    scores = torch.randint(0, 4, (800,)).float() if ties else torch.rand(800)
    idxs = torch.randint(0, 6, (800,))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    expected = tv_ops.batched_nms(boxes, scores, idxs, 0.5)
    if ties:
        assert set(keep.tolist()) == set(expected.tolist())
        assert (scores[keep].diff() <= 0).all()
    else:
        torch.testing.assert_close(keep, expected)


@pytest.mark.parametrize("ties", [False, True])
def test_batched_nms_per_class_loop_equals_offset_trick(ties, monkeypatch):
    boxes = random_boxes(700).double()
    scores = torch.randint(0, 4, (700,)).float() if ties else torch.rand(700)
    idxs = torch.randint(0, 10, (700,))
    offset = batched_nms(boxes, scores, idxs, 0.6)
    monkeypatch.setitem(nms_module.PER_CLASS_LOOP_THRESHOLD, "cpu", 100)
    per_class = batched_nms(boxes, scores, idxs, 0.6)
    torch.testing.assert_close(per_class, offset)
    # no suppression across classes: each class alone gives the same boxes
    for c in range(10):
        members = torch.nonzero(idxs == c).view(-1)
        expected = members[nms(boxes[members].float(), scores[members], 0.6)]
        assert set(offset[idxs[offset] == c].tolist()) == set(expected.tolist())


def per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Oracle for batched_nms: nms on each class separately, merged by score (ties: index)."""
    nms_fn = tv_ops.nms if tv_ops is not None else nms_reference
    keep = [torch.empty(0, dtype=torch.int64, device=boxes.device)]
    for c in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == c).view(-1)
        keep.append(members[nms_fn(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(keep).sort().values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def lvis_like_case(num_classes: int = 1203):
    """In every class, B = [x, y, x + 10, y + 5.03] lies inside A = [x, y, x + 10, y + 10]:
    IoU(A, B) = 0.503 > 0.5, so per-class NMS suppresses B. Shifted by class * 1334 (the
    coordinate trick), coordinates near 1.6e6 are rounded to 1/8 px in float32, B's height
    becomes 5.0 and IoU 0.5: B survives in the high classes."""
    rows, scores, idxs = [[0.0, 0.0, 1333.0, 800.0]], [0.1], [0]
    for c in range(num_classes):
        x, y = 100.3 + c % 7, 200.7
        rows += [[x, y, x + 10, y + 10], [x, y, x + 10, y + 5.03]]
        scores += [0.9 - 1e-4 * (c % 5), 0.8]
        idxs += [c, c]
    return torch.tensor(rows), torch.tensor(scores), torch.tensor(idxs)


def coordinate_trick(boxes, scores, idxs, iou_threshold):
    # torchvision's _batched_nms_coordinate_trick (and libra's former offset path)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


@pytest.mark.parametrize("path", ["single_call", "per_class_loop", "reference"])
def test_batched_nms_is_exact_with_1203_classes(path, monkeypatch):
    boxes, scores, idxs = lvis_like_case()
    expected = per_class_nms(boxes, scores, idxs, 0.5)
    assert expected.numel() == 1204  # every B suppressed; the big box of class 0 kept
    trick = coordinate_trick(boxes, scores, idxs, 0.5)
    assert trick.numel() > expected.numel()  # the offset trick is not exact here
    if tv_ops is not None:
        from torchvision.ops.boxes import _batched_nms_coordinate_trick

        assert not torch.equal(_batched_nms_coordinate_trick(boxes, scores, idxs, 0.5), expected)
    if path == "per_class_loop":
        monkeypatch.setitem(nms_module.PER_CLASS_LOOP_THRESHOLD, "cpu", 100)
    if path == "reference":
        monkeypatch.setattr(nms_module, "use_extension", lambda stacklevel=3: False)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    torch.testing.assert_close(keep, expected, rtol=0, atol=0)
    if path == "single_call" and libra.ops.EXTENSION_AVAILABLE:
        torch.testing.assert_close(torch.ops.libra.batched_nms(boxes, scores, idxs, 0.5), expected, rtol=0, atol=0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("num_classes", [1, 7, 300])
def test_batched_nms_equals_nms_per_class(ties, num_classes):
    boxes = random_boxes(900) * 13.37  # fractional coordinates up to ~1337 px
    scores = torch.randint(0, 4, (900,)).float() if ties else torch.rand(900)
    idxs = torch.randint(0, num_classes, (900,)) * 3 - 50  # sparse, negative groups too
    expected = per_class_nms(boxes, scores, idxs, 0.5)
    torch.testing.assert_close(batched_nms(boxes, scores, idxs, 0.5), expected, rtol=0, atol=0)
    torch.testing.assert_close(nms_reference(boxes, scores, 0.5, idxs), expected, rtol=0, atol=0)
    if libra.ops.EXTENSION_AVAILABLE:  # the op itself also takes float64 / half boxes and int32 idxs, like nms
        double, half = boxes.double(), boxes.half()
        got = torch.ops.libra.batched_nms(double, scores, idxs.int(), 0.5)
        torch.testing.assert_close(got, per_class_nms(double, scores.double(), idxs, 0.5), rtol=0, atol=0)
        got = torch.ops.libra.batched_nms(half, scores, idxs.int(), 0.5)  # compared in float32
        torch.testing.assert_close(got, per_class_nms(half.float(), scores, idxs, 0.5), rtol=0, atol=0)


@needs_extension
def test_batched_nms_opcheck_and_bad_idxs():
    boxes = random_boxes(200)
    torch.library.opcheck(torch.ops.libra.batched_nms.default, (boxes, torch.rand(200), torch.randint(0, 5, (200,)), 0.5))
    with pytest.raises(RuntimeError, match="idxs"):
        torch.ops.libra.batched_nms(boxes, torch.rand(200), torch.rand(200), 0.5)
    with pytest.raises(RuntimeError, match="idxs"):
        torch.ops.libra.batched_nms(boxes, torch.rand(200), torch.zeros(3, dtype=torch.long), 0.5)


# ----------------------------------------------------------------------------- drop-in for torchvision.ops
# The cases of torchvision's own test suite (test/test_ops.py) that libra.ops failed before: a batch
# of no boxes as a 1-D ``torch.empty(0)``, torch.fx tracing (roi_align a leaf node) and TorchScript.


class _LayerWrapper(torch.nn.Module):
    """torchvision's RoIOpTesterModuleWrapper: calls the layer, returns nothing."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, a, b):
        self.layer(a, b)


class _PoolWrapper(torch.nn.Module):
    """torchvision's PoolWrapper: a scriptable module taking a list of per-image boxes."""

    def __init__(self, pool: torch.nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, imgs: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.pool(imgs, boxes)


class _CallsRoIAlign(torch.nn.Module):
    """A user module that calls ``libra.ops.roi_align`` (or torchvision's) through the package."""

    def __init__(self, ops_module) -> None:
        super().__init__()
        self.ops_module = ops_module

    def forward(self, x, rois):
        return self.ops_module.roi_align(x, rois, 5, 0.5, -1, False) * 2.0


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as error:  # noqa: BLE001 - what each library does is the point
        return "raises", error


@needs_torchvision
def test_empty_1d_boxes_behave_as_in_torchvision():
    empty, no_labels = torch.empty(0), torch.empty(0, dtype=torch.int64)
    feats = torch.rand(1, 2, 5, 5)
    cases = {
        "batched_nms of torch.empty(0), None, None, None": lambda ops: ops.batched_nms(empty, None, None, None),
        "batched_nms of empty 1-D tensors": lambda ops: ops.batched_nms(empty, empty, no_labels, 0.5),
        "batched_nms of [0, 4]": lambda ops: ops.batched_nms(torch.empty(0, 4), empty, no_labels, 0.5),
        "nms of torch.empty(0)": lambda ops: ops.nms(empty, empty, 0.5),
        "roi_align of torch.empty(0)": lambda ops: ops.roi_align(feats, empty, 2),
        "roi_align of [torch.empty(0)]": lambda ops: ops.roi_align(feats, [empty], 2),
        "roi_align of [0, 5]": lambda ops: ops.roi_align(feats, torch.empty(0, 5), 2),
    }
    for name, call in cases.items():
        (ours, our_value), (theirs, their_value) = _outcome(lambda: call(libra.ops)), _outcome(lambda: call(tv_ops))
        assert ours == theirs, f"{name}: libra {ours} ({our_value!r}), torchvision {theirs} ({their_value!r})"
        if ours == "ok":
            torch.testing.assert_close(our_value, their_value)
        else:  # libra's wrappers raise ValueError where torchvision raises RuntimeError / IndexError
            assert isinstance(our_value, ValueError), f"{name}: {our_value!r}"
    assert batched_nms(empty, None, None, None).dtype == torch.int64
    with pytest.raises(ValueError, match="boxes are empty but scores"):
        batched_nms(empty, torch.rand(3), no_labels, 0.5)


@needs_torchvision
def test_roi_align_is_a_leaf_of_fx_tracing_like_torchvision():
    from torchvision.models.feature_extraction import get_graph_node_names

    # torchvision's test_is_leaf_node: the two inputs and one node for the op (torchvision's tracer
    # keeps its own RoIAlign module whole, "layer"; libra's module is traced to its roi_align call).
    ours = get_graph_node_names(_LayerWrapper(RoIAlign(5, 1.0, -1)))
    theirs = get_graph_node_names(_LayerWrapper(tv_ops.RoIAlign(5, 1.0, -1)))
    assert ours == (["a", "b", "layer.roi_align"], ["a", "b", "layer.roi_align"])
    assert len(ours[0]) == len(theirs[0]) == len(theirs[1]) == 3

    # torchvision's test_torch_fx_trace: the traced module computes what the module computes.
    feats = torch.rand(2, 50, 5, 5)
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype=torch.float32)
    module = RoIAlign(5, 1.0, -1, aligned=False)
    traced = torch.fx.symbolic_trace(module)
    assert [node.op for node in traced.graph.nodes] == ["placeholder", "placeholder", "call_function", "output"]
    torch.testing.assert_close(traced(feats, rois), module(feats, rois), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traced(feats, rois), tv_ops.RoIAlign(5, 1.0, -1, aligned=False)(feats, rois))

    # A module of the user's that calls libra.ops.roi_align: the call is one node (it would otherwise
    # be traced into, and the argument checks cannot branch on a proxy).
    user = torch.fx.symbolic_trace(_CallsRoIAlign(libra.ops))
    calls = [node.target for node in user.graph.nodes if node.op == "call_function"]
    assert calls[0] is libra.ops.roi_align and len(calls) == 2
    torch.testing.assert_close(user(feats, rois), _CallsRoIAlign(tv_ops)(feats, rois))


@needs_extension
@needs_torchvision
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's own notice
def test_roi_align_compiles_with_torchscript_like_torchvision():
    # torchvision's test_backward: gradcheck of the scripted function in float64.
    x = torch.rand(1, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], dtype=torch.float64)
    scripted = torch.jit.script(roi_align)
    assert torch.autograd.gradcheck(lambda z: scripted(z, rois, 2, 1.0, 1, True), (x,))
    for aligned in (False, True):
        torch.testing.assert_close(
            scripted(x, rois, (2, 3), 0.5, -1, aligned), tv_ops.roi_align(x, rois, (2, 3), 0.5, -1, aligned)
        )
    torch.testing.assert_close(scripted(x, rois, 2), roi_align(x, rois, 2))  # libra's defaults

    # torchvision's test_jit_boxes_list: the module scripted, boxes as a list of per-image [Ki, 4].
    feats = torch.rand(2, 1, 10, 10)
    roi = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype=torch.float).t()
    module = torch.jit.script(_PoolWrapper(RoIAlign(output_size=[3, 3], spatial_scale=1.0, sampling_ratio=-1, aligned=False)))
    peer = torch.jit.script(_PoolWrapper(tv_ops.RoIAlign(output_size=[3, 3], spatial_scale=1.0, sampling_ratio=-1)))
    out = module(feats, [roi, roi])
    assert out.shape == (10, 1, 3, 3)
    torch.testing.assert_close(out, peer(feats, [roi, roi]))

    # Bad input is refused inside TorchScript too (the interpreter raises it as a torch.jit.Error).
    with pytest.raises(torch.jit.Error, match="rois must be a"):
        scripted(x, rois[:, :4], 2)
    with pytest.raises(torch.jit.Error, match=r"boxes\[i\] must be"):
        module(feats, [roi[:, :3]])


class _NMSModule(torch.nn.Module):
    """A user's module that calls ``batched_nms`` of either library, scripted as a whole."""

    def __init__(self, ops) -> None:
        super().__init__()
        self.batched_nms = ops.batched_nms

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        return self.batched_nms(boxes, scores, idxs, 0.5)


@needs_extension
@needs_torchvision
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's own notice
def test_nms_and_batched_nms_compile_with_torchscript_like_torchvision():
    generator = torch.Generator().manual_seed(3)
    corners = torch.rand(400, 2, generator=generator) * 100
    boxes = torch.cat([corners, corners + torch.rand(400, 2, generator=generator) * 40 + 1], dim=1)
    scores = torch.rand(400, generator=generator)
    idxs = torch.randint(0, 6, (400,), generator=generator)
    scripted_nms, scripted_batched = torch.jit.script(libra.ops.nms), torch.jit.script(libra.ops.batched_nms)
    for threshold in (0.3, 0.5, 0.7):
        expected = tv_ops.nms(boxes, scores, threshold)
        assert torch.equal(scripted_nms(boxes, scores, threshold), expected)
        assert torch.equal(scripted_nms(boxes.double(), scores, threshold), libra.ops.nms(boxes.double(), scores, threshold))
        assert torch.equal(scripted_batched(boxes, scores, idxs, threshold), tv_ops.batched_nms(boxes, scores, idxs, threshold))
    module = torch.jit.script(_NMSModule(libra.ops))
    assert torch.equal(module(boxes, scores, idxs), torch.jit.script(_NMSModule(tv_ops))(boxes, scores, idxs))
    # No boxes, as torchvision's test_batched_nms_empty, and bad input refused inside TorchScript.
    assert scripted_batched(torch.empty(0), torch.empty(0), torch.empty(0), 0.5).shape == (0,)
    with pytest.raises(torch.jit.Error, match=r"boxes must be a \[N, 4\]"):
        scripted_nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(torch.jit.Error, match="idxs must be"):
        scripted_batched(boxes, scores, idxs[:5], 0.5)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_cuda_matches_cpu(dtype, aligned, sampling_ratio):
    feats = torch.randn(2, 5, 20, 24).to(dtype)
    rois = random_rois(50, 2, 40, 48, dtype=torch.float32, scale=0.5)
    rois[-1, 1] = float("nan")
    cpu_in = feats.clone().requires_grad_()
    cuda_in = feats.cuda().requires_grad_()
    out_cpu = roi_align(cpu_in, rois, 7, 0.5, sampling_ratio, aligned)
    out_cuda = roi_align(cuda_in, rois.cuda(), 7, 0.5, sampling_ratio, aligned)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=tol, atol=tol)
    grad = torch.randn_like(out_cpu)
    out_cpu.backward(grad)
    out_cuda.backward(grad.cuda().transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(cuda_in.grad.cpu(), cpu_in.grad, rtol=tol * 4, atol=tol * 4)


@needs_cuda
@needs_extension
def test_roi_align_cuda_empty_and_opcheck():
    feats = torch.randn(2, 3, 10, 12, device="cuda", requires_grad=True)
    assert roi_align(feats, torch.zeros(0, 5, device="cuda"), 7).shape == (0, 3, 7, 7)
    rois = random_rois(12, 2, 10, 12, dtype=torch.float32).cuda()
    torch.library.opcheck(torch.ops.libra.roi_align.default, (feats, rois, 1.0, 3, 4, 0, True))
    torch.library.opcheck(torch.ops.libra.nms.default, (random_boxes(300).cuda(), torch.rand(300, device="cuda"), 0.5))


@needs_cuda
@needs_extension
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 5000])
@pytest.mark.parametrize("ties", [False, True])
def test_nms_cuda_matches_cpu(n, ties):
    boxes = random_boxes(n) if n else torch.zeros(0, 4)
    scores = torch.randint(0, 5, (n,)).float() if ties else torch.rand(n)
    for threshold in (0.3, 0.7):
        keep_cpu = nms(boxes, scores, threshold)
        keep_cuda = nms(boxes.cuda(), scores.cuda(), threshold)
        assert keep_cuda.device.type == "cuda"
        torch.testing.assert_close(keep_cuda.cpu(), keep_cpu)
    idxs = torch.randint(0, 80, (n,))
    torch.testing.assert_close(batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu(), batched_nms(boxes, scores, idxs, 0.5))


@needs_cuda
@needs_extension
@pytest.mark.parametrize("spatial_scale", [1.0, 4.0])
def test_roi_align_cuda_huge_rois_and_negative_sampling_ratio(spatial_scale):
    feats = torch.randn(2, 3, 8, 8)
    rois = torch.cat([huge_rois(), random_rois(20, 2, 8, 8, dtype=torch.float32)])
    cpu_in = feats.clone().requires_grad_()
    cuda_in = feats.cuda().requires_grad_()
    out_cpu = roi_align(cpu_in, rois, 7, spatial_scale, -1, True)
    out_cuda = roi_align(cuda_in, rois.cuda(), 7, spatial_scale, -1, True)
    torch.cuda.synchronize()
    assert torch.isfinite(out_cuda).all() and not out_cuda[1:6].any()
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cuda, roi_align(cuda_in, rois.cuda(), 7, spatial_scale, 0, True), rtol=0, atol=0)
    grad = torch.randn_like(out_cpu)
    out_cpu.backward(grad)
    out_cuda.backward(grad.cuda())
    torch.testing.assert_close(cuda_in.grad.cpu(), cpu_in.grad, rtol=1e-4, atol=1e-4)


@needs_cuda
@needs_extension
@pytest.mark.parametrize("per_class_loop", [False, True])
def test_batched_nms_cuda_is_exact_with_1203_classes(per_class_loop, monkeypatch):
    boxes, scores, idxs = lvis_like_case()
    expected = per_class_nms(boxes, scores, idxs, 0.5)
    if per_class_loop:
        monkeypatch.setitem(nms_module.PER_CLASS_LOOP_THRESHOLD, "cuda", 100)
    keep = batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5)
    assert keep.device.type == "cuda"
    torch.testing.assert_close(keep.cpu(), expected, rtol=0, atol=0)
    random = random_boxes(3000) * 13.37, torch.randint(0, 4, (3000,)).float(), torch.randint(0, 50, (3000,))
    expected = per_class_nms(*random, 0.5)
    got = torch.ops.libra.batched_nms(*(t.cuda() for t in random), 0.5)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.libra.batched_nms.default, tuple(t.cuda() for t in random) + (0.5,))


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nms_cuda_threshold_is_strict(dtype):
    scores = torch.tensor([0.9, 0.8], dtype=dtype, device="cuda")
    for h, expected in ((5.0001, [0]), (4.9999, [0, 1]), (5.0, [0, 1])):
        boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, h]], dtype=dtype, device="cuda")
        assert nms(boxes, scores, 0.5).tolist() == expected
