// RoIAlign forward and backward on the CPU.
//
// Work is split so that no two threads write the same memory: the forward runs in
// parallel over RoIs (each RoI owns its output rows), the backward in parallel over
// channels (each channel owns its gradient plane; many RoIs hit the same pixels).
// For every RoI the sample positions and interpolation weights are computed once and
// reused for all channels: 4 pixel offsets and 4 bilinear weights per sample.
// (A separable two-pass forward, rows then columns, was tried and was not faster.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../roi_align_geometry.h"

namespace libra {
namespace {

// Any sampling_ratio is valid: <= 0 means adaptive (see roi_geometry).
void check_roi_align_args(const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "roi_align: rois must be [K, 5] (batch_index, x1, y1, x2, y2), got ", rois.sizes());
  TORCH_CHECK(rois.is_floating_point(), "roi_align: rois must be floating point, got ", rois.scalar_type());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "roi_align: pooled size must be positive, got ",
              pooled_height, "x", pooled_width);
}

// Fills `samples` with the bilinear samples of one RoI, bin after bin:
// bin (ph, pw) owns samples [(ph * pooled_width + pw) * grid, ... + grid).
template <typename T>
void roi_samples(const RoIGeometry<T>& g, int64_t pooled_height, int64_t pooled_width,
                 int64_t height, int64_t width, std::vector<BilinearSample<T>>& samples) {
  samples.clear();
  samples.reserve(pooled_height * pooled_width * g.grid_h * g.grid_w);
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        const T y = sample_position(g.start_y, g.bin_h, ph, iy, g.grid_h);
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
          const T x = sample_position(g.start_x, g.bin_w, pw, ix, g.grid_w);
          samples.push_back(bilinear_sample(y, x, height, width));
        }
      }
    }
  }
}

// Pools kChannels channels of one RoI at once: each sample's offsets and weights are
// loaded once for all of them, and the independent sums keep the FPU busy.
constexpr int kChannelBlock = 8;

template <int kChannels, typename scalar_t, typename acc_t>
inline void pool_channels(const scalar_t* image, int64_t first_channel, int64_t plane_size,
                          const BilinearSample<acc_t>* samples, int64_t grid, int64_t bins, acc_t count,
                          scalar_t* out) {
  const scalar_t* planes[kChannels];
  for (int j = 0; j < kChannels; ++j) planes[j] = image + (first_channel + j) * plane_size;
  for (int64_t bin = 0; bin < bins; ++bin) {
    const BilinearSample<acc_t>* s = samples + bin * grid;
    acc_t sums[kChannels] = {};
    for (int64_t i = 0; i < grid; ++i) {
      for (int j = 0; j < kChannels; ++j) {
        const scalar_t* plane = planes[j];
        sums[j] += s[i].weight[0] * static_cast<acc_t>(plane[s[i].offset[0]]) +
                   s[i].weight[1] * static_cast<acc_t>(plane[s[i].offset[1]]) +
                   s[i].weight[2] * static_cast<acc_t>(plane[s[i].offset[2]]) +
                   s[i].weight[3] * static_cast<acc_t>(plane[s[i].offset[3]]);
      }
    }
    for (int j = 0; j < kChannels; ++j) out[(first_channel + j) * bins + bin] = static_cast<scalar_t>(sums[j] / count);
  }
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                 bool aligned) {
  TORCH_CHECK(input.device().is_cpu() && rois.device().is_cpu(), "roi_align_forward_cpu: tensors must be on the CPU");
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W], got ", input.sizes());
  check_roi_align_args(rois, pooled_height, pooled_width);
  const int64_t num_rois = rois.size(0), num_images = input.size(0), channels = input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  at::Tensor output = at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  if (output.numel() == 0 || input.numel() == 0) return output;
  const at::Tensor input_c = input.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // RoI coordinates in the accumulation type: half would round them to ~0.5 px.
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* rois_data = rois_acc.data_ptr<acc_t>();
    const scalar_t* input_data = input_c.data_ptr<scalar_t>();
    scalar_t* output_data = output.data_ptr<scalar_t>();
    const int64_t bins = pooled_height * pooled_width;

    at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
      std::vector<BilinearSample<acc_t>> samples;
      for (int64_t k = begin; k < end; ++k) {
        const RoIGeometry<acc_t> g = roi_geometry<acc_t>(rois_data + k * 5, num_images, static_cast<acc_t>(spatial_scale),
                                                          pooled_height, pooled_width, sampling_ratio, aligned);
        if (!g.valid) continue;  // output stays 0
        roi_samples(g, pooled_height, pooled_width, height, width, samples);
        const int64_t grid = g.grid_h * g.grid_w;
        const scalar_t* image = input_data + g.batch * channels * height * width;
        scalar_t* out = output_data + k * channels * bins;
        int64_t c = 0;
        for (; c + kChannelBlock <= channels; c += kChannelBlock) {
          pool_channels<kChannelBlock>(image, c, height * width, samples.data(), grid, bins, g.count, out);
        }
        for (; c < channels; ++c) pool_channels<1>(image, c, height * width, samples.data(), grid, bins, g.count, out);
      }
    });
  });
  return output;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                  int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                  bool aligned) {
  TORCH_CHECK(grad.device().is_cpu() && rois.device().is_cpu(), "roi_align_backward_cpu: tensors must be on the CPU");
  check_roi_align_args(rois, pooled_height, pooled_width);
  const int64_t num_rois = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == num_rois && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "_roi_align_backward: grad must be [K, C, PH, PW] = [", num_rois, ", ", channels, ", ", pooled_height,
              ", ", pooled_width, "], got ", grad.sizes());
  at::Tensor grad_input = at::zeros({batch_size, channels, height, width}, grad.options());
  if (num_rois == 0 || grad_input.numel() == 0) return grad_input;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rois_acc = rois.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* rois_data = rois_acc.data_ptr<acc_t>();
    // half/bfloat16 gradients are summed in a float buffer (many RoIs add to one pixel).
    at::Tensor grad_acc = std::is_same<acc_t, scalar_t>::value
        ? grad_input
        : at::zeros(grad_input.sizes(), grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* grad_acc_data = grad_acc.data_ptr<acc_t>();
    // grad is read through its strides: it may be non-contiguous or expanded.
    const scalar_t* grad_data = grad.data_ptr<scalar_t>();
    const int64_t s_k = grad.stride(0), s_c = grad.stride(1), s_h = grad.stride(2), s_w = grad.stride(3);

    at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<BilinearSample<acc_t>> samples;
      for (int64_t k = 0; k < num_rois; ++k) {
        const RoIGeometry<acc_t> g = roi_geometry<acc_t>(rois_data + k * 5, batch_size, static_cast<acc_t>(spatial_scale),
                                                          pooled_height, pooled_width, sampling_ratio, aligned);
        if (!g.valid) continue;
        roi_samples(g, pooled_height, pooled_width, height, width, samples);
        const int64_t grid = g.grid_h * g.grid_w;
        if (grid == 0) continue;
        for (int64_t c = c_begin; c < c_end; ++c) {
          acc_t* plane = grad_acc_data + (g.batch * channels + c) * height * width;
          const scalar_t* grad_roi = grad_data + k * s_k + c * s_c;
          for (int64_t ph = 0; ph < pooled_height; ++ph) {
            for (int64_t pw = 0; pw < pooled_width; ++pw) {
              const acc_t value = static_cast<acc_t>(grad_roi[ph * s_h + pw * s_w]) / g.count;
              const BilinearSample<acc_t>* s = samples.data() + (ph * pooled_width + pw) * grid;
              for (int64_t i = 0; i < grid; ++i) {
                for (int j = 0; j < 4; ++j) plane[s[i].offset[j]] += s[i].weight[j] * value;
              }
            }
          }
        }
      }
    });
    if (!grad_acc.is_same(grad_input)) grad_input.copy_(grad_acc);
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("_roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace libra
