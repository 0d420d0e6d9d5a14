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
  // In place: energies -> attention, a softmax over each pixel's W row keys and H - 1 column keys together (computed
  // in float32 for 16-bit types); the diagonal of columns becomes 0.
  void (*softmax_)(at::Tensor& rows, at::Tensor& columns);
  // In place: grad of the attention -> grad of the energies, attention * (grad - sum_keys(attention * grad)).
  void (*softmax_backward_)(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                            const at::Tensor& columns);
  // Whether the products need features with a unit channel stride (NHWC-like); others are converted first.
  bool needs_unit_channel_stride;
};

// Makes `kernels` the ones used for tensors on `device` and registers the ccnet ops' kernels for its dispatch key
// (called from each device file's TORCH_LIBRARY_IMPL block).
void register_device(torch::Library& library, c10::DeviceType device, const DeviceKernels& kernels);

// The products through ATen's batched matrix multiply on strided views of the features and blocks (no copies where
// cuBLAS / the CPU BLAS take the strides): the CUDA kernels, and the CPU kernels for 16-bit types.
void affinity_by_matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& rows, at::Tensor& columns);
void gather_by_matmul(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& v, at::Tensor& out);
void scatter_by_matmul(const at::Tensor& rows, const at::Tensor& columns, const at::Tensor& g, at::Tensor& out);

// The joint softmax and its backward as ATen tensor operations (the CPU kernels).
void softmax_by_tensor_ops_(at::Tensor& rows, at::Tensor& columns);
void softmax_backward_by_tensor_ops_(at::Tensor& grad_rows, at::Tensor& grad_columns, const at::Tensor& rows,
                                     const at::Tensor& columns);

}  // namespace ccnet
