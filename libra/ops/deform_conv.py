"""Deformable convolution (DCN v1 and modulated DCN v2): typed wrapper around
``torch.ops.libra.deform_conv2d`` and the ``nn.Module`` forms MMDetection's backbones use.

- :func:`deform_conv2d` has ``torchvision.ops.deform_conv2d``'s signature and results (DCN v1
  without ``mask``, DCN v2 with it; ``groups`` and ``offset_groups`` are read from the shapes).
- :class:`DeformConv2d` / :class:`ModulatedDeformConv2d` hold the weight (and bias) and take the
  offsets (and mask) as forward arguments.
- :class:`DeformConv2dPack` / :class:`ModulatedDeformConv2dPack` also own the convolution that
  predicts them from the input, ``conv_offset``, initialised to zero. Their parameter names are
  mmcv's (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``), so the
  ``conv2.*`` keys of an MMDetection DCN backbone load unchanged; MMDetection's
  ``dcn=dict(type='DCN')`` is :class:`DeformConv2dPack`, ``type='DCNv2'`` is
  :class:`ModulatedDeformConv2dPack`.

Sampling (Dai et al. 2017, Eq. (2)-(4); Zhu et al. 2019, Eq. (1)): output ``(ho, wo)``, kernel
point ``(i, j)`` reads the input bilinearly at ``y = ho * stride - pad + i * dilation + dy``
(``x`` likewise) with zeros outside the image, times the mask in DCN v2; see
``deform_conv_reference.py`` for the layouts.

Autocast: like :func:`libra.ops.roi_align`, the wrapper runs the op in float32 with autocast
disabled and casts the result back to the input's dtype (one code path for the compiled kernels
and the fallback). Called directly, ``torch.ops.libra.deform_conv2d`` also takes half / bfloat16
tensors and computes them in float32.

Differences from torchvision: bad arguments raise ``ValueError`` from the wrapper (torchvision:
``RuntimeError``; the op called directly raises ``RuntimeError`` too), and the double backward is
not implemented (it raises).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from libra.ops._extension import use_extension_op
from libra.ops.deform_conv_reference import deform_conv2d_reference


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair (h, w), got {value!r}.")
    return pair


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution; a drop-in for ``torchvision.ops.deform_conv2d``.

    Args:
        input: [B, C, H, W] (float32/float64/float16/bfloat16).
        offset: [B, 2 * offset_groups * kh * kw, Ho, Wo], a ``(dy, dx)`` pair per kernel point and
            offset group; ``offset_groups`` is read from its channels and must divide C.
        weight: [C_out, C / groups, kh, kw]; ``groups = C // weight.shape[1]`` (e.g. 64 for the
            3x3 convs of ResNeXt-101 64x4d).
        bias: [C_out] or None.
        stride, padding, dilation: ints or ``(h, w)`` pairs, as for ``nn.Conv2d``.
        mask: [B, offset_groups * kh * kw, Ho, Wo] modulation scalars (DCN v2), or None (DCN v1).

    Returns:
        [B, C_out, Ho, Wo] with ``Ho = (H + 2 * pad_h - dilation_h * (kh - 1) - 1) // stride_h + 1``.

    Raises:
        ValueError: for tensors of the wrong rank, inconsistent shapes, devices or dtypes, or
            arguments that give an empty output.
    """
    for name, tensor in (("input", input), ("offset", offset), ("weight", weight)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            raise ValueError(f"deform_conv2d: {name} must be a 4-d tensor, got {_shape(tensor)}.")
    stride_h, stride_w = _pair(stride, "stride")
    pad_h, pad_w = _pair(padding, "padding")
    dil_h, dil_w = _pair(dilation, "dilation")
    if min(stride_h, stride_w, dil_h, dil_w) < 1 or min(pad_h, pad_w) < 0:
        raise ValueError(
            f"deform_conv2d: stride and dilation must be >= 1 and padding >= 0, got stride={stride!r}, "
            f"padding={padding!r}, dilation={dilation!r}."
        )
    batch, channels, height, width = input.shape
    out_channels, channels_per_group, kernel_h, kernel_w = weight.shape
    if channels_per_group == 0 or channels % channels_per_group != 0:
        raise ValueError(
            f"deform_conv2d: weight {tuple(weight.shape)} does not fit input {tuple(input.shape)}: the input channels "
            f"({channels}) must be a multiple of weight.shape[1] ({channels_per_group})."
        )
    groups = channels // channels_per_group
    if out_channels % groups != 0:
        raise ValueError(f"deform_conv2d: {out_channels} output channels are not divisible by groups={groups}.")
    kernel_points = kernel_h * kernel_w
    if kernel_points == 0:
        raise ValueError(f"deform_conv2d: weight {tuple(weight.shape)} has an empty kernel.")
    out_h = (height + 2 * pad_h - dil_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"deform_conv2d: the output would be empty ({out_h}x{out_w}) for input {height}x{width}, kernel "
            f"{kernel_h}x{kernel_w}, stride={stride!r}, padding={padding!r}, dilation={dilation!r}."
        )
    offset_channels = offset.shape[1]
    offset_groups = offset_channels // (2 * kernel_points)
    if offset_groups == 0 or offset_channels % (2 * kernel_points) != 0 or channels % offset_groups != 0:
        raise ValueError(
            f"deform_conv2d: offset has {offset_channels} channels; expected 2 * offset_groups * kh * kw = "
            f"2 * offset_groups * {kernel_points} with offset_groups dividing the {channels} input channels."
        )
    if tuple(offset.shape) != (batch, offset_channels, out_h, out_w):
        raise ValueError(
            f"deform_conv2d: offset must be [B, 2 * offset_groups * kh * kw, Ho, Wo] = "
            f"{[batch, offset_channels, out_h, out_w]}, got {list(offset.shape)}."
        )
    if mask is not None:
        expected = (batch, offset_groups * kernel_points, out_h, out_w)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            raise ValueError(f"deform_conv2d: mask must be [B, offset_groups * kh * kw, Ho, Wo] = {list(expected)}, got {_shape(mask)}.")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (out_channels,)):
        raise ValueError(f"deform_conv2d: bias must be [C_out] = [{out_channels}], got {_shape(bias)}.")
    tensors = {"offset": offset, "weight": weight, "mask": mask, "bias": bias}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != input.device:
            raise ValueError(f"deform_conv2d: {name} is on {tensor.device} but input is on {input.device}.")
        if tensor is not None and tensor.dtype != input.dtype:
            raise ValueError(f"deform_conv2d: {name} is {tensor.dtype} but input is {input.dtype}; use one dtype.")
    if not input.is_floating_point():
        raise ValueError(f"deform_conv2d: input must be floating point, got {input.dtype}.")

    params = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type) and input.dtype != torch.float64:
        bias32 = None if bias is None else bias.float()
        mask32 = None if mask is None else mask.float()
        with torch.autocast(device_type, enabled=False):
            output = _deform_conv2d(input.float(), offset.float(), weight.float(), bias32, mask32, params)
        return output.to(input.dtype)
    return _deform_conv2d(input, offset, weight, bias, mask, params)


def _deform_conv2d(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, params: tuple[int, ...]
) -> Tensor:
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups = params
    if use_extension_op("deform_conv2d"):
        use_mask = mask is not None
        # The op's mask and bias are plain tensors: an empty mask (ignored when use_mask is
        # false) and zeros for a missing bias, as torchvision's op takes them.
        mask_t = mask if use_mask else input.new_empty(0)
        bias_t = bias if bias is not None else input.new_zeros(weight.shape[0])
        return torch.ops.libra.deform_conv2d(
            input, weight, offset, mask_t, bias_t, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups, use_mask
        )
    return deform_conv2d_reference(input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w), mask)


class DeformConv2d(nn.Module):
    """Deformable convolution layer (DCN v1; with a ``mask`` in forward, DCN v2) whose offsets are given.

    Args are ``nn.Conv2d``'s plus ``deform_groups`` (offset groups: the input channels are split
    into that many groups, each with its own offsets). ``bias`` defaults to False, as in mmcv's
    ``DeformConv2d``. The weight is initialised like ``nn.Conv2d``'s.

    Shapes: ``forward(x [B, C_in, H, W], offset [B, 2 * deform_groups * kh * kw, Ho, Wo],
    mask [B, deform_groups * kh * kw, Ho, Wo] or None) -> [B, C_out, Ho, Wo]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups}).")
        if deform_groups < 1 or in_channels % deform_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups}).")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class ModulatedDeformConv2d(DeformConv2d):
    """Modulated deformable convolution (DCN v2, Zhu et al. 2019) whose offsets and mask are given.

    Same arguments as :class:`DeformConv2d` except that ``bias`` defaults to True (mmcv's
    ``ModulatedDeformConv2d``). ``forward(x, offset, mask)`` requires the mask.
    """

    def __init__(self, *args, bias: bool = True, **kwargs) -> None:
        super().__init__(*args, bias=bias, **kwargs)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            raise ValueError("ModulatedDeformConv2d needs a mask [B, deform_groups * kh * kw, Ho, Wo]; use DeformConv2d for DCN v1.")
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


def _offset_conv(layer: DeformConv2d, channels_per_point: int) -> nn.Conv2d:
    # Same kernel, stride, padding and dilation as the deformable conv, so it predicts one
    # value set per output position; zero weights and bias: a fresh layer samples the regular grid.
    kh, kw = layer.kernel_size
    conv = nn.Conv2d(
        layer.in_channels,
        layer.deform_groups * channels_per_point * kh * kw,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=True,
    )
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class DeformConv2dPack(DeformConv2d):
    """DCN v1 layer that predicts its own offsets: ``conv_offset(x)`` -> ``[B, 2 * deform_groups * kh * kw, Ho, Wo]``.

    mmcv's ``DeformConv2dPack`` (MMDetection ``dcn=dict(type='DCN', ...)``): parameters ``weight``,
    ``bias`` (only with ``bias=True``), ``conv_offset.weight``, ``conv_offset.bias``. ``conv_offset``
    is a plain (ungrouped) conv with this layer's kernel, stride, padding and dilation, initialised
    to zero, so a fresh layer equals ``nn.Conv2d`` with the same weight.

    Shapes: ``forward(x [B, C_in, H, W]) -> [B, C_out, Ho, Wo]``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _offset_conv(self, 2)

    def init_offset(self) -> None:
        """Zero the offset conv (e.g. after a generic weight initialisation)."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        offset = self.conv_offset(x)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """DCN v2 layer that predicts its offsets and mask: ``conv_offset(x)`` -> ``3 * deform_groups * kh * kw`` channels.

    mmcv's ``ModulatedDeformConv2dPack`` (MMDetection ``dcn=dict(type='DCNv2', ...)``): the output of
    ``conv_offset`` is split into three equal chunks ``o1, o2, m``; the offsets are
    ``cat(o1, o2)`` (read as interleaved ``(dy, dx)`` pairs like every offset tensor here) and the
    mask is ``sigmoid(m)``. Parameters ``weight``, ``bias`` (default True; none with ``bias=False``),
    ``conv_offset.weight``, ``conv_offset.bias``.

    ``conv_offset`` is initialised to zero, as in mmcv: a fresh layer samples the regular grid with
    mask ``sigmoid(0) = 0.5``, i.e. it equals ``nn.Conv2d`` with HALF the weight (plus the bias), not
    the plain conv.

    Shapes: ``forward(x [B, C_in, H, W]) -> [B, C_out, Ho, Wo]``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _offset_conv(self, 3)

    def init_offset(self) -> None:
        """Zero the offset / mask conv (e.g. after a generic weight initialisation)."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        o1, o2, mask_logits = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask_logits)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)
