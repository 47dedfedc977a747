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
}

// `import libra._C` loads this shared library, which runs the registrations
// above; the module itself exposes nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
