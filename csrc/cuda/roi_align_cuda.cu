// RoIAlign forward and backward on CUDA: one thread per output element (RoI,
// channel, bin), grid-stride loops, the geometry of csrc/roi_align_geometry.h.
// The backward scatters with atomics because RoIs overlap on the feature map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../roi_align_geometry.h"

namespace libra {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t total) {
  // Enough blocks to fill the GPU; the grid-stride loop covers the rest.
  return std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
}

template <typename scalar_t, typename acc_t>
__global__ void roi_align_forward_kernel(
    int64_t total, const scalar_t* __restrict__ input, const acc_t* __restrict__ rois, acc_t spatial_scale,
    int64_t num_images, int64_t channels, int64_t height, int64_t width, int64_t pooled_height,
    int64_t pooled_width, int64_t sampling_ratio, bool aligned, scalar_t* __restrict__ output) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t k = index / pooled_width / pooled_height / channels;
    const RoIGeometry<acc_t> g = roi_geometry<acc_t>(rois + k * 5, num_images, spatial_scale, pooled_height,
                                                      pooled_width, sampling_ratio, aligned);
    acc_t sum = 0;
    const scalar_t* plane = input + (g.batch * channels + c) * height * width;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const acc_t y = sample_position(g.start_y, g.bin_h, ph, iy, g.grid_h);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const acc_t x = sample_position(g.start_x, g.bin_w, pw, ix, g.grid_w);
        const BilinearSample<acc_t> s = bilinear_sample(y, x, height, width);
        sum += s.weight[0] * static_cast<acc_t>(plane[s.offset[0]]) +
               s.weight[1] * static_cast<acc_t>(plane[s.offset[1]]) +
               s.weight[2] * static_cast<acc_t>(plane[s.offset[2]]) +
               s.weight[3] * static_cast<acc_t>(plane[s.offset[3]]);
      }
    }
    output[index] = static_cast<scalar_t>(sum / g.count);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void roi_align_backward_kernel(
    int64_t total, const scalar_t* __restrict__ grad, int64_t s_k, int64_t s_c, int64_t s_h, int64_t s_w,
    const acc_t* __restrict__ rois, acc_t spatial_scale, int64_t num_images, int64_t channels, int64_t height,
    int64_t width, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned,
    scalar_t* __restrict__ grad_input, int64_t grad_input_numel) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pw = index % pooled_width;
    const int64_t ph = (index / pooled_width) % pooled_height;
    const int64_t c = (index / pooled_width / pooled_height) % channels;
    const int64_t k = index / pooled_width / pooled_height / channels;
    const RoIGeometry<acc_t> g = roi_geometry<acc_t>(rois + k * 5, num_images, spatial_scale, pooled_height,
                                                      pooled_width, sampling_ratio, aligned);
    if (!g.valid) continue;
    // grad is read through its strides, so a non-contiguous grad needs no copy.
    const acc_t value = static_cast<acc_t>(grad[k * s_k + c * s_c + ph * s_h + pw * s_w]) / g.count;
    const int64_t plane = (g.batch * channels + c) * height * width;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      const acc_t y = sample_position(g.start_y, g.bin_h, ph, iy, g.grid_h);
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const acc_t x = sample_position(g.start_x, g.bin_w, pw, ix, g.grid_w);
        const BilinearSample<acc_t> s = bilinear_sample(y, x, height, width);
        for (int j = 0; j < 4; ++j) {
          if (s.weight[j] != acc_t(0)) {
            // fastAtomicAdd pairs half/bfloat16 neighbours into one vector atomic.
            at::native::fastAtomicAdd(grad_input, plane + s.offset[j], grad_input_numel,
                                      static_cast<scalar_t>(s.weight[j] * value), true);
          }
        }
      }
    }
  }
}

// Any sampling_ratio is valid: <= 0 means adaptive (see roi_geometry).
void check_args(const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "roi_align: rois must be [K, 5] (batch_index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(rois.is_floating_point(), "roi_align: rois must be floating point, got ", rois.scalar_type());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "roi_align: pooled size must be positive");
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                  bool aligned) {
  TORCH_CHECK(input.is_cuda() && rois.is_cuda(), "roi_align_forward_cuda: input and rois must be CUDA tensors");
  TORCH_CHECK(input.device() == rois.device(), "roi_align: input and rois must be on the same device");
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W], got ", input.sizes());
  check_args(rois, pooled_height, pooled_width);
  c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1);
  at::Tensor output = at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  const int64_t total = output.numel();
  if (total == 0 || input.numel() == 0) return output;
  const at::Tensor input_c = input.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    roi_align_forward_kernel<scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, input_c.data_ptr<scalar_t>(), rois_acc.data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale),
        input.size(0), channels, input.size(2), input.size(3), pooled_height, pooled_width, sampling_ratio,
        aligned, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                   int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                   bool aligned) {
  TORCH_CHECK(grad.is_cuda() && rois.is_cuda(), "roi_align_backward_cuda: grad and rois must be CUDA tensors");
  TORCH_CHECK(grad.device() == rois.device(), "_roi_align_backward: grad and rois must be on the same device");
  check_args(rois, pooled_height, pooled_width);
  const int64_t num_rois = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == num_rois && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "_roi_align_backward: grad must be [K, C, PH, PW], got ", grad.sizes());
  c10::cuda::CUDAGuard device_guard(grad.device());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  const int64_t total = grad.numel();
  if (total == 0 || grad_input.numel() == 0) return grad_input;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    roi_align_backward_kernel<scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
        rois_acc.data_ptr<acc_t>(), static_cast<acc_t>(spatial_scale), batch_size, channels, height, width,
        pooled_height, pooled_width, sampling_ratio, aligned, grad_input.data_ptr<scalar_t>(), grad_input.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("roi_align", &roi_align_forward_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace libra
