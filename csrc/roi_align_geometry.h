// RoIAlign sampling geometry shared by the CPU and CUDA kernels, so both backends
// (and libra/ops/roi_align_reference.py) place samples and weigh them identically.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace libra {

// True for finite values; NaN and +-inf give NaN for v - v. Written without
// std::isfinite so the same code runs on host and device.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T v) {
  return (v - v) == (v - v);
}

// Most samples per bin side with adaptive sampling (sampling_ratio <= 0). Without a cap
// a huge RoI costs ceil(bin_size)^2 samples per bin (1e5 px: 20x slower, 1e9 px: out of
// memory, 1e30 px: 2^60 samples per bin). 64 never changes the result of a RoI that fits
// in a 1333x800 image at FPN strides 4..64 with 7x7 bins: 1333 / 4 / 7 = 47.6 -> 48 <= 64
// (up to 64 * 4 * 7 = 1792 px at stride 4). It bounds a bin to 64 * 64 = 4096 samples.
// Must equal MAX_ADAPTIVE_SAMPLING_GRID in libra/ops/roi_align_reference.py.
constexpr int64_t kMaxAdaptiveSamplingGrid = 64;

// Adaptive samples per bin side: min(ceil(bin_size), kMaxAdaptiveSamplingGrid), and 0 for
// bin_size <= 0 or NaN (no samples, output 0).
template <typename T>
C10_HOST_DEVICE inline int64_t adaptive_grid(T bin_size) {
  if (!(bin_size > T(0))) return 0;
  if (bin_size >= static_cast<T>(kMaxAdaptiveSamplingGrid)) return kMaxAdaptiveSamplingGrid;  // also +inf
  const int64_t truncated = static_cast<int64_t>(bin_size);
  return static_cast<T>(truncated) < bin_size ? truncated + 1 : truncated;
}

// Where one RoI's bins and samples lie on the feature map.
template <typename T>
struct RoIGeometry {
  bool valid;       // finite coordinates and batch index in [0, num_images)
  int64_t batch;    // image index
  T start_y, start_x;
  T bin_h, bin_w;
  int64_t grid_h, grid_w;  // samples per bin along y / x
  T count;                 // grid_h * grid_w, at least 1 (the average's denominator)
};

// roi = (batch_index, x1, y1, x2, y2) in image coordinates.
template <typename T>
C10_HOST_DEVICE inline RoIGeometry<T> roi_geometry(
    const T* roi, int64_t num_images, T spatial_scale, int64_t pooled_height,
    int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  RoIGeometry<T> g;
  bool finite = true;
  for (int i = 0; i < 5; ++i) finite = finite && is_finite(roi[i]);
  g.batch = finite ? static_cast<int64_t>(roi[0]) : 0;
  g.valid = finite && g.batch >= 0 && g.batch < num_images;
  if (!g.valid) {  // NaN/inf or bad batch index: no samples, output 0
    g.batch = 0;
    g.start_y = g.start_x = g.bin_h = g.bin_w = T(0);
    g.grid_h = g.grid_w = 0;
    g.count = T(1);
    return g;
  }
  // aligned: pixel i covers [i, i+1), so its centre is i + 0.5 -> shift by -0.5.
  const T offset = aligned ? T(0.5) : T(0);
  g.start_x = roi[1] * spatial_scale - offset;
  g.start_y = roi[2] * spatial_scale - offset;
  T roi_w = (roi[3] * spatial_scale - offset) - g.start_x;
  T roi_h = (roi[4] * spatial_scale - offset) - g.start_y;
  if (!aligned) {  // legacy Mask R-CNN: malformed RoIs are forced to 1x1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  // sampling_ratio <= 0 (0, or torchvision's -1): adaptive, ceil(roi_size / pooled_size)
  // samples per bin side, at most kMaxAdaptiveSamplingGrid. A positive ratio is used as
  // given: its cost is the caller's choice and does not grow with the RoI.
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(g.bin_h);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(g.bin_w);
  const int64_t samples = g.grid_h * g.grid_w;
  g.count = static_cast<T>(samples > 1 ? samples : 1);
  return g;
}

// Position of sample `step` (of `grid`) in bin `bin` along one axis.
template <typename T>
C10_HOST_DEVICE inline T sample_position(T start, T bin_size, int64_t bin, int64_t step, int64_t grid) {
  return start + static_cast<T>(bin) * bin_size +
      (static_cast<T>(step) + T(0.5)) * bin_size / static_cast<T>(grid);
}

// Linear interpolation along one axis at `pos` on [0, size): neighbouring indices
// and weights. Returns false (zero weights) for points more than one pixel outside
// or NaN; otherwise the axis is extended by its border value. Bilinear weights are
// products of one y and one x interpolation.
template <typename T>
struct AxisInterpolation {
  int64_t low, high;
  T weight_low, weight_high;
};

template <typename T>
C10_HOST_DEVICE inline bool axis_interpolation(T pos, int64_t size, AxisInterpolation<T>& out) {
  if (!(pos >= T(-1) && pos <= static_cast<T>(size))) {
    out.low = out.high = 0;
    out.weight_low = out.weight_high = T(0);
    return false;
  }
  pos = pos > T(0) ? pos : T(0);
  out.low = static_cast<int64_t>(pos);  // pos >= 0: truncation is floor
  if (out.low >= size - 1) {
    out.low = out.high = size - 1;
    pos = static_cast<T>(out.low);
  } else {
    out.high = out.low + 1;
  }
  out.weight_high = pos - static_cast<T>(out.low);
  out.weight_low = T(1) - out.weight_high;
  return true;
}

// Bilinear interpolation at (y, x): four pixel offsets (row * width + col) and weights.
template <typename T>
struct BilinearSample {
  int64_t offset[4];  // (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high)
  T weight[4];
};

template <typename T>
C10_HOST_DEVICE inline BilinearSample<T> bilinear_sample(T y, T x, int64_t height, int64_t width) {
  BilinearSample<T> s;
  AxisInterpolation<T> ay, ax;
  const bool inside_y = axis_interpolation(y, height, ay);
  const bool inside_x = axis_interpolation(x, width, ax);
  if (!(inside_y && inside_x)) {
    for (int i = 0; i < 4; ++i) {
      s.offset[i] = 0;
      s.weight[i] = T(0);
    }
    return s;
  }
  s.offset[0] = ay.low * width + ax.low;
  s.offset[1] = ay.low * width + ax.high;
  s.offset[2] = ay.high * width + ax.low;
  s.offset[3] = ay.high * width + ax.high;
  s.weight[0] = ay.weight_low * ax.weight_low;
  s.weight[1] = ay.weight_low * ax.weight_high;
  s.weight[2] = ay.weight_high * ax.weight_low;
  s.weight[3] = ay.weight_high * ax.weight_high;
  return s;
}

}  // namespace libra
