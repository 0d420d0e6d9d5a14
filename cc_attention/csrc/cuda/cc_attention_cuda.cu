// Criss-cross attention on CUDA (float32, float16, bfloat16, float64): the products of cc_attention.h and the joint
// softmax over a pixel's row and column keys.
//
// The products are cuBLAS GEMMs on views: with the features in channels-last (NHWC) every operand -- the row
// matrices [x][c] batched over (n, y), the column matrices [y][c] batched over (n, x), the attention blocks -- is a
// view that cuBLAS reads and writes in place (tensor cores for 16-bit types, float32 accumulation). NCHW features
// are copied to channels-last first. The row part is one strided-batched call (at::bmm, ops.cpp); the column part,
// whose matrices of different images are not one stride apart, is one pointer-array batched call
// (cublasGemmBatchedEx, below) or one strided-batched call per image (the design choice "column_gemm").
//
// The softmax of the pixel (y, x) reads its W row energies rows[n, y, x, :] and its H column energies
// columns[n, x, y, :] (both contiguous), skips the diagonal y' = y, and writes the attention (in place, or from
// float32 energies into 16-bit blocks): one warp per pixel, float32 (float64 for float64) arithmetic, an online
// maximum and sum in one pass and the normalized values in a second; each lane reads 16-byte vectors of 8 keys
// (the blocks are padded to multiples of 8 keys) or single keys (the design choice "softmax_loads"). The backward,
// attention * (grad - sum(attention * grad)), has the same shape.
#include "../cc_attention.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

namespace ccnet {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVectorKeys = 8;  // keys per 16-byte vector of a 16-bit block; the blocks' padding (ops.cpp)

// Adds one energy to a running (maximum, sum of exp(energy - maximum)). An energy of -inf adds nothing: its weight
// is exp(-inf) = 0 (computed as exp(energy - maximum) it would be exp(-inf - -inf) = NaN while the maximum is still
// -inf, e.g. when it is a lane's first energy), as in torch.softmax.
template <typename acc_t>
__device__ __forceinline__ void accumulate_exp(acc_t& maximum, acc_t& sum, acc_t energy) {
  if (energy > maximum) {
    sum = sum * exp(maximum - energy) + acc_t(1);
    maximum = energy;
  } else if (energy != -std::numeric_limits<acc_t>::infinity()) {
    sum += exp(energy - maximum);
  }
}

// Merges another lane's (maximum, sum) into this one's; a lane that saw no finite energy has maximum = -inf, sum = 0.
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
  TORCH_CHECK(rows.stride(3) == 1 && columns.stride(3) == 1, "ccnet: the attention blocks need a contiguous last "
              "dimension, got strides ", rows.strides(), " and ", columns.strides());
  return {rows.stride(0), rows.stride(1), rows.stride(2), columns.stride(0), columns.stride(1), columns.stride(2)};
}

// Whether every pixel's keys in `block` start 16-byte aligned with room for whole vectors of kVectorKeys keys (the
// padded buffers of ops.cpp), so that the vectorized softmax may read and write it.
bool takes_vectors(const at::Tensor& block) {
  const int64_t whole = (block.size(3) + kVectorKeys - 1) / kVectorKeys * kVectorKeys;
  return block.stride(3) == 1 && block.stride(2) >= whole && block.stride(0) % kVectorKeys == 0 &&
         block.stride(1) % kVectorKeys == 0 && block.stride(2) % kVectorKeys == 0 &&
         reinterpret_cast<std::uintptr_t>(block.data_ptr()) % 16 == 0 && block.element_size() >= 2;
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

// kKeys consecutive keys that one lane reads or writes at once: 1 (scalar accesses) or kVectorKeys (16-byte
// vectors for 16-bit types; two or four 16-byte accesses for float32 and float64).
template <typename T, int kKeys>
struct Keys {
  T values[kKeys];

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kKeys == 1) {
      values[0] = *p;
    } else {
      constexpr int kWords = kKeys * sizeof(T) / sizeof(uint4);
      static_assert(kWords * sizeof(uint4) == kKeys * sizeof(T), "whole 16-byte words");
      uint4 words[kWords];
#pragma unroll
      for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const uint4*>(p)[w];
      memcpy(values, words, sizeof(values));
    }
  }

  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kKeys == 1) {
      *p = values[0];
    } else {
      constexpr int kWords = kKeys * sizeof(T) / sizeof(uint4);
      uint4 words[kWords];
      memcpy(words, values, sizeof(values));
#pragma unroll
      for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(p)[w] = words[w];
    }
  }
};

// The softmax of every pixel: energies (energy_t: the attention's type, or float32 for 16-bit attention; possibly
// the same memory as the attention) -> attention (scalar_t). Keys that are not keys (the diagonal of columns, the
// padding a vector reaches into) are written 0.
template <typename scalar_t, typename energy_t, int kKeys>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    joint_softmax_kernel(const energy_t* energy_rows, const energy_t* energy_columns, scalar_t* rows,
                         scalar_t* columns, BlockStrides strides, int64_t pixels, int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; pixel < pixels;
       pixel += step) {
    const PixelKeys keys = pixel_keys(pixel, H, W, strides);
    const energy_t* energy_row = energy_rows + keys.row_offset;
    const energy_t* energy_column = energy_columns + keys.column_offset;
    acc_t maximum = -std::numeric_limits<acc_t>::infinity(), sum = 0;
    for (int64_t first = lane * kKeys; first < W; first += kWarpSize * kKeys) {
      Keys<energy_t, kKeys> energies;
      energies.load(energy_row + first);
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        if (first + j < W) accumulate_exp(maximum, sum, static_cast<acc_t>(energies.values[j]));
    }
    for (int64_t first = lane * kKeys; first < H; first += kWarpSize * kKeys) {
      Keys<energy_t, kKeys> energies;
      energies.load(energy_column + first);
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        if (first + j < H && first + j != keys.y) accumulate_exp(maximum, sum, static_cast<acc_t>(energies.values[j]));
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const acc_t other_maximum = __shfl_xor_sync(kFullMask, maximum, offset);
      const acc_t other_sum = __shfl_xor_sync(kFullMask, sum, offset);
      merge_exp(maximum, sum, other_maximum, other_sum);
    }
    const acc_t inverse = acc_t(1) / sum;
    for (int64_t first = lane * kKeys; first < W; first += kWarpSize * kKeys) {
      Keys<energy_t, kKeys> energies;
      energies.load(energy_row + first);
      Keys<scalar_t, kKeys> attention;
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        attention.values[j] = first + j < W ? static_cast<scalar_t>(
                                                  exp(static_cast<acc_t>(energies.values[j]) - maximum) * inverse)
                                            : scalar_t(0);
      attention.store(rows + keys.row_offset + first);
    }
    for (int64_t first = lane * kKeys; first < H; first += kWarpSize * kKeys) {
      Keys<energy_t, kKeys> energies;
      energies.load(energy_column + first);
      Keys<scalar_t, kKeys> attention;
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        attention.values[j] = first + j < H && first + j != keys.y
                                  ? static_cast<scalar_t>(exp(static_cast<acc_t>(energies.values[j]) - maximum) * inverse)
                                  : scalar_t(0);
      attention.store(columns + keys.column_offset + first);
    }
  }
}

// In place: grad of the attention -> grad of the energies, attention * (grad - sum_keys(attention * grad)); the
// grads' blocks have their own strides (`grad_strides`).
template <typename scalar_t, int kKeys>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize)
    joint_softmax_backward_kernel(scalar_t* __restrict__ grad_rows, scalar_t* __restrict__ grad_columns,
                                  const scalar_t* __restrict__ rows, const scalar_t* __restrict__ columns,
                                  BlockStrides grad_strides, BlockStrides strides, int64_t pixels, int64_t H,
                                  int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t pixel = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; pixel < pixels;
       pixel += step) {
    const PixelKeys keys = pixel_keys(pixel, H, W, strides), grad_keys = pixel_keys(pixel, H, W, grad_strides);
    scalar_t* grad_row = grad_rows + grad_keys.row_offset;
    scalar_t* grad_column = grad_columns + grad_keys.column_offset;
    const scalar_t* row = rows + keys.row_offset;
    const scalar_t* column = columns + keys.column_offset;
    acc_t dot = 0;
    for (int64_t first = lane * kKeys; first < W; first += kWarpSize * kKeys) {
      Keys<scalar_t, kKeys> grad, attention;
      grad.load(grad_row + first);
      attention.load(row + first);
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        if (first + j < W) dot += static_cast<acc_t>(grad.values[j]) * static_cast<acc_t>(attention.values[j]);
    }
    for (int64_t first = lane * kKeys; first < H; first += kWarpSize * kKeys) {
      Keys<scalar_t, kKeys> grad, attention;
      grad.load(grad_column + first);
      attention.load(column + first);
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        if (first + j < H && first + j != keys.y)
          dot += static_cast<acc_t>(grad.values[j]) * static_cast<acc_t>(attention.values[j]);
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
    for (int64_t first = lane * kKeys; first < W; first += kWarpSize * kKeys) {
      Keys<scalar_t, kKeys> grad, attention;
      grad.load(grad_row + first);
      attention.load(row + first);
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        grad.values[j] = first + j < W ? static_cast<scalar_t>(static_cast<acc_t>(attention.values[j]) *
                                                               (static_cast<acc_t>(grad.values[j]) - dot))
                                       : scalar_t(0);
      grad.store(grad_row + first);
    }
    for (int64_t first = lane * kKeys; first < H; first += kWarpSize * kKeys) {
      Keys<scalar_t, kKeys> grad, attention;
      grad.load(grad_column + first);
      attention.load(column + first);
#pragma unroll
      for (int j = 0; j < kKeys; ++j)
        grad.values[j] = first + j < H && first + j != keys.y
                             ? static_cast<scalar_t>(static_cast<acc_t>(attention.values[j]) *
                                                     (static_cast<acc_t>(grad.values[j]) - dot))
                             : scalar_t(0);
      grad.store(grad_column + first);
    }
  }
}

// Blocks for one warp per pixel (capped: a warp then takes several pixels).
unsigned int blocks_for(int64_t pixels) {
  return static_cast<unsigned int>(std::min<int64_t>((pixels + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 20));
}

template <typename scalar_t, typename energy_t>
void launch_softmax(const at::Tensor& energy_rows, const at::Tensor& energy_columns, at::Tensor& rows,
                    at::Tensor& columns, int64_t pixels, int64_t H, int64_t W) {
  const BlockStrides strides = block_strides(rows, columns);
  const BlockStrides energy_strides = block_strides(energy_rows, energy_columns);
  TORCH_CHECK(std::memcmp(&strides, &energy_strides, sizeof(strides)) == 0, "ccnet: the energies and the attention "
              "must have the same strides, got ", energy_rows.strides(), " / ", energy_columns.strides(), " and ",
              rows.strides(), " / ", columns.strides());
  const bool vectors = design_choices().vectorized_softmax && takes_vectors(rows) && takes_vectors(columns) &&
                       takes_vectors(energy_rows) && takes_vectors(energy_columns);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const energy_t* energy_rows_data = energy_rows.data_ptr<energy_t>();
  const energy_t* energy_columns_data = energy_columns.data_ptr<energy_t>();
  if (vectors) {
    joint_softmax_kernel<scalar_t, energy_t, kVectorKeys><<<blocks_for(pixels), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        energy_rows_data, energy_columns_data, rows.data_ptr<scalar_t>(), columns.data_ptr<scalar_t>(), strides,
        pixels, H, W);
  } else {
    joint_softmax_kernel<scalar_t, energy_t, 1><<<blocks_for(pixels), kWarpsPerBlock * kWarpSize, 0, stream>>>(
        energy_rows_data, energy_columns_data, rows.data_ptr<scalar_t>(), columns.data_ptr<scalar_t>(), strides,
        pixels, H, W);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void softmax_cuda(const at::Tensor& energy_rows, const at::Tensor& energy_columns, at::Tensor& rows,
                  at::Tensor& columns) {
  const int64_t H = rows.size(1), W = rows.size(2), pixels = rows.size(0) * H * W;
  if (pixels == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  const bool float32_energies = energy_rows.scalar_type() != rows.scalar_type();
  TORCH_CHECK(!float32_energies || (energy_rows.scalar_type() == at::kFloat &&
                                    energy_columns.scalar_type() == at::kFloat),
              "ccnet: energies must be of the attention's dtype or float32, got ", energy_rows.scalar_type(), " for ",
              rows.scalar_type(), " attention");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, rows.scalar_type(),
                                  "ccnet_softmax_cuda", [&] {
    if (float32_energies) {
      launch_softmax<scalar_t, float>(energy_rows, energy_columns, rows, columns, pixels, H, W);
    } else {
      launch_softmax<scalar_t, scalar_t>(energy_rows, energy_columns, rows, columns, pixels, H, W);
    }
  });
}

void softmax_backward_cuda_(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                            const at::Tensor& columns) {
  const int64_t H = rows.size(1), W = rows.size(2), pixels = rows.size(0) * H * W;
  if (pixels == 0) return;
  TORCH_CHECK(grad_rows.sizes() == rows.sizes() && grad_columns.sizes() == columns.sizes() &&
                  grad_rows.scalar_type() == rows.scalar_type() && grad_columns.scalar_type() == columns.scalar_type(),
              "ccnet: the attention's gradient must have the attention's sizes and dtype, got ", grad_rows.sizes(),
              " / ", grad_columns.sizes(), " for ", rows.sizes(), " / ", columns.sizes());
  const c10::cuda::CUDAGuard guard(rows.device());
  const BlockStrides grad_strides = block_strides(grad_rows, grad_columns), strides = block_strides(rows, columns);
  const bool vectors = design_choices().vectorized_softmax && takes_vectors(rows) && takes_vectors(columns) &&
                       takes_vectors(grad_rows) && takes_vectors(grad_columns);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, rows.scalar_type(),
                                  "ccnet_softmax_backward_cuda", [&] {
    if (vectors) {
      joint_softmax_backward_kernel<scalar_t, kVectorKeys><<<blocks_for(pixels), kWarpsPerBlock * kWarpSize, 0,
                                                             stream>>>(
          grad_rows.data_ptr<scalar_t>(), grad_columns.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
          columns.data_ptr<scalar_t>(), grad_strides, strides, pixels, H, W);
    } else {
      joint_softmax_backward_kernel<scalar_t, 1><<<blocks_for(pixels), kWarpsPerBlock * kWarpSize, 0, stream>>>(
          grad_rows.data_ptr<scalar_t>(), grad_columns.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
          columns.data_ptr<scalar_t>(), grad_strides, strides, pixels, H, W);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The column products as ONE pointer-array batched GEMM (cublasGemmBatchedEx) over every (n, x): a small kernel
// writes the matrices' addresses on the device (no host-to-device copy), then one cuBLAS call multiplies them.

// out[i0, i1] = a[i0, i1] @ b[i0, i1]: the addresses of the three matrices of batch entry i = i0 * size1 + i1 at
// pointers[i], pointers[count + i], pointers[2 * count + i].
struct BatchAddresses {
  char* base[3];
  int64_t stride0[3], stride1[3];  // bytes
};

__global__ void batch_addresses_kernel(BatchAddresses addresses, int64_t size1, int64_t count, void** pointers) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int64_t i0 = i / size1, i1 = i % size1;
#pragma unroll
  for (int operand = 0; operand < 3; ++operand)
    pointers[operand * count + i] =
        addresses.base[operand] + i0 * addresses.stride0[operand] + i1 * addresses.stride1[operand];
}

// A row-major matrix view (the last two dimensions of `m`: sizes rows x cols) as cuBLAS (column-major) sees the
// transposed matrix m^T: stored as m^T itself (op N, unit column stride) or as m, transposed on the fly (op T, unit
// row stride); nullopt when neither stride is 1.
struct CublasOperand {
  cublasOperation_t op;
  int64_t ld;
};

std::optional<CublasOperand> transposed_operand(const at::Tensor& m) {
  const int64_t rows = m.size(-2), cols = m.size(-1);
  if (m.stride(-1) == 1 || cols == 1) {
    const int64_t ld = rows == 1 ? std::max<int64_t>(cols, 1) : m.stride(-2);
    if (ld >= std::max<int64_t>(cols, 1)) return CublasOperand{CUBLAS_OP_N, ld};
  }
  if (m.stride(-2) == 1 || rows == 1) {
    const int64_t ld = cols == 1 ? std::max<int64_t>(rows, 1) : m.stride(-1);
    if (ld >= std::max<int64_t>(rows, 1)) return CublasOperand{CUBLAS_OP_T, ld};
  }
  return std::nullopt;
}

cudaDataType_t cuda_data_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "ccnet: no cuBLAS type for ", type);
  }
}

bool fits_int(int64_t value) { return value <= std::numeric_limits<int>::max(); }

// out[i, j] = a[i, j] @ b[i, j] (+= with `accumulate`) for 4-D tensors on one GPU in one cublasGemmBatchedEx call;
// false (nothing done) where cuBLAS cannot take the operands as they lie (neither stride of a matrix is 1, sizes
// beyond int), so that the caller falls back.
bool gemm_batched_pointers(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (out.stride(-1) != 1 && out.size(-1) > 1) {  // cuBLAS writes column-major: out^T = b^T a^T needs unit columns
    if (out.stride(-2) != 1 && out.size(-2) > 1) return false;
    return gemm_batched_pointers(out.transpose(-2, -1), b.transpose(-2, -1), a.transpose(-2, -1), accumulate);
  }
  const int64_t m = out.size(-2), n = out.size(-1), k = a.size(-1), count = out.size(0) * out.size(1);
  const auto c_operand = transposed_operand(out), b_operand = transposed_operand(b), a_operand = transposed_operand(a);
  if (!c_operand || c_operand->op != CUBLAS_OP_N || !b_operand || !a_operand || m == 0 || n == 0 || k == 0 ||
      !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(count) || !fits_int(c_operand->ld) ||
      !fits_int(a_operand->ld) || !fits_int(b_operand->ld)) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor pointers = at::empty({3 * count}, out.options().dtype(at::kLong));
  BatchAddresses addresses{};
  const at::Tensor* operands[3] = {&a, &b, &out};
  for (int operand = 0; operand < 3; ++operand) {
    const at::Tensor& t = *operands[operand];
    addresses.base[operand] = static_cast<char*>(t.data_ptr());
    addresses.stride0[operand] = t.stride(0) * t.element_size();
    addresses.stride1[operand] = t.stride(1) * t.element_size();
  }
  void** pointer_data = reinterpret_cast<void**>(pointers.data_ptr<int64_t>());
  constexpr int kThreads = 256;
  batch_addresses_kernel<<<static_cast<unsigned int>((count + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      addresses, out.size(1), count, pointer_data);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const bool float64 = a.scalar_type() == at::kDouble;
  const cublasComputeType_t compute = float64 ? CUBLAS_COMPUTE_64F
                                      : a.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS()
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  const double alpha64 = 1, beta64 = accumulate ? 1 : 0;
  const float alpha32 = 1, beta32 = accumulate ? 1 : 0;
  const void* alpha = float64 ? static_cast<const void*>(&alpha64) : static_cast<const void*>(&alpha32);
  const void* beta = float64 ? static_cast<const void*>(&beta64) : static_cast<const void*>(&beta32);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // Column-major: out^T (n x m) = b^T (n x k) a^T (k x m).
  TORCH_CUDABLAS_CHECK(cublasGemmBatchedEx(
      handle, b_operand->op, a_operand->op, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), alpha,
      pointer_data + count, cuda_data_type(b.scalar_type()), static_cast<int>(b_operand->ld), pointer_data,
      cuda_data_type(a.scalar_type()), static_cast<int>(a_operand->ld), beta,
      pointer_data + 2 * count, cuda_data_type(out.scalar_type()),
      static_cast<int>(c_operand->ld), static_cast<int>(count), compute, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
  return true;
}

// The column part's product in one call where cuBLAS takes the operands, else one strided-batched call per image.
void column_matmul_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (gemm_batched_pointers(out, a, b, accumulate)) return;
  for (int64_t i = 0; i < out.size(0); ++i) {
    at::Tensor out_i = out[i];
    if (accumulate) {
      out_i.baddbmm_(a[i], b[i]);
    } else if (out.scalar_type() != a.scalar_type()) {
      at::bmm_out(out_i, a[i], b[i], out.scalar_type());
    } else {
      at::bmm_out(out_i, a[i], b[i]);
    }
  }
}

void affinity_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& rows, at::Tensor& columns) {
  affinity_by_matmul(a, b, rows, columns, column_matmul_cuda);
}

void gather_cuda(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& v, at::Tensor& out) {
  gather_by_matmul(rows, columns, v, out, column_matmul_cuda);
}

void scatter_cuda(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& g, at::Tensor& out) {
  scatter_by_matmul(rows, columns, g, out, column_matmul_cuda);
}

const DeviceKernels kCudaKernels{affinity_cuda, gather_cuda, scatter_cuda, softmax_cuda, softmax_backward_cuda_,
                                 /*needs_unit_channel_stride=*/true};

}  // namespace
}  // namespace ccnet

TORCH_LIBRARY_IMPL(ccnet, CUDA, m) { ccnet::register_device(m, c10::DeviceType::CUDA, ccnet::kCudaKernels); }
