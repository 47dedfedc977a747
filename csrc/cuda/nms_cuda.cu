// Greedy NMS on CUDA with 64-bit suppression masks, entirely on the device.
//
// 1. Boxes are sorted by score (stable, like the CPU kernel).
// 2. nms_mask_kernel: block (row_block, col_block) compares 64 boxes with 64 boxes;
//    bit j of mask[i][col_block] says box i (earlier in score order) overlaps box
//    col_block * 64 + j with IoU > threshold.
// 3. nms_reduce_kernel: one block walks the 64-box blocks in order. One thread does
//    the short sequential part inside a block (from shared memory); then all threads
//    OR the rows of the boxes just kept into the "removed" words of later blocks.
// 4. nonzero on the keep mask gives the kept positions in score order.
// batched_nms passes each box's group (in score order) to nms_mask_kernel, which sets a
// bit only for boxes of the same group: exactly nms per group, in one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace libra {
namespace {

constexpr int kBoxesPerBlock = 64;  // bits in one mask word
constexpr int kReduceThreads = 256;

// Round-to-nearest products so that nvcc cannot fuse them into an FMA: the IoU must
// be rounded exactly like the CPU kernel's for ties at the threshold to agree.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Number of boxes in 64-box block `block` (the last one may be partial).
__device__ __forceinline__ int block_size(int64_t n, int64_t block) {
  const int64_t remaining = n - block * kBoxesPerBlock;
  return remaining < kBoxesPerBlock ? static_cast<int>(remaining) : kBoxesPerBlock;
}

template <typename T>
__device__ __forceinline__ bool iou_above(const T* a, const T* b, T iou_threshold) {
  const T w = max(T(0), min(a[2], b[2]) - max(a[0], b[0]));
  const T h = max(T(0), min(a[3], b[3]) - max(a[1], b[1]));
  const T inter = mul_rn(w, h);
  const T area_a = mul_rn(a[2] - a[0], a[3] - a[1]);
  const T area_b = mul_rn(b[2] - b[0], b[3] - b[1]);
  return inter / (area_a + area_b - inter) > iou_threshold;  // NaN never suppresses
}

// groups: [n] group of each box in score order, or nullptr (plain nms: one group).
template <typename T>
__global__ void nms_mask_kernel(int64_t n, int64_t col_blocks, T iou_threshold, const T* __restrict__ boxes,
                                const int64_t* __restrict__ groups, uint64_t* __restrict__ mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (row_block > col_block) return;  // only later boxes can be suppressed
  const int row_size = block_size(n, row_block);
  const int col_size = block_size(n, col_block);
  __shared__ T col_boxes[kBoxesPerBlock * 4];
  __shared__ int64_t col_groups[kBoxesPerBlock];
  if (threadIdx.x < col_size) {
    const int64_t j = col_block * kBoxesPerBlock + threadIdx.x;
    for (int d = 0; d < 4; ++d) col_boxes[threadIdx.x * 4 + d] = boxes[j * 4 + d];
    col_groups[threadIdx.x] = groups != nullptr ? groups[j] : 0;
  }
  __syncthreads();
  if (threadIdx.x < row_size) {
    const int64_t i = row_block * kBoxesPerBlock + threadIdx.x;
    const T* box = boxes + i * 4;
    const int64_t group = groups != nullptr ? groups[i] : 0;
    uint64_t bits = 0;
    const int start = row_block == col_block ? threadIdx.x + 1 : 0;
    for (int j = start; j < col_size; ++j) {
      if (col_groups[j] == group && iou_above(box, col_boxes + j * 4, iou_threshold)) bits |= uint64_t(1) << j;
    }
    mask[i * col_blocks + col_block] = bits;
  }
}

// Single block. removed: [col_blocks] zero-initialised scratch. keep: [n] output.
__global__ void nms_reduce_kernel(int64_t n, int64_t col_blocks, const uint64_t* __restrict__ mask,
                                  uint64_t* removed, bool* __restrict__ keep) {
  __shared__ uint64_t diagonal[kBoxesPerBlock];  // each box's bits within its own block
  __shared__ uint64_t kept_bits;
  for (int64_t block = 0; block < col_blocks; ++block) {
    const int64_t base = block * kBoxesPerBlock;
    const int size = block_size(n, block);
    if (threadIdx.x < size) diagonal[threadIdx.x] = mask[(base + threadIdx.x) * col_blocks + block];
    __syncthreads();
    if (threadIdx.x == 0) {  // the inherently sequential part, 64 steps in shared memory
      uint64_t removed_here = removed[block];
      uint64_t kept = 0;
      for (int b = 0; b < size; ++b) {
        if (!((removed_here >> b) & 1)) {
          kept |= uint64_t(1) << b;
          removed_here |= diagonal[b];
        }
      }
      kept_bits = kept;
    }
    __syncthreads();
    const uint64_t kept = kept_bits;
    for (int b = threadIdx.x; b < size; b += blockDim.x) keep[base + b] = (kept >> b) & 1;
    // Each thread owns some later words; rows of kept boxes are read coalesced.
    for (int64_t word = block + 1 + threadIdx.x; word < col_blocks; word += blockDim.x) {
      uint64_t removed_word = removed[word];
      for (uint64_t bits = kept; bits != 0; bits &= bits - 1) {
        const int b = __ffsll(static_cast<long long>(bits)) - 1;
        removed_word |= mask[(base + b) * col_blocks + word];
      }
      removed[word] = removed_word;
    }
    __syncthreads();
  }
}

void check_nms_args(const at::Tensor& dets, const at::Tensor& scores) {
  TORCH_CHECK(dets.is_cuda() && scores.is_cuda(), "nms_cuda: dets and scores must be CUDA tensors");
  TORCH_CHECK(dets.device() == scores.device(), "nms: dets and scores must be on the same device");
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: dets must be [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0), "nms: scores must be [N] with N = ",
              dets.size(0), ", got ", scores.sizes());
}

// idxs == nullptr: plain nms (one group).
at::Tensor nms_cuda_impl(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor* idxs,
                         double iou_threshold) {
  c10::cuda::CUDAGuard device_guard(dets.device());
  const int64_t n = dets.size(0);
  if (n == 0) return at::empty({0}, dets.options().dtype(at::kLong));
  const bool low_precision = dets.scalar_type() == at::kHalf || dets.scalar_type() == at::kBFloat16;
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor sorted_boxes = (low_precision ? dets.to(at::kFloat) : dets).index_select(0, order).contiguous();
  const at::Tensor sorted_groups =
      idxs != nullptr ? idxs->to(at::kLong).index_select(0, order).contiguous() : at::Tensor();
  const int64_t col_blocks = (n + kBoxesPerBlock - 1) / kBoxesPerBlock;
  TORCH_CHECK(col_blocks <= 65535, "nms_cuda: at most ", 65535 * kBoxesPerBlock, " boxes, got ", n);
  at::Tensor mask = at::empty({n * col_blocks}, dets.options().dtype(at::kLong));
  at::Tensor removed = at::zeros({col_blocks}, dets.options().dtype(at::kLong));
  at::Tensor keep = at::empty({n}, dets.options().dtype(at::kBool));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 blocks(col_blocks, col_blocks);

  AT_DISPATCH_FLOATING_TYPES(sorted_boxes.scalar_type(), "nms_cuda", [&] {
    nms_mask_kernel<scalar_t><<<blocks, kBoxesPerBlock, 0, stream>>>(
        n, col_blocks, static_cast<scalar_t>(iou_threshold), sorted_boxes.data_ptr<scalar_t>(),
        sorted_groups.defined() ? sorted_groups.data_ptr<int64_t>() : nullptr,
        reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  nms_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(
      n, col_blocks, reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()),
      reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), keep.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Kept positions in score order -> original indices (nonzero runs on the device).
  return order.index_select(0, at::nonzero(keep).view(-1));
}

at::Tensor nms_cuda(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  check_nms_args(dets, scores);
  return nms_cuda_impl(dets, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_cuda(const at::Tensor& dets, const at::Tensor& scores, const at::Tensor& idxs,
                            double iou_threshold) {
  check_nms_args(dets, scores);
  TORCH_CHECK(idxs.device() == dets.device(), "batched_nms: idxs must be on the device of dets");
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == dets.size(0), "batched_nms: idxs must be [N] with N = ",
              dets.size(0), ", got ", idxs.sizes());
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && !at::isComplexType(idxs.scalar_type()),
              "batched_nms: idxs must be an integer tensor, got ", idxs.scalar_type());
  return nms_cuda_impl(dets, scores, &idxs, iou_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
}

}  // namespace libra
