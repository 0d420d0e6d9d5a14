// Criss-cross attention: what the device kernels provide and what the shared op code (ops.cpp) builds from them.
//
// Features are (N, C, H, W) tensors in any memory format (NCHW, NHWC, channel slices of a larger tensor). The
// attention of the pixel (y, x) over its H + W - 1 keys is kept in two blocks, each a batch of dense matrices that
// the matrix products read and write in place:
//
//   rows    (N, H, W, W): rows[n, y, x, x']    -- the keys on the pixel's row (x' = x included);
//   columns (N, W, H, H): columns[n, x, y, y'] -- the keys on its column; the diagonal y' = y is not a key (the
//                                                  pixel is already a row key): its attention is zero.
//
// The last dimension of each block is contiguous; the blocks are views of buffers padded along it (ops.cpp), so
// that every matrix is 16-byte aligned.
//
// The public layout (N, H+W-1, H, W) of ca_weight / ca_map -- channels [0, W) the row keys, [W, W+H-1) the column
// keys y' != y in increasing order -- is converted to and from the blocks in ops.cpp.
#pragma once

#include <torch/extension.h>

namespace ccnet {

// The three products every forward and backward pass is made of, the joint softmax over a pixel's row and column
// keys and its backward. One set per device (cpu/cc_attention_cpu.cpp, cuda/cc_attention_cuda.cu).
struct DeviceKernels {
  // rows[n, y, x, x'] = <a[n, :, y, x], b[n, :, y, x']>; columns[n, x, y, y'] = <a[n, :, y, x], b[n, :, y', x]>
  // (the diagonal of columns gets a value that the softmax ignores).
  void (*affinity)(const at::Tensor& a, const at::Tensor& b, at::Tensor& rows, at::Tensor& columns);
  // out[n, c, y, x] = sum_x' rows[n, y, x, x'] v[n, c, y, x'] + sum_y' columns[n, x, y, y'] v[n, c, y', x].
  void (*gather)(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& v, at::Tensor& out);
  // The transpose of gather: out[n, c, p] = sum over the pixels q that have p as a key of attention(q -> p) g[n, c, q].
  void (*scatter)(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& g, at::Tensor& out);
  // Energies -> attention: rows / columns = a softmax over each pixel's W row keys and H - 1 column keys of
  // energy_rows / energy_columns together (float32 arithmetic for 16-bit types); the diagonal of columns becomes 0.
  // The energies are the attention blocks themselves (in place) or float32 blocks of the same shape for 16-bit
  // attention (then they may be overwritten). An energy of -inf gets the weight 0, like torch.softmax.
  void (*softmax)(const at::Tensor& energy_rows, const at::Tensor& energy_columns, at::Tensor& rows,
                  at::Tensor& columns);
  // In place: grad of the attention -> grad of the energies, attention * (grad - sum_keys(attention * grad)).
  void (*softmax_backward_)(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                            const at::Tensor& columns);
  // Whether the products need features with a unit channel stride (NHWC-like); others are converted first.
  bool needs_unit_channel_stride;
};

// Design choices that only a GPU can measure, each with a switch (set from Python: cc_attention/library.py reads
// CCNET_CC_ENERGY_DTYPE, CCNET_CC_COLUMN_GEMM, CCNET_CC_SOFTMAX_LOADS once, through the ccnet::set_design_choice
// operator). Set them before running the op, not while it runs.
struct DesignChoices {
  // 16-bit features: energies (the softmax's input) in float32 blocks ("float32"), or in the attention's own 16-bit
  // blocks ("input": no extra buffer, but |q.k| > 65504 overflows in float16). Every device.
  bool energies_in_float32 = true;
  // CUDA: the column products as one pointer-array batched GEMM over every (n, x) ("batched"), or one
  // strided-batched GEMM per image ("per_image").
  bool batched_column_gemm = true;
  // CUDA: the softmax reads and writes 16-byte vectors of its blocks ("vector") or single elements ("scalar").
  bool vectorized_softmax = true;
};

const DesignChoices& design_choices();

// Makes `kernels` the ones used for tensors on `device` and registers the ccnet ops' kernels for its dispatch key
// (called from each device file's TORCH_LIBRARY_IMPL block).
void register_device(torch::Library& library, c10::DeviceType device, const DeviceKernels& kernels);

// The products through ATen's batched matrix multiply on strided views of the features and blocks (no copies where
// cuBLAS / the CPU BLAS take the strides): the CUDA kernels, and the CPU kernels for 16-bit types.
// `column_matmul`, where given: a device's single call for a column part's batch over (n, x) (4-D tensors
// out[n, x] = a[n, x] @ b[n, x], or += with `accumulate`), used when design_choices().batched_column_gemm.
// The energies (`rows`, `columns` of affinity) may be float32 for 16-bit features (CUDA only).
using ColumnMatmul = void (*)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);
void affinity_by_matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& rows, at::Tensor& columns,
                        ColumnMatmul column_matmul = nullptr);
void gather_by_matmul(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& v, at::Tensor& out,
                      ColumnMatmul column_matmul = nullptr);
void scatter_by_matmul(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& g, at::Tensor& out,
                       ColumnMatmul column_matmul = nullptr);

// The joint softmax and its backward as ATen tensor operations (the CPU kernels for other types than float32).
void softmax_by_tensor_ops(const at::Tensor& energy_rows, const at::Tensor& energy_columns, at::Tensor& rows,
                           at::Tensor& columns);
void softmax_backward_by_tensor_ops_(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                                     const at::Tensor& columns);

}  // namespace ccnet
