// Deformable convolution (DCN v1, Dai et al. 2017; modulated DCN v2, Zhu et al. 2019)
// on CUDA: the per-image kernels of csrc/deform_conv2d_common.h, whose driver does the
// matmuls with at::bmm on the current stream.
//
//   im2col        one thread per column entry (channel, kernel point, output position)
//   col2im_coord  one thread per (offset group, kernel point, output position): it owns
//                 that offset pair and mask gradient, sums over the group's channels and
//                 also writes their column entries (for the weight gradient)
//   col2im        one thread per column entry, scattering into the input gradient with
//                 atomics (the samples of neighbouring positions share pixels)
// Grid-stride loops; adjacent threads take adjacent output positions, so the column,
// offset and mask accesses are coalesced. The sampling is csrc/deform_conv2d_geometry.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../deform_conv2d_common.h"
#include "../deform_conv2d_geometry.h"

namespace libra {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t total) {
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest.
  return std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
}

// Everything a kernel needs to place the sample of (offset group g, kernel point k,
// output position p) of one image.
struct SampleGrid {
  int64_t height, width, out_w, out_size, kernel_w, kernel_size;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

SampleGrid sample_grid(const DeformConvShape& s) {
  return {s.height,   s.width,    s.out_w, s.out_size(), s.kernel_w,   s.kernel_size(),
          s.stride_h, s.stride_w, s.pad_h, s.pad_w,      s.dilation_h, s.dilation_w};
}

// offset: [2 * og * K, Ho * Wo]; mask: [og * K, Ho * Wo] or nullptr (DCN v1: mask 1).
template <typename scalar_t>
__device__ inline DeformSample<scalar_t> sample_at(const SampleGrid& grid, const scalar_t* __restrict__ offset,
                                                   const scalar_t* __restrict__ mask, int64_t gk, int64_t k,
                                                   int64_t p) {
  const scalar_t dy = offset[(2 * gk) * grid.out_size + p];
  const scalar_t dx = offset[(2 * gk + 1) * grid.out_size + p];
  const scalar_t m = mask == nullptr ? scalar_t(1) : mask[gk * grid.out_size + p];
  return deform_conv_sample<scalar_t>(p / grid.out_w, p % grid.out_w, k / grid.kernel_w, k % grid.kernel_w, dy, dx, m,
                                      grid.height, grid.width, grid.stride_h, grid.stride_w, grid.pad_h, grid.pad_w,
                                      grid.dilation_h, grid.dilation_w);
}

// columns[(c * K + k) * P + p] = mask * x_c(sample (g(c), k, p)).
template <typename scalar_t>
__global__ void deformable_im2col_kernel(int64_t total, SampleGrid grid, int64_t channels_per_og,
                                         const scalar_t* __restrict__ input, const scalar_t* __restrict__ offset,
                                         const scalar_t* __restrict__ mask, scalar_t* __restrict__ columns) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t p = index % grid.out_size;
    const int64_t k = (index / grid.out_size) % grid.kernel_size;
    const int64_t c = index / grid.out_size / grid.kernel_size;
    const int64_t gk = (c / channels_per_og) * grid.kernel_size + k;
    const DeformSample<scalar_t> s = sample_at(grid, offset, mask, gk, k, p);
    const scalar_t* plane = input + c * grid.height * grid.width;
    columns[index] = s.weight[0] * plane[s.offset[0]] + s.weight[1] * plane[s.offset[1]] +
                     s.weight[2] * plane[s.offset[2]] + s.weight[3] * plane[s.offset[3]];
  }
}

// col2im_coord (Dai et al. 2017, Eq. (7); Zhu et al. 2019, Sec. 2.1): for the sample of
// (g, k, p) with mask m and value v_c on channel c,
//   dL/d(dy) = m * sum_c dL/dcol[c,k,p] * dv_c/dy   (dL/d(dx) likewise),  dL/dm = sum_c dL/dcol[c,k,p] * v_c
// over the channels c of offset group g; columns[c, k, p] = m * v_c is written again.
template <typename scalar_t>
__global__ void deformable_col2im_coord_kernel(int64_t total, SampleGrid grid, int64_t channels_per_og,
                                               const scalar_t* __restrict__ input,
                                               const scalar_t* __restrict__ offset,
                                               const scalar_t* __restrict__ mask,
                                               const scalar_t* __restrict__ grad_columns,
                                               scalar_t* __restrict__ columns, scalar_t* __restrict__ grad_offset,
                                               scalar_t* __restrict__ grad_mask) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t p = index % grid.out_size;
    const int64_t gk = index / grid.out_size;  // g * K + k
    const int64_t k = gk % grid.kernel_size;
    const int64_t g = gk / grid.kernel_size;
    const DeformSample<scalar_t> s = sample_at(grid, offset, mask, gk, k, p);
    scalar_t acc_y = 0, acc_x = 0, acc_m = 0;
    for (int64_t c = g * channels_per_og; c < (g + 1) * channels_per_og; ++c) {
      const int64_t col_index = (c * grid.kernel_size + k) * grid.out_size + p;
      scalar_t value, d_y, d_x;
      interpolate_with_gradient(s, input + c * grid.height * grid.width, value, d_y, d_x);
      const scalar_t grad_col = grad_columns[col_index];
      acc_y += grad_col * d_y;
      acc_x += grad_col * d_x;
      acc_m += grad_col * value;
      columns[col_index] = s.mask * value;
    }
    grad_offset[(2 * gk) * grid.out_size + p] = s.mask * acc_y;
    grad_offset[(2 * gk + 1) * grid.out_size + p] = s.mask * acc_x;
    if (grad_mask != nullptr) grad_mask[gk * grid.out_size + p] = acc_m;
  }
}

// col2im (Dai et al. 2017, Eq. (6)): each column entry flows back to the <= 4 pixels it
// was interpolated from, with the weights mask * G(q, p).
template <typename scalar_t>
__global__ void deformable_col2im_kernel(int64_t total, SampleGrid grid, int64_t channels_per_og,
                                         const scalar_t* __restrict__ offset, const scalar_t* __restrict__ mask,
                                         const scalar_t* __restrict__ grad_columns, scalar_t* __restrict__ grad_input,
                                         int64_t grad_input_numel) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t p = index % grid.out_size;
    const int64_t k = (index / grid.out_size) % grid.kernel_size;
    const int64_t c = index / grid.out_size / grid.kernel_size;
    const int64_t gk = (c / channels_per_og) * grid.kernel_size + k;
    const DeformSample<scalar_t> s = sample_at(grid, offset, mask, gk, k, p);
    const scalar_t grad_col = grad_columns[index];
    const int64_t plane = c * grid.height * grid.width;
    for (int j = 0; j < 4; ++j) {
      if (s.weight[j] != scalar_t(0)) {
        at::native::fastAtomicAdd(grad_input, plane + s.offset[j], grad_input_numel, s.weight[j] * grad_col, true);
      }
    }
  }
}

template <typename scalar_t>
const scalar_t* optional_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

struct CudaKernels {
  static void im2col(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                     const DeformConvShape& s, const at::Tensor& columns) {
    const int64_t total = s.in_channels * s.kernel_size() * s.out_size();
    if (total == 0) return;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deformable_im2col_cuda", [&] {
      deformable_im2col_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
          total, sample_grid(s), s.channels_per_offset_group(), input.data_ptr<scalar_t>(),
          offset.data_ptr<scalar_t>(), optional_data<scalar_t>(mask), columns.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward_image(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                             const at::Tensor& grad_columns, const DeformConvShape& s, const at::Tensor& columns,
                             const at::Tensor& grad_input, const at::Tensor& grad_offset, const at::Tensor& grad_mask) {
    const int64_t coord_total = s.offset_groups * s.kernel_size() * s.out_size();
    const int64_t column_total = s.in_channels * s.kernel_size() * s.out_size();
    if (column_total == 0) return;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deformable_col2im_cuda", [&] {
      scalar_t* grad_mask_data = grad_mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr;
      deformable_col2im_coord_kernel<scalar_t><<<num_blocks(coord_total), kThreads, 0, stream>>>(
          coord_total, sample_grid(s), s.channels_per_offset_group(), input.data_ptr<scalar_t>(),
          offset.data_ptr<scalar_t>(), optional_data<scalar_t>(mask), grad_columns.data_ptr<scalar_t>(),
          columns.data_ptr<scalar_t>(), grad_offset.data_ptr<scalar_t>(), grad_mask_data);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      deformable_col2im_kernel<scalar_t><<<num_blocks(column_total), kThreads, 0, stream>>>(
          column_total, sample_grid(s), s.channels_per_offset_group(), offset.data_ptr<scalar_t>(),
          optional_data<scalar_t>(mask), grad_columns.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(),
          grad_input.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                      const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h,
                                      int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                      int64_t dilation_w, int64_t groups, int64_t offset_groups, bool use_mask) {
  TORCH_CHECK(input.is_cuda(), "deform_conv2d_forward_cuda: input must be a CUDA tensor");
  c10::cuda::CUDAGuard device_guard(input.device());
  return deform_conv2d_forward<CudaKernels>(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                            dilation_h, dilation_w, groups, offset_groups, use_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups, bool use_mask) {
  TORCH_CHECK(input.is_cuda() && grad.is_cuda(), "deform_conv2d_backward_cuda: grad and input must be CUDA tensors");
  // The input gradient is summed with atomics, in an order that varies from run to run.
  at::globalContext().alertNotDeterministic("libra::_deform_conv2d_backward (CUDA)");
  c10::cuda::CUDAGuard device_guard(input.device());
  return deform_conv2d_backward<CudaKernels>(grad, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                             dilation_h, dilation_w, groups, offset_groups, use_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_forward_cuda);
  m.impl("_deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace libra
