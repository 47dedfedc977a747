// Greedy NMS on the CPU: sort once (stable, so equal scores keep index order and the
// CUDA kernel agrees), copy the boxes into score order with their areas, then walk
// them; each kept box marks the later boxes it overlaps with IoU > threshold.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace libra {
namespace {

template <typename T>
std::vector<int64_t> greedy_nms(const T* boxes, const int64_t* order, int64_t n, T iou_threshold) {
  // Structure of arrays in score order: the inner loop is contiguous and branch free.
  std::vector<T> x1(n), y1(n), x2(n), y2(n), area(n);
  for (int64_t i = 0; i < n; ++i) {
    const T* b = boxes + order[i] * 4;
    x1[i] = b[0];
    y1[i] = b[1];
    x2[i] = b[2];
    y2[i] = b[3];
    area[i] = (b[2] - b[0]) * (b[3] - b[1]);
  }
  std::vector<uint8_t> removed(n, 0);
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < n; ++i) {
    if (removed[i]) continue;
    keep.push_back(order[i]);
    const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
    uint8_t* removed_row = removed.data();
    for (int64_t j = i + 1; j < n; ++j) {
      const T w = std::max(T(0), std::min(ix2, x2[j]) - std::max(ix1, x1[j]));
      const T h = std::max(T(0), std::min(iy2, y2[j]) - std::max(iy1, y1[j]));
      const T inter = w * h;
      // Same expression as the CUDA kernel and the reference; NaN IoU never suppresses.
      const T iou = inter / (iarea + area[j] - inter);
      removed_row[j] |= static_cast<uint8_t>(iou > iou_threshold);
    }
  }
  return keep;
}

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(dets.device().is_cpu() && scores.device().is_cpu(), "nms_cpu: tensors must be on the CPU");
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: dets must be [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0), "nms: scores must be [N] with N = ", dets.size(0),
              ", got ", scores.sizes());
  const int64_t n = dets.size(0);
  if (n == 0) return at::empty({0}, dets.options().dtype(at::kLong));
  // half/bfloat16 boxes are compared in float32.
  const bool low_precision = dets.scalar_type() == at::kHalf || dets.scalar_type() == at::kBFloat16;
  const at::Tensor boxes = (low_precision ? dets.to(at::kFloat) : dets).contiguous();
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  std::vector<int64_t> keep;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cpu", [&] {
    keep = greedy_nms<scalar_t>(boxes.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), n,
                                static_cast<scalar_t>(iou_threshold));
  });
  at::Tensor result = at::empty({static_cast<int64_t>(keep.size())}, dets.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), result.data_ptr<int64_t>());
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("nms", &nms_cpu);
}

}  // namespace libra
