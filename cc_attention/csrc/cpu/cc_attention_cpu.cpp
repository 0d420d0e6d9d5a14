// Criss-cross attention on the CPU: forward and backward of ca_weight and ca_map (float32, float64).
//
// Layout (the original CUDA extension's): for the pixel (y, x) of an (N, H+W-1, H, W) attention tensor, channels
// [0, W) are the keys on the same row (x' = 0..W-1, self included) and channels [W, W+H-1) the keys on the same
// column with y' != y, in increasing y'.
//
// Three products cover the forward and backward of both ops:
//   affinity(a, b)[k, y, x]  = <a[:, y, x], b[:, key_k(y, x)]>              ca_weight; grad of attention in ca_map
//   gather(A, v)[c, y, x]    = sum_k A[k, y, x] v[c, key_k(y, x)]          ca_map; grad of query in ca_weight
//   scatter(A, g)[c, p]      = sum_{(k, y, x): key_k(y, x) = p} A[k, y, x] g[c, y, x]
//                                                                          grad of value / key
// Each splits into a row part (a batch of small GEMMs, one per image row) and a column part (one per image column,
// with the column channels of the attention spread into a dense (H, H) matrix with a zero diagonal). Each GEMM
// packs its panels into contiguous buffers; the micro-kernel keeps a block of accumulators in vector registers
// (GCC/Clang vector extension) and streams them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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

// dst[r * d_row + c * d_col] (+)= src[r * s_row + c * s_col] for r < rows, c < cols, in square blocks so that
// both sides touch few cache lines and pages at a time (the strided side of a transpose).
template <typename T, bool kAdd = false>
void copy_2d(const T* src, int64_t s_row, int64_t s_col, T* dst, int64_t d_row, int64_t d_col, int64_t rows,
             int64_t cols) {
  if (!kAdd && s_col == 1 && d_col == 1) {  // rows are contiguous on both sides
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * d_row, src + r * s_row, cols * sizeof(T));
    return;
  }
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          if constexpr (kAdd)
            dst[r * d_row + c * d_col] += src[r * s_row + c * s_col];
          else
            dst[r * d_row + c * d_col] = src[r * s_row + c * s_col];
        }
    }
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

// ---------------------------------------------------------------------------------------------------------------
// Layout changes: the column channels of an attention map as dense per-column matrices with a zero diagonal (the
// pixel itself is a row key), so that the column part of every product is a batch of GEMMs over x.

// Per-column matrices of the column channels. Column channel j of the pixel (y, x) is the key row
// y' = j + (j >= y); seen from the key row, the pixels y < y' hold it in channel W + y' - 1, those y > y' in W + y'.

// M[x, y', y] = attention[W + j, y, x], zero where y' == y. M is (W, H, H).
template <typename T>
void column_channels_to_matrices(const T* attention, T* M, int64_t H, int64_t W) {
  const int64_t HW = H * W, HH = H * H;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t yk = begin; yk < end; ++yk) {
      T* m = M + yk * H;
      if (yk > 0) copy_2d<T>(attention + (W + yk - 1) * HW, W, 1, m, 1, HH, yk, W);
      if (yk + 1 < H) copy_2d<T>(attention + (W + yk) * HW + (yk + 1) * W, W, 1, m + yk + 1, 1, HH, H - 1 - yk, W);
      for (int64_t x = 0; x < W; ++x) m[yk + x * HH] = T(0);
    }
  });
}

// attention[W + j, y, x] = M[x, y', y]: the inverse of column_channels_to_matrices.
template <typename T>
void matrices_to_column_channels(const T* M, T* attention, int64_t H, int64_t W) {
  const int64_t HW = H * W, HH = H * H;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t yk = begin; yk < end; ++yk) {
      const T* m = M + yk * H;
      if (yk > 0) copy_2d<T>(m, 1, HH, attention + (W + yk - 1) * HW, W, 1, yk, W);
      if (yk + 1 < H) copy_2d<T>(m + yk + 1, 1, HH, attention + (W + yk) * HW + (yk + 1) * W, W, 1, H - 1 - yk, W);
    }
  });
}

// M[x, y, y'] = attention[W + j, y, x], zero where y' == y: the per-column matrices transposed.
template <typename T>
void column_channels_to_transposed_matrices(const T* attention, T* M, int64_t H, int64_t W) {
  const int64_t HW = H * W, HH = H * H;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t y = begin; y < end; ++y) {
      const T* channels = attention + W * HW + y * W;  // channel W + j of row y
      T* m = M + y * H;
      copy_2d<T>(channels, HW, 1, m, 1, HH, y, W);                         // y' = j < y
      copy_2d<T>(channels + y * HW, HW, 1, m + y + 1, 1, HH, H - 1 - y, W);  // y' = j + 1 > y
      for (int64_t x = 0; x < W; ++x) m[y + x * HH] = T(0);
    }
  });
}

// Channels per pass of a column part: within a pass, consecutive columns x reuse the same cache lines.
constexpr int64_t kChannelsPerPass = 32;

// Scratch elements of the products below: the per-column matrices.
int64_t scratch_size(int64_t H, int64_t W) { return W * H * H; }

// ---------------------------------------------------------------------------------------------------------------
// The three products for one batch element. a, b, v, g, out: (C, H, W); attention: (H+W-1, H, W); contiguous.

// out[k, y, x] = <a[:, y, x], b[:, key_k(y, x)]>.
template <typename T>
void affinity(const T* a, const T* b, T* out, T* scratch, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  // Row part, per y: out[x', y, x] = sum_c b[c, y, x'] a[c, y, x].
  batched_gemm<T>(b, {W, 1, HW}, a, {W, HW, 1}, out, {W, HW, 1}, H, W, C, W, false);
  if (H == 1) return;
  // Column part, per x: M[x, y', y] = sum_c b[c, y', x] a[c, y, x], over passes of channels.
  T* M = scratch;
  for (int64_t c0 = 0; c0 < C; c0 += kChannelsPerPass) {
    const int64_t channels = std::min(kChannelsPerPass, C - c0);
    batched_gemm<T>(b + c0 * HW, {1, W, HW}, a + c0 * HW, {1, HW, W}, M, {H * H, H, 1}, W, H, channels, H, c0 > 0);
  }
  matrices_to_column_channels<T>(M, out, H, W);
}

// Column part of gather and scatter: out[c, y, x] += sum_z g[c, z, x] M[x, z, y], over passes of channels.
template <typename T>
void add_column_product(const T* M, const T* g, T* out, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  for (int64_t c0 = 0; c0 < C; c0 += kChannelsPerPass) {
    const int64_t channels = std::min(kChannelsPerPass, C - c0);
    batched_gemm<T>(g + c0 * HW, {1, HW, W}, M, {H * H, H, 1}, out + c0 * HW, {1, HW, W}, W, channels, H, H, true);
  }
}

// out[c, y, x] = sum_k attention[k, y, x] v[c, key_k(y, x)].
template <typename T>
void gather(const T* attention, const T* v, T* out, T* scratch, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  // Row part, per y: out[c, y, x] = sum_x' v[c, y, x'] attention[x', y, x].
  batched_gemm<T>(v, {W, HW, 1}, attention, {W, HW, 1}, out, {W, HW, 1}, H, C, W, W, false);
  if (H == 1) return;
  // Column part: out[c, y, x] += sum_y' v[c, y', x] M[x, y', y].
  column_channels_to_matrices<T>(attention, scratch, H, W);
  add_column_product<T>(scratch, v, out, C, H, W);
}

// out[c, y', x'] = sum over the pixels (y, x) whose key k is (y', x') of attention[k, y, x] g[c, y, x].
template <typename T>
void scatter(const T* attention, const T* g, T* out, T* scratch, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  // Row part, per y: out[c, y, x'] = sum_x g[c, y, x] attention[x', y, x] (row attention read transposed).
  batched_gemm<T>(g, {W, HW, 1}, attention, {W, 1, HW}, out, {W, HW, 1}, H, C, W, W, false);
  if (H == 1) return;
  // Column part: out[c, y', x] += sum_y g[c, y, x] M[x, y, y'].
  column_channels_to_transposed_matrices<T>(attention, scratch, H, W);
  add_column_product<T>(scratch, g, out, C, H, W);
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points. Inputs are checked in Python; here only what would make the kernel read out of bounds.
// Tensors must be contiguous in (C, H, W); the batch stride is free (e.g. channel slices of one (N, C1+C2, H, W)).

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, name, " must have 4 dimensions, got ", t.sizes());
  TORCH_CHECK(t.size(0) == 0 || t[0].is_contiguous(), name,
              " must be contiguous in its last three dimensions, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Runs product(first[n], second[n], out[n], scratch) for every batch element n.
template <typename Product>
at::Tensor batched(const at::Tensor& first, const at::Tensor& second, std::vector<int64_t> out_shape,
                   int64_t scratch_elements, Product product) {
  at::Tensor out = at::empty(out_shape, first.options());
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "cc_attention_cpu", [&] {
    at::Tensor scratch = at::empty({scratch_elements}, first.options());
    const int64_t first_stride = first.stride(0), second_stride = second.stride(0), out_stride = out.stride(0);
    for (int64_t n = 0; n < first.size(0); ++n)
      product(first.data_ptr<scalar_t>() + n * first_stride, second.data_ptr<scalar_t>() + n * second_stride,
              out.data_ptr<scalar_t>() + n * out_stride, scratch.data_ptr<scalar_t>());
  });
  return out;
}

// affinity(a, b): (N, C, H, W) x (N, C, H, W) -> (N, H+W-1, H, W).
at::Tensor affinity_batched(const at::Tensor& a, const at::Tensor& b) {
  const int64_t C = a.size(1), H = a.size(2), W = a.size(3);
  return batched(a, b, {a.size(0), H + W - 1, H, W}, scratch_size(H, W), [&](auto pa, auto pb, auto po, auto s) {
    affinity(pa, pb, po, s, C, H, W);
  });
}

// gather(attention, v): (N, H+W-1, H, W) x (N, C, H, W) -> (N, C, H, W).
at::Tensor gather_batched(const at::Tensor& attention, const at::Tensor& v) {
  const int64_t C = v.size(1), H = v.size(2), W = v.size(3);
  return batched(attention, v, {v.size(0), C, H, W}, scratch_size(H, W), [&](auto pa, auto pv, auto po, auto s) {
    gather(pa, pv, po, s, C, H, W);
  });
}

// scatter(attention, g): (N, H+W-1, H, W) x (N, C, H, W) -> (N, C, H, W).
at::Tensor scatter_batched(const at::Tensor& attention, const at::Tensor& g) {
  const int64_t C = g.size(1), H = g.size(2), W = g.size(3);
  return batched(attention, g, {g.size(0), C, H, W}, scratch_size(H, W),
                 [&](auto pa, auto pg, auto po, auto s) { scatter(pa, pg, po, s, C, H, W); });
}

at::Tensor ca_weight_forward(const at::Tensor& query, const at::Tensor& key) {
  check_input(query, "query");
  check_input(key, "key");
  return affinity_batched(query, key);
}

std::vector<at::Tensor> ca_weight_backward(const at::Tensor& grad_energy, const at::Tensor& query,
                                           const at::Tensor& key) {
  check_input(grad_energy, "grad_energy");
  check_input(query, "query");
  check_input(key, "key");
  return {gather_batched(grad_energy, key), scatter_batched(grad_energy, query)};
}

at::Tensor ca_map_forward(const at::Tensor& attention, const at::Tensor& value) {
  check_input(attention, "attention");
  check_input(value, "value");
  return gather_batched(attention, value);
}

std::vector<at::Tensor> ca_map_backward(const at::Tensor& grad_out, const at::Tensor& attention,
                                        const at::Tensor& value) {
  check_input(grad_out, "grad_out");
  check_input(attention, "attention");
  check_input(value, "value");
  return {affinity_batched(grad_out, value), scatter_batched(attention, grad_out)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ca_weight_forward", &ca_weight_forward, "criss-cross energies (N,C',H,W)x(N,C',H,W)->(N,H+W-1,H,W)");
  m.def("ca_weight_backward", &ca_weight_backward, "gradients of ca_weight w.r.t. query and key");
  m.def("ca_map_forward", &ca_map_forward, "criss-cross aggregation (N,H+W-1,H,W)x(N,C,H,W)->(N,C,H,W)");
  m.def("ca_map_backward", &ca_map_backward, "gradients of ca_map w.r.t. attention and value");
}
