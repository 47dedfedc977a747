// Deformable convolution (DCN v1, Dai et al. 2017; modulated DCN v2, Zhu et al. 2019)
// on the CPU: the per-image kernels of csrc/deform_conv2d_common.h.
//
// The sampling geometry of a kernel point at an output position (4 corner offsets and
// their bilinear weights, csrc/deform_conv2d_geometry.h) depends only on the offset
// group, not on the channel, so it is computed ONCE per (offset group, kernel point,
// output position) and then reused by the C / offset_groups channels of the group.
// Work is split so that no two threads write the same memory:
//   im2col          parallel over column rows (channel, kernel point)
//   col2im          parallel over input channels (each owns its gradient plane; the
//                   samples of one channel overlap, those of two channels never do)
//   col2im_coord    parallel over (offset group, kernel point, block of positions):
//                   each owns its offset / mask gradients and its column entries
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../deform_conv2d_common.h"
#include "../deform_conv2d_geometry.h"

namespace libra {
namespace {

// Output positions handled together by one task of the coordinate-gradient pass.
constexpr int64_t kPositionBlock = 256;

// samples[(g * K + k) * Ho * Wo + p] for every offset group g, kernel point k and output
// position p of one image.
template <typename scalar_t>
std::vector<DeformSample<scalar_t>> compute_samples(const scalar_t* offset, const scalar_t* mask,
                                                    const DeformConvShape& s) {
  const int64_t K = s.kernel_size(), P = s.out_size();
  std::vector<DeformSample<scalar_t>> samples(s.offset_groups * K * P);
  // One task per (offset group, kernel point, output row).
  at::parallel_for(0, s.offset_groups * K * s.out_h, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ho = task % s.out_h;
      const int64_t gk = task / s.out_h;  // g * K + k
      const int64_t k = gk % K;
      const int64_t i = k / s.kernel_w, j = k % s.kernel_w;
      const scalar_t* dy = offset + (2 * gk) * P + ho * s.out_w;
      const scalar_t* dx = offset + (2 * gk + 1) * P + ho * s.out_w;
      const scalar_t* m = mask == nullptr ? nullptr : mask + gk * P + ho * s.out_w;
      DeformSample<scalar_t>* out = samples.data() + gk * P + ho * s.out_w;
      for (int64_t wo = 0; wo < s.out_w; ++wo) {
        out[wo] = deform_conv_sample<scalar_t>(ho, wo, i, j, dy[wo], dx[wo], m == nullptr ? scalar_t(1) : m[wo],
                                               s.height, s.width, s.stride_h, s.stride_w, s.pad_h, s.pad_w,
                                               s.dilation_h, s.dilation_w);
      }
    }
  });
  return samples;
}

template <typename scalar_t>
const scalar_t* mask_data(const at::Tensor& mask) {
  return mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
}

struct CpuKernels {
  // columns[c * K + k][p] = mask * x_c(sample (g(c), k, p)).
  static void im2col(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                     const DeformConvShape& s, const at::Tensor& columns) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deformable_im2col_cpu", [&] {
      const auto samples = compute_samples(offset.data_ptr<scalar_t>(), mask_data<scalar_t>(mask), s);
      const scalar_t* input_data = input.data_ptr<scalar_t>();
      scalar_t* columns_data = columns.data_ptr<scalar_t>();
      const int64_t K = s.kernel_size(), P = s.out_size(), plane_size = s.height * s.width;
      const int64_t channels_per_og = s.channels_per_offset_group();
      at::parallel_for(0, s.in_channels * K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t c = row / K, k = row % K;
          const scalar_t* plane = input_data + c * plane_size;
          const DeformSample<scalar_t>* sample = samples.data() + ((c / channels_per_og) * K + k) * P;
          scalar_t* col = columns_data + row * P;
          for (int64_t p = 0; p < P; ++p) {
            const DeformSample<scalar_t>& t = sample[p];
            col[p] = t.weight[0] * plane[t.offset[0]] + t.weight[1] * plane[t.offset[1]] +
                     t.weight[2] * plane[t.offset[2]] + t.weight[3] * plane[t.offset[3]];
          }
        }
      });
    });
  }

  static void backward_image(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                             const at::Tensor& grad_columns, const DeformConvShape& s, const at::Tensor& columns,
                             const at::Tensor& grad_input, const at::Tensor& grad_offset, const at::Tensor& grad_mask) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deformable_col2im_cpu", [&] {
      const auto samples = compute_samples(offset.data_ptr<scalar_t>(), mask_data<scalar_t>(mask), s);
      const scalar_t* input_data = input.data_ptr<scalar_t>();
      const scalar_t* grad_col_data = grad_columns.data_ptr<scalar_t>();
      scalar_t* columns_data = columns.data_ptr<scalar_t>();
      scalar_t* grad_input_data = grad_input.data_ptr<scalar_t>();
      scalar_t* grad_offset_data = grad_offset.data_ptr<scalar_t>();
      scalar_t* grad_mask_data = grad_mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr;
      const int64_t K = s.kernel_size(), P = s.out_size(), plane_size = s.height * s.width;
      const int64_t channels_per_og = s.channels_per_offset_group();

      // col2im_coord (Dai et al. 2017, Eq. (7); Zhu et al. 2019, Sec. 2.1): for the sample
      // of (g, k, p), with v_c its interpolated value on channel c and m its mask,
      //   dL/d(dy) = m * sum_c dL/dcol[c,k,p] * dv_c/dy     (dL/d(dx) likewise)
      //   dL/dm    =     sum_c dL/dcol[c,k,p] * v_c
      // summed over the channels c of offset group g. The same pass stores the columns
      // m * v_c again, for dL/dweight.
      const int64_t blocks = (P + kPositionBlock - 1) / kPositionBlock;
      at::parallel_for(0, s.offset_groups * K * blocks, 1, [&](int64_t begin, int64_t end) {
        scalar_t acc_y[kPositionBlock], acc_x[kPositionBlock], acc_m[kPositionBlock];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t gk = task / blocks;  // g * K + k
          const int64_t g = gk / K, k = gk % K;
          const int64_t p_begin = (task % blocks) * kPositionBlock;
          const int64_t n = std::min(kPositionBlock, P - p_begin);
          const DeformSample<scalar_t>* sample = samples.data() + gk * P + p_begin;
          std::fill(acc_y, acc_y + n, scalar_t(0));
          std::fill(acc_x, acc_x + n, scalar_t(0));
          std::fill(acc_m, acc_m + n, scalar_t(0));
          for (int64_t c = g * channels_per_og; c < (g + 1) * channels_per_og; ++c) {
            const scalar_t* plane = input_data + c * plane_size;
            const scalar_t* grad_col = grad_col_data + (c * K + k) * P + p_begin;
            scalar_t* col = columns_data + (c * K + k) * P + p_begin;
            for (int64_t q = 0; q < n; ++q) {
              scalar_t value, d_y, d_x;
              interpolate_with_gradient(sample[q], plane, value, d_y, d_x);
              acc_y[q] += grad_col[q] * d_y;
              acc_x[q] += grad_col[q] * d_x;
              acc_m[q] += grad_col[q] * value;
              col[q] = sample[q].mask * value;
            }
          }
          scalar_t* grad_dy = grad_offset_data + (2 * gk) * P + p_begin;
          scalar_t* grad_dx = grad_offset_data + (2 * gk + 1) * P + p_begin;
          for (int64_t q = 0; q < n; ++q) {
            grad_dy[q] = sample[q].mask * acc_y[q];
            grad_dx[q] = sample[q].mask * acc_x[q];
          }
          if (grad_mask_data != nullptr) std::copy(acc_m, acc_m + n, grad_mask_data + gk * P + p_begin);
        }
      });

      // col2im (Dai et al. 2017, Eq. (6)): each column entry flows back to the <= 4
      // pixels it was interpolated from, with the weights mask * G(q, p).
      at::parallel_for(0, s.in_channels, 1, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          scalar_t* grad_plane = grad_input_data + c * plane_size;
          const DeformSample<scalar_t>* group_samples = samples.data() + (c / channels_per_og) * K * P;
          for (int64_t k = 0; k < K; ++k) {
            const DeformSample<scalar_t>* sample = group_samples + k * P;
            const scalar_t* grad_col = grad_col_data + (c * K + k) * P;
            for (int64_t p = 0; p < P; ++p) {
              const DeformSample<scalar_t>& t = sample[p];
              const scalar_t g = grad_col[p];
              for (int j = 0; j < 4; ++j) {
                if (t.weight[j] != scalar_t(0)) grad_plane[t.offset[j]] += t.weight[j] * g;
              }
            }
          }
        }
      });
    });
  }
};

at::Tensor deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                     const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h,
                                     int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                     int64_t dilation_w, int64_t groups, int64_t offset_groups, bool use_mask) {
  TORCH_CHECK(input.device().is_cpu(), "deform_conv2d_forward_cpu: tensors must be on the CPU");
  return deform_conv2d_forward<CpuKernels>(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                           dilation_h, dilation_w, groups, offset_groups, use_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups, bool use_mask) {
  TORCH_CHECK(input.device().is_cpu() && grad.device().is_cpu(), "deform_conv2d_backward_cpu: tensors must be on the CPU");
  return deform_conv2d_backward<CpuKernels>(grad, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                            dilation_h, dilation_w, groups, offset_groups, use_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_forward_cpu);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace libra
