// Deformable-convolution sampling shared by the CPU and CUDA kernels, so both
// backends (and libra/ops/deform_conv_reference.py) read the same pixels with the
// same weights and differentiate them the same way.
//
// A deformable convolution (Dai et al. 2017, "Deformable Convolutional Networks",
// Eq. (2)) computes at output position p0
//     y(p0) = sum_k w_k * x(p0 + p_k + dp_k)                     (DCN v1)
// and its modulated form (Zhu et al. 2019, "Deformable ConvNets v2", Eq. (1))
//     y(p0) = sum_k w_k * x(p0 + p_k + dp_k) * dm_k               (DCN v2)
// where p_k runs over the kernel grid (times the dilation), dp_k is the learned
// offset and dm_k the learned modulation scalar ("mask"). x at the fractional
// position p is bilinear interpolation (Dai et al. 2017, Eq. (3)-(4)):
//     x(p) = sum_q G(q, p) x(q),  G(q, p) = max(0, 1 - |q_y - p_y|) * max(0, 1 - |q_x - p_x|)
// over the 4 integer neighbours q of p; pixels outside the image are zero, so a
// point with y <= -1, y >= H, x <= -1 or x >= W reads nothing. This is the
// convention of torchvision.ops.deform_conv2d and mmcv's (modulated_)deform_conv2d.
// Derivatives with respect to the position are one-sided from the right (floor()
// picks the corners), as in torchvision; so at y = -1 exactly (zero offsets with
// padding 1 land there) the value is 0 but dv/dy = v(row 0), where mmcv gives 0.
//
// Layouts (torchvision's and MMDetection's): for output position (ho, wo), kernel
// point k = i * kernel_w + j and offset group g,
//     sample y = ho * stride_h - pad_h + i * dilation_h + offset[2 * (g * K + k)    ][ho][wo]
//     sample x = wo * stride_w - pad_w + j * dilation_w + offset[2 * (g * K + k) + 1][ho][wo]
//     mask       = mask[g * K + k][ho][wo]                         (K = kernel_h * kernel_w)
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace libra {

// One bilinear sample at a fractional position of an H x W plane.
template <typename T>
struct DeformSample {
  // The 4 corners (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1) as offsets
  // y * W + x into the plane; 0 for a corner outside the plane (its weight is 0).
  int64_t offset[4];
  T inside[4];  // 1 for a corner inside the plane, 0 outside
  T ly, lx;     // fractional parts y - y0, x - x0 (both 0 for a point that reads nothing)
  T mask;       // modulation scalar dm_k (1 for DCN v1)
  // mask * G(corner, p) for an inside corner, 0 outside: the value is sum_j weight[j] * x[offset[j]].
  // (Branch-free: an outside corner reads pixel 0 with weight 0, so a NaN / inf in pixel 0
  // of a plane reaches the samples that have an outside corner; finite inputs are exact.)
  T weight[4];
};

// The sample at (y, x) with modulation `mask`. NaN or infinite positions read nothing.
template <typename T>
C10_HOST_DEVICE inline DeformSample<T> deform_sample(T y, T x, int64_t height, int64_t width, T mask) {
  DeformSample<T> s;
  s.mask = mask;
  // Outside [-1, H) x [-1, W) no corner is inside the plane (y = -1 itself reads 0 but
  // has the right derivative of the ramp up to row 0). Written as a negated conjunction
  // so that NaN (every comparison false) is outside.
  if (!(y >= T(-1) && y < static_cast<T>(height) && x >= T(-1) && x < static_cast<T>(width))) {
    for (int j = 0; j < 4; ++j) {
      s.offset[j] = 0;
      s.inside[j] = T(0);
      s.weight[j] = T(0);
    }
    s.ly = s.lx = T(0);
    return s;
  }
  // floor() for y in [-1, H): truncation rounds (-1, 0) up to 0, so those give -1.
  const int64_t y0 = y < T(0) ? -1 : static_cast<int64_t>(y);
  const int64_t x0 = x < T(0) ? -1 : static_cast<int64_t>(x);
  const int64_t y1 = y0 + 1, x1 = x0 + 1;
  s.ly = y - static_cast<T>(y0);
  s.lx = x - static_cast<T>(x0);
  const T hy = T(1) - s.ly, hx = T(1) - s.lx;
  const bool y0_in = y0 >= 0, y1_in = y1 <= height - 1;
  const bool x0_in = x0 >= 0, x1_in = x1 <= width - 1;
  const bool in[4] = {y0_in && x0_in, y0_in && x1_in, y1_in && x0_in, y1_in && x1_in};
  const int64_t corner[4] = {y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1};
  const T bilinear[4] = {hy * hx, hy * s.lx, s.ly * hx, s.ly * s.lx};
  for (int j = 0; j < 4; ++j) {
    s.offset[j] = in[j] ? corner[j] : 0;
    s.inside[j] = in[j] ? T(1) : T(0);
    s.weight[j] = in[j] ? mask * bilinear[j] : T(0);
  }
  return s;
}

// The sample of output position (ho, wo) and kernel point (i, j), whose offset pair
// (dy, dx) and mask the caller has read.
template <typename T>
C10_HOST_DEVICE inline DeformSample<T> deform_conv_sample(
    int64_t ho, int64_t wo, int64_t i, int64_t j, T dy, T dx, T mask, int64_t height, int64_t width,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w) {
  const T y = static_cast<T>(ho * stride_h - pad_h + i * dilation_h) + dy;
  const T x = static_cast<T>(wo * stride_w - pad_w + j * dilation_w) + dx;
  return deform_sample(y, x, height, width, mask);
}

// The interpolated value of `plane` at s (without the mask) and its derivatives with
// respect to the sample position. Bilinear interpolation is linear in each of ly, lx:
//     v   = (1-ly)(1-lx) v00 + (1-ly) lx v01 + ly (1-lx) v10 + ly lx v11
//     dv/dy = (1-lx)(v10 - v00) + lx (v11 - v01)
//     dv/dx = (1-ly)(v01 - v00) + ly (v11 - v10)
// with v.. = 0 for corners outside. At an integer position these are the one-sided
// (right) derivatives, as in torchvision and mmcv.
template <typename T, typename scalar_t>
C10_HOST_DEVICE inline void interpolate_with_gradient(const DeformSample<T>& s, const scalar_t* plane, T& value,
                                                      T& d_y, T& d_x) {
  T v[4];
  for (int j = 0; j < 4; ++j) v[j] = s.inside[j] * static_cast<T>(plane[s.offset[j]]);
  const T hy = T(1) - s.ly, hx = T(1) - s.lx;
  value = hy * hx * v[0] + hy * s.lx * v[1] + s.ly * hx * v[2] + s.ly * s.lx * v[3];
  d_y = hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]);
  d_x = hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]);
}

}  // namespace libra
