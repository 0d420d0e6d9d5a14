// Criss-cross attention on CUDA: forward and backward of ca_weight and ca_map (float32, float16, bfloat16).
//
// Layout (the original CUDA extension's): for the pixel (y, x) of an (N, H+W-1, H, W) attention tensor, channels
// [0, W) are the keys on the same row (x' = 0..W-1, self included) and channels [W, W+H-1) the keys on the same
// column with y' != y, in increasing y'.
//
// Three products cover the forward and backward of both ops (see csrc/cpu for the same decomposition):
//   affinity(a, b)[k, y, x] = <a[:, y, x], b[:, key_k(y, x)]>           ca_weight; grad of attention in ca_map
//   gather(A, v)[c, y, x]   = sum_k A[k, y, x] v[c, key_k(y, x)]       ca_map; grad of query in ca_weight
//   scatter(A, g)[c, p]     = sum_{(k, y, x): key_k(y, x) = p} A[k, y, x] g[c, y, x]     grad of value / key
//
// Every product is a row part (one GEMM per image row) plus a column part (one GEMM per image column). Both run as
// strided-batched cuBLAS GEMMs (tensor cores for half / bfloat16, fp32 accumulation) on permuted views -- instead
// of the original's per-pixel loops over channels. Two CUDA kernels move the column channels of an attention map
// to and from dense per-column matrices M[n, x, y', y] (zero diagonal: the pixel itself is a row key). Everything
// runs on the current CUDA stream of the tensors' device.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `elements` (capped: each thread then handles several elements).
inline unsigned int blocks_for(int64_t elements) {
  return static_cast<unsigned int>(std::min<int64_t>((elements + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// M[n, x, y', y] = attention[n, W + j, y, x] with y' = j + (j >= y); zero where y' == y. One thread per element of
// the attention's column channels (x fastest: coalesced reads), plus the diagonal.
template <typename scalar_t>
__global__ void column_channels_to_matrices_kernel(const scalar_t* __restrict__ attention, int64_t attention_batch,
                                                   scalar_t* __restrict__ M, int64_t N, int64_t H, int64_t W) {
  const int64_t total = N * H * H * W;  // (n, y', y, x), the diagonal included
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = index % W;
    const int64_t y = (index / W) % H;
    const int64_t yk = (index / (W * H)) % H;
    const int64_t n = index / (W * H * H);
    scalar_t value = scalar_t(0);
    if (yk != y) value = attention[n * attention_batch + ((W + yk - (yk > y)) * H + y) * W + x];
    M[((n * W + x) * H + yk) * H + y] = value;
  }
}

// attention[n, W + j, y, x] = M[n, x, y', y] with y' = j + (j >= y): the inverse (the diagonal is dropped).
template <typename scalar_t>
__global__ void matrices_to_column_channels_kernel(const scalar_t* __restrict__ M, scalar_t* __restrict__ attention,
                                                   int64_t N, int64_t H, int64_t W) {
  const int64_t total = N * (H - 1) * H * W;  // (n, j, y, x)
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = index % W;
    const int64_t y = (index / W) % H;
    const int64_t j = (index / (W * H)) % (H - 1);
    const int64_t n = index / (W * H * (H - 1));
    const int64_t yk = j + (j >= y);
    attention[((n * (H + W - 1) + W + j) * H + y) * W + x] = M[((n * W + x) * H + yk) * H + y];
  }
}

// (N, W, H, H) per-column matrices of the column channels of attention (N, H+W-1, H, W).
at::Tensor column_matrices(const at::Tensor& attention, int64_t H, int64_t W) {
  const int64_t N = attention.size(0);
  at::Tensor M = at::empty({N, W, H, H}, attention.options());
  const int64_t total = N * H * H * W;
  if (total == 0) return M;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, attention.scalar_type(),
                                  "cc_attention_column_matrices", [&] {
    column_channels_to_matrices_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        attention.data_ptr<scalar_t>(), attention.stride(0), M.data_ptr<scalar_t>(), N, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return M;
}

// Writes the column channels of out (N, H+W-1, H, W), contiguous, from the matrices M (N, W, H, H), contiguous.
void write_column_channels(const at::Tensor& M, at::Tensor& out, int64_t H, int64_t W) {
  const int64_t N = out.size(0);
  const int64_t total = N * (H - 1) * H * W;
  if (total == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, out.scalar_type(),
                                  "cc_attention_column_channels", [&] {
    matrices_to_column_channels_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        M.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, H, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The three products. a, b, v, g: (N, C, H, W); attention: (N, H+W-1, H, W).

// (N, H+W-1, H, W): out[n, k, y, x] = <a[n, :, y, x], b[n, :, key_k(y, x)]>.
at::Tensor affinity(const at::Tensor& a, const at::Tensor& b) {
  const int64_t N = a.size(0), H = a.size(2), W = a.size(3);
  at::Tensor out = at::empty({N, H + W - 1, H, W}, a.options());
  // Row part, per (n, y): (W', C) x (C, W) -> out[n, x', y, x].
  const at::Tensor rows = at::matmul(b.permute({0, 2, 3, 1}), a.permute({0, 2, 1, 3}));  // (N, H, W', W)
  out.narrow(1, 0, W).copy_(rows.permute({0, 2, 1, 3}));
  if (H > 1) {
    // Column part, per (n, x): (H', C) x (C, H) -> M[n, x, y', y].
    const at::Tensor M = at::matmul(b.permute({0, 3, 2, 1}), a.permute({0, 3, 1, 2})).contiguous();
    write_column_channels(M, out, H, W);
  }
  return out;
}

// (N, C, H, W): out[n, c, y, x] = sum_k attention[n, k, y, x] v[n, c, key_k(y, x)].
at::Tensor gather(const at::Tensor& attention, const at::Tensor& v) {
  const int64_t H = v.size(2), W = v.size(3);
  // Row part, per (n, y): (C, W') x (W', W).
  at::Tensor out = at::matmul(v.permute({0, 2, 1, 3}), attention.narrow(1, 0, W).permute({0, 2, 1, 3}))
                       .permute({0, 2, 1, 3})
                       .contiguous();
  if (H > 1) {
    // Column part, per (n, x): (C, H') x (H', H) with the per-column matrices M[n, x, y', y].
    const at::Tensor M = column_matrices(attention, H, W);
    out.add_(at::matmul(v.permute({0, 3, 1, 2}), M).permute({0, 2, 3, 1}));
  }
  return out;
}

// (N, C, H, W): out[n, c, p] = sum over the pixels (y, x) whose key k is p of attention[n, k, y, x] g[n, c, y, x].
at::Tensor scatter(const at::Tensor& attention, const at::Tensor& g) {
  const int64_t H = g.size(2), W = g.size(3);
  // Row part, per (n, y): (C, W) x (W, W') with attention[n, x', y, x] read as [x, x'].
  at::Tensor out = at::matmul(g.permute({0, 2, 1, 3}), attention.narrow(1, 0, W).permute({0, 2, 3, 1}))
                       .permute({0, 2, 1, 3})
                       .contiguous();
  if (H > 1) {
    // Column part, per (n, x): (C, H) x (H, H') with the transposed per-column matrices.
    const at::Tensor M = column_matrices(attention, H, W);
    out.add_(at::matmul(g.permute({0, 3, 1, 2}), M.transpose(2, 3)).permute({0, 2, 3, 1}));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points. Inputs are checked in Python; here only what the kernels rely on.

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, name, " must have 4 dimensions, got ", t.sizes());
  TORCH_CHECK(t.size(0) == 0 || t[0].is_contiguous(), name,
              " must be contiguous in its last three dimensions, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

at::Tensor ca_weight_forward(const at::Tensor& query, const at::Tensor& key) {
  check_input(query, "query");
  check_input(key, "key");
  const c10::cuda::CUDAGuard guard(query.device());
  return affinity(query, key);
}

std::vector<at::Tensor> ca_weight_backward(const at::Tensor& grad_energy, const at::Tensor& query,
                                           const at::Tensor& key) {
  check_input(grad_energy, "grad_energy");
  check_input(query, "query");
  check_input(key, "key");
  const c10::cuda::CUDAGuard guard(query.device());
  return {gather(grad_energy, key), scatter(grad_energy, query)};
}

at::Tensor ca_map_forward(const at::Tensor& attention, const at::Tensor& value) {
  check_input(attention, "attention");
  check_input(value, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  return gather(attention, value);
}

std::vector<at::Tensor> ca_map_backward(const at::Tensor& grad_out, const at::Tensor& attention,
                                        const at::Tensor& value) {
  check_input(grad_out, "grad_out");
  check_input(attention, "attention");
  check_input(value, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  return {affinity(grad_out, value), scatter(attention, grad_out)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ca_weight_forward", &ca_weight_forward, "criss-cross energies (N,C',H,W)x(N,C',H,W)->(N,H+W-1,H,W)");
  m.def("ca_weight_backward", &ca_weight_backward, "gradients of ca_weight w.r.t. query and key");
  m.def("ca_map_forward", &ca_map_forward, "criss-cross aggregation (N,H+W-1,H,W)x(N,C,H,W)->(N,C,H,W)");
  m.def("ca_map_backward", &ca_map_backward, "gradients of ca_map w.r.t. attention and value");
}
