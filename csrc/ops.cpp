// One schema per op. Each backend registers its kernels in its own file with
// TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp, csrc/cuda/*.cu), so a CPU-only build
// needs no #ifdef, and a CUDA tensor on a CPU-only build gets the dispatcher's
// "could not run 'libra::...' with arguments from the 'CUDA' backend" error.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(libra, m) {
  // rois: [K, 5] (batch_index, x1, y1, x2, y2) in input-image coordinates.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "int pooled_height, int pooled_width, int batch_size, int channels, "
      "int height, int width, int sampling_ratio, bool aligned) -> Tensor");
  // Greedy NMS; returns int64 indices into dets sorted by decreasing score.
  m.def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
  // Class-aware NMS: only boxes with equal idxs (integer) suppress each other; exactly
  // nms on each group separately, merged by decreasing score.
  m.def("batched_nms(Tensor dets, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  // Deformable convolution, DCN v1 (Dai et al. 2017) and with use_mask the modulated
  // DCN v2 (Zhu et al. 2019); torchvision's argument order and tensor layouts:
  //   input  [B, C, H, W]          weight [C_out, C / groups, kh, kw]      bias [C_out]
  //   offset [B, 2 * offset_groups * kh * kw, Ho, Wo], a (dy, dx) pair per kernel point
  //   mask   [B, offset_groups * kh * kw, Ho, Wo]; ignored (any tensor, e.g. empty) when !use_mask
  // Sample of output (ho, wo), kernel point (i, j): y = ho * stride_h - pad_h + i * dilation_h + dy,
  // x likewise, bilinear with zeros outside the image (csrc/deform_conv2d_geometry.h).
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int groups, int offset_groups, bool use_mask) -> Tensor");
  // Returns (grad_input, grad_weight, grad_offset, grad_mask, grad_bias); grad_mask is zeros
  // shaped like mask when !use_mask.
  m.def(
      "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
      "Tensor bias, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int groups, int offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import libra._C` loads this shared library, which runs the registrations
// above; the module itself exposes nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
