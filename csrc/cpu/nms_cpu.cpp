// Greedy NMS on the CPU: sort once (stable, so equal scores keep index order and the
// CUDA kernel agrees), copy the boxes into score order with their areas, then walk
// them; each kept box marks the later boxes it overlaps with IoU > threshold.
//
// batched_nms (class-aware): the score order is also sorted stably by group, so every
// group is a contiguous run still in score order, and each run is walked on its own.
// Boxes of different groups are never compared: the result is exactly that of nms on
// each group separately, at O(sum of n_group^2) instead of O(N^2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace libra {
namespace {

// Greedy NMS over the boxes boxes[visit[0]], boxes[visit[1]], ... (one group, in score
// order): sets kept[i] = 1 for each visited box that survives.
template <typename T>
void greedy_nms(const T* boxes, const int64_t* visit, int64_t n, T iou_threshold, uint8_t* kept) {
  // Structure of arrays in visiting order: the inner loop is contiguous and branch free.
  std::vector<T> x1(n), y1(n), x2(n), y2(n), area(n);
  for (int64_t i = 0; i < n; ++i) {
    const T* b = boxes + visit[i] * 4;
    x1[i] = b[0];
    y1[i] = b[1];
    x2[i] = b[2];
    y2[i] = b[3];
    area[i] = (b[2] - b[0]) * (b[3] - b[1]);
  }
  std::vector<uint8_t> removed(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (removed[i]) continue;
    kept[i] = 1;
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
}

void check_nms_args(const at::Tensor& dets, const at::Tensor& scores) {
  TORCH_CHECK(dets.device().is_cpu() && scores.device().is_cpu(), "nms_cpu: tensors must be on the CPU");
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: dets must be [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0), "nms: scores must be [N] with N = ", dets.size(0),
              ", got ", scores.sizes());
}

// idxs == nullptr: plain nms (one group).
at::Tensor nms_cpu_impl(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor* idxs,
                        double iou_threshold) {
  const int64_t n = dets.size(0);
  if (n == 0) return at::empty({0}, dets.options().dtype(at::kLong));
  // half/bfloat16 boxes are compared in float32.
  const bool low_precision = dets.scalar_type() == at::kHalf || dets.scalar_type() == at::kBFloat16;
  const at::Tensor boxes = (low_precision ? dets.to(at::kFloat) : dets).contiguous();
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  const int64_t* order_data = order.data_ptr<int64_t>();

  // rank[i]: position in score order of the i-th visited box; groups are contiguous runs.
  std::vector<int64_t> rank(n);
  std::iota(rank.begin(), rank.end(), int64_t(0));
  std::vector<int64_t> run_starts = {0};
  at::Tensor groups;
  if (idxs != nullptr) {
    groups = idxs->to(at::kLong).contiguous();
    const int64_t* group = groups.data_ptr<int64_t>();
    std::stable_sort(rank.begin(), rank.end(),
                     [&](int64_t a, int64_t b) { return group[order_data[a]] < group[order_data[b]]; });
    for (int64_t i = 1; i < n; ++i) {
      if (group[order_data[rank[i]]] != group[order_data[rank[i - 1]]]) run_starts.push_back(i);
    }
  }
  run_starts.push_back(n);
  std::vector<int64_t> visit(n);
  for (int64_t i = 0; i < n; ++i) visit[i] = order_data[rank[i]];

  std::vector<uint8_t> kept(n, 0);  // by visiting position
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cpu", [&] {
    const scalar_t* boxes_data = boxes.data_ptr<scalar_t>();
    for (size_t r = 0; r + 1 < run_starts.size(); ++r) {
      const int64_t start = run_starts[r];
      greedy_nms<scalar_t>(boxes_data, visit.data() + start, run_starts[r + 1] - start,
                           static_cast<scalar_t>(iou_threshold), kept.data() + start);
    }
  });
  // Kept boxes in score order (ties: lower index first, from the stable sort).
  std::vector<uint8_t> kept_by_rank(n, 0);
  for (int64_t i = 0; i < n; ++i) kept_by_rank[rank[i]] = kept[i];
  const int64_t num_kept = std::count(kept_by_rank.begin(), kept_by_rank.end(), uint8_t(1));
  at::Tensor result = at::empty({num_kept}, dets.options().dtype(at::kLong));
  int64_t* result_data = result.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    if (kept_by_rank[r]) *result_data++ = order_data[r];
  }
  return result;
}

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  check_nms_args(dets, scores);
  return nms_cpu_impl(dets, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cpu(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                           double iou_threshold) {
  check_nms_args(dets, scores);
  TORCH_CHECK(idxs.device().is_cpu(), "batched_nms_cpu: idxs must be on the CPU");
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == dets.size(0), "batched_nms: idxs must be [N] with N = ",
              dets.size(0), ", got ", idxs.sizes());
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && !at::isComplexType(idxs.scalar_type()),
              "batched_nms: idxs must be an integer tensor, got ", idxs.scalar_type());
  return nms_cpu_impl(dets, scores, &idxs, iou_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("batched_nms", &batched_nms_cpu);
}

}  // namespace libra
