// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the CPU and CUDA kernels of the dpo_kernels ops share: building a dpo::loss_config
// from the ops' arguments (TRL's names), and lowering a logits tensor to the row layout of
// dpo::token_view (rows of `vocab` contiguous values `row_stride` apart).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "dpo/core/layout.hpp"
#include "dpo/core/validate.hpp"

namespace dpo_kernels {

/// The loss configuration arguments of pair_loss, pair_loss_backward and dpo_forward, one row
/// per field in schema order: X(name, schema type, kernel parameter type, value type, default).
/// The op schemas (DPO_CONFIG_SCHEMA), the kernels' parameters (DPO_CONFIG_PARAMS), the calls
/// that forward them (DPO_CONFIG_ARGS) and the Python package's list of fields and defaults
/// (dpo_kernels._C.config_fields, from which Python builds and unpacks the arguments) all come
/// from this table. The defaults are TRL DPOConfig's; ld_alpha = 1 disables LD-DPO, an empty
/// loss_weights means weight 1 for each loss type.
#define DPO_CONFIG_FIELDS(X)                                                                 \
  X(loss_type, "str", c10::string_view, std::string, "sigmoid")                            \
  X(loss_weights, "float[]", c10::ArrayRef<double>, std::vector<double>, /* none */)       \
  X(beta, "float", double, double, 0.1)                                                      \
  X(label_smoothing, "float", double, double, 0.0)                                           \
  X(f_divergence_type, "str", c10::string_view, std::string, "reverse_kl")                 \
  X(f_alpha_divergence_coef, "float", double, double, 0.5)                                   \
  X(discopop_tau, "float", double, double, 0.05)                                             \
  X(use_weighting, "bool", bool, bool, false)                                                \
  X(ld_alpha, "float", double, double, 1.0)                                                  \
  X(reference_free, "bool", bool, bool, false)                                               \
  X(cdpo_smoothing, "bool", bool, bool, false)                                               \
  X(simpo_gamma, "float", double, double, 0.5)                                               \
  X(cpo_alpha, "float", double, double, 1.0)                                                 \
  X(cpo_base, "str", c10::string_view, std::string, "sigmoid")

// A comma-separated list from rows that each expand to ", item": drops the first comma.
#define DPO_DROP_FIRST_(first, ...) __VA_ARGS__
#define DPO_DROP_FIRST(...) DPO_DROP_FIRST_(__VA_ARGS__)

#define DPO_CONFIG_SCHEMA_ITEM_(name, schema, param, value, def) ", " schema " " #name
#define DPO_CONFIG_PARAM_ITEM_(name, schema, param, value, def) , param name
#define DPO_CONFIG_VALUE_PARAM_ITEM_(name, schema, param, value, def) , const value& name
#define DPO_CONFIG_ARG_ITEM_(name, schema, param, value, def) , name

/// The config arguments of an op schema, each preceded by ", ": "Tensor? weights"
/// DPO_CONFIG_SCHEMA ") -> ...".
#define DPO_CONFIG_SCHEMA DPO_CONFIG_FIELDS(DPO_CONFIG_SCHEMA_ITEM_)
/// The kernels' parameters for the config arguments (the dispatcher's types).
#define DPO_CONFIG_PARAMS DPO_DROP_FIRST(DPO_CONFIG_FIELDS(DPO_CONFIG_PARAM_ITEM_))
/// The same fields as owning values (std::string, std::vector<double>), for pybind11.
#define DPO_CONFIG_VALUE_PARAMS DPO_DROP_FIRST(DPO_CONFIG_FIELDS(DPO_CONFIG_VALUE_PARAM_ITEM_))
/// The config parameters forwarded, in order, to a function taking DPO_CONFIG_PARAMS.
#define DPO_CONFIG_ARGS DPO_DROP_FIRST(DPO_CONFIG_FIELDS(DPO_CONFIG_ARG_ITEM_))

/// A validated dpo::loss_config. `loss_type` is a comma-separated list of TRL names with one
/// weight each in `loss_weights` (empty means 1 each). `exponent_clamp` is TRL's clamp of the
/// alpha-divergence exponent for the log-probs' dtype (11 for fp16, 80 otherwise). Throws
/// c10::ValueError (Python ValueError) naming the bad argument.
dpo::loss_config make_config(DPO_CONFIG_PARAMS, double exponent_clamp = 80.0);

/// ValueError naming the missing Python argument (reference_chosen_logps /
/// reference_rejected_logps) when the configuration needs reference log-probs (not
/// reference_free, not a reference-free loss type) and one is absent.
void check_references(const dpo::loss_config& c, bool has_chosen, bool has_rejected);

/// t as contiguous float64 on `device`, kept alive in `keep`; null when t is absent.
inline const double* doubles_or_null(const std::optional<at::Tensor>& t, at::Tensor& keep, const at::Device& device) {
  if (!t.has_value()) return nullptr;
  keep = t->to(at::TensorOptions().dtype(at::kDouble).device(device)).contiguous();
  return keep.data_ptr<double>();
}

/// Rethrows dpo::error (std::invalid_argument) as c10::ValueError so Python sees a
/// ValueError with the library's message.
template <class Fn>
auto rethrow_as_value_error(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

/// A logits tensor lowered to dpo::token_view rows. Sequences are either padded (logits
/// [B, T, V], sequence b owns rows [b * seq_len, b * seq_len + T)) or packed (logits [N, V]
/// with cu_seqlens). A padded batch whose rows are evenly strided but whose sequences sit
/// further apart than T rows (e.g. logits[:, :-1] of a contiguous [B, T + 1, V] tensor) is
/// read in place: seq_len > T, and the views have seq_stride = seq_len, so the rows between
/// sequences are never read (their labels are padded with ignore_index all the same).
struct row_layout {
  at::Tensor logits;      // the tensor read (the input itself, or a contiguous copy)
  at::Tensor labels;      // contiguous labels, one per row of the view ([B, seq_len] or [N])
  at::Tensor cu_seqlens;  // contiguous int64 [S + 1] when packed, else undefined
  bool copied = false;    // logits is a copy (the input's rows were not usable in place)
  bool packed = false;
  std::int64_t num_seqs = 0;
  std::int64_t seq_len = 0;   // rows per sequence in the view (padded)
  std::int64_t tokens = 0;    // T, the sequence length of the input (padded)
  std::int64_t rows = 0;      // rows of the input: B * T (padded) or N (packed)
  std::int64_t vocab = 0;
  std::int64_t row_stride = 0;

  /// The row of the input (0 <= r < rows) that view row v maps to, or -1 for a padding row.
  std::int64_t input_row(std::int64_t v) const {
    if (packed) return v;
    const std::int64_t b = v / seq_len, t = v % seq_len;
    return t < tokens ? b * tokens + t : -1;
  }
  /// Rows of the view: B * seq_len (padded) or N (packed).
  std::int64_t view_rows() const { return packed ? rows : num_seqs * seq_len; }
};

/// Whether padded logits [B, T, V] with strides (s0, s1, s2), B, T >= 1, are read in place:
/// unit vocabulary stride, rows at least V apart and evenly strided, and each sequence's first
/// row a whole number of rows after the previous one's (at least T). Others are copied to a
/// contiguous tensor. A template so the fake kernels evaluate the same rule on symbolic sizes
/// (c10::SymInt, through dpo_kernels._C.view_seq_len); make_layout uses std::int64_t.
template <class Int>
bool padded_in_place(const Int& B, const Int& T, const Int& V, const Int& s0, const Int& s1, const Int& s2) {
  if (s2 != 1) return false;
  if (T == 1) return B == 1 || s0 >= V;
  return s1 >= V && (B == 1 || (s1 > 0 && s0 % s1 == 0 && s0 / s1 >= T));
}

/// Rows per sequence of the view of padded logits [B, T, V] with strides (s0, s1, s2)
/// (row_layout::seq_len): T, or s0 / s1 > T when the sequences of logits read in place sit
/// further apart (logits[:, :-1] of a contiguous [B, T + 1, V] tensor). The gradient outputs
/// have this row indexing: strides (seq_len * V, V, 1).
template <class Int>
Int view_seq_len(const Int& B, const Int& T, const Int& V, const Int& s0, const Int& s1, const Int& s2) {
  if (B <= 1 || T <= 1 || !padded_in_place(B, T, V, s0, s1, s2)) return T;
  return s0 / s1;
}

/// Lowers logits ([B, T, V] with labels [B, T], or [N, V] with labels [N] and optional
/// cu_seqlens [S + 1]; without cu_seqlens [N, V] is one sequence). Checks dtypes, devices
/// and shapes (TypeError / ValueError naming `name`).
row_layout make_layout(const at::Tensor& logits, const at::Tensor& labels,
                       const std::optional<at::Tensor>& cu_seqlens, std::int64_t ignore_index,
                       const char* name);

/// The pair count P of TRL's concatenated layout (sequences [0, P) chosen, [P, 2P) rejected):
/// ValueError unless the layout holds an even number 2P >= 2 of sequences.
std::int64_t concatenated_pairs(const row_layout& l);

/// dpo_forward's reference arguments, checked: either `ref_logits` (the shape and device of
/// `logits`; lowered, in the logits' dtype, with their labels and cu_seqlens) or the two
/// [P] log-prob vectors (each optional, on the logits' device), never both. Returns the
/// reference logits' layout, or nullopt when there are none.
std::optional<row_layout> reference_layout(const at::Tensor& logits, const at::Tensor& labels,
                                           const std::optional<at::Tensor>& cu_seqlens,
                                           const std::optional<at::Tensor>& reference_chosen_logps,
                                           const std::optional<at::Tensor>& reference_rejected_logps,
                                           const std::optional<at::Tensor>& ref_logits,
                                           std::int64_t ignore_index, std::int64_t P);

/// inplace_backward's requirement: logits rows usable in place (not copied), evenly strided,
/// with no gap between sequences. ValueError naming the strides otherwise.
void check_inplace(const row_layout& l, const at::Tensor& logits);

/// The backward's checks shared by the backends: grad_loss holds one value on `device`, and
/// the layout is the concatenated one.
void check_backward(const at::Tensor& grad_loss, const row_layout& l, const at::Device& device);

/// Checks a per-pair vector argument: floating, 1-D with `n` entries, on `device`.
void check_pair_vector(const at::Tensor& t, std::int64_t n, const at::Device& device,
                       const char* name);

/// Pair-level inputs lowered to the library's dpo::pair_logps_in: fp64 contiguous copies on
/// the inputs' device (kept alive here) and pointers into them. Call after check_pair_inputs
/// and the backend's device check.
struct pair_inputs {
  at::Tensor pc, pr, rc, rr, lc, lr, w;
  dpo::pair_logps_in in;
};
pair_inputs lower_pairs(const at::Tensor& policy_chosen_logps, const at::Tensor& policy_rejected_logps,
                        const std::optional<at::Tensor>& reference_chosen_logps,
                        const std::optional<at::Tensor>& reference_rejected_logps,
                        const std::optional<at::Tensor>& chosen_lengths,
                        const std::optional<at::Tensor>& rejected_lengths,
                        const std::optional<at::Tensor>& weights);

/// pair_loss_backward's weights. Every per-pair loss is linear in its weight W_i (the NLL and
/// aot terms included), so the vector-Jacobian product for upstream gradients u is
/// P * dL/dpi of the batch loss with weights W_i * u_i. Checks grad_losses' shape ([P]),
/// points p.in.weights at W_i * u_i (fp64, on the inputs' device) and returns the tensor
/// that holds them.
at::Tensor weigh_by_upstream(const at::Tensor& grad_losses, pair_inputs& p);

/// The dtype of per-sequence results: fp64 for fp64 logits, fp32 otherwise (never the
/// logits' bf16/fp16, whose spacing near typical sequence sums exceeds DPO margins).
/// The dtypes the kernels read.
inline bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline at::ScalarType result_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

/// TRL's clamp of the alpha-divergence exponent for the log-probs' dtype.
inline double clamp_for(at::ScalarType t) { return t == at::kHalf ? 11.0 : 80.0; }

/// Calls fn with a null pointer of the label type of a (checked) int32 / int64 tensor.
template <class Fn>
void dispatch_label(at::ScalarType t, Fn&& fn) {
  if (t == at::kInt) return fn(static_cast<std::int32_t*>(nullptr));
  return fn(static_cast<std::int64_t*>(nullptr));
}

/// The dpo::token_view of a layout (all its sequences); T is the backend's element type of
/// the logits' dtype. Pointers are the tensors' (host or device).
template <class T, class L>
dpo::token_view<T, L> token_view_of(const row_layout& l, std::int64_t ignore_index) {
  dpo::token_view<T, L> v;
  v.logits = reinterpret_cast<const T*>(l.logits.data_ptr());
  v.labels = l.labels.data_ptr<L>();
  v.cu_seqlens = l.packed ? l.cu_seqlens.data_ptr<std::int64_t>() : nullptr;
  v.vocab = l.vocab;
  v.row_stride = l.row_stride;
  v.num_seqs = l.num_seqs;
  v.seq_len = l.tokens;
  v.seq_stride = l.seq_len;
  v.ignore_index = ignore_index;
  return v;
}

/// The pair view of TRL's concatenated layout: sequences [0, P) chosen, [P, 2P) rejected.
template <class T, class L>
dpo::pair_view<T, L> pair_view_of(const row_layout& l, std::int64_t ignore_index) {
  const T* z = reinterpret_cast<const T*>(l.logits.data_ptr());
  const L* y = l.labels.data_ptr<L>();
  if (l.packed)
    return dpo::packed_pairs(z, y, l.cu_seqlens.data_ptr<std::int64_t>(), l.num_seqs, l.vocab,
                             l.row_stride, nullptr, ignore_index);
  dpo::pair_view<T, L> p = dpo::padded_pairs(z, y, l.num_seqs, l.tokens, l.vocab, l.row_stride,
                                             nullptr, ignore_index);
  p.chosen.seq_stride = p.rejected.seq_stride = l.seq_len;
  return p;
}

/// A layout's views for one element type T (the backend's type of the logits' dtype) and
/// label type L; what dispatch_views hands to its callback.
template <class T, class L>
struct layout_views {
  using value_type = T;
  using label_type = L;
  const row_layout& layout;
  std::int64_t ignore_index;
  dpo::token_view<T, L> tokens() const { return token_view_of<T, L>(layout, ignore_index); }
  dpo::pair_view<T, L> pairs() const { return pair_view_of<T, L>(layout, ignore_index); }
  /// A buffer of the logits' dtype (a gradient) as the backend's element type.
  static T* elements(void* p) { return reinterpret_cast<T*>(p); }
};

/// Calls fn(static_cast<T*>(nullptr)) for the backend's element type T of a floating dtype:
/// float, double, Types::bf16 or Types::f16 (each backend names its own 16-bit types: Eigen's
/// on the CPU, CUDA's on the device). `name`: the argument, for the error.
template <class Types, class Fn>
void dispatch_value(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(static_cast<float*>(nullptr));
    case at::kDouble: return fn(static_cast<double*>(nullptr));
    case at::kBFloat16: return fn(static_cast<typename Types::bf16*>(nullptr));
    case at::kHalf: return fn(static_cast<typename Types::f16*>(nullptr));
    default: TORCH_CHECK_TYPE(false, "unsupported ", name, " dtype ", dtype);
  }
}

/// Calls fn(layout_views<T, L>) for the dtype of the layout's logits and of its labels.
template <class Types, class Fn>
void dispatch_views(const row_layout& l, std::int64_t ignore_index, Fn&& fn) {
  dispatch_value<Types>(l.logits.scalar_type(), "logits", [&](auto* tp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    dispatch_label(l.labels.scalar_type(), [&](auto* lp) {
      fn(layout_views<T, std::remove_pointer_t<decltype(lp)>>{l, ignore_index});
    });
  });
}

/// Calls fn(pair_view<R, L>) for another layout with the labels of `v` (the reference logits),
/// R the element type of that layout's own dtype: the reference pass reads its logits as they
/// are, never rounded to the policy's dtype.
template <class Types, class T, class L, class Fn>
void dispatch_reference(const layout_views<T, L>& v, const row_layout& ref, Fn&& fn) {
  dispatch_value<Types>(ref.logits.scalar_type(), "ref_logits", [&](auto* rp) {
    using R = std::remove_pointer_t<decltype(rp)>;
    fn(pair_view_of<R, L>(ref, v.ignore_index));
  });
}

/// Per-row values indexed by the view's rows (view_rows() entries, as the library's row_lse /
/// row_coef) as a tensor shaped like the input's rows (logits.shape[:-1]): drops the rows
/// between the sequences of a padded view with seq_len > T.
inline at::Tensor view_rows_to_input(const at::Tensor& v, const row_layout& l, const at::Tensor& logits) {
  std::vector<std::int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 1);
  if (!l.packed && logits.dim() == 3 && l.seq_len != l.tokens)
    return v.view({l.num_seqs, l.seq_len}).narrow(1, 0, l.tokens).contiguous();
  return v.view(shape);
}

/// The inverse: input-row values as a contiguous double tensor of view_rows() entries, 0 on
/// the rows between sequences.
inline at::Tensor input_rows_to_view(const at::Tensor& t, const row_layout& l, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == l.rows, name, " has ", t.numel(), " entries, expected ", l.rows);
  TORCH_CHECK_VALUE(t.device() == l.logits.device(), name, " is on ", t.device(), " but logits is on ",
                    l.logits.device());
  at::Tensor d = t.to(at::kDouble).contiguous().reshape({-1});
  if (!l.packed && l.seq_len != l.tokens) {
    at::Tensor v = at::zeros({l.num_seqs, l.seq_len}, d.options());
    v.narrow(1, 0, l.tokens).copy_(d.view({l.num_seqs, l.tokens}));
    return v.view({-1});
  }
  return d;
}

/// A gradient buffer with the view's row indexing ([view_rows(), V]) as a tensor shaped like
/// the logits: [B, T, V] (a strided view when seq_len > T) or [N, V].
inline at::Tensor grad_as_logits(const at::Tensor& grad, const row_layout& l, const at::Tensor& logits) {
  if (l.packed || logits.dim() == 2) return grad;
  return grad.view({l.num_seqs, l.seq_len, l.vocab}).narrow(1, 0, l.tokens);
}

/// Completion tokens (label != ignore_index) of each sequence, int64 [num_seqs], with
/// tensor ops on the labels' device (no host read of cu_seqlens). Needs num_seqs >= 1.
inline at::Tensor completion_counts(const row_layout& l, std::int64_t ignore_index) {
  if (!l.packed)
    return l.labels.view({l.num_seqs, l.seq_len}).narrow(1, 0, l.tokens).ne(ignore_index).sum(1);
  // Sequence s owns rows [cu[s], cu[s + 1]): differences of a prefix sum of the flags.
  const at::Tensor flags = l.labels.ne(ignore_index).to(at::kLong);
  const at::Tensor prefix = at::cat({at::zeros({1}, flags.options()), flags.cumsum(0)});
  const at::Tensor cu = l.cu_seqlens.clamp(0, l.rows);
  return prefix.index_select(0, cu.narrow(0, 1, l.num_seqs)) - prefix.index_select(0, cu.narrow(0, 0, l.num_seqs));
}

/// d sum_s grad[s] * logps[s] / d sums[s] as the library's per-sequence doubles: grad, divided
/// by max(count, 1) when the op averaged. Contiguous, on grad's device.
inline at::Tensor sequence_grad(const at::Tensor& grad, const row_layout& l, std::int64_t ignore_index,
                                bool average) {
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == l.num_seqs, "grad must have shape [", l.num_seqs,
                    "], got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == l.logits.device(), "grad is on ", grad.device(), " but logits is on ",
                    l.logits.device());
  at::Tensor g = grad.to(at::kDouble);
  if (average) g = g / completion_counts(l, ignore_index).clamp_min(1).to(at::kDouble);
  return g.contiguous();
}

/// The sharded backwards' per-sequence inputs: seq_grad [num_seqs] and nll_token_grad (one
/// value), their shapes checked (the logits and the head path alike).
inline void check_seq_grad_shapes(const at::Tensor& seq_grad, const at::Tensor& nll_token_grad,
                                  std::int64_t num_seqs) {
  TORCH_CHECK_VALUE(seq_grad.dim() == 1 && seq_grad.size(0) == num_seqs, "seq_grad must have shape [", num_seqs,
                    "], got ", seq_grad.sizes());
  TORCH_CHECK_VALUE(nll_token_grad.numel() == 1, "nll_token_grad must hold one value, got shape ",
                    nll_token_grad.sizes());
}

}  // namespace dpo_kernels
