// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// DPO straight from hidden states (issue 13, item 3): the operator linear_dpo binds the
// library's one-call CPU path dpo::cpu::linear_dpo (include/dpo/cpu/linear_dpo.hpp), which
// computes the loss, the metrics and the gradients of hidden, weight and bias in one call
// (three or four passes over the weight, its own choice; docs/linear.md). The gradients are
// outputs of the forward; the autograd formula (dpo_kernels/_linear_dpo.py) scales them by
// the upstream gradient. No [rows, vocab] logits ever exist.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "common.h"
#include "gemm_isa.h"
#include "head.h"
#include "forward_outputs.h"
#include "dpo/core/metrics.hpp"
#include "dpo/cpu/linear_dpo.hpp"
#include "dpo/cpu/linear_shard.hpp"

namespace dpo_kernels {
namespace {

/// hidden ([2P, T, H] with labels [2P, T], or [N, H] with labels [N] and cu_seqlens [2P + 1])
/// lowered to contiguous rows; returns the pair count P.
struct hidden_layout {
  at::Tensor hidden, labels, cu;
  std::int64_t rows = 0, H = 0, num_seqs = 0, seq_len = 0;
  bool packed = false;
};

hidden_layout lower_hidden(const at::Tensor& hidden, const at::Tensor& labels,
                           const std::optional<at::Tensor>& cu_seqlens, const char* name) {
  TORCH_CHECK_TYPE(is_floating(hidden.scalar_type()), name, " must be float32, float64, bfloat16 or float16, got ",
                   hidden.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == hidden.device(), "labels is on ", labels.device(), " but ", name, " is on ",
                    hidden.device());
  hidden_layout l;
  l.packed = cu_seqlens.has_value();
  if (l.packed) {
    TORCH_CHECK_VALUE(hidden.dim() == 2, name, " must be 2-D [N, H] with cu_seqlens, got shape ", hidden.sizes());
    TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must have shape [",
                      hidden.size(0), "] to match ", name, " ", hidden.sizes(), ", got ", labels.sizes());
    const at::Tensor& c = *cu_seqlens;
    TORCH_CHECK_TYPE(c.scalar_type() == at::kLong || c.scalar_type() == at::kInt,
                     "cu_seqlens must be int64 or int32, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) >= 1, "cu_seqlens must be 1-D [S + 1], got shape ", c.sizes());
    TORCH_CHECK_VALUE(c.device() == hidden.device(), "cu_seqlens is on ", c.device(), " but ", name, " is on ",
                      hidden.device());
    l.cu = c.to(at::kLong).contiguous();
    l.num_seqs = c.size(0) - 1;
    l.rows = hidden.size(0);
    const std::int64_t* cu = l.cu.data_ptr<std::int64_t>();
    TORCH_CHECK_VALUE(cu[0] >= 0, "cu_seqlens[0] = ", cu[0], " is invalid: must be >= 0");
    for (std::int64_t s = 0; s < l.num_seqs; ++s)
      TORCH_CHECK_VALUE(cu[s + 1] >= cu[s], "cu_seqlens must be non-decreasing: cu_seqlens[", s + 1, "] = ",
                        cu[s + 1], " < cu_seqlens[", s, "] = ", cu[s]);
    TORCH_CHECK_VALUE(cu[l.num_seqs] <= l.rows, "cu_seqlens[", l.num_seqs, "] = ", cu[l.num_seqs], " is past the ",
                      l.rows, " rows of ", name);
  } else {
    TORCH_CHECK_VALUE(hidden.dim() == 3, name, " must be 3-D [2P, T, H] (or 2-D [N, H] with cu_seqlens), got shape ",
                      hidden.sizes());
    TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == hidden.size(0) && labels.size(1) == hidden.size(1),
                      "labels must have shape [", hidden.size(0), ", ", hidden.size(1), "] to match ", name, " ",
                      hidden.sizes(), ", got ", labels.sizes());
    l.num_seqs = hidden.size(0);
    l.seq_len = hidden.size(1);
    l.rows = l.num_seqs * l.seq_len;
  }
  l.H = hidden.size(-1);
  TORCH_CHECK_VALUE(l.H >= 1, name, " has hidden size 0: shape ", hidden.sizes());
  TORCH_CHECK_VALUE(l.num_seqs >= 2 && l.num_seqs % 2 == 0, name, " must hold an even number 2P >= 2 of sequences ",
                    "(chosen then rejected), got ", l.num_seqs);
  l.hidden = hidden.reshape({l.rows, l.H}).contiguous();
  l.labels = labels.reshape({l.rows}).contiguous();
  return l;
}

template <class T, class L>
dpo::cpu::hidden_pairs<T, L> pairs_of(const hidden_layout& l, std::int64_t ignore_index) {
  const T* h = reinterpret_cast<const T*>(l.hidden.data_ptr());
  const L* lab = l.labels.data_ptr<L>();
  if (l.packed)
    return dpo::cpu::linear_packed_pairs<T, L>(h, l.H, l.H, lab, l.cu.data_ptr<std::int64_t>(), l.num_seqs, nullptr,
                                               ignore_index);
  return dpo::cpu::linear_padded_pairs<T, L>(h, l.H, l.H, lab, l.num_seqs, l.seq_len, nullptr, ignore_index);
}

at::Tensor pair_vector(const std::optional<at::Tensor>& t, std::int64_t P, const at::Tensor& hidden,
                       const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK_TYPE(is_floating(t->scalar_type()), name, " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == P, name, " must have shape [", P, "] (one per pair), got ",
                    t->sizes());
  TORCH_CHECK_VALUE(t->device() == hidden.device(), name, " is on ", t->device(), " but hidden is on ",
                    hidden.device());
  return t->to(at::kDouble).contiguous();
}

/// The gradient outputs of the DPO-from-hidden ops: dHidden [rows, H] in hidden's dtype (one
/// buffer for both sides; [0] when not needed) and the head's (head_grad_tensors).
struct grad_tensors {
  at::Tensor dh;
  head_grad_tensors head;
  std::int64_t H = 0;
  bool need_hidden = false;

  grad_tensors(const hidden_layout& l, const at::Tensor& hidden, const at::Tensor& w, const at::Tensor& b,
               bool need_hidden, bool need_weight, bool need_bias)
      : dh(need_hidden ? at::zeros({l.rows, l.H}, hidden.options()) : at::empty({0}, hidden.options())),
        head(w, w.size(0), need_weight, need_bias && b.defined()),
        H(l.H),
        need_hidden(need_hidden) {}

  template <class T, class G>
  dpo::cpu::linear_dpo_grads<T, G> grads() const {
    dpo::cpu::linear_dpo_grads<T, G> g;
    if (need_hidden) {
      g.chosen_hidden = g.rejected_hidden = reinterpret_cast<T*>(dh.data_ptr());
      g.chosen_hidden_stride = g.rejected_hidden_stride = H;
    }
    g.weight = head.weight_ptr<G>();
    g.weight_stride = H;
    g.bias = head.bias_ptr<G>();
    return g;
  }

  /// dHidden in hidden's shape (when needed), dWeight / dBias rounded once to weight's dtype.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(const at::Tensor& hidden, const at::Tensor& w) const {
    return {need_hidden ? dh.reshape(hidden.sizes()) : dh, head.weight_result(w.options()),
            head.bias_result(w.options())};
  }
};

/// The transforms (checked_transforms) and the workspace budget's check.
dpo::logit_transforms transforms_of(double temperature, std::optional<double> softcap, double logit_scale,
                                    std::int64_t workspace_bytes) {
  TORCH_CHECK_VALUE(workspace_bytes >= 1, "workspace_bytes = ", workspace_bytes, " is invalid: must be >= 1");
  return checked_transforms(temperature, softcap, logit_scale);
}

// Outputs: loss [], metrics [num_metrics], pair values [6, P] (float32; float64 for float64
// hidden), then the gradients of the loss w.r.t. hidden (hidden's shape and dtype), weight and
// bias (their dtypes; dWeight / dBias summed in float, double for float64, and rounded once),
// each [0] when its flag is off.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_dpo_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& reference_chosen_logps,
    const std::optional<at::Tensor>& reference_rejected_logps, const std::optional<at::Tensor>& ref_hidden,
    const std::optional<at::Tensor>& ref_weight, const std::optional<at::Tensor>& ref_bias, double temperature,
    std::optional<double> softcap, double logit_scale, std::int64_t ignore_index, DPO_CONFIG_PARAMS,
    bool compute_metrics, bool need_hidden, bool need_weight, bool need_bias, std::int64_t workspace_bytes) {
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "hidden is on ", hidden.device(), ": this kernel is the CPU one");
  const dpo::loss_config cfg = make_config(DPO_CONFIG_ARGS);
  const bool has_ref_hidden = ref_hidden.has_value();
  check_references(cfg, reference_chosen_logps.has_value() || has_ref_hidden,
                   reference_rejected_logps.has_value() || has_ref_hidden);
  TORCH_CHECK_VALUE(!(has_ref_hidden && (reference_chosen_logps.has_value() || reference_rejected_logps.has_value())),
                    "give either ref_hidden or reference_chosen_logps / reference_rejected_logps, not both");
  TORCH_CHECK_VALUE(has_ref_hidden || (!ref_weight.has_value() && !ref_bias.has_value()),
                    "ref_weight / ref_bias are given without ref_hidden");
  const hidden_layout l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
  check_head_tensors(weight, bias, hidden, "weight", "bias", "hidden");
  const dpo::logit_transforms tr = transforms_of(temperature, softcap, logit_scale, workspace_bytes);
  const std::int64_t P = l.num_seqs / 2;
  const at::Tensor rc = pair_vector(reference_chosen_logps, P, hidden, "reference_chosen_logps");
  const at::Tensor rr = pair_vector(reference_rejected_logps, P, hidden, "reference_rejected_logps");
  hidden_layout rl;
  at::Tensor rw, rb;
  if (has_ref_hidden) {
    check_same(*ref_hidden, hidden, "ref_hidden", "hidden");
    TORCH_CHECK_VALUE(ref_hidden->sizes() == hidden.sizes(), "ref_hidden must have hidden's shape ", hidden.sizes(),
                      ", got ", ref_hidden->sizes());
    rl = lower_hidden(*ref_hidden, labels, cu_seqlens, "ref_hidden");
    rw = ref_weight.has_value() ? *ref_weight : weight;
    const std::optional<at::Tensor> rbias = ref_weight.has_value() ? ref_bias : bias;
    check_head_tensors(rw, rbias, hidden, ref_weight.has_value() ? "ref_weight" : "weight",
                       ref_weight.has_value() ? "ref_bias" : "bias", "hidden");
    TORCH_CHECK_VALUE(rw.size(0) == weight.size(0), "ref_weight has vocabulary ", rw.size(0), " but weight has ",
                      weight.size(0), ": they must match");
    rw = rw.contiguous();
    if (rbias.has_value()) rb = rbias->contiguous();
  }
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();

  pair_result_tensors t(P, at::TensorOptions().dtype(at::kDouble));
  at::Tensor &loss = t.loss, &metrics = t.metrics, &pairs = t.pairs;
  dpo::forward_outputs& out = t.out;

  const grad_tensors gt(l, hidden, w, b, need_hidden, need_weight, need_bias);
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = at::get_num_threads();
  opt.gemm = cpu_gemm();
  opt.metrics = compute_metrics;
  opt.workspace_bytes = workspace_bytes;
  dispatch_head(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const auto g = gt.grads<T, dpo::cpu::acc_t<T>>();
    const auto policy = pairs_of<T, L>(l, ignore_index);
    const auto head = head_of<T>(w, b, tr);
    rethrow_as_value_error([&] {
      if (has_ref_hidden)
        dpo::cpu::linear_dpo(policy, head, pairs_of<T, L>(rl, ignore_index), head_of<T>(rw, rb, tr), cfg, out, g,
                             opt);
      else
        dpo::cpu::linear_dpo(policy, head, rc.defined() ? rc.data_ptr<double>() : nullptr,
                             rr.defined() ? rr.data_ptr<double>() : nullptr, cfg, out, g, opt);
    });
  });
  const auto res = result_dtype(hidden.scalar_type());
  const auto [dh, dw, db] = gt.result(hidden, weight);
  return {loss.to(res), metrics.to(res), pairs.to(res), dh, dw, db};
}

// ---- DPO from hidden states on a head shard (dpo/cpu/linear_shard.hpp; docs/distributed.md) -----
// weight / bias hold rows [vocab_start, vocab_start + V_local) of a head of vocab_size rows;
// labels are global ids. Records and maxima are indexed by hidden's rows ([R] and
// [R, shard_fields], R = 2P * T or N), one array for both sides. The collectives between these
// ops are torch.distributed all-reduces issued from Python (dpo_kernels/distributed.py).

/// The checked inputs of a sharded call: layout, head tensors, transforms.
struct shard_call {
  hidden_layout l;
  at::Tensor w, b;
  dpo::logit_transforms tr;
  dpo::vocab_shard sh;
};

shard_call shard_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens, double temperature,
                        std::optional<double> softcap, double logit_scale, std::int64_t vocab_start,
                        std::int64_t vocab_size, std::int64_t workspace_bytes) {
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "hidden is on ", hidden.device(), ": this kernel is the CPU one");
  shard_call c;
  c.l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
  check_head_tensors(weight, bias, hidden, "weight", "bias", "hidden");
  c.tr = transforms_of(temperature, softcap, logit_scale, workspace_bytes);
  c.w = weight.contiguous();
  if (bias.has_value()) c.b = bias->contiguous();
  c.sh = {vocab_size, vocab_start, vocab_start + weight.size(0)};
  return c;
}

at::Tensor row_state(const at::Tensor& t, std::int64_t rows, std::int64_t width, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == rows * width && t.device().is_cpu(), name, " must be the CPU float64 [", rows,
                    width > 1 ? ", " + std::to_string(width) : std::string(), "] tensor of linear_dpo_shard_partials",
                    " for this hidden, got ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

dpo::cpu::linear_dpo_options shard_options(bool metrics, std::int64_t workspace_bytes) {
  dpo::cpu::linear_dpo_options o;
  o.num_threads = at::get_num_threads();
  o.gemm = cpu_gemm();
  o.metrics = metrics;
  o.workspace_bytes = workspace_bytes;
  return o;
}

std::tuple<at::Tensor, at::Tensor> linear_dpo_shard_partials_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens, double temperature,
    std::optional<double> softcap, double logit_scale, std::int64_t ignore_index, std::int64_t vocab_start,
    std::int64_t vocab_size, bool metrics, std::int64_t workspace_bytes) {
  const shard_call c = shard_inputs(hidden, weight, bias, labels, cu_seqlens, temperature, softcap, logit_scale,
                                    vocab_start, vocab_size, workspace_bytes);
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  // Rows no side's sequences span keep the empty record (nothing in the sums, -inf in the max).
  at::Tensor row_max = at::full({c.l.rows}, -INFINITY, dbl);
  at::Tensor records = at::zeros({c.l.rows, dpo::shard_fields}, dbl);
  records.select(1, static_cast<int>(dpo::shard_field::shard_max)).fill_(-INFINITY);
  dispatch_head(c.l.hidden.scalar_type(), c.l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    double* m = row_max.data_ptr<double>();
    double* r = records.data_ptr<double>();
    rethrow_as_value_error([&] {
      dpo::cpu::linear_pair_shard_partials(pairs_of<T, L>(c.l, ignore_index), head_of<T>(c.w, c.b, c.tr), c.sh, m, r,
                                           m, r, shard_options(metrics, workspace_bytes));
    });
  });
  return {row_max, records};
}

// The [seq_fields, 2P] sequence sums from the combined records (what the context group sums).
at::Tensor linear_dpo_shard_sequences_cpu(const at::Tensor& hidden, const at::Tensor& labels,
                                          const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_max,
                                          const at::Tensor& records, std::int64_t ignore_index,
                                          std::int64_t vocab_start, std::int64_t vocab_end, std::int64_t vocab_size,
                                          double ld_alpha, bool metrics) {
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "hidden is on ", hidden.device(), ": this kernel is the CPU one");
  const hidden_layout l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
  const at::Tensor m = row_state(row_max, l.rows, 1, "row_max");
  const at::Tensor r = row_state(records, l.rows, dpo::shard_fields, "records");
  at::Tensor seq = at::zeros({dpo::seq_fields, l.num_seqs}, at::kDouble);
  dispatch_head(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const double* pm = m.data_ptr<double>();
    const double* pr = r.data_ptr<double>();
    rethrow_as_value_error([&] {
      dpo::cpu::linear_pair_shard_sequences(pairs_of<T, L>(l, ignore_index), {vocab_size, vocab_start, vocab_end}, pm,
                                            pr, pm, pr, ld_alpha, seq.data_ptr<double>(), metrics);
    });
  });
  return seq;
}

// The shard-local backward: (dHidden PARTIAL in hidden's shape, dWeight rows, dBias rows); the
// caller sums dHidden over the tensor-parallel group.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_dpo_shard_backward_cpu(
    const at::Tensor& seq_grad, const at::Tensor& nll_token_grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& row_max, const at::Tensor& records, double temperature, std::optional<double> softcap,
    double logit_scale, std::int64_t ignore_index, std::int64_t vocab_start, std::int64_t vocab_size,
    double ld_alpha, bool need_hidden, bool need_weight, bool need_bias, std::int64_t workspace_bytes) {
  const shard_call c = shard_inputs(hidden, weight, bias, labels, cu_seqlens, temperature, softcap, logit_scale,
                                    vocab_start, vocab_size, workspace_bytes);
  const hidden_layout& l = c.l;
  const at::Tensor m = row_state(row_max, l.rows, 1, "row_max");
  const at::Tensor r = row_state(records, l.rows, dpo::shard_fields, "records");
  TORCH_CHECK_VALUE(seq_grad.dim() == 1 && seq_grad.size(0) == l.num_seqs, "seq_grad must have shape [", l.num_seqs,
                    "], got ", seq_grad.sizes());
  TORCH_CHECK_VALUE(nll_token_grad.numel() == 1, "nll_token_grad must hold one value, got shape ",
                    nll_token_grad.sizes());
  const at::Tensor g = seq_grad.to(at::kDouble).contiguous();
  const double nll = nll_token_grad.to(at::kDouble).item<double>();
  const grad_tensors gt(l, hidden, c.w, c.b, need_hidden, need_weight, need_bias);
  dispatch_head(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const auto gr = gt.grads<T, dpo::cpu::acc_t<T>>();
    const double* pm = m.data_ptr<double>();
    const double* pr = r.data_ptr<double>();
    rethrow_as_value_error([&] {
      dpo::cpu::linear_pair_shard_backward(pairs_of<T, L>(l, ignore_index), head_of<T>(c.w, c.b, c.tr), c.sh, pm, pr,
                                           pm, pr, g.data_ptr<double>(), nll, ld_alpha, gr, 1.0,
                                           shard_options(false, workspace_bytes));
    });
  });
  return gt.result(hidden, weight);
}

void no_cuda_linear_dpo(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op.schema().name(), ": DPO from hidden states has no CUDA kernel in this ",
                              "dpo_kernels build (CPU only for now): move hidden, weight, bias and labels to the CPU");
}

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_FRAGMENT(dpo_kernels, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "linear_dpo(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? cu_seqlens, "
      "Tensor? reference_chosen_logps, Tensor? reference_rejected_logps, Tensor? ref_hidden, Tensor? ref_weight, "
      "Tensor? ref_bias, float temperature, float? softcap, float logit_scale, int ignore_index" DPO_CONFIG_SCHEMA
      ", bool compute_metrics, bool need_hidden, bool need_weight, bool need_bias, int workspace_bytes) -> "
      "(Tensor loss, Tensor metrics, Tensor pair_values, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
      tags);
  m.def(
      "linear_dpo_shard_partials(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? cu_seqlens, "
      "float temperature, float? softcap, float logit_scale, int ignore_index, int vocab_start, int vocab_size, "
      "bool metrics, int workspace_bytes) -> (Tensor row_max, Tensor records)");
  m.def(
      "linear_dpo_shard_sequences(Tensor hidden, Tensor labels, Tensor? cu_seqlens, Tensor row_max, Tensor records, "
      "int ignore_index, int vocab_start, int vocab_end, int vocab_size, float ld_alpha, bool metrics) -> Tensor");
  m.def(
      "linear_dpo_shard_backward(Tensor seq_grad, Tensor nll_token_grad, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, Tensor? cu_seqlens, Tensor row_max, Tensor records, float temperature, float? softcap, "
      "float logit_scale, int ignore_index, int vocab_start, int vocab_size, float ld_alpha, bool need_hidden, "
      "bool need_weight, bool need_bias, int workspace_bytes) -> (Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("linear_dpo", &dpo_kernels::linear_dpo_cpu);
  m.impl("linear_dpo_shard_partials", &dpo_kernels::linear_dpo_shard_partials_cpu);
  m.impl("linear_dpo_shard_sequences", &dpo_kernels::linear_dpo_shard_sequences_cpu);
  m.impl("linear_dpo_shard_backward", &dpo_kernels::linear_dpo_shard_backward_cpu);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  for (const char* name : {"linear_dpo", "linear_dpo_shard_partials", "linear_dpo_shard_sequences",
                           "linear_dpo_shard_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&dpo_kernels::no_cuda_linear_dpo>());
}
