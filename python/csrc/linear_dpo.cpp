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
#include "head.h"
#include "forward_outputs.h"
#include "dpo/core/metrics.hpp"
#include "dpo/cpu/linear_dpo.hpp"

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
  const dpo::logit_transforms tr = checked_transforms(temperature, softcap, logit_scale);
  TORCH_CHECK_VALUE(workspace_bytes >= 1, "workspace_bytes = ", workspace_bytes, " is invalid: must be >= 1");
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

  need_bias = need_bias && b.defined();
  at::Tensor dh = need_hidden ? at::zeros({l.rows, l.H}, hidden.options()) : at::empty({0}, hidden.options());
  const head_grad_tensors hg(w, w.size(0), need_weight, need_bias);

  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = at::get_num_threads();
  opt.metrics = compute_metrics;
  opt.workspace_bytes = workspace_bytes;
  dispatch_head(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    using G = dpo::cpu::acc_t<T>;
    dpo::cpu::linear_dpo_grads<T, G> g;
    if (need_hidden) {
      g.chosen_hidden = g.rejected_hidden = reinterpret_cast<T*>(dh.data_ptr());
      g.chosen_hidden_stride = g.rejected_hidden_stride = l.H;
    }
    g.weight = hg.weight_ptr<G>();
    g.weight_stride = l.H;
    g.bias = hg.bias_ptr<G>();
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
  return {loss.to(res), metrics.to(res), pairs.to(res), need_hidden ? dh.reshape(hidden.sizes()) : dh,
          hg.weight_result(w.options()), hg.bias_result(w.options())};
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
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) { m.impl("linear_dpo", &dpo_kernels::linear_dpo_cpu); }

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("linear_dpo", torch::CppFunction::makeFromBoxedFunction<&dpo_kernels::no_cuda_linear_dpo>());
}
