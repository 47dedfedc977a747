"""Pure-PyTorch RoIAlign: the readable definition, a test oracle and the fallback op.

RoIAlign (Mask R-CNN) averages ``sampling_grid_h x sampling_grid_w`` bilinear samples
inside each of the ``pooled_height x pooled_width`` bins of a RoI. Libra R-CNN pools
7x7 features from the FPN level of each RoI with ``sampling_ratio=0`` (adaptive grid,
``ceil(roi_size / pooled_size)`` samples per bin) and ``aligned=True`` (MMDetection
``faster-rcnn_r50_fpn_1x_coco``: ``roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0)``,
mmcv's default ``aligned=True``).

Any ``sampling_ratio <= 0`` is adaptive (torchvision's default is -1). The adaptive grid
is capped at ``MAX_ADAPTIVE_SAMPLING_GRID`` samples per bin side, like the kernels in
``csrc/`` (``kMaxAdaptiveSamplingGrid``), so a huge RoI costs at most 64 x 64 samples per
bin instead of unbounded time and memory. The cap never binds for a RoI that fits in a
1333x800 image at FPN strides 4..64 with 7x7 bins (1333 / 4 / 7 = 47.6 -> 48 samples).
A positive ``sampling_ratio`` is used as given.

This module is vectorised over RoIs: every RoI gets the same *maximum* sampling grid
and samples beyond its own grid are masked out. That costs memory proportional to
``K * C * pooled_h * grid_h * pooled_w * grid_w`` (grid <= 64 when adaptive), so it is
meant for tests and as a fallback, not for training; the compiled kernels in ``csrc/``
are the fast path.
"""
import torch
from torch import Tensor

# Most samples per bin side with adaptive sampling; equal to kMaxAdaptiveSamplingGrid in
# csrc/roi_align_geometry.h (see there for the choice of 64).
MAX_ADAPTIVE_SAMPLING_GRID = 64


def _opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    # half/bfloat16 are accumulated in float32, like at::opmath_type in the kernels.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _axis_samples(
    start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, max_grid: int, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear sample positions along one axis (y or x) for every RoI.

    Args:
        start: [K] RoI start in feature-map coordinates.
        bin_size: [K] bin size.
        grid: [K] int64 samples per bin for each RoI (0 means no sample).
        pooled: number of output bins along this axis.
        max_grid: the largest entry of ``grid``; all RoIs use a grid this big.
        size: feature map extent along this axis (H or W).

    Returns:
        low, high: [K, pooled * max_grid] int64 neighbouring pixel indices,
        weight_low, weight_high: [K, pooled * max_grid] interpolation weights, zero for
        masked samples and for samples outside ``[-1, size]``.
    """
    bins = torch.arange(pooled, device=start.device, dtype=start.dtype)
    steps = torch.arange(max_grid, device=start.device, dtype=start.dtype)
    grid_f = grid.clamp(min=1).to(start.dtype)[:, None, None]
    # Sample i of bin p lies at the centre of sub-cell i: start + p*bin + (i + 0.5) * bin / grid.
    pos = (
        start[:, None, None]
        + bins[None, :, None] * bin_size[:, None, None]
        + (steps[None, None, :] + 0.5) * bin_size[:, None, None] / grid_f
    )
    in_grid = steps[None, None, :] < grid[:, None, None]
    # A sample more than one pixel outside the map contributes nothing; otherwise the
    # position is clamped to the border pixel (the map is extended by its edge value).
    inside = (pos >= -1.0) & (pos <= size)
    # Masked samples (also NaN/inf positions of a RoI whose scaled size overflowed) read
    # pixel 0 with weight 0, so that every index is valid.
    pos = torch.where(inside, pos, torch.zeros_like(pos)).clamp(min=0.0)
    low = pos.floor().clamp(max=size - 1)
    at_edge = low >= size - 1
    pos = torch.where(at_edge, low, pos)
    high = torch.where(at_edge, low, low + 1)
    weight_high = pos - low
    weight_low = 1.0 - weight_high
    keep = (in_grid & inside).to(pos.dtype)
    flat = (-1, pooled * max_grid)
    return (
        low.long().reshape(flat),
        high.long().reshape(flat),
        (weight_low * keep).reshape(flat),
        (weight_high * keep).reshape(flat),
    )


def roi_align_reference(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign in plain PyTorch (differentiable through autograd).

    Args:
        input: [N, C, H, W] feature map.
        rois: [K, 5] rows ``(batch_index, x1, y1, x2, y2)`` in input-image coordinates.
        spatial_scale: feature-map size / image size (1 / stride).
        pooled_height, pooled_width: output bins per RoI.
        sampling_ratio: samples per bin along each axis; <= 0 = adaptive
            ``min(ceil(roi_size / pooled), MAX_ADAPTIVE_SAMPLING_GRID)``.
        aligned: shift by -0.5 so that pixel centres sit at integer + 0.5 (no minimum
            RoI size); False keeps the original Mask R-CNN convention (RoI size >= 1).

    Returns:
        [K, C, pooled_height, pooled_width] in ``input.dtype``. RoIs with a non-finite
        coordinate or an out-of-range batch index give zeros.
    """
    num_images, channels, height, width = input.shape
    num_rois = rois.shape[0]
    compute_dtype = _opmath_dtype(input.dtype)
    if num_rois == 0 or input.numel() == 0:
        empty = input.new_zeros((num_rois, channels, pooled_height, pooled_width))
        # stay in the autograd graph (zero gradient), like the compiled op
        return empty + input.narrow(0, 0, 0).sum() if input.requires_grad else empty
    feats = input.to(compute_dtype)
    rois = rois.detach().to(device=input.device, dtype=compute_dtype)

    # Invalid RoIs (NaN/inf, bad batch index) are computed on a dummy box and zeroed.
    batch_f = rois[:, 0].trunc()
    valid = torch.isfinite(rois).all(dim=1) & (batch_f >= 0) & (batch_f < num_images)
    rois = torch.where(valid[:, None], rois, torch.zeros_like(rois))
    batch = rois[:, 0].trunc().long()

    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # legacy convention: force malformed RoIs to 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / pooled_width
    bin_h = roi_h / pooled_height
    if sampling_ratio > 0:
        grid_h = torch.full_like(batch, sampling_ratio)
        grid_w = torch.full_like(batch, sampling_ratio)
    else:
        # min(ceil(bin), cap), 0 for bin <= 0 or NaN (clamped before the cast, which
        # is undefined for NaN and inf).
        cap = MAX_ADAPTIVE_SAMPLING_GRID
        grid_h = torch.nan_to_num(torch.ceil(bin_h), nan=0.0).clamp(min=0, max=cap).long()
        grid_w = torch.nan_to_num(torch.ceil(bin_w), nan=0.0).clamp(min=0, max=cap).long()
    # The one host sync: the shared grid size (a fixed maximum, masks do the rest).
    max_grid_h = max(int(grid_h.max()), 1)
    max_grid_w = max(int(grid_w.max()), 1)
    count = (grid_h * grid_w).clamp(min=1).to(compute_dtype)

    y_low, y_high, wy_low, wy_high = _axis_samples(y1, bin_h, grid_h, pooled_height, max_grid_h, height)
    x_low, x_high, wx_low, wx_high = _axis_samples(x1, bin_w, grid_w, pooled_width, max_grid_w, width)

    # Gather the 4 neighbours of every (y sample, x sample) pair from the RoI's image:
    # flat index into [N*H*W] for image b, row y, column x is (b*H + y)*W + x.
    flat_feats = feats.permute(1, 0, 2, 3).reshape(channels, -1)  # [C, N*H*W]
    row_base = (batch[:, None] * height)  # [K, 1]
    total = None
    for y_idx, wy in ((y_low, wy_low), (y_high, wy_high)):
        for x_idx, wx in ((x_low, wx_low), (x_high, wx_high)):
            index = ((row_base + y_idx)[:, :, None] * width + x_idx[:, None, :]).reshape(-1)
            values = flat_feats.index_select(1, index).reshape(channels, num_rois, y_idx.shape[1], x_idx.shape[1])
            term = values * (wy[:, :, None] * wx[:, None, :])[None]
            total = term if total is None else total + term
    # [C, K, PH*GH, PW*GW] -> average over each bin's grid -> [K, C, PH, PW]
    total = total.reshape(channels, num_rois, pooled_height, max_grid_h, pooled_width, max_grid_w)
    pooled = total.sum(dim=(3, 5)) / count[None, :, None, None]
    pooled = pooled * valid.to(compute_dtype)[None, :, None, None]
    return pooled.permute(1, 0, 2, 3).contiguous().to(input.dtype)
