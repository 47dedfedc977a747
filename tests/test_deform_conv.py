"""Tests for libra.ops.deform_conv2d (DCN v1 / modulated DCN v2), its modules and the DCN backbone.

Oracles: torchvision.ops.deform_conv2d (an independent implementation of the same convention;
those tests skip when it is missing), nn.Conv2d (a deformable conv with zero offsets and mask 1 is
a plain conv), torch.autograd.gradcheck, torch.library.opcheck, and the float64 pure-PyTorch
reference in libra/ops/deform_conv_reference.py. Set LIBRA_REQUIRE_EXTENSION=1 (CI does) to fail
instead of testing only the fallback.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

import libra.ops
from libra.backbone import ResNet, build_resnet, check_dcn, load_pretrained
from libra.ops import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
    deform_conv2d_reference,
)

deform_conv_module = importlib.import_module("libra.ops.deform_conv")

try:
    import torchvision.ops as tv_ops
except ImportError:  # the oracle tests skip; the others still run
    tv_ops = None

needs_torchvision = pytest.mark.skipif(tv_ops is None, reason="torchvision not importable (oracle for these tests)")
needs_extension = pytest.mark.skipif(not libra.ops.EXTENSION_AVAILABLE, reason="libra._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Small inputs: threads only add overhead, and on shared cores much of it (gradcheck: 4-8x).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def make_inputs(
    batch=2,
    channels=6,
    out_channels=4,
    size=(7, 9),
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups=1,
    offset_groups=1,
    mask=False,
    bias=True,
    offsets="random",
    dtype=torch.float64,
    device="cpu",
):
    """Random inputs of torchvision.ops.deform_conv2d: (input, offset, weight, bias, stride, padding, dilation, mask)."""
    kh, kw = kernel
    out_h = out_size(size[0], kh, stride[0], padding[0], dilation[0])
    out_w = out_size(size[1], kw, stride[1], padding[1], dilation[1])
    options = {"dtype": dtype, "device": device}
    x = torch.randn(batch, channels, *size, **options)
    offset_shape = (batch, 2 * offset_groups * kh * kw, out_h, out_w)
    if offsets == "zero":
        offset = torch.zeros(offset_shape, **options)
    elif offsets == "large":  # mostly far outside the image, some just across its border
        offset = torch.randn(offset_shape, **options) * 30
        offset[:, ::3] = torch.rand(offset_shape, **options)[:, ::3] * 4 - 2 - size[0] / 2
    else:  # fractional, up to ~2 pixels: samples near and across the border too
        offset = torch.randn(offset_shape, **options) * 1.5
    weight = torch.randn(out_channels, channels // groups, kh, kw, **options)
    b = torch.randn(out_channels, **options) if bias else None
    m = torch.rand(batch, offset_groups * kh * kw, out_h, out_w, **options) if mask else None
    if m is not None and m.numel():
        m.view(-1)[::7] = 0.0  # some samples switched off entirely
    return x, offset, weight, b, stride, padding, dilation, m


CASES = {
    "plain": {},
    "mask": {"mask": True},
    "no_bias": {"bias": False, "mask": True},
    "groups2_offset_groups3": {"groups": 2, "offset_groups": 3, "mask": True},
    "groups3_offset_groups2": {"channels": 6, "out_channels": 6, "groups": 3, "offset_groups": 2},
    "resnext_like_groups": {"channels": 8, "out_channels": 8, "groups": 4, "mask": True},
    "offset_groups_per_channel": {"channels": 4, "offset_groups": 4},
    "stride2": {"stride": (2, 2), "mask": True},
    "dilation2": {"dilation": (2, 2), "padding": (2, 2)},
    "mixed_stride_dilation_pad": {"stride": (2, 1), "padding": (0, 2), "dilation": (1, 2), "mask": True},
    "non_square_kernel": {"kernel": (2, 3), "padding": (1, 0), "mask": True},
    "kernel1x1": {"kernel": (1, 1), "padding": (0, 0)},
    "zero_offsets": {"offsets": "zero", "mask": True},
    "zero_offsets_no_mask": {"offsets": "zero", "stride": (2, 2)},
    "out_of_image_offsets": {"offsets": "large", "mask": True},
    "out_of_image_offsets_groups": {"offsets": "large", "groups": 2, "offset_groups": 2},
    "empty_batch": {"batch": 0, "mask": True},
    "batch3": {"batch": 3, "size": (5, 4)},
}


def grads(output, tensors, grad_output):
    """Gradients of (output * grad_output).sum() with respect to tensors (None entries skipped)."""
    leaves = [t for t in tensors if t is not None]
    return torch.autograd.grad(output, leaves, grad_output, allow_unused=False)


def leaf_inputs(args):
    x, offset, weight, bias, stride, padding, dilation, mask = args
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, offset, weight, bias, mask)]
    x, offset, weight, bias, mask = leaves
    return (x, offset, weight, bias, stride, padding, dilation, mask), [x, offset, weight, bias, mask]


# ----------------------------------------------------------------------------- extension


def test_extension_has_the_deform_conv_kernels_when_built_or_required():
    if os.environ.get("LIBRA_REQUIRE_EXTENSION") == "1" or libra.ops.EXTENSION_AVAILABLE:
        assert libra.ops.EXTENSION_AVAILABLE, libra.ops._extension.EXTENSION_ERROR
        for op in ("deform_conv2d", "_deform_conv2d_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"libra::{op}", "CPU"), op
    else:
        pytest.skip("libra._C not built and LIBRA_REQUIRE_EXTENSION != 1")


# ----------------------------------------------------------------------------- vs torchvision


@needs_torchvision
@pytest.mark.parametrize("impl", ["libra", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_all_gradients_match_torchvision(case, impl):
    args, leaves = leaf_inputs(make_inputs(**CASES[case]))
    fn = deform_conv2d if impl == "libra" else deform_conv2d_reference
    out = fn(*args)
    expected = tv_ops.deform_conv2d(*args)
    assert out.shape == expected.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_output = torch.randn_like(out)
    ours = grads(out, leaves, grad_output)
    theirs = grads(expected, leaves, grad_output)
    names = [n for n, t in zip(("input", "offset", "weight", "bias", "mask"), leaves) if t is not None]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")
    if case != "empty_batch":
        assert out.abs().sum() > 0 and ours[0].abs().sum() > 0
    if case.startswith("out_of_image"):
        assert (out == (args[3].view(1, -1, 1, 1) if args[3] is not None else 0)).any()  # some outputs read nothing


@needs_torchvision
def test_float32_matches_torchvision():
    args, leaves = leaf_inputs(make_inputs(batch=2, channels=16, out_channels=8, size=(12, 15), groups=2, offset_groups=2,
                                           mask=True, dtype=torch.float32))
    out = deform_conv2d(*args)
    expected = tv_ops.deform_conv2d(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(out)
    for a, b in zip(grads(out, leaves, grad_output), grads(expected, leaves, grad_output)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- gradcheck, opcheck


@pytest.mark.parametrize(
    "config",
    [
        {"groups": 2, "offset_groups": 2, "mask": True},
        {"stride": (2, 2), "dilation": (2, 2), "padding": (2, 1), "mask": False},
        {"kernel": (2, 3), "padding": (0, 1), "offset_groups": 3, "mask": True, "bias": False},
    ],
)
@pytest.mark.parametrize("impl", ["libra", "reference"])
def test_gradcheck(config, impl):
    # Random fractional offsets: bilinear sampling is differentiable away from integer positions.
    args, _ = leaf_inputs(make_inputs(batch=1, channels=6, out_channels=2, size=(4, 5), **config))
    x, offset, weight, bias, stride, padding, dilation, mask = args
    fn = deform_conv2d if impl == "libra" else deform_conv2d_reference
    tensors = [t for t in (x, offset, weight, bias, mask) if t is not None]

    def f(*ts):
        it = iter(ts)
        x_, o_, w_ = next(it), next(it), next(it)
        b_ = next(it) if bias is not None else None
        m_ = next(it) if mask is not None else None
        return fn(x_, o_, w_, b_, stride, padding, dilation, m_)

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-6)


def op_args(args, use_mask: bool):
    """(input, weight, offset, mask, bias, ...) for torch.ops.libra.deform_conv2d from make_inputs' tuple."""
    x, offset, weight, bias, stride, padding, dilation, mask = args
    groups = x.shape[1] // weight.shape[1]
    offset_groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
    mask_t = mask if use_mask else x.new_empty(0)
    bias_t = bias if bias is not None else x.new_zeros(weight.shape[0])
    return (x, weight, offset, mask_t, bias_t, *stride, *padding, *dilation, groups, offset_groups, use_mask)


@needs_extension
@pytest.mark.parametrize("use_mask", [True, False])
def test_opcheck(use_mask):
    args, _ = leaf_inputs(make_inputs(batch=2, channels=4, out_channels=4, size=(6, 5), groups=2, offset_groups=2,
                                      stride=(2, 1), mask=use_mask, dtype=torch.float32))
    forward_args = op_args(args, use_mask)
    torch.library.opcheck(torch.ops.libra.deform_conv2d.default, forward_args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in forward_args)
    out = torch.ops.libra.deform_conv2d(*detached)
    torch.library.opcheck(torch.ops.libra._deform_conv2d_backward.default, (torch.randn_like(out), *detached))


@needs_extension
def test_op_called_directly_raises_runtime_error_and_double_backward_raises():
    args = op_args(make_inputs(mask=True, dtype=torch.float32), True)
    bad_offset = args[2][:, :-1]
    with pytest.raises(RuntimeError, match="offset"):
        torch.ops.libra.deform_conv2d(args[0], args[1], bad_offset, *args[3:])
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.libra.deform_conv2d(*args[:3], args[3][:, :, :-1], *args[4:])
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.libra.deform_conv2d(*args[:11], 4, *args[12:])
    x, offset, weight, bias, stride, padding, dilation, mask = make_inputs(mask=True)
    x.requires_grad_()
    out = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


@needs_extension
def test_torch_compile():
    torch._dynamo.reset()
    args, leaves = leaf_inputs(make_inputs(batch=1, channels=4, size=(6, 6), mask=True, dtype=torch.float32))

    def f(*a):
        return (deform_conv2d(*a) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    value = compiled(*args)
    expected = f(*args)
    torch.testing.assert_close(value, expected)
    live = [t for t in leaves if t is not None]
    for a, b in zip(torch.autograd.grad(value, live), torch.autograd.grad(expected, live)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- equals a plain conv


@pytest.mark.parametrize(
    "stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 1, 1, 4), (1, 0, 1, 2)]
)
def test_zero_offsets_equal_nn_conv2d(stride, padding, dilation, groups):
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True).double()
    dcn = DeformConv2dPack(8, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True).double()
    dcn.load_state_dict({**dcn.state_dict(), "weight": conv.weight.detach(), "bias": conv.bias.detach()})
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    torch.testing.assert_close(dcn(x), conv(x), rtol=1e-12, atol=1e-12)
    # explicit offsets 0 and mask 1 on the functional form and the modulated layer
    offset = torch.zeros(2, 18, *conv(x).shape[-2:], dtype=torch.float64)
    ones = torch.ones(2, 9, *conv(x).shape[-2:], dtype=torch.float64)
    torch.testing.assert_close(deform_conv2d(x, offset, conv.weight, conv.bias, stride, padding, dilation, ones), conv(x),
                               rtol=1e-12, atol=1e-12)
    modulated = ModulatedDeformConv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    modulated.load_state_dict(conv.state_dict())
    torch.testing.assert_close(modulated(x, offset, ones), conv(x), rtol=1e-12, atol=1e-12)


def test_fresh_pack_modules_zero_offsets_and_mmcv_semantics():
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    v1 = DeformConv2dPack(4, 6, 3, padding=1, deform_groups=2).double()
    assert v1.bias is None and tuple(v1.conv_offset.weight.shape) == (2 * 2 * 9, 4, 3, 3)
    assert not v1.conv_offset.weight.any() and not v1.conv_offset.bias.any()
    v2 = ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2).double()
    assert tuple(v2.conv_offset.weight.shape) == (3 * 2 * 9, 4, 3, 3) and v2.bias is not None
    # mmcv's DCNv2 starts with mask sigmoid(0) = 0.5: half the plain conv, plus the bias
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(v2.weight * 0.5)
        conv.bias.copy_(v2.bias)
    torch.testing.assert_close(v2(x), conv(x), rtol=1e-12, atol=1e-12)
    assert set(v1.state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert set(ModulatedDeformConv2dPack(4, 6, 3, bias=False).state_dict()) == {"weight", "conv_offset.weight", "conv_offset.bias"}


def test_modulated_pack_splits_offsets_and_mask_like_mmcv():
    """conv_offset output = (o1, o2, m) chunks; offsets cat(o1, o2), mask sigmoid(m) (mmcv)."""
    layer = ModulatedDeformConv2dPack(4, 5, 3, padding=1, deform_groups=2).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.1)
        layer.conv_offset.bias.normal_(0, 0.5)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    raw = layer.conv_offset(x)
    k = 2 * 9
    offset, mask = raw[:, : 2 * k], torch.sigmoid(raw[:, 2 * k:])
    expected = deform_conv2d_reference(x, offset, layer.weight, layer.bias, 1, 1, 1, mask)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    v1 = DeformConv2dPack(4, 5, 3, padding=1).double()
    with torch.no_grad():
        v1.conv_offset.bias.normal_(0, 0.7)
    expected = deform_conv2d_reference(x, v1.conv_offset(x), v1.weight, None, 1, 1, 1)
    torch.testing.assert_close(v1(x), expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- reference, dtypes, fallback


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extension_matches_reference(dtype):
    args, leaves = leaf_inputs(make_inputs(batch=2, channels=12, out_channels=6, size=(10, 13), groups=3, offset_groups=2,
                                           stride=(2, 2), mask=True, dtype=dtype))
    out = deform_conv2d(*args)
    expected = deform_conv2d_reference(*args)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad_output = torch.randn_like(out)
    for a, b in zip(grads(out, leaves, grad_output), grads(expected, leaves, grad_output)):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_fallback_without_the_op_uses_the_reference(monkeypatch):
    args = make_inputs(mask=True, groups=2, offset_groups=2)
    expected = deform_conv2d_reference(*args)
    monkeypatch.setattr(deform_conv_module, "use_extension_op", lambda name, stacklevel=4: False)
    torch.testing.assert_close(deform_conv2d(*args), expected, rtol=0, atol=0)


@needs_extension
def test_stale_extension_warns_and_falls_back(monkeypatch):
    extension = importlib.import_module("libra.ops._extension")
    monkeypatch.setattr(extension, "has_op", lambda name: False)
    monkeypatch.setattr(extension, "_warned_stale", set())
    args = make_inputs()
    with pytest.warns(RuntimeWarning, match="no libra::deform_conv2d"):
        out = deform_conv2d(*args)
    torch.testing.assert_close(out, deform_conv2d_reference(*args), rtol=0, atol=0)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_the_op_close_to_float32(dtype):
    args = make_inputs(batch=2, channels=8, size=(8, 8), mask=True, dtype=torch.float32)
    low, leaves_low = leaf_inputs(tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args))
    high, leaves_high = leaf_inputs(tuple(a.to(dtype).float() if isinstance(a, torch.Tensor) else a for a in args))
    out_low = deform_conv2d(*low)
    out_high = deform_conv2d(*high)
    assert out_low.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out_low.float(), out_high, rtol=tol, atol=tol)
    grad_output = torch.randn_like(out_high)
    for a, b in zip(grads(out_low, leaves_low, grad_output.to(dtype)), grads(out_high, leaves_high, grad_output)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol * 4)


def test_autocast_runs_in_float32():
    args = make_inputs(mask=True, dtype=torch.float32)
    expected = deform_conv2d(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(*args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", ["libra", "reference"])
def test_empty_batch_forward_and_backward(impl):
    fn = deform_conv2d if impl == "libra" else deform_conv2d_reference
    args, leaves = leaf_inputs(make_inputs(batch=0, mask=True))
    out = fn(*args)
    assert out.shape == (0, 4, 7, 9)
    out.sum().backward()
    x, offset, weight, bias, mask = leaves
    assert x.grad.shape == x.shape and offset.grad.shape == offset.shape and mask.grad.shape == mask.shape
    assert not weight.grad.any() and not bias.grad.any()


# ----------------------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_value_error():
    x, offset, weight, bias, stride, padding, dilation, mask = make_inputs(mask=True, dtype=torch.float32)
    cases = [
        ((x[0], offset, weight), {}, "input must be a 4-d"),
        ((x, offset[0], weight), {}, "offset must be a 4-d"),
        ((x, offset, weight[0]), {}, "weight must be a 4-d"),
        ((x, offset, torch.randn(4, 4, 3, 3)), {"padding": 1}, "multiple of weight.shape"),
        ((x, offset, torch.randn(5, 3, 3, 3)), {"padding": 1}, "not divisible by groups"),
        ((x, offset[:, :-2], weight), {"padding": 1}, "offset has 16 channels"),
        ((x, torch.zeros(2, 4 * 18, 7, 9), weight), {"padding": 1}, "offset_groups dividing"),
        ((x, offset[..., :-1], weight), {"padding": 1}, "offset must be"),
        ((x, offset, weight), {"padding": 0}, "offset must be"),
        ((x, offset[:1], weight), {"padding": 1}, "offset must be"),
        ((x, offset, weight), {"padding": 1, "mask": mask[:, :-1]}, "mask must be"),
        ((x, offset, weight), {"padding": 1, "bias": torch.zeros(5)}, "bias must be"),
        ((x, offset, weight), {"padding": 1, "stride": 0}, "stride and dilation"),
        ((x, offset, weight), {"padding": (1, 1, 1)}, "padding must be"),
        ((x, offset, weight.double()), {"padding": 1}, "weight is torch.float64"),
        ((x, offset.double(), weight), {"padding": 1}, "offset is torch.float64"),
        ((x, offset, weight), {"padding": 1, "mask": mask.double()}, "mask is torch.float64"),
        ((x[..., :1, :1], offset, weight), {}, "output would be empty"),
        ((x.long(), offset, weight), {"padding": 1}, "offset is torch.float32 but input is torch.int64"),
    ]
    for positional, keywords, message in cases:
        with pytest.raises(ValueError, match=message):
            deform_conv2d(*positional, **keywords)
    with pytest.raises(ValueError, match="needs a mask"):
        ModulatedDeformConv2d(6, 4, 3, padding=1)(x, offset)
    with pytest.raises(ValueError, match="deform_groups"):
        DeformConv2dPack(6, 4, 3, deform_groups=4)
    with pytest.raises(ValueError, match="groups"):
        DeformConv2d(6, 4, 3, groups=4)


# ----------------------------------------------------------------------------- CUDA


def to_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


@needs_cuda
@needs_extension
@pytest.mark.parametrize("case", ["plain", "groups2_offset_groups3", "resnext_like_groups", "stride2", "dilation2",
                                  "out_of_image_offsets", "zero_offsets", "empty_batch", "non_square_kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(case, dtype):
    args = make_inputs(**{**CASES[case], "dtype": dtype})
    cpu, cpu_leaves = leaf_inputs(args)
    gpu, gpu_leaves = leaf_inputs(to_cuda(args))
    out_cpu = deform_conv2d(*cpu)
    out_gpu = deform_conv2d(*gpu)
    assert out_gpu.device.type == "cuda"
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=tol, atol=tol)
    grad_output = torch.randn_like(out_cpu)
    # a non-contiguous grad on the GPU
    grad_gpu = grad_output.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    for a, b in zip(grads(out_gpu, gpu_leaves, grad_gpu), grads(out_cpu, cpu_leaves, grad_output)):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10)


@needs_cuda
@needs_extension
@needs_torchvision
def test_cuda_matches_torchvision_cuda():
    args = to_cuda(make_inputs(batch=2, channels=8, out_channels=8, size=(13, 11), groups=2, offset_groups=4, mask=True))
    gpu, leaves = leaf_inputs(args)
    out = deform_conv2d(*gpu)
    expected = tv_ops.deform_conv2d(*gpu)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_output = torch.randn_like(out)
    for a, b in zip(grads(out, leaves, grad_output), grads(expected, leaves, grad_output)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_close_to_cpu_float32(dtype):
    args = make_inputs(batch=2, channels=8, size=(9, 10), groups=2, offset_groups=2, mask=True, dtype=torch.float32)
    low = to_cuda(tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args))
    gpu, gpu_leaves = leaf_inputs(low)
    cpu, cpu_leaves = leaf_inputs(tuple(a.cpu().float() if isinstance(a, torch.Tensor) else a for a in low))
    out_gpu = deform_conv2d(*gpu)
    out_cpu = deform_conv2d(*cpu)
    assert out_gpu.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(out_gpu.float().cpu(), out_cpu, rtol=tol, atol=tol)
    # the op called directly (autocast aside): half / bfloat16 in, computed in float32
    direct = torch.ops.libra.deform_conv2d(*op_args(low, True))
    assert direct.dtype == dtype
    torch.testing.assert_close(direct.float().cpu(), out_cpu, rtol=tol, atol=tol)
    grad_output = torch.randn_like(out_cpu)
    for a, b in zip(grads(out_gpu, gpu_leaves, grad_output.cuda().to(dtype)), grads(out_cpu, cpu_leaves, grad_output)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float().cpu(), b, rtol=tol, atol=tol * 4)


@needs_cuda
@needs_extension
def test_cuda_opcheck_gradcheck_and_modules():
    args, _ = leaf_inputs(to_cuda(make_inputs(batch=2, channels=4, size=(6, 5), groups=2, offset_groups=2, mask=True,
                                              dtype=torch.float32)))
    torch.library.opcheck(torch.ops.libra.deform_conv2d.default, op_args(args, True))
    torch.library.opcheck(torch.ops.libra.deform_conv2d.default, op_args(args, False))
    small, _ = leaf_inputs(to_cuda(make_inputs(batch=1, channels=4, out_channels=2, size=(4, 5), groups=2, mask=True)))
    x, offset, weight, bias, stride, padding, dilation, mask = small
    assert torch.autograd.gradcheck(
        lambda *t: deform_conv2d(t[0], t[1], t[2], t[3], stride, padding, dilation, t[4]), (x, offset, weight, bias, mask)
    )
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4).cuda()
    dcn = DeformConv2dPack(8, 8, 3, padding=1, groups=4, bias=True).cuda()
    dcn.load_state_dict({**dcn.state_dict(), **conv.state_dict()})
    images = torch.randn(2, 8, 16, 12, device="cuda")
    torch.testing.assert_close(dcn(images), conv(images), rtol=1e-4, atol=1e-4)


@needs_cuda
@needs_extension
def test_cuda_dcn_backbone_forward_backward():
    model = build_resnet("resnext101_64x4d", stage_blocks=(1, 1, 1, 1), frozen_stages=-1, dcn={"type": "DCNv2"}).cuda()
    outputs = model(torch.randn(2, 3, 64, 64, device="cuda"))
    sum(o.mean() for o in outputs).backward()
    assert model.layer3[0].conv2.conv_offset.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- backbone


DCN_V1 = {"type": "DCN", "deform_groups": 1, "fallback_on_stride": False}


@pytest.mark.parametrize("name", ["resnet50", "resnext101_64x4d"])
def test_dcn_backbone_keys_and_shapes(name):
    with torch.device("meta"):
        plain = build_resnet(name)
        dcn = build_resnet(name, dcn=DCN_V1)
        dcn_v2 = build_resnet(name, dcn={"type": "DCNv2", "deform_groups": 2}, stage_with_dcn=(False, False, True, True))
    plain_keys, dcn_keys = plain.state_dict(), dcn.state_dict()
    offsets = [k for k in dcn_keys if "conv_offset" in k]
    # one weight and one bias per bottleneck of C3-C5, nothing else new, order of the old keys kept
    blocks = {"resnet50": 4 + 6 + 3, "resnext101_64x4d": 4 + 23 + 3}[name]
    assert len(offsets) == 2 * blocks
    assert [k for k in dcn_keys if "conv_offset" not in k] == list(plain_keys)
    assert not any(k.startswith("layer1.") for k in offsets)
    assert all(k.split(".")[2] == "conv2" for k in offsets)
    width = {"resnet50": 128, "resnext101_64x4d": 512}[name]
    assert tuple(dcn_keys["layer2.0.conv2.weight"].shape) == tuple(plain_keys["layer2.0.conv2.weight"].shape)
    assert tuple(dcn_keys["layer2.0.conv2.conv_offset.weight"].shape) == (18, width, 3, 3)
    assert tuple(dcn_keys["layer4.2.conv2.conv_offset.bias"].shape) == (18,)
    assert dcn.layer2[0].conv2.stride == (2, 2) and dcn.layer2[0].conv2.conv_offset.stride == (2, 2)
    assert dcn.layer3[1].conv2.groups == plain.layer3[1].conv2.groups
    v2_keys = dcn_v2.state_dict()
    assert "layer2.0.conv2.conv_offset.weight" not in v2_keys
    assert tuple(v2_keys["layer3.0.conv2.conv_offset.weight"].shape) == (3 * 2 * 9, 2 * width, 3, 3)
    assert "layer3.0.conv2.bias" not in v2_keys  # DCNv2 built with bias=False, like mmdet's Bottleneck
    assert isinstance(dcn_v2.layer4[0].conv2, ModulatedDeformConv2dPack)


def test_fresh_dcn_backbone_equals_plain_backbone_and_trains():
    torch.manual_seed(1)
    plain = ResNet(50, width_per_group=16, stage_blocks=(1, 2, 1, 1), frozen_stages=-1).double().eval()
    dcn = ResNet(50, width_per_group=16, stage_blocks=(1, 2, 1, 1), frozen_stages=-1, dcn=DCN_V1).double().eval()
    assert all(not p.any() for n, p in dcn.named_parameters() if "conv_offset" in n)  # zero init survives _init_weights
    missing, unexpected = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("conv_offset" in k for k in missing)
    images = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(dcn(images), plain(images)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # one training step: the offset convs get gradients and then change the output
    dcn.train()
    outputs = dcn(images)
    sum((o ** 2).mean() for o in outputs).backward()
    offset_grad = dcn.layer3[0].conv2.conv_offset.weight.grad
    assert offset_grad is not None and offset_grad.abs().sum() > 0
    with torch.no_grad():
        for p in dcn.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
        assert not torch.allclose(dcn(images)[-1], plain(images)[-1])


def test_fallback_on_stride_keeps_plain_convs_like_mmdetection():
    model = build_resnet("resnet50", stage_blocks=(1, 2, 1, 1), width_per_group=8,
                         dcn={"type": "DCN", "fallback_on_stride": True})
    # MMDetection's Bottleneck: `if not with_dcn or fallback_on_stride` -> a plain conv in every block
    assert not any("conv_offset" in k for k in model.state_dict())
    assert type(model.layer2[1].conv2) is nn.Conv2d


def test_bad_dcn_settings_raise_value_error():
    for dcn, message in [
        ({"type": "DCNv3"}, "dcn\\['type'\\]"),
        ({"deform_groups": 1}, "dcn\\['type'\\]"),
        ({"type": "DCN", "deformable_groups": 1}, "unknown keys"),
        ({"type": "DCN", "deform_groups": 0}, "deform_groups"),
        ({"type": "DCN", "fallback_on_stride": "no"}, "fallback_on_stride"),
        ("DCN", "dict"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_dcn(dcn)
        with pytest.raises(ValueError, match=message):
            build_resnet("resnet50", stage_blocks=(1, 1, 1, 1), width_per_group=8, dcn=dcn)
    with pytest.raises(ValueError, match="dcn is None"):
        build_resnet("resnet50", stage_with_dcn=(False, True, True, True))
    with pytest.raises(ValueError, match="4 bools"):
        build_resnet("resnet50", dcn=DCN_V1, stage_with_dcn=(True, True))
    with pytest.raises(ValueError, match="deform_groups"):  # 7 does not divide the 3x3 conv's channels
        build_resnet("resnet50", stage_blocks=(1, 1, 1, 1), width_per_group=8, dcn={"type": "DCN", "deform_groups": 7})
    assert check_dcn({"type": "DCNv2"}) == {"type": "DCNv2", "deform_groups": 1, "fallback_on_stride": False}


def test_imagenet_checkpoint_loads_into_a_dcn_backbone(tmp_path):
    plain = build_resnet("resnet50", stage_blocks=(1, 1, 1, 1), width_per_group=8)
    path = tmp_path / "imagenet.pth"
    torch.save(plain.state_dict(), path)
    dcn = load_pretrained(build_resnet("resnet50", stage_blocks=(1, 1, 1, 1), width_per_group=8, dcn=DCN_V1), path)
    assert torch.equal(dcn.layer3[0].conv2.weight, plain.layer3[0].conv2.weight)
    assert not dcn.layer3[0].conv2.conv_offset.weight.any()
