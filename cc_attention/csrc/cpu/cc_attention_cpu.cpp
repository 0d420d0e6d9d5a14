// Criss-cross attention on the CPU: the products of cc_attention.h for float32 / float64 features, with the attention
// in blocks (rows (N, H, W, W), columns (N, W, H, H)). The micro-kernel takes features with a unit channel stride
// (NHWC, channel slices of NHWC); NCHW features are copied to channels-last one image at a time (their column
// matrices have no unit stride: packing them element by element for every product cost more than the products).
//
// Every product is a row part (a batch of small GEMMs, one per image row y) plus a column part (one per image column
// x); the blocks are read and written as those GEMMs' operands directly. Each GEMM packs its panels into contiguous
// buffers; the micro-kernel keeps a block of accumulators in vector registers (GCC/Clang vector extension) and
// streams them. float16 / bfloat16 features (CPU autocast) go through ATen's batched matrix multiply instead (their
// energies through the micro-kernel in float32, from float32 copies of the query and key), and the softmax runs as
// ATen tensor operations for every dtype (ops.cpp).
#include "../cc_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ccnet {
namespace {

// SIMD vectors through the GCC/Clang vector extension: 32 bytes (8 floats, 4 doubles), plain loads and stores.
constexpr int kVectorBytes = 32;
template <typename T>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vector = typename VectorOf<T>::type;
template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);

template <typename T>
inline Vector<T> load(const T* p) {
  Vector<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, Vector<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// dst[r * d_row + c * d_col] = src[r * s_row + c * s_col] for r < rows, c < cols, in square blocks so that
// both sides touch few cache lines and pages at a time (the strided side of a transpose).
template <typename T>
void copy_2d(const T* src, int64_t s_row, int64_t s_col, T* dst, int64_t d_row, int64_t d_col, int64_t rows,
             int64_t cols) {
  if (s_col == 1 && d_col == 1) {  // rows are contiguous on both sides
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * d_row, src + r * s_row, cols * sizeof(T));
    return;
  }
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[r * d_row + c * d_col] = src[r * s_row + c * s_col];
    }
}

// The 8 x 8 block of float32 at src (rows s_row apart) transposed into dst (rows d_row apart) in vector registers:
// three rounds of two-vector shuffles (interleave elements, then pairs, then halves).
inline void transpose_block(const float* src, int64_t s_row, float* dst, int64_t d_row) {
  typedef int Mask __attribute__((vector_size(kVectorBytes)));
  static_assert(kLanes<float> == 8, "8 floats per vector");
  Vector<float> r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = load(src + i * s_row);
  for (int i = 0; i < 8; i += 2) {  // a[i] = rows i, i+1 interleaved, columns 0-3; a[i+1]: columns 4-7
    a[i] = __builtin_shuffle(r[i], r[i + 1], Mask{0, 8, 1, 9, 2, 10, 3, 11});
    a[i + 1] = __builtin_shuffle(r[i], r[i + 1], Mask{4, 12, 5, 13, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4)  // b: four rows of two columns each
    for (int half = 0; half < 2; ++half) {
      b[i + 2 * half] = __builtin_shuffle(a[i + half], a[i + half + 2], Mask{0, 1, 8, 9, 2, 3, 10, 11});
      b[i + 2 * half + 1] = __builtin_shuffle(a[i + half], a[i + half + 2], Mask{4, 5, 12, 13, 6, 7, 14, 15});
    }
  for (int j = 0; j < 4; ++j) {  // columns 2j, 2j+1: rows 0-3 from b[j], rows 4-7 from b[j + 4]
    store(dst + 2 * j * d_row, __builtin_shuffle(b[j], b[j + 4], Mask{0, 1, 2, 3, 8, 9, 10, 11}));
    store(dst + (2 * j + 1) * d_row, __builtin_shuffle(b[j], b[j + 4], Mask{4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

// dst[c * d_row + r] = src[r * s_row + c] for r < rows, c < cols: a transpose between two row-major matrices, in
// 8 x 8 blocks read and written as runs of 8 contiguous elements (float32: shuffled in vector registers).
template <typename T>
void transpose(const T* src, int64_t s_row, T* dst, int64_t d_row, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 8;
  const int64_t whole_rows = rows / kBlock * kBlock, whole_cols = cols / kBlock * kBlock;
  for (int64_t r0 = 0; r0 < whole_rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < whole_cols; c0 += kBlock) {
      if constexpr (std::is_same_v<T, float>) {
        transpose_block(src + r0 * s_row + c0, s_row, dst + c0 * d_row + r0, d_row);
        continue;
      }
      T block[kBlock][kBlock];
      for (int64_t i = 0; i < kBlock; ++i)
        for (int64_t j = 0; j < kBlock; ++j) block[j][i] = src[(r0 + i) * s_row + c0 + j];
      for (int64_t j = 0; j < kBlock; ++j)
        for (int64_t i = 0; i < kBlock; ++i) dst[(c0 + j) * d_row + r0 + i] = block[j][i];
    }
    for (int64_t r = r0; r < r0 + kBlock; ++r)
      for (int64_t c = whole_cols; c < cols; ++c) dst[c * d_row + r] = src[r * s_row + c];
  }
  for (int64_t r = whole_rows; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * d_row + r] = src[r * s_row + c];
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM micro-kernel: a block of R x NV accumulator vectors stays in registers while z streams through packed
// panels: P as [z][a] (broadcast one element per row), Q as [z][x] rows padded to whole vectors.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kRows = 6;        // 32 vector registers: 6 x 3 accumulators
constexpr int kRowVectors = 3;
#else
constexpr int kRows = 4;        // 16 vector registers: 4 x 2 accumulators
constexpr int kRowVectors = 2;
#endif

// O[a * oa + x * ox] (+)= sum_z P[a * pa + z * pz] * Q[z * qz + x] for a < R, x < min(NV * lanes, valid).
template <typename T, int R, int NV>
inline void row_tile(const T* __restrict P, int64_t pa, int64_t pz, const T* __restrict Q, int64_t qz, T* __restrict O,
                     int64_t oa, int64_t ox, int64_t Z, int64_t valid, bool accumulate) {
  constexpr int L = kLanes<T>;
  Vector<T> acc[R][NV] = {};
  for (int64_t z = 0; z < Z; ++z) {
    Vector<T> q[NV];
    for (int v = 0; v < NV; ++v) q[v] = load(Q + z * qz + v * L);
    for (int i = 0; i < R; ++i) {
      const T p = P[i * pa + z * pz];
      for (int v = 0; v < NV; ++v) acc[i][v] += p * q[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) {
      T* out = O + i * oa + v * L * ox;
      const int64_t count = std::min<int64_t>(L, valid - v * L);
      if (count == L && ox == 1) {
        store(out, accumulate ? load(out) + acc[i][v] : acc[i][v]);
      } else if (count > 0) {  // the row's last, partial vector, or a strided output
        T lanes[L];
        store(lanes, acc[i][v]);
        for (int64_t e = 0; e < count; ++e) out[e * ox] = accumulate ? out[e * ox] + lanes[e] : lanes[e];
      }
    }
}

// O[a * oa + x * ox] (+)= sum_z P[a * pa + z * pz] * Q[z * qz + x] for a < R, x < X (Q rows padded to whole
// vectors).
template <typename T, int R>
void row_block(const T* P, int64_t pa, int64_t pz, const T* Q, int64_t qz, T* O, int64_t oa, int64_t ox, int64_t Z, int64_t X,
               bool accumulate) {
  constexpr int L = kLanes<T>;
  int64_t x = 0;
  for (; x + kRowVectors * L <= X; x += kRowVectors * L)
    row_tile<T, R, kRowVectors>(P, pa, pz, Q + x, qz, O + x * ox, oa, ox, Z, X - x, accumulate);
  for (; x < X; x += L) row_tile<T, R, 1>(P, pa, pz, Q + x, qz, O + x * ox, oa, ox, Z, X - x, accumulate);
}

template <typename T, int R = kRows>
void row_blocks(const T* P, int64_t pa, int64_t pz, const T* Q, int64_t qz, T* O, int64_t oa, int64_t ox, int64_t A, int64_t Z,
                int64_t X, bool accumulate) {
  int64_t a = 0;
  for (; a + R <= A; a += R) row_block<T, R>(P + a * pa, pa, pz, Q, qz, O + a * oa, oa, ox, Z, X, accumulate);
  if constexpr (R > 1)
    if (a < A) row_blocks<T, R - 1>(P + a * pa, pa, pz, Q, qz, O + a * oa, oa, ox, A - a, Z, X, accumulate);
}

// Element strides of the three operands of a batch of small GEMMs O_r = P_r Q_r (r: the batch index).
struct Strides {
  int64_t batch, rows, cols;
};

// For every r < batches: O_r[a, x] (+)= sum_z P_r[a, z] * Q_r[z, x] for a < A, z < Z, x < X, where
// P_r[a, z] = P[r * p.batch + a * p.rows + z * p.cols], Q_r[z, x] = Q[r * q.batch + z * q.rows + x * q.cols],
// O_r[a, x] = O[r * o.batch + a * o.rows + x * o.cols]. In parallel over r; each r first packs its panels into
// contiguous buffers (so any strides stream well, e.g. channel strides of H*W) -- except a P contiguous along z:
// the few cache lines of its R rows per tile are read in place.
template <typename T>
void batched_gemm(const T* P, Strides p, const T* Q, Strides q, T* O, Strides o, int64_t batches, int64_t A,
                  int64_t Z, int64_t X, bool accumulate) {
  const int64_t padded = (X + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
  at::parallel_for(0, batches, 1, [&](int64_t begin, int64_t end) {
    const bool pack_P = p.cols != 1;
    std::vector<T> P_packed(pack_P ? Z * A : 0), Q_packed(Z * padded, T(0));  // the padding columns stay zero
    for (int64_t r = begin; r < end; ++r) {
      const T* P_r = P + r * p.batch;
      if (pack_P) copy_2d<T>(P_r, p.cols, p.rows, P_packed.data(), A, 1, Z, A);
      copy_2d<T>(Q + r * q.batch, q.rows, q.cols, Q_packed.data(), padded, 1, Z, X);
      row_blocks<T>(pack_P ? P_packed.data() : P_r, pack_P ? 1 : p.rows, pack_P ? A : p.cols, Q_packed.data(), padded,
                    O + r * o.batch, o.rows, o.cols, A, Z, X, accumulate);
    }
  });
}

// O = P Q as batched_gemm computes it, oriented so that the micro-kernel's vector stores run along a unit stride of
// O: when O's columns are strided but its rows are not, it computes O^T = Q^T P^T instead.
template <typename T>
void gemm(const T* P, Strides p, const T* Q, Strides q, T* O, Strides o, int64_t batches, int64_t A, int64_t Z,
          int64_t X, bool accumulate) {
  if (o.cols != 1 && o.rows == 1) {
    batched_gemm<T>(Q, {q.batch, q.cols, q.rows}, P, {p.batch, p.cols, p.rows}, O, {o.batch, o.cols, o.rows}, batches,
                    X, Z, A, accumulate);
  } else {
    batched_gemm<T>(P, p, Q, q, O, o, batches, A, Z, X, accumulate);
  }
}

// One image of a (N, C, H, W) tensor: element (c, y, x) at data[c * c_stride + y * y_stride + x * x_stride].
template <typename T>
struct Plane {
  T* data;
  int64_t c_stride, y_stride, x_stride;
};

template <typename T>
Plane<T> plane(const at::Tensor& t, int64_t n) {
  return {t.data_ptr<std::remove_const_t<T>>() + n * t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The attention blocks of one image: rows[y][x][x'] at rows + y * row_y + x * row_x + x', columns[x][y][y'] at
// columns + x * column_x + y * column_y + y' (the last dimension is contiguous; rows may be padded).
template <typename T>
struct Blocks {
  T* rows;
  int64_t row_y, row_x;
  T* columns;
  int64_t column_x, column_y;
};

template <typename T>
Blocks<T> blocks(const at::Tensor& rows, const at::Tensor& columns, int64_t n) {
  using Element = std::remove_const_t<T>;
  return {rows.data_ptr<Element>() + n * rows.stride(0), rows.stride(1), rows.stride(2),
          columns.data_ptr<Element>() + n * columns.stride(0), columns.stride(1), columns.stride(2)};
}

// ---------------------------------------------------------------------------------------------------------------
// The three products for one image.

// rows[y][x][x'] = <a[:, y, x], b[:, y, x']>, columns[x][y][y'] = <a[:, y, x], b[:, y', x]>.
template <typename T>
void affinity_plane(Plane<const T> a, Plane<const T> b, Blocks<T> out, int64_t C, int64_t H, int64_t W) {
  // Per y: (W x C) x (C x W).
  gemm<T>(a.data, {a.y_stride, a.x_stride, a.c_stride}, b.data, {b.y_stride, b.c_stride, b.x_stride}, out.rows,
          {out.row_y, out.row_x, 1}, H, W, C, W, false);
  // Per x: (H x C) x (C x H).
  gemm<T>(a.data, {a.x_stride, a.y_stride, a.c_stride}, b.data, {b.x_stride, b.c_stride, b.y_stride}, out.columns,
          {out.column_x, out.column_y, 1}, W, H, C, H, false);
}

// out[c, y, x] = sum_x' rows[y][x][x'] v[c, y, x'] + sum_y' columns[x][y][y'] v[c, y', x].
template <typename T>
void gather_plane(Blocks<const T> attention, Plane<const T> v, Plane<T> out, int64_t C, int64_t H, int64_t W) {
  // Per y: (C x W') x (W' x W), the row block read transposed.
  gemm<T>(v.data, {v.y_stride, v.c_stride, v.x_stride}, attention.rows, {attention.row_y, 1, attention.row_x},
          out.data, {out.y_stride, out.c_stride, out.x_stride}, H, C, W, W, false);
  // Per x: (C x H') x (H' x H), the column block read transposed.
  gemm<T>(v.data, {v.x_stride, v.c_stride, v.y_stride}, attention.columns, {attention.column_x, 1, attention.column_y},
          out.data, {out.x_stride, out.c_stride, out.y_stride}, W, C, H, H, true);
}

// out[c, y, x'] = sum_x g[c, y, x] rows[y][x][x'] + (at (y', x)) sum_y g[c, y, x] columns[x][y][y'].
template <typename T>
void scatter_plane(Blocks<const T> attention, Plane<const T> g, Plane<T> out, int64_t C, int64_t H, int64_t W) {
  // Per y: (C x W) x (W x W').
  gemm<T>(g.data, {g.y_stride, g.c_stride, g.x_stride}, attention.rows, {attention.row_y, attention.row_x, 1},
          out.data, {out.y_stride, out.c_stride, out.x_stride}, H, C, W, W, false);
  // Per x: (C x H) x (H x H').
  gemm<T>(g.data, {g.x_stride, g.c_stride, g.y_stride}, attention.columns, {attention.column_x, attention.column_y, 1},
          out.data, {out.x_stride, out.c_stride, out.y_stride}, W, C, H, H, true);
}

// ---------------------------------------------------------------------------------------------------------------
// The joint softmax of float32 blocks and its backward, pixel by pixel (ATen's tensor operations take about ten
// passes over the blocks, each larger than the caches); other dtypes through those tensor operations (ops.cpp).

using FloatVector = Vector<float>;
typedef int IntVector __attribute__((vector_size(kVectorBytes)));

// exp(x) for x <= 0, 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor polynomial of degree 7
// (relative error below 2e-7), times 2^n put into the exponent bits; x < -87 (e.g. -inf) gives 0, NaN gives NaN.
inline FloatVector exp_nonpositive(FloatVector x) {
  const FloatVector round_shift = FloatVector{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const FloatVector n = (x * 1.44269504f + round_shift) - round_shift;
  const FloatVector r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts
  FloatVector p = FloatVector{} + 1.0f / 5040;
  for (float coefficient : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + coefficient;
  const IntVector exponent = (__builtin_convertvector(n, IntVector) + 127) << 23;
  FloatVector scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return x < -87.0f ? FloatVector{} : p * scale;
}

// out[i] = exp(in[i] - maximum) for i < count (vectors, then single lanes); returns their sum.
inline float exp_shifted(const float* in, float* out, int64_t count, float maximum) {
  constexpr int L = kLanes<float>;
  FloatVector sums{};
  int64_t i = 0;
  for (; i + L <= count; i += L) {
    const FloatVector e = exp_nonpositive(load(in + i) - maximum);
    store(out + i, e);
    sums += e;
  }
  float sum = 0;
  for (int lane = 0; lane < L; ++lane) sum += sums[lane];
  if (i < count) {
    FloatVector tail = FloatVector{} - __builtin_inff();
    std::memcpy(&tail, in + i, (count - i) * sizeof(float));
    const FloatVector e = exp_nonpositive(tail - maximum);
    for (int64_t lane = 0; lane < count - i; ++lane) {
      out[i + lane] = e[lane];
      sum += e[lane];
    }
  }
  return sum;
}

// In place on float32 blocks: energies -> attention, the softmax over each pixel's W row keys and H - 1 column keys
// (the diagonal of columns is set to -inf first, so its weight is 0); tasks (n, y) in parallel.
void softmax_float_(at::Tensor& rows, at::Tensor& columns) {
  const int64_t N = rows.size(0), H = rows.size(1), W = rows.size(2);
  float* row_data = rows.data_ptr<float>();
  float* column_data = columns.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, y = task % H;
      for (int64_t x = 0; x < W; ++x) {
        float* row = row_data + n * rows.stride(0) + y * rows.stride(1) + x * rows.stride(2);
        float* column = column_data + n * columns.stride(0) + x * columns.stride(1) + y * columns.stride(2);
        column[y] = -__builtin_inff();
        float maximum = -__builtin_inff();
        for (int64_t i = 0; i < W; ++i) maximum = std::max(maximum, row[i]);
        for (int64_t i = 0; i < H; ++i) maximum = std::max(maximum, column[i]);
        const float inverse = 1.0f / (exp_shifted(row, row, W, maximum) + exp_shifted(column, column, H, maximum));
        for (int64_t i = 0; i < W; ++i) row[i] *= inverse;
        for (int64_t i = 0; i < H; ++i) column[i] *= inverse;
      }
    }
  });
}

void softmax_cpu(const at::Tensor& energy_rows, const at::Tensor& energy_columns, at::Tensor& rows,
                 at::Tensor& columns) {
  if (rows.scalar_type() != at::kFloat || !rows.is_same(energy_rows) || !columns.is_same(energy_columns)) {
    return softmax_by_tensor_ops(energy_rows, energy_columns, rows, columns);
  }
  softmax_float_(rows, columns);
}

// sum_i a[i] * b[i] for i < count.
inline float dot(const float* a, const float* b, int64_t count) {
  constexpr int L = kLanes<float>;
  FloatVector sums{};
  int64_t i = 0;
  for (; i + L <= count; i += L) sums += load(a + i) * load(b + i);
  float sum = 0;
  for (int lane = 0; lane < L; ++lane) sum += sums[lane];
  for (; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

// In place on float32 blocks: grad of the attention -> grad of the energies, attention * (grad - sum_keys(attention
// * grad)), the diagonal of grad_columns 0; tasks (n, y) in parallel.
void softmax_backward_float_(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                             const at::Tensor& columns) {
  const int64_t N = rows.size(0), H = rows.size(1), W = rows.size(2);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H, y = task % H;
      for (int64_t x = 0; x < W; ++x) {
        float* grad_row = grad_rows.data_ptr<float>() + n * grad_rows.stride(0) + y * grad_rows.stride(1) +
                          x * grad_rows.stride(2);
        float* grad_column = grad_columns.data_ptr<float>() + n * grad_columns.stride(0) +
                             x * grad_columns.stride(1) + y * grad_columns.stride(2);
        const float* row = rows.data_ptr<float>() + n * rows.stride(0) + y * rows.stride(1) + x * rows.stride(2);
        const float* column = columns.data_ptr<float>() + n * columns.stride(0) + x * columns.stride(1) +
                              y * columns.stride(2);
        grad_column[y] = 0;  // not a key (its attention is 0 too): whatever the product left there
        const float total = dot(grad_row, row, W) + dot(grad_column, column, H);
        for (int64_t i = 0; i < W; ++i) grad_row[i] = row[i] * (grad_row[i] - total);
        for (int64_t i = 0; i < H; ++i) grad_column[i] = column[i] * (grad_column[i] - total);
      }
    }
  });
}

void softmax_backward_cpu_(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                           const at::Tensor& columns) {
  if (rows.scalar_type() != at::kFloat || grad_rows.scalar_type() != at::kFloat) {
    return softmax_backward_by_tensor_ops_(grad_rows, grad_columns, rows, columns);
  }
  softmax_backward_float_(grad_rows, grad_columns, rows, columns);
}

// ---------------------------------------------------------------------------------------------------------------
// The CPU kernels: the micro-kernel for float32 / float64, ATen's batched matrix multiply for 16-bit types.

bool micro_kernel_takes(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// Whether element (n, c, y, x) of `t` lies at n * stride(0) + c * stride(1) + (y * W + x) * stride(3): each image a
// (C x H*W) matrix (NCHW, NHWC and their channel slices).
bool pixels_in_one_stride(const at::Tensor& t) { return t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3); }

// dst = src for float32 / float64 features in two memory formats: each image's (C x H*W) matrix transposed in
// 8 x 8 blocks, panels of 64 pixels in parallel (ATen's copy_ of a transposed tensor is several times slower);
// other cases through copy_.
void copy_features_cpu(const at::Tensor& src, const at::Tensor& dst) {
  if (!micro_kernel_takes(src) || src.scalar_type() != dst.scalar_type() || !pixels_in_one_stride(src) ||
      !pixels_in_one_stride(dst) || src.sizes() != dst.sizes()) {
    dst.copy_(src);
    return;
  }
  constexpr int64_t kPanel = 64;
  const int64_t N = src.size(0), C = src.size(1), P = src.size(2) * src.size(3);
  const int64_t panels = (P + kPanel - 1) / kPanel;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ccnet_copy_features_cpu", [&] {
    const scalar_t* from = src.data_ptr<scalar_t>();
    scalar_t* to = dst.data_ptr<scalar_t>();
    at::parallel_for(0, N * panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / panels, p0 = task % panels * kPanel, count = std::min(kPanel, P - p0);
        const scalar_t* panel_from = from + n * src.stride(0) + p0 * src.stride(3);
        scalar_t* panel_to = to + n * dst.stride(0) + p0 * dst.stride(3);
        if (src.stride(3) == 1 && dst.stride(1) == 1) {  // NCHW -> NHWC
          transpose<scalar_t>(panel_from, src.stride(1), panel_to, dst.stride(3), C, count);
        } else if (src.stride(1) == 1 && dst.stride(3) == 1) {  // NHWC -> NCHW
          transpose<scalar_t>(panel_from, src.stride(3), panel_to, dst.stride(1), count, C);
        } else {
          copy_2d<scalar_t>(panel_from, src.stride(1), src.stride(3), panel_to, dst.stride(1), dst.stride(3), C,
                            count);
        }
      }
    });
  });
}

// Image n of the features `t` as the micro-kernel takes it, (1, C, H, W) with a unit channel stride: t[n] itself,
// or a channels-last copy of it. One image at a time, so that a copy is the size of one image: glibc reuses such
// blocks from call to call, while a batch-sized block above its mmap threshold (32 MB) would be mapped and faulted
// in anew at every call.
at::Tensor image_for_products(const at::Tensor& t, int64_t n) {
  const at::Tensor image = t.narrow(0, n, 1);
  if (image.stride(1) == 1 || image.size(1) == 1) return image;
  at::Tensor copy = at::empty(image.sizes(), image.options().memory_format(at::MemoryFormat::ChannelsLast));
  copy_features_cpu(image, copy);
  return copy;
}

// Runs product(target) for image n of `out`: into it, or into a channels-last image copied into it afterwards.
template <typename Product>
void write_image(const at::Tensor& out, int64_t n, Product product) {
  at::Tensor image = out.narrow(0, n, 1);
  if (image.stride(1) == 1 || image.size(1) == 1) {
    product(image);
    return;
  }
  at::Tensor work = at::empty(image.sizes(), image.options().memory_format(at::MemoryFormat::ChannelsLast));
  product(work);
  copy_features_cpu(work, image);
}

void affinity_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& rows, at::Tensor& columns) {
  if (rows.scalar_type() == at::kFloat && a.scalar_type() != at::kFloat) {  // float32 energies of 16-bit features
    return affinity_cpu(a.to(at::kFloat), b.to(at::kFloat), rows, columns);
  }
  if (!micro_kernel_takes(a)) return affinity_by_matmul(a, b, rows, columns);
  const int64_t C = a.size(1), H = a.size(2), W = a.size(3);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "ccnet_affinity_cpu", [&] {
    for (int64_t n = 0; n < a.size(0); ++n)
      affinity_plane<scalar_t>(plane<const scalar_t>(image_for_products(a, n), 0),
                               plane<const scalar_t>(image_for_products(b, n), 0), blocks<scalar_t>(rows, columns, n),
                               C, H, W);
  });
}

void gather_cpu(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& v, at::Tensor& out) {
  if (!micro_kernel_takes(v)) return gather_by_matmul(rows, columns, v, out);
  const int64_t C = v.size(1), H = v.size(2), W = v.size(3);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ccnet_gather_cpu", [&] {
    for (int64_t n = 0; n < v.size(0); ++n) {
      const at::Tensor v_n = image_for_products(v, n);
      write_image(out, n, [&](const at::Tensor& target) {
        gather_plane<scalar_t>(blocks<const scalar_t>(rows, columns, n), plane<const scalar_t>(v_n, 0),
                               plane<scalar_t>(target, 0), C, H, W);
      });
    }
  });
}

void scatter_cpu(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& g, at::Tensor& out) {
  if (!micro_kernel_takes(g)) return scatter_by_matmul(rows, columns, g, out);
  const int64_t C = g.size(1), H = g.size(2), W = g.size(3);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "ccnet_scatter_cpu", [&] {
    for (int64_t n = 0; n < g.size(0); ++n) {
      const at::Tensor g_n = image_for_products(g, n);
      write_image(out, n, [&](const at::Tensor& target) {
        scatter_plane<scalar_t>(blocks<const scalar_t>(rows, columns, n), plane<const scalar_t>(g_n, 0),
                                plane<scalar_t>(target, 0), C, H, W);
      });
    }
  });
}

// The products convert NCHW features to channels-last themselves, image by image (image_for_products).
const DeviceKernels kCpuKernels{affinity_cpu, gather_cpu, scatter_cpu, softmax_cpu, softmax_backward_cpu_,
                                /*needs_unit_channel_stride=*/false};

}  // namespace
}  // namespace ccnet

TORCH_LIBRARY_IMPL(ccnet, CPU, m) { ccnet::register_device(m, c10::DeviceType::CPU, ccnet::kCpuKernels); }
