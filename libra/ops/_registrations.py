"""Fake (meta) kernels and autograd formulas for ``torch.ops.libra.*``.

Registered through ``torch.library`` so that ``torch.library.opcheck`` passes and the
ops trace under ``torch.compile``. Imported only when ``libra._C`` loaded (the ops
must exist before anything can be registered for them).
"""
import torch
from torch import Tensor

from libra.ops._extension import has_op


@torch.library.register_fake("libra::roi_align")
def _roi_align_fake(
    input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool
) -> Tensor:
    torch._check(input.dim() == 4, lambda: "roi_align: input must be [N, C, H, W]")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "roi_align: rois must be [K, 5]")
    # Like the kernels, any sampling_ratio is accepted (<= 0: adaptive grid, at most 64
    # samples per bin side); it does not change the output's shape.
    return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))


@torch.library.register_fake("libra::_roi_align_backward")
def _roi_align_backward_fake(
    grad: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    torch._check(grad.dim() == 4, lambda: "_roi_align_backward: grad must be [K, C, PH, PW]")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "_roi_align_backward: rois must be [K, 5]")
    return grad.new_empty((batch_size, channels, height, width))


@torch.library.register_fake("libra::nms")
def _nms_fake(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    torch._check(dets.dim() == 2 and dets.size(1) == 4, lambda: "nms: dets must be [N, 4]")
    torch._check(scores.dim() == 1 and scores.size(0) == dets.size(0), lambda: "nms: scores must be [N]")
    # The number of kept boxes depends on the data.
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return dets.new_empty((num_kept,), dtype=torch.int64)


@torch.library.register_fake("libra::batched_nms")
def _batched_nms_fake(dets: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    torch._check(dets.dim() == 2 and dets.size(1) == 4, lambda: "batched_nms: dets must be [N, 4]")
    torch._check(scores.dim() == 1 and scores.size(0) == dets.size(0), lambda: "batched_nms: scores must be [N]")
    torch._check(idxs.dim() == 1 and idxs.size(0) == dets.size(0), lambda: "batched_nms: idxs must be [N]")
    torch._check(
        not idxs.is_floating_point() and not idxs.is_complex(), lambda: "batched_nms: idxs must be an integer tensor"
    )
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return dets.new_empty((num_kept,), dtype=torch.int64)


# RoIAlign is linear in its input, so its gradient is the adjoint map (scatter of the
# bilinear weights), and the adjoint of that is RoIAlign again: this gives double
# backward for free.
def _roi_align_setup_context(ctx, inputs, output) -> None:
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align_backward(ctx, grad_output: Tensor):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = torch.ops.libra._roi_align_backward(
        grad_output, rois, spatial_scale, pooled_height, pooled_width,
        batch_size, channels, height, width, sampling_ratio, aligned,
    )
    return grad_input, None, None, None, None, None, None


def _roi_align_backward_setup_context(ctx, inputs, output) -> None:
    grad, rois, spatial_scale, pooled_height, pooled_width, _, _, _, _, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align_backward_backward(ctx, grad_grad_input: Tensor):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    grad_grad = torch.ops.libra.roi_align(
        grad_grad_input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
    )
    return (grad_grad,) + (None,) * 10


torch.library.register_autograd("libra::roi_align", _roi_align_backward, setup_context=_roi_align_setup_context)
torch.library.register_autograd(
    "libra::_roi_align_backward", _roi_align_backward_backward, setup_context=_roi_align_backward_setup_context
)


# ----------------------------------------------------------------------------- deform_conv2d
# Registered only when the loaded libra._C has the op: an extension built before it existed
# still loads, and libra.ops.deform_conv2d then falls back to the reference (with a warning).


def _deform_conv2d_out_size(size: int, pad: int, dilation: int, kernel: int, stride: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _deform_conv2d_fake(
    input: Tensor,
    weight: Tensor,
    offset: Tensor,
    mask: Tensor,
    bias: Tensor,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    offset_groups: int,
    use_mask: bool,
) -> Tensor:
    torch._check(input.dim() == 4, lambda: "deform_conv2d: input must be [B, C, H, W]")
    torch._check(weight.dim() == 4, lambda: "deform_conv2d: weight must be [C_out, C / groups, kh, kw]")
    torch._check(offset.dim() == 4, lambda: "deform_conv2d: offset must be [B, 2 * offset_groups * kh * kw, Ho, Wo]")
    torch._check(weight.size(1) * groups == input.size(1), lambda: "deform_conv2d: weight.size(1) * groups != C")
    out_h = _deform_conv2d_out_size(input.size(2), pad_h, dilation_h, weight.size(2), stride_h)
    out_w = _deform_conv2d_out_size(input.size(3), pad_w, dilation_w, weight.size(3), stride_w)
    torch._check(out_h > 0 and out_w > 0, lambda: "deform_conv2d: the output would be empty")
    torch._check(
        offset.size(1) == 2 * offset_groups * weight.size(2) * weight.size(3) and offset.size(2) == out_h and offset.size(3) == out_w,
        lambda: "deform_conv2d: offset must be [B, 2 * offset_groups * kh * kw, Ho, Wo]",
    )
    return input.new_empty((input.size(0), weight.size(0), out_h, out_w))


def _deform_conv2d_backward_fake(
    grad: Tensor,
    input: Tensor,
    weight: Tensor,
    offset: Tensor,
    mask: Tensor,
    bias: Tensor,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    groups: int,
    offset_groups: int,
    use_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    torch._check(grad.dim() == 4, lambda: "_deform_conv2d_backward: grad must be [B, C_out, Ho, Wo]")
    # The kernels return contiguous gradients of the inputs' shapes and dtypes.
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        torch.empty_like(mask, memory_format=torch.contiguous_format),
        bias.new_empty(bias.shape),
    )


# The five gradients come from one backward op (they share the sampling and the column
# buffers). mask is an input without a gradient when use_mask is false.
def _deform_conv2d_setup_context(ctx, inputs, output) -> None:
    input, weight, offset, mask, bias, *params = inputs
    ctx.save_for_backward(input, weight, offset, mask, bias)
    ctx.params = tuple(params)


def _deform_conv2d_backward(ctx, grad_output: Tensor):
    input, weight, offset, mask, bias = ctx.saved_tensors
    grad_input, grad_weight, grad_offset, grad_mask, grad_bias = torch.ops.libra._deform_conv2d_backward(
        grad_output, input, weight, offset, mask, bias, *ctx.params
    )
    use_mask = ctx.params[-1]
    return (grad_input, grad_weight, grad_offset, grad_mask if use_mask else None, grad_bias) + (None,) * 9


def _deform_conv2d_backward_setup_context(ctx, inputs, output) -> None:
    pass


def _deform_conv2d_double_backward(ctx, *grads):
    raise NotImplementedError(
        "libra.ops.deform_conv2d has no double backward (second derivatives); "
        "torch.autograd.grad(..., create_graph=True) through it is not supported."
    )


if has_op("deform_conv2d"):
    torch.library.register_fake("libra::deform_conv2d")(_deform_conv2d_fake)
    torch.library.register_fake("libra::_deform_conv2d_backward")(_deform_conv2d_backward_fake)
    torch.library.register_autograd(
        "libra::deform_conv2d", _deform_conv2d_backward, setup_context=_deform_conv2d_setup_context
    )
    torch.library.register_autograd(
        "libra::_deform_conv2d_backward",
        _deform_conv2d_double_backward,
        setup_context=_deform_conv2d_backward_setup_context,
    )
