"""Pure-PyTorch deformable convolution: the readable definition, a test oracle and the fallback op.

DCN v1 (Dai et al. 2017, "Deformable Convolutional Networks", Eq. (2)) samples the input at
the regular kernel grid shifted by a learned offset per kernel point and output position:

    y(p0) = sum_k w_k * x(p0 + p_k + dp_k)

and the modulated DCN v2 (Zhu et al. 2019, "Deformable ConvNets v2", Eq. (1)) also scales
every sample by a learned mask ``dm_k``: ``y(p0) = sum_k w_k * x(p0 + p_k + dp_k) * dm_k``.
``x`` at a fractional position is bilinear interpolation of its 4 neighbouring pixels (Dai et
al. 2017, Eq. (3)-(4)); pixels outside the image are zero, and a point with ``y <= -1``,
``y >= H``, ``x <= -1`` or ``x >= W`` reads nothing.

Layouts (torchvision's and MMDetection's): ``offset`` is ``[B, 2 * offset_groups * kh * kw, Ho, Wo]``
with a ``(dy, dx)`` pair per kernel point ``k = i * kw + j`` (channel ``2 * (g * kh * kw + k)``
is ``dy`` of offset group ``g``), ``mask`` is ``[B, offset_groups * kh * kw, Ho, Wo]``; input
channel ``c`` uses offset group ``c // (C / offset_groups)``. The sample of output ``(ho, wo)``
and kernel point ``(i, j)`` lies at

    y = ho * stride_h - pad_h + i * dilation_h + dy,    x = wo * stride_w - pad_w + j * dilation_w + dx.

Gradients come from autograd through ``floor`` (which has none) and the bilinear weights, so at
integer positions they are the right-sided derivatives, as in the compiled kernels and torchvision
(at ``y = -1`` exactly the value is 0 but the derivative is that of the ramp up to row 0).

This module gathers all ``C * kh * kw * Ho * Wo`` samples at once (several times that memory),
so it is meant for tests and as a fallback; the compiled kernels in ``csrc/`` are the fast path.
"""
import torch
from torch import Tensor


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair, got {value!r}.")
    return int(value[0]), int(value[1])


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution with ``torchvision.ops.deform_conv2d``'s arguments.

    Args:
        input: [B, C, H, W].
        offset: [B, 2 * offset_groups * kh * kw, Ho, Wo].
        weight: [C_out, C / groups, kh, kw]; ``groups = C // weight.shape[1]``.
        bias: [C_out] or None.
        stride, padding, dilation: ints or (h, w) pairs.
        mask: [B, offset_groups * kh * kw, Ho, Wo] (DCN v2) or None (DCN v1).

    Returns:
        [B, C_out, Ho, Wo].
    """
    stride_h, stride_w = _pair(stride, "stride")
    pad_h, pad_w = _pair(padding, "padding")
    dil_h, dil_w = _pair(dilation, "dilation")
    batch, channels, height, width = input.shape
    out_channels, channels_per_group, kernel_h, kernel_w = weight.shape
    groups = channels // channels_per_group
    kernel_points = kernel_h * kernel_w
    offset_groups = offset.shape[1] // (2 * kernel_points)
    out_h, out_w = offset.shape[2], offset.shape[3]

    # Sample positions [B, og, K, Ho, Wo]: the regular grid plus the offsets.
    off = offset.reshape(batch, offset_groups, kernel_points, 2, out_h, out_w)
    options = {"device": input.device, "dtype": input.dtype}
    ki = torch.arange(kernel_h, **options).repeat_interleave(kernel_w)  # i of k = i * kw + j
    kj = torch.arange(kernel_w, **options).repeat(kernel_h)
    grid_y = (torch.arange(out_h, **options) * stride_h - pad_h)[None, :, None] + (ki * dil_h)[:, None, None]
    grid_x = (torch.arange(out_w, **options) * stride_w - pad_w)[None, None, :] + (kj * dil_w)[:, None, None]
    y = grid_y + off[:, :, :, 0]
    x = grid_x + off[:, :, :, 1]

    inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)
    y0, x0 = torch.floor(y).detach(), torch.floor(x).detach()
    ly, lx = y - y0, x - x0

    # Every channel of an offset group reads the same positions: gather from [B, og, C/og, H*W].
    samples = kernel_points * out_h * out_w
    planes = input.reshape(batch, offset_groups, channels // offset_groups, height * width)
    value = input.new_zeros(batch, offset_groups, channels // offset_groups, samples)
    for dy, dx, corner_weight in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        cy, cx = y0 + dy, x0 + dx
        valid = inside & (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
        index = torch.where(valid, cy * width + cx, torch.zeros_like(cy)).long()
        index = index.reshape(batch, offset_groups, 1, samples).expand(-1, -1, channels // offset_groups, -1)
        pixels = torch.gather(planes, 3, index)
        factor = torch.where(valid, corner_weight, torch.zeros_like(corner_weight))
        value = value + factor.reshape(batch, offset_groups, 1, samples) * pixels
    if mask is not None:
        value = value * mask.reshape(batch, offset_groups, 1, samples)

    # columns [B, groups, C/groups * K, Ho*Wo] (row c * K + k), then a matmul per group.
    columns = value.reshape(batch, groups, channels_per_group * kernel_points, out_h * out_w)
    weight_g = weight.reshape(groups, out_channels // groups, channels_per_group * kernel_points)
    output = torch.einsum("gok,bgkp->bgop", weight_g, columns).reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        output = output + bias.reshape(1, -1, 1, 1)
    return output
