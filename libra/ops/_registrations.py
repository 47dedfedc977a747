"""Fake (meta) kernels and autograd formulas for ``torch.ops.libra.*``.

Registered through ``torch.library`` so that ``torch.library.opcheck`` passes and the
ops trace under ``torch.compile``. Imported only when ``libra._C`` loaded (the ops
must exist before anything can be registered for them).
"""
import torch
from torch import Tensor


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
