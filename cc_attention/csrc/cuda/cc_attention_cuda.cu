// Criss-cross attention on CUDA (float32, float16, bfloat16, float64): the products of cc_attention.h and the joint
// softmax over a pixel's row and column keys.
//
// The products are strided-batched cuBLAS GEMMs (ops.cpp, through at::bmm on views): with the features in
// channels-last (NHWC) every operand -- the row matrices [x][c] batched over (n, y), the column matrices [y][c]
// batched over x (one call per image), the attention blocks -- is a view that cuBLAS reads and writes in place
// (tensor cores for 16-bit types, float32 accumulation). NCHW features are copied to channels-last first.
//
// The softmax of the pixel (y, x) reads its W row energies rows[n, y, x, :] and its H column energies
// columns[n, x, y, :] (both contiguous), skips the diagonal y' = y, and writes the attention in place: one warp per
// pixel, float32 (float64 for float64) arithmetic, an online maximum and sum in one pass and the normalized values
// in a second. The backward, attention * (grad - sum(attention * grad)), has the same shape.
#include "../cc_attention.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace ccnet {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// Adds one energy to a running (maximum, sum of exp(energy - maximum)).
template <typename acc_t>
__device__ __forceinline__ void accumulate_exp(acc_t& maximum, acc_t& sum, acc_t energy) {
  if (energy > maximum) {
    sum = sum * exp(maximum - energy) + acc_t(1);
    maximum = energy;
  } else {
    sum += exp(energy - maximum);
  }
}

// Merges another lane's (maximum, sum) into this one's; a lane that saw no energy has maximum = -inf, sum = 0.
template <typename acc_t>
__device__ __forceinline__ void merge_exp(acc_t& maximum, acc_t& sum, acc_t other_maximum, acc_t other_sum) {
  const acc_t merged = maximum > other_maximum ? maximum : other_maximum;
  const acc_t none = -std::numeric_limits<acc_t>::infinity();
  sum = (maximum == none ? acc_t(0) : sum * exp(maximum - merged)) +
        (other_maximum == none ? acc_t(0) : other_sum * exp(other_maximum - merged));
  maximum = merged;
}

// Where the attention blocks keep a pixel's keys: rows[n, y, x, :] at n * rows_n + y * rows_y + x * rows_x and
// columns[n, x, y, :] at n * columns_n + x * columns_x + y * columns_y (the last dimension contiguous).
struct BlockStrides {
  int64_t rows_n, rows_y, rows_x, columns_n, columns_x, columns_y;
};

BlockStrides block_strides(const at::Tensor& rows, const at::Tensor& columns) {
  return {rows.stride(0), rows.stride(1), rows.stride(2), columns.stride(0), columns.stride(1), columns.stride(2)};
}

// The pixel (n, y, x) = `pixel` (row-major): offsets of its row keys (W) and column keys (H, the diagonal at y).
struct PixelKeys {
  int64_t row_offset, column_offset, y;
};

__device__ __forceinline__ PixelKeys pixel_keys(int64_t pixel, int64_t H, int64_t W, const BlockStrides& strides) {
  const int64_t x = pixel % W, y = (pixel / W) % H, n = pixel / (W * H);
  return {n * strides.rows_n + y * strides.rows_y + x * strides.rows_x,
          n * strides.columns_n + x * strides.columns_x + y * strides.columns_y, y};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    joint_softmax_kernel(scalar_t* __restrict__ rows, scalar_t* __restrict__ columns, BlockStrides strides,
                         int64_t pixels, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; pixel < pixels;
       pixel += step) {
    const PixelKeys keys = pixel_keys(pixel, H, W, strides);
    scalar_t* row = rows + keys.row_offset;
    scalar_t* column = columns + keys.column_offset;
    acc_t maximum = -std::numeric_limits<acc_t>::infinity(), sum = 0;
    for (int64_t i = lane; i < W; i += kWarpSize) accumulate_exp(maximum, sum, static_cast<acc_t>(row[i]));
    for (int64_t i = lane; i < H; i += kWarpSize)
      if (i != keys.y) accumulate_exp(maximum, sum, static_cast<acc_t>(column[i]));
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const acc_t other_maximum = __shfl_xor_sync(kFullMask, maximum, offset);
      const acc_t other_sum = __shfl_xor_sync(kFullMask, sum, offset);
      merge_exp(maximum, sum, other_maximum, other_sum);
    }
    const acc_t inverse = acc_t(1) / sum;
    for (int64_t i = lane; i < W; i += kWarpSize)
      row[i] = static_cast<scalar_t>(exp(static_cast<acc_t>(row[i]) - maximum) * inverse);
    for (int64_t i = lane; i < H; i += kWarpSize)
      column[i] = i == keys.y ? scalar_t(0) : static_cast<scalar_t>(exp(static_cast<acc_t>(column[i]) - maximum) * inverse);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    joint_softmax_backward_kernel(scalar_t* __restrict__ grad_rows, scalar_t* __restrict__ grad_columns,
                                  const scalar_t* __restrict__ rows, const scalar_t* __restrict__ columns,
                                  BlockStrides strides, int64_t pixels, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; pixel < pixels;
       pixel += step) {
    const PixelKeys keys = pixel_keys(pixel, H, W, strides);
    scalar_t* grad_row = grad_rows + keys.row_offset;
    scalar_t* grad_column = grad_columns + keys.column_offset;
    const scalar_t* row = rows + keys.row_offset;
    const scalar_t* column = columns + keys.column_offset;
    acc_t dot = 0;
    for (int64_t i = lane; i < W; i += kWarpSize) dot += static_cast<acc_t>(grad_row[i]) * static_cast<acc_t>(row[i]);
    for (int64_t i = lane; i < H; i += kWarpSize)
      if (i != keys.y) dot += static_cast<acc_t>(grad_column[i]) * static_cast<acc_t>(column[i]);
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
    for (int64_t i = lane; i < W; i += kWarpSize)
      grad_row[i] = static_cast<scalar_t>(static_cast<acc_t>(row[i]) * (static_cast<acc_t>(grad_row[i]) - dot));
    for (int64_t i = lane; i < H; i += kWarpSize)
      grad_column[i] = i == keys.y ? scalar_t(0)
                                   : static_cast<scalar_t>(static_cast<acc_t>(column[i]) *
                                                           (static_cast<acc_t>(grad_column[i]) - dot));
  }
}

// Blocks for one warp per pixel (capped: a warp then takes several pixels).
unsigned int blocks_for(int64_t pixels) {
  return static_cast<unsigned int>(std::min<int64_t>((pixels + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 20));
}

void softmax_cuda_(at::Tensor& rows, at::Tensor& columns) {
  const int64_t H = rows.size(1), W = rows.size(2), pixels = rows.size(0) * H * W;
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, rows.scalar_type(),
                                  "ccnet_softmax_cuda", [&] {
    joint_softmax_kernel<scalar_t><<<blocks_for(pixels), kWarpsPerBlock * kWarpSize, 0,
                                     c10::cuda::getCurrentCUDAStream()>>>(
        rows.data_ptr<scalar_t>(), columns.data_ptr<scalar_t>(), block_strides(rows, columns), pixels, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void softmax_backward_cuda_(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                            const at::Tensor& columns) {
  const int64_t H = rows.size(1), W = rows.size(2), pixels = rows.size(0) * H * W;
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, rows.scalar_type(),
                                  "ccnet_softmax_backward_cuda", [&] {
    joint_softmax_backward_kernel<scalar_t><<<blocks_for(pixels), kWarpsPerBlock * kWarpSize, 0,
                                              c10::cuda::getCurrentCUDAStream()>>>(
        grad_rows.data_ptr<scalar_t>(), grad_columns.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
        columns.data_ptr<scalar_t>(), block_strides(rows, columns), pixels, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const DeviceKernels kCudaKernels{affinity_by_matmul, gather_by_matmul, scatter_by_matmul, softmax_cuda_,
                                 softmax_backward_cuda_, /*needs_unit_channel_stride=*/true};

}  // namespace
}  // namespace ccnet

TORCH_LIBRARY_IMPL(ccnet, CUDA, m) { ccnet::register_device(m, c10::DeviceType::CUDA, ccnet::kCudaKernels); }
