// The backend-independent part of deform_conv2d: argument checks and the per-image
// im2col + matmul algorithm. Each backend (csrc/cpu/deform_conv2d_cpu.cpp,
// csrc/cuda/deform_conv2d_cuda.cu) supplies three per-image kernels as static members
// of a struct and instantiates deform_conv2d_forward<Kernels> / deform_conv2d_backward<Kernels>:
//
//   Kernels::im2col(input_b, offset_b, mask_b, shape, columns)
//       columns[c * K + k][p] = mask * x_c(sample of kernel point k at output p)
//   Kernels::backward_image(input_b, offset_b, mask_b, grad_columns, shape,
//                           columns, grad_input_b, grad_offset_b, grad_mask_b)
//       given dL/dcolumns: dL/dinput (col2im: the bilinear weights scattered back),
//       dL/doffset and dL/dmask (col2im_coord: the derivative of the sample with respect
//       to its position, and its value), and the columns again (for dL/dweight).
//
// input_b [C, H, W], offset_b [2 * og * K, Ho, Wo], mask_b [og * K, Ho, Wo] (undefined
// without a mask), columns [C * K, Ho * Wo]; all contiguous, float or double.
//
// The convolution is then a matmul per group (Dai et al. 2017, Sec. 2.1, with the
// regular grid replaced by the deformed one):
//     out_b[group] = weight[group] (C_out/G x C/G*K)  @  columns[group] (C/G*K x Ho*Wo)
// and its gradients are matmuls too:
//     dL/dcolumns[group] = weight[group]^T @ dL/dout_b[group]
//     dL/dweight[group] += dL/dout_b[group] @ columns[group]^T
// Images are processed one at a time, so the column buffers hold one image
// (C * K * Ho * Wo elements) whatever the batch size.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace libra {

struct DeformConvShape {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, offset_groups;
  bool use_mask;

  int64_t kernel_size() const { return kernel_h * kernel_w; }
  int64_t out_size() const { return out_h * out_w; }
  int64_t channels_per_offset_group() const { return in_channels / offset_groups; }
};

// Checks every argument of deform_conv2d (the tensors of one device and dtype, their
// shapes consistent) and returns the sizes. `mask` is not looked at when !use_mask.
inline DeformConvShape deform_conv2d_shape(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                           const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h,
                                           int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                           int64_t dilation_w, int64_t groups, int64_t offset_groups, bool use_mask) {
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: input must be [B, C, H, W], got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "deform_conv2d: weight must be [C_out, C / groups, kh, kw], got ", weight.sizes());
  TORCH_CHECK(offset.dim() == 4, "deform_conv2d: offset must be [B, 2 * offset_groups * kh * kw, Ho, Wo], got ",
              offset.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "deform_conv2d: bias must be [C_out] = [",
              weight.size(0), "], got ", bias.sizes());
  TORCH_CHECK(input.is_floating_point(), "deform_conv2d: input must be floating point, got ", input.scalar_type());
  std::vector<const at::Tensor*> others = {&weight, &offset, &bias};
  if (use_mask) others.push_back(&mask);
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == input.device(), "deform_conv2d: all tensors must be on one device (input on ",
                input.device(), ", another on ", t->device(), ")");
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), "deform_conv2d: all tensors must have one dtype (input ",
                input.scalar_type(), ", another ", t->scalar_type(), ")");
  }
  TORCH_CHECK(stride_h > 0 && stride_w > 0, "deform_conv2d: stride must be positive, got ", stride_h, "x", stride_w);
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0, "deform_conv2d: dilation must be positive, got ", dilation_h, "x",
              dilation_w);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "deform_conv2d: padding must be >= 0, got ", pad_h, "x", pad_w);
  TORCH_CHECK(groups > 0 && offset_groups > 0, "deform_conv2d: groups and offset_groups must be positive, got ", groups,
              " and ", offset_groups);

  DeformConvShape s;
  s.batch = input.size(0);
  s.in_channels = input.size(1);
  s.height = input.size(2);
  s.width = input.size(3);
  s.out_channels = weight.size(0);
  s.kernel_h = weight.size(2);
  s.kernel_w = weight.size(3);
  s.stride_h = stride_h;
  s.stride_w = stride_w;
  s.pad_h = pad_h;
  s.pad_w = pad_w;
  s.dilation_h = dilation_h;
  s.dilation_w = dilation_w;
  s.groups = groups;
  s.offset_groups = offset_groups;
  s.use_mask = use_mask;
  TORCH_CHECK(s.kernel_h > 0 && s.kernel_w > 0, "deform_conv2d: empty kernel ", weight.sizes());
  TORCH_CHECK(s.in_channels % groups == 0 && weight.size(1) * groups == s.in_channels,
              "deform_conv2d: weight.size(1) * groups must equal the input channels: ", weight.size(1), " * ", groups,
              " != ", s.in_channels);
  TORCH_CHECK(s.out_channels % groups == 0, "deform_conv2d: output channels ", s.out_channels,
              " are not divisible by groups ", groups);
  TORCH_CHECK(s.in_channels % offset_groups == 0, "deform_conv2d: input channels ", s.in_channels,
              " are not divisible by offset_groups ", offset_groups);
  s.out_h = (s.height + 2 * pad_h - (dilation_h * (s.kernel_h - 1) + 1)) / stride_h + 1;
  s.out_w = (s.width + 2 * pad_w - (dilation_w * (s.kernel_w - 1) + 1)) / stride_w + 1;
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0, "deform_conv2d: the output would be empty (", s.out_h, "x", s.out_w,
              ") for input ", s.height, "x", s.width, ", kernel ", s.kernel_h, "x", s.kernel_w, ", padding ", pad_h,
              "x", pad_w, ", dilation ", dilation_h, "x", dilation_w);
  const int64_t kernel_points = s.kernel_size();
  TORCH_CHECK(offset.size(0) == s.batch && offset.size(1) == 2 * offset_groups * kernel_points &&
                  offset.size(2) == s.out_h && offset.size(3) == s.out_w,
              "deform_conv2d: offset must be [B, 2 * offset_groups * kh * kw, Ho, Wo] = [", s.batch, ", ",
              2 * offset_groups * kernel_points, ", ", s.out_h, ", ", s.out_w, "], got ", offset.sizes());
  if (use_mask) {
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == s.batch && mask.size(1) == offset_groups * kernel_points &&
                    mask.size(2) == s.out_h && mask.size(3) == s.out_w,
                "deform_conv2d: mask must be [B, offset_groups * kh * kw, Ho, Wo] = [", s.batch, ", ",
                offset_groups * kernel_points, ", ", s.out_h, ", ", s.out_w, "], got ", mask.sizes());
  }
  return s;
}

inline bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

inline at::Tensor to_float(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : t;
}

template <typename Kernels>
at::Tensor deform_conv2d_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                 const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h, int64_t stride_w,
                                 int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups,
                                 int64_t offset_groups, bool use_mask) {
  const DeformConvShape s = deform_conv2d_shape(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                                dilation_h, dilation_w, groups, offset_groups, use_mask);
  if (is_reduced_float(input)) {
    // half / bfloat16: computed in float32 and rounded once at the end (the sums over
    // C * K products and the bilinear weights would lose too much in 16 bits).
    return deform_conv2d_forward<Kernels>(to_float(input), to_float(weight), to_float(offset),
                                          use_mask ? to_float(mask) : mask, to_float(bias), stride_h, stride_w, pad_h,
                                          pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask)
        .to(input.scalar_type());
  }
  at::Tensor output = at::empty({s.batch, s.out_channels, s.out_h, s.out_w}, input.options());
  if (output.numel() == 0) return output;
  const at::Tensor input_c = input.contiguous();
  const at::Tensor offset_c = offset.contiguous();
  const at::Tensor mask_c = use_mask ? mask.contiguous() : at::Tensor();
  const int64_t rows_per_group = s.in_channels / s.groups * s.kernel_size();
  const at::Tensor weight_g = weight.reshape({s.groups, s.out_channels / s.groups, rows_per_group});
  at::Tensor columns = at::empty({s.in_channels * s.kernel_size(), s.out_size()}, input.options());
  const at::Tensor columns_g = columns.view({s.groups, rows_per_group, s.out_size()});
  for (int64_t b = 0; b < s.batch; ++b) {
    Kernels::im2col(input_c[b], offset_c[b], use_mask ? mask_c[b] : at::Tensor(), s, columns);
    at::Tensor out_b = output[b].view({s.groups, s.out_channels / s.groups, s.out_size()});
    at::bmm_out(out_b, weight_g, columns_g);
  }
  output.add_(bias.view({1, s.out_channels, 1, 1}));
  return output;
}

// Returns (grad_input, grad_weight, grad_offset, grad_mask, grad_bias); grad_mask is
// zeros shaped like `mask` when !use_mask.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const at::Tensor& mask, const at::Tensor& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups, bool use_mask) {
  const DeformConvShape s = deform_conv2d_shape(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w,
                                                dilation_h, dilation_w, groups, offset_groups, use_mask);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == s.batch && grad.size(1) == s.out_channels &&
                  grad.size(2) == s.out_h && grad.size(3) == s.out_w,
              "_deform_conv2d_backward: grad must be [B, C_out, Ho, Wo] = [", s.batch, ", ", s.out_channels, ", ",
              s.out_h, ", ", s.out_w, "], got ", grad.sizes());
  TORCH_CHECK(grad.device() == input.device(), "_deform_conv2d_backward: grad is on ", grad.device(),
              ", input on ", input.device());
  if (is_reduced_float(input) || is_reduced_float(grad)) {
    auto grads = deform_conv2d_backward<Kernels>(to_float(grad), to_float(input), to_float(weight), to_float(offset),
                                                 use_mask ? to_float(mask) : mask, to_float(bias), stride_h, stride_w,
                                                 pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask);
    return {std::get<0>(grads).to(input.scalar_type()), std::get<1>(grads).to(weight.scalar_type()),
            std::get<2>(grads).to(offset.scalar_type()), std::get<3>(grads).to(mask.scalar_type()),
            std::get<4>(grads).to(bias.scalar_type())};
  }
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "_deform_conv2d_backward: grad is ", grad.scalar_type(),
              ", input ", input.scalar_type());
  at::Tensor grad_input = at::zeros_like(input, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_offset = at::zeros_like(offset, at::MemoryFormat::Contiguous);
  at::Tensor grad_mask = at::zeros_like(mask, at::MemoryFormat::Contiguous);
  at::Tensor grad_bias = grad.sum({0, 2, 3}).to(bias.scalar_type());
  if (s.batch == 0 || s.in_channels == 0 || s.out_channels == 0) return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};

  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor input_c = input.contiguous();
  const at::Tensor offset_c = offset.contiguous();
  const at::Tensor mask_c = use_mask ? mask.contiguous() : at::Tensor();
  const int64_t rows_per_group = s.in_channels / s.groups * s.kernel_size();
  const int64_t out_per_group = s.out_channels / s.groups;
  const at::Tensor weight_t = weight.reshape({s.groups, out_per_group, rows_per_group}).transpose(1, 2);
  at::Tensor grad_weight_g = grad_weight.view({s.groups, out_per_group, rows_per_group});
  at::Tensor columns = at::empty({s.in_channels * s.kernel_size(), s.out_size()}, input.options());
  at::Tensor grad_columns = at::empty_like(columns);
  const at::Tensor columns_t = columns.view({s.groups, rows_per_group, s.out_size()}).transpose(1, 2);
  at::Tensor grad_columns_g = grad_columns.view({s.groups, rows_per_group, s.out_size()});
  for (int64_t b = 0; b < s.batch; ++b) {
    const at::Tensor grad_b = grad_c[b].view({s.groups, out_per_group, s.out_size()});
    at::bmm_out(grad_columns_g, weight_t, grad_b);
    Kernels::backward_image(input_c[b], offset_c[b], use_mask ? mask_c[b] : at::Tensor(), grad_columns, s, columns,
                            grad_input[b], grad_offset[b], use_mask ? grad_mask[b] : at::Tensor());
    grad_weight_g.baddbmm_(grad_b, columns_t);
  }
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace libra
