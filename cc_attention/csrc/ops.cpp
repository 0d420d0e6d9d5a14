// The ccnet:: operators: schemas, the forward and backward passes composed from a device's kernels, autograd.
//
// Public operators (what cc_attention.functions calls):
//   criss_cross_attention(query, key, value) -> out       ca_map(softmax(ca_weight(query, key)), value), fused
//   ca_weight(query, key) -> energy (N, H+W-1, H, W)        the public attention layout of the original
//   ca_map(attention, value) -> out
// Their forward / backward operators (functional, one per pass) are what autograd records; torch.compile and
// torch.export see them too (their fake kernels are registered in Python, cc_attention/library.py).
#include "cc_attention.h"

#include <array>
#include <optional>
#include <string>
#include <limits>
#include <tuple>

namespace ccnet {
namespace {

using at::Tensor;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------------------------------------------------------
// The devices' kernels.

std::array<const DeviceKernels*, 2> registered_kernels{};  // [CPU, CUDA]

int device_slot(c10::DeviceType device) {
  return device == c10::DeviceType::CPU ? 0 : device == c10::DeviceType::CUDA ? 1 : -1;
}

// ---------------------------------------------------------------------------------------------------------------
// The design choices (cc_attention.h), set from Python (library.py reads the environment once).

DesignChoices choices;

void set_design_choice(const std::string& name, const std::string& value) {
  if (name == "energy_dtype" && (value == "float32" || value == "input")) {
    choices.energies_in_float32 = value == "float32";
  } else if (name == "column_gemm" && (value == "batched" || value == "per_image")) {
    choices.batched_column_gemm = value == "batched";
  } else if (name == "softmax_loads" && (value == "vector" || value == "scalar")) {
    choices.vectorized_softmax = value == "vector";
  } else {
    TORCH_CHECK(false, "ccnet: unknown design choice ", name, "=", value);
  }
}

std::string design_choice(const std::string& name) {
  if (name == "energy_dtype") return choices.energies_in_float32 ? "float32" : "input";
  if (name == "column_gemm") return choices.batched_column_gemm ? "batched" : "per_image";
  if (name == "softmax_loads") return choices.vectorized_softmax ? "vector" : "scalar";
  TORCH_CHECK(false, "ccnet: unknown design choice ", name);
}

const DeviceKernels& kernels_for(const Tensor& t) {
  const int slot = device_slot(t.device().type());
  TORCH_CHECK(slot >= 0 && registered_kernels[slot] != nullptr, "ccnet: no criss-cross attention kernels for ",
              t.device(), " tensors in this build");
  return *registered_kernels[slot];
}

// The attention blocks rows (N, H, W, W) and columns (N, W, H, H) are views of contiguous buffers whose last
// dimension is padded to a multiple of 8 elements, so that every matrix starts 16-byte aligned and has an aligned
// leading dimension (what cuBLAS's fastest 16-bit kernels need; 97 keys would give none). The fused forward
// returns the buffers (dense tensors, for autograd to save and compilers to trace); the fake kernels in Python
// allocate the same shapes.
constexpr int64_t kBlockAlignment = 8;

int64_t padded(int64_t keys) { return (keys + kBlockAlignment - 1) / kBlockAlignment * kBlockAlignment; }

// (N, H, W, padded W) and (N, W, H, padded H) for features (N, C, H, W), of the features' dtype or `dtype`.
Tensor empty_rows_buffer(const Tensor& features, std::optional<at::ScalarType> dtype = std::nullopt) {
  return at::empty({features.size(0), features.size(2), features.size(3), padded(features.size(3))},
                   features.options().dtype(dtype.value_or(features.scalar_type())));
}

Tensor empty_columns_buffer(const Tensor& features, std::optional<at::ScalarType> dtype = std::nullopt) {
  return at::empty({features.size(0), features.size(3), features.size(2), padded(features.size(2))},
                   features.options().dtype(dtype.value_or(features.scalar_type())));
}

// The block in a buffer: its first `keys` entries of the last dimension.
Tensor block_of(const Tensor& buffer, int64_t keys) { return buffer.narrow(3, 0, keys); }

Tensor empty_rows(const Tensor& features) { return block_of(empty_rows_buffer(features), features.size(3)); }

Tensor empty_columns(const Tensor& features) { return block_of(empty_columns_buffer(features), features.size(2)); }

// ---------------------------------------------------------------------------------------------------------------
// Checks (the Python functions check their arguments first, with messages for users; these guard the kernels).

void check_features(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "ccnet: ", name, " must be 4-D (N, C, H, W), got sizes ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), "ccnet: ", name, " must be floating point, got ", t.scalar_type());
}

void check_alike(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device() && a.scalar_type() == b.scalar_type(), "ccnet: ", a_name, " and ", b_name,
              " must share device and dtype, got ", a.device(), " ", a.scalar_type(), " and ", b.device(), " ",
              b.scalar_type());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3), "ccnet: ", a_name, " and ",
              b_name, " must agree in N, H and W, got sizes ", a.sizes(), " and ", b.sizes());
}

void check_attention_inputs(const Tensor& query, const Tensor& key, const Tensor& value) {
  check_features(query, "query");
  check_features(key, "key");
  check_features(value, "value");
  TORCH_CHECK(query.sizes() == key.sizes(), "ccnet: query and key must have the same sizes, got ", query.sizes(),
              " and ", key.sizes());
  check_alike(query, "query", key, "key");
  check_alike(query, "query", value, "value");
}

void check_saved_blocks(const Tensor& rows_buffer, const Tensor& columns_buffer, const Tensor& features) {
  const int64_t N = features.size(0), H = features.size(2), W = features.size(3);
  TORCH_CHECK(rows_buffer.sizes() == at::IntArrayRef({N, H, W, padded(W)}) &&
                  columns_buffer.sizes() == at::IntArrayRef({N, W, H, padded(H)}) && rows_buffer.is_contiguous() &&
                  columns_buffer.is_contiguous() && rows_buffer.scalar_type() == features.scalar_type() &&
                  columns_buffer.scalar_type() == features.scalar_type(),
              "ccnet: the saved attention must be the forward's contiguous (N, H, W, W padded) and (N, W, H, H "
              "padded) buffers of the features' dtype, got ", rows_buffer.sizes(), " and ", columns_buffer.sizes());
}

void check_public_attention(const Tensor& attention, const Tensor& value) {
  check_features(attention, "attention");
  const int64_t N = value.size(0), H = value.size(2), W = value.size(3);
  TORCH_CHECK(attention.sizes() == at::IntArrayRef({N, H + W - 1, H, W}), "ccnet: attention must be (N, H+W-1, H, W) = ",
              at::IntArrayRef({N, H + W - 1, H, W}), " for value ", value.sizes(), ", got ", attention.sizes());
  check_alike(attention, "attention", value, "value");
}

// ---------------------------------------------------------------------------------------------------------------
// Memory formats. Outputs of the shape of a feature tensor take its memory format: channels-last when its channel
// stride is 1 (NHWC, or a channel slice of an NHWC tensor), contiguous otherwise. The fake kernels in Python
// apply the same rule.

Tensor empty_features(const Tensor& like) {
  const bool channels_last = like.stride(1) == 1 && like.size(1) > 1;
  return at::empty(like.sizes(), like.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                            : at::MemoryFormat::Contiguous));
}

// `t` as the device's products take it (a channels-last copy where they need a unit channel stride).
Tensor operand(const DeviceKernels& kernels, const Tensor& t) {
  if (!kernels.needs_unit_channel_stride || t.stride(1) == 1) return t;
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// Runs product(target) for the output `out`: into `out` itself, or through a channels-last temporary copied back.
template <typename Product>
void write_features(const DeviceKernels& kernels, Tensor& out, Product product) {
  if (!kernels.needs_unit_channel_stride || out.stride(1) == 1) {
    product(out);
    return;
  }
  Tensor work = at::empty(out.sizes(), out.options().memory_format(at::MemoryFormat::ChannelsLast));
  product(work);
  out.copy_(work);
}

// ---------------------------------------------------------------------------------------------------------------
// The public layout (N, H+W-1, H, W) and the blocks.

// index[n, j, y, x] = j + (j >= y): the row y' of the j-th column key of a pixel on row y; (N, H-1, H, W), expanded.
Tensor column_key_index(int64_t N, int64_t H, int64_t W, const at::Device& device) {
  const auto options = at::TensorOptions().dtype(at::kLong).device(device);
  const Tensor j = at::arange(H - 1, options).view({H - 1, 1});
  const Tensor y = at::arange(H, options).view({1, H});
  return (j + j.ge(y).to(at::kLong)).view({1, H - 1, H, 1}).expand({N, H - 1, H, W});
}

Tensor blocks_to_public(const Tensor& rows, const Tensor& columns) {
  const int64_t N = rows.size(0), H = rows.size(1), W = rows.size(2);
  Tensor attention = at::empty({N, H + W - 1, H, W}, rows.options());
  attention.narrow(1, 0, W).copy_(rows.permute({0, 3, 1, 2}));  // [n, x', y, x]
  if (H > 1) {
    const Tensor by_key_row = columns.permute({0, 3, 2, 1});  // [n, y', y, x]
    attention.narrow(1, W, H - 1).copy_(at::gather(by_key_row, 1, column_key_index(N, H, W, rows.device())));
  }
  return attention;
}

TensorPair public_to_blocks(const Tensor& attention) {
  const int64_t N = attention.size(0), H = attention.size(2), W = attention.size(3);
  Tensor rows = empty_rows(attention), columns = empty_columns(attention);
  rows.copy_(attention.narrow(1, 0, W).permute({0, 2, 3, 1}));
  Tensor by_key_row = at::zeros({N, H, H, W}, attention.options());  // [n, y', y, x], zero where y' == y
  if (H > 1) by_key_row.scatter_(1, column_key_index(N, H, W, attention.device()), attention.narrow(1, W, H - 1));
  columns.copy_(by_key_row.permute({0, 3, 2, 1}));
  return {rows, columns};
}



// ---------------------------------------------------------------------------------------------------------------
// The operators' device kernels: the same code for every device, on its DeviceKernels.

bool is_16_bit(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

TensorTriple attention_forward(const Tensor& query, const Tensor& key, const Tensor& value) {
  check_attention_inputs(query, key, value);
  const DeviceKernels& kernels = kernels_for(value);
  const Tensor rows_buffer = empty_rows_buffer(value), columns_buffer = empty_columns_buffer(value);
  Tensor rows = block_of(rows_buffer, value.size(3)), columns = block_of(columns_buffer, value.size(2));
  // The energies: in the attention's buffers, or (16-bit features) in float32 ones, where |q.k| > 65504 stays
  // finite in float16 and bfloat16's 8-bit mantissa does not round the softmax's input.
  Tensor energy_rows = rows, energy_columns = columns;
  if (is_16_bit(value) && choices.energies_in_float32) {
    energy_rows = block_of(empty_rows_buffer(value, at::kFloat), value.size(3));
    energy_columns = block_of(empty_columns_buffer(value, at::kFloat), value.size(2));
  }
  kernels.affinity(operand(kernels, query), operand(kernels, key), energy_rows, energy_columns);
  kernels.softmax(energy_rows, energy_columns, rows, columns);
  Tensor out = empty_features(value);
  const Tensor v = operand(kernels, value);
  write_features(kernels, out, [&](Tensor& target) { kernels.gather(rows, columns, v, target); });
  return {out, rows_buffer, columns_buffer};
}

Tensor attention_output(const Tensor& query, const Tensor& key, const Tensor& value) {
  return std::get<0>(attention_forward(query, key, value));
}

TensorTriple attention_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value,
                                const Tensor& rows_buffer, const Tensor& columns_buffer) {
  check_attention_inputs(query, key, value);
  check_saved_blocks(rows_buffer, columns_buffer, value);
  const Tensor rows = block_of(rows_buffer, value.size(3)), columns = block_of(columns_buffer, value.size(2));
  const DeviceKernels& kernels = kernels_for(value);
  const Tensor g = operand(kernels, grad_out.to(value.scalar_type()));
  const Tensor v = operand(kernels, value);
  Tensor grad_rows = empty_rows(value), grad_columns = empty_columns(value);
  kernels.affinity(g, v, grad_rows, grad_columns);  // the gradient of the attention
  Tensor grad_value = empty_features(value);
  write_features(kernels, grad_value, [&](Tensor& target) { kernels.scatter(rows, columns, g, target); });
  kernels.softmax_backward_(grad_rows, grad_columns, rows, columns);  // now the gradient of the energies
  Tensor grad_query = empty_features(query), grad_key = empty_features(key);
  const Tensor q = operand(kernels, query), k = operand(kernels, key);
  write_features(kernels, grad_query, [&](Tensor& target) { kernels.gather(grad_rows, grad_columns, k, target); });
  write_features(kernels, grad_key, [&](Tensor& target) { kernels.scatter(grad_rows, grad_columns, q, target); });
  return {grad_query, grad_key, grad_value};
}

Tensor ca_weight_forward(const Tensor& query, const Tensor& key) {
  check_features(query, "query");
  check_features(key, "key");
  TORCH_CHECK(query.sizes() == key.sizes(), "ccnet: query and key must have the same sizes, got ", query.sizes(),
              " and ", key.sizes());
  check_alike(query, "query", key, "key");
  const DeviceKernels& kernels = kernels_for(query);
  Tensor rows = empty_rows(query), columns = empty_columns(query);
  kernels.affinity(operand(kernels, query), operand(kernels, key), rows, columns);
  return blocks_to_public(rows, columns);
}

TensorPair ca_weight_backward(const Tensor& grad_energy, const Tensor& query, const Tensor& key) {
  check_public_attention(grad_energy.to(query.scalar_type()), query);
  const DeviceKernels& kernels = kernels_for(query);
  const auto [grad_rows, grad_columns] = public_to_blocks(grad_energy.to(query.scalar_type()));
  Tensor grad_query = empty_features(query), grad_key = empty_features(key);
  const Tensor q = operand(kernels, query), k = operand(kernels, key);
  write_features(kernels, grad_query, [&](Tensor& target) { kernels.gather(grad_rows, grad_columns, k, target); });
  write_features(kernels, grad_key, [&](Tensor& target) { kernels.scatter(grad_rows, grad_columns, q, target); });
  return {grad_query, grad_key};
}

Tensor ca_map_forward(const Tensor& attention, const Tensor& value) {
  check_features(value, "value");
  check_public_attention(attention, value);
  const DeviceKernels& kernels = kernels_for(value);
  const auto [rows, columns] = public_to_blocks(attention);
  Tensor out = empty_features(value);
  const Tensor v = operand(kernels, value);
  write_features(kernels, out, [&](Tensor& target) { kernels.gather(rows, columns, v, target); });
  return out;
}

TensorPair ca_map_backward(const Tensor& grad_out, const Tensor& attention, const Tensor& value) {
  check_features(value, "value");
  check_public_attention(attention, value);
  const DeviceKernels& kernels = kernels_for(value);
  const Tensor g = operand(kernels, grad_out.to(value.scalar_type()));
  const Tensor v = operand(kernels, value);
  Tensor grad_rows = empty_rows(value), grad_columns = empty_columns(value);
  kernels.affinity(g, v, grad_rows, grad_columns);
  const Tensor grad_attention = blocks_to_public(grad_rows, grad_columns);
  const auto [rows, columns] = public_to_blocks(attention);
  Tensor grad_value = empty_features(value);
  write_features(kernels, grad_value, [&](Tensor& target) { kernels.scatter(rows, columns, g, target); });
  return {grad_attention, grad_value};
}

// ---------------------------------------------------------------------------------------------------------------
// Autograd: each public operator records one node whose backward is the matching backward operator.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class CrissCrossAttentionFunction : public torch::autograd::Function<CrissCrossAttentionFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& value) {
    static const auto op =
        find_operator<TensorTriple(const Tensor&, const Tensor&, const Tensor&)>("ccnet::criss_cross_attention_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, rows, columns] = op.call(query, key, value);
    ctx->save_for_backward({query, key, value, rows, columns});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        find_operator<TensorTriple(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&)>("ccnet::criss_cross_attention_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_query, grad_key, grad_value] = op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    return {grad_query, grad_key, grad_value};
  }
};

class CaWeightFunction : public torch::autograd::Function<CaWeightFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& query, const Tensor& key) {
    static const auto op = find_operator<Tensor(const Tensor&, const Tensor&)>("ccnet::ca_weight");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({query, key});
    return op.call(query, key);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        find_operator<TensorPair(const Tensor&, const Tensor&, const Tensor&)>("ccnet::ca_weight_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_query, grad_key] = op.call(grad_outputs[0], saved[0], saved[1]);
    return {grad_query, grad_key};
  }
};

class CaMapFunction : public torch::autograd::Function<CaMapFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& attention, const Tensor& value) {
    static const auto op = find_operator<Tensor(const Tensor&, const Tensor&)>("ccnet::ca_map");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({attention, value});
    return op.call(attention, value);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op =
        find_operator<TensorPair(const Tensor&, const Tensor&, const Tensor&)>("ccnet::ca_map_backward");
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_attention, grad_value] = op.call(grad_outputs[0], saved[0], saved[1]);
    return {grad_attention, grad_value};
  }
};

Tensor criss_cross_attention_autograd(const Tensor& query, const Tensor& key, const Tensor& value) {
  return CrissCrossAttentionFunction::apply(query, key, value);
}

Tensor ca_weight_autograd(const Tensor& query, const Tensor& key) { return CaWeightFunction::apply(query, key); }

Tensor ca_map_autograd(const Tensor& attention, const Tensor& value) { return CaMapFunction::apply(attention, value); }

// ---------------------------------------------------------------------------------------------------------------
// The products through ATen's batched matrix multiply.


// Features (N, C, H, W) as matrices [x][c] per image row (N, H, W, C), or [y][c] per image column (N, W, H, C).
Tensor by_rows(const Tensor& t) { return t.permute({0, 2, 3, 1}); }
Tensor by_columns(const Tensor& t) { return t.permute({0, 3, 2, 1}); }

// Whether the two batch dimensions of a 4-D tensor merge into one with a single stride.
bool batch_dims_merge(const Tensor& t) {
  return t.size(0) == 1 || t.size(1) == 1 || t.stride(0) == t.size(1) * t.stride(1);
}

Tensor merged_batch_dims(const Tensor& t) { return t.view({t.size(0) * t.size(1), t.size(2), t.size(3)}); }

// out = a @ b (or +=) for 3-D tensors; `out` may be float32 for 16-bit a and b (CUDA: cuBLAS writes float32).
void matmul_into(Tensor out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (accumulate) {
    out.baddbmm_(a, b);
  } else if (out.scalar_type() != a.scalar_type()) {
    at::bmm_out(out, a, b, out.scalar_type());
  } else {
    at::bmm_out(out, a, b);
  }
}

// out[i, j] = a[i, j] @ b[i, j] (or +=) for 4-D tensors: one batched product where the batch dimensions of all
// three merge, else one per i. The matrices are strided views: BLAS reads and writes them in place when one of
// their two strides is 1.
void batched_matmul(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (out.numel() == 0) return;
  if (batch_dims_merge(out) && batch_dims_merge(a) && batch_dims_merge(b)) {
    matmul_into(merged_batch_dims(out), merged_batch_dims(a), merged_batch_dims(b), accumulate);
    return;
  }
  for (int64_t i = 0; i < out.size(0); ++i) matmul_into(out[i], a[i], b[i], accumulate);
}

// The column part's products: `column_matmul` (a device's single call over every (n, x), e.g. a pointer-array
// batched GEMM) when given and the design choice asks for it, else batched_matmul (one call per image where the
// batch dimensions do not merge).
void column_matmul_into(ColumnMatmul column_matmul, const Tensor& out, const Tensor& a, const Tensor& b,
                        bool accumulate) {
  if (column_matmul != nullptr && choices.batched_column_gemm && out.numel() > 0) {
    column_matmul(out, a, b, accumulate);
  } else {
    batched_matmul(out, a, b, accumulate);
  }
}

}  // namespace

const DesignChoices& design_choices() { return choices; }

void affinity_by_matmul(const Tensor& a, const Tensor& b, Tensor& rows, Tensor& columns, ColumnMatmul column_matmul) {
  batched_matmul(rows, by_rows(a), by_rows(b).transpose(2, 3), false);
  column_matmul_into(column_matmul, columns, by_columns(a), by_columns(b).transpose(2, 3), false);
}

void gather_by_matmul(const Tensor& rows, const Tensor& columns, const Tensor& v, Tensor& out,
                      ColumnMatmul column_matmul) {
  batched_matmul(by_rows(out), rows, by_rows(v), false);
  column_matmul_into(column_matmul, by_columns(out), columns, by_columns(v), true);
}

void scatter_by_matmul(const Tensor& rows, const Tensor& columns, const Tensor& g, Tensor& out,
                       ColumnMatmul column_matmul) {
  batched_matmul(by_rows(out), rows.transpose(2, 3), by_rows(g), false);
  column_matmul_into(column_matmul, by_columns(out), columns.transpose(2, 3), by_columns(g), true);
}

// ---------------------------------------------------------------------------------------------------------------
// The joint softmax with ATen tensor operations. The maximum and the sum of a pixel (y, x) combine its row block
// [y, x, :] and its column block [x, y, :]: reductions over the last dimension, one of them transposed to (y, x).
// An energy of -inf gets the weight 0 (exp(-inf - maximum)), like torch.softmax; all of a pixel's energies -inf
// give NaN, like torch.softmax.

void softmax_by_tensor_ops(const Tensor& energy_rows, const Tensor& energy_columns, Tensor& rows, Tensor& columns) {
  if (is_16_bit(energy_rows) || energy_rows.scalar_type() != rows.scalar_type()) {  // in float32, then cast
    Tensor rows32 = energy_rows.to(at::kFloat), columns32 = energy_columns.to(at::kFloat);
    softmax_by_tensor_ops(rows32, columns32, rows32, columns32);
    rows.copy_(rows32);
    columns.copy_(columns32);
    return;
  }
  if (!rows.is_same(energy_rows)) rows.copy_(energy_rows);
  if (!columns.is_same(energy_columns)) columns.copy_(energy_columns);
  columns.diagonal(0, 2, 3).fill_(-std::numeric_limits<double>::infinity());
  const Tensor maximum = at::maximum(rows.amax(3), columns.amax(3).transpose(1, 2));  // (N, H, W)
  rows.sub_(maximum.unsqueeze(3)).exp_();
  columns.sub_(maximum.transpose(1, 2).unsqueeze(3)).exp_();
  const Tensor total = rows.sum(3) + columns.sum(3).transpose(1, 2);
  rows.div_(total.unsqueeze(3));
  columns.div_(total.transpose(1, 2).unsqueeze(3));
}

void softmax_backward_by_tensor_ops_(Tensor& grad_rows, Tensor& grad_columns, const Tensor& rows,
                                     const Tensor& columns) {
  if (is_16_bit(grad_rows)) {
    Tensor grad_rows32 = grad_rows.to(at::kFloat), grad_columns32 = grad_columns.to(at::kFloat);
    softmax_backward_by_tensor_ops_(grad_rows32, grad_columns32, rows.to(at::kFloat), columns.to(at::kFloat));
    grad_rows.copy_(grad_rows32);
    grad_columns.copy_(grad_columns32);
    return;
  }
  grad_columns.diagonal(0, 2, 3).zero_();  // not a key: no gradient, whatever the product left there
  const Tensor dot = (grad_rows * rows).sum(3) + (grad_columns * columns).sum(3).transpose(1, 2);  // (N, H, W)
  grad_rows.sub_(dot.unsqueeze(3)).mul_(rows);
  grad_columns.sub_(dot.transpose(1, 2).unsqueeze(3)).mul_(columns);
}

// ---------------------------------------------------------------------------------------------------------------
// Registration.

void register_device(torch::Library& library, c10::DeviceType device, const DeviceKernels& kernels) {
  const int slot = device_slot(device);
  TORCH_CHECK(slot >= 0, "ccnet: register_device has no slot for ", device, " kernels (only CPU and CUDA)");
  registered_kernels[slot] = &kernels;
  library.impl("criss_cross_attention", &attention_output);
  library.impl("criss_cross_attention_forward", &attention_forward);
  library.impl("criss_cross_attention_backward", &attention_backward);
  library.impl("ca_weight", &ca_weight_forward);
  library.impl("ca_weight_backward", &ca_weight_backward);
  library.impl("ca_map", &ca_map_forward);
  library.impl("ca_map_backward", &ca_map_backward);
}

}  // namespace ccnet

TORCH_LIBRARY(ccnet, m) {
  m.def("criss_cross_attention(Tensor query, Tensor key, Tensor value) -> Tensor");
  m.def("criss_cross_attention_forward(Tensor query, Tensor key, Tensor value) -> (Tensor, Tensor, Tensor)");
  m.def("criss_cross_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
        "Tensor attention_rows, Tensor attention_columns) -> (Tensor, Tensor, Tensor)");
  m.def("ca_weight(Tensor query, Tensor key) -> Tensor");
  m.def("ca_weight_backward(Tensor grad_energy, Tensor query, Tensor key) -> (Tensor, Tensor)");
  m.def("ca_map(Tensor attention, Tensor value) -> Tensor");
  m.def("ca_map_backward(Tensor grad_out, Tensor attention, Tensor value) -> (Tensor, Tensor)");
  // The design choices (cc_attention.h): set by cc_attention.library from the environment; no tensors.
  m.def("set_design_choice(str name, str value) -> ()", &ccnet::set_design_choice);
  m.def("design_choice(str name) -> str", &ccnet::design_choice);
}

TORCH_LIBRARY_IMPL(ccnet, Autograd, m) {
  m.impl("criss_cross_attention", &ccnet::criss_cross_attention_autograd);
  m.impl("ca_weight", &ccnet::ca_weight_autograd);
  m.impl("ca_map", &ccnet::ca_map_autograd);
}
