// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The tensors of the ops' outputs and the dpo::forward_outputs that point into them: one
// adapter for both backends, whose entry points take the same caller-owned outputs
// (dpo/core/outputs.hpp). A backend's kernel checks its device and makes the library call.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "dpo/core/metrics.hpp"
#include "dpo/core/outputs.hpp"

namespace dpo_kernels {

/// The checked inputs of a fused forward on logits, for both backends: the layout of the
/// policy's logits (and of the reference's, with ref_logits), P, and the reference log-probs
/// as float64 on the logits' device.
struct forward_inputs {
  row_layout l;
  std::int64_t P = 0;
  std::optional<row_layout> rl;
  at::Tensor keep_c, keep_r;
  const double* ref_c = nullptr;
  const double* ref_r = nullptr;
};

/// check_rows(l): the backend's own checks of the policy's layout, run before P is read.
template <class CheckRows>
forward_inputs lower_forward(const dpo::loss_config& cfg, const at::Tensor& logits, const at::Tensor& labels,
                             const std::optional<at::Tensor>& cu_seqlens,
                             const std::optional<at::Tensor>& reference_chosen_logps,
                             const std::optional<at::Tensor>& reference_rejected_logps,
                             const std::optional<at::Tensor>& ref_logits, std::int64_t ignore_index,
                             CheckRows&& check_rows) {
  check_references(cfg, reference_chosen_logps.has_value() || ref_logits.has_value(),
                   reference_rejected_logps.has_value() || ref_logits.has_value());
  forward_inputs f;
  f.l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  check_rows(f.l);
  f.P = concatenated_pairs(f.l);
  f.rl = reference_layout(logits, labels, cu_seqlens, reference_chosen_logps, reference_rejected_logps, ref_logits,
                          ignore_index, f.P);
  f.ref_c = doubles_or_null(reference_chosen_logps, f.keep_c, logits.device());
  f.ref_r = doubles_or_null(reference_rejected_logps, f.keep_r, logits.device());
  return f;
}

/// The pair-level outputs every DPO op returns (double, NaN until written: the CUDA backend
/// writes nothing when the device finds invalid data) and where the library writes them.
/// The metrics struct is in output order (DPO_METRICS), so it is written straight into the
/// `metrics` output.
struct pair_result_tensors {
  at::Tensor loss;     // []
  at::Tensor metrics;  // [num_metrics]: the metrics struct (outputs must not alias: not one buffer with loss)
  at::Tensor pairs;    // [6, P]: chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, losses, weights
  dpo::forward_outputs out;

  pair_result_tensors(std::int64_t P, const at::TensorOptions& dopts) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    loss = at::full({}, nan, dopts);
    metrics = at::full({dpo::num_metrics}, nan, dopts);
    pairs = at::full({6, P}, nan, dopts);
    out.loss = loss.data_ptr<double>();
    out.metrics = reinterpret_cast<dpo::metrics*>(metrics.data_ptr<double>());
    double* p = pairs.data_ptr<double>();
    out.chosen_logps = p;
    out.rejected_logps = p + P;
    out.chosen_rewards = p + 2 * P;
    out.rejected_rewards = p + 3 * P;
    out.losses = p + 4 * P;
    out.weights = p + 5 * P;
  }
};

/// dpo_forward's output tensors (on the logits' device): the pair-level results and the
/// per-row backward state.
struct forward_tensors : pair_result_tensors {
  at::Tensor row_lse;  // [view_rows()]: indexed by the view's row, 0 between sequences
  at::Tensor row_coef;

  forward_tensors(const row_layout& l, std::int64_t P, const at::TensorOptions& dopts)
      : pair_result_tensors(P, dopts) {
    row_lse = at::zeros({l.view_rows()}, dopts);
    row_coef = at::zeros({l.view_rows()}, dopts);
    out.row_lse = row_lse.data_ptr<double>();
    out.row_coef = row_coef.data_ptr<double>();
  }

  /// (loss, metrics, pair_values, row_lse, row_coef) as the op returns them.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> results(const row_layout& l,
                                                                                 const at::Tensor& logits) const {
    const auto out_dtype = result_dtype(logits.scalar_type());
    return {loss.to(out_dtype), metrics.to(out_dtype), pairs.to(out_dtype),
            view_rows_to_input(row_lse, l, logits), view_rows_to_input(row_coef, l, logits)};
  }
};

/// The pair-level ops' tensor parameters (pair_loss, and pair_loss_backward after its
/// grad_losses), in schema order, and the same names as arguments.
#define DPO_PAIR_LOGPS_PARAMS                                                                     \
  const at::Tensor& policy_chosen_logps, const at::Tensor& policy_rejected_logps,                \
      const std::optional<at::Tensor>& reference_chosen_logps,                                    \
      const std::optional<at::Tensor>& reference_rejected_logps,                                  \
      const std::optional<at::Tensor>& chosen_lengths,                                            \
      const std::optional<at::Tensor>& rejected_lengths, const std::optional<at::Tensor>& weights
#define DPO_PAIR_LOGPS_ARGS                                                                       \
  policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, \
      chosen_lengths, rejected_lengths, weights

/// The pair-level ops' prologue on either backend: the checked configuration (the
/// alpha-divergence clamp follows the log-probs' dtype; a missing reference log-prob is named
/// as the Python argument), then the backend's device check (Backend's constructor, which for
/// CUDA also holds the device guard), then the inputs lowered to dpo::pair_logps_in.
template <class Backend>
struct pair_call {
  dpo::loss_config cfg;
  Backend backend;
  pair_inputs p;

  pair_call(DPO_PAIR_LOGPS_PARAMS, DPO_CONFIG_PARAMS)
      : cfg(config(policy_chosen_logps, reference_chosen_logps, reference_rejected_logps, weights.has_value(),
                   DPO_CONFIG_ARGS)),
        backend(policy_chosen_logps),
        p(lower_pairs(DPO_PAIR_LOGPS_ARGS)) {}

  /// The configuration, checked with the inputs it constrains: the references it needs, and
  /// the caller's per-pair weights, which a loss that sorts pairs (aot, aot_unpaired) would
  /// apply to sorted positions (pair_loss_backward's own upstream weights are set after this).
  static dpo::loss_config config(const at::Tensor& policy_chosen_logps,
                                 const std::optional<at::Tensor>& reference_chosen_logps,
                                 const std::optional<at::Tensor>& reference_rejected_logps, bool has_weights,
                                 DPO_CONFIG_PARAMS) {
    const dpo::loss_config c = make_config(DPO_CONFIG_ARGS, clamp_for(policy_chosen_logps.scalar_type()));
    check_references(c, reference_chosen_logps.has_value(), reference_rejected_logps.has_value());
    if (has_weights) {
      const std::string e = dpo::check_pair_weights(c, "weights");
      TORCH_CHECK_VALUE(e.empty(), e);
    }
    return c;
  }

  /// The backend's dpo_loss into caller-owned outputs on the inputs' device.
  void run(const dpo::forward_outputs& o) const { backend.dpo_loss(p.in, cfg, o); }
};

/// The pair_loss op of a backend (Backend: constructed from policy_chosen_logps, it checks
/// the device; its dpo_loss(in, cfg, out) calls the library). Returns (losses,
/// chosen_rewards, rejected_rewards) in the result dtype; losses_i = sum_k w_k loss_k,i W_i,
/// whose mean is the batch loss.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_loss_op(DPO_PAIR_LOGPS_PARAMS, DPO_CONFIG_PARAMS) {
  const pair_call<Backend> call(DPO_PAIR_LOGPS_ARGS, DPO_CONFIG_ARGS);
  const std::int64_t P = call.p.in.num_pairs;
  const auto opts = call.p.pc.options();
  at::Tensor losses = at::empty({P}, opts), chosen = at::empty({P}, opts), rejected = at::empty({P}, opts);
  dpo::forward_outputs o;
  o.losses = losses.data_ptr<double>();
  o.chosen_rewards = chosen.data_ptr<double>();
  o.rejected_rewards = rejected.data_ptr<double>();
  call.run(o);
  const auto out = result_dtype(policy_chosen_logps.scalar_type());
  return {losses.to(out), chosen.to(out), rejected.to(out)};
}

/// The pair_loss_backward op of a backend (as pair_loss_op): the vector-Jacobian product for
/// upstream gradients u is P * dL/dpi of the batch loss with weights W_i * u_i
/// (weigh_by_upstream), the NLL share added on the chosen side. In the inputs' dtypes.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> pair_loss_backward_op(const at::Tensor& grad_losses, DPO_PAIR_LOGPS_PARAMS,
                                                         DPO_CONFIG_PARAMS) {
  pair_call<Backend> call(DPO_PAIR_LOGPS_ARGS, DPO_CONFIG_ARGS);
  const std::int64_t P = call.p.in.num_pairs;
  TORCH_CHECK_VALUE(grad_losses.device() == policy_chosen_logps.device(), "grad_losses is on ",
                    grad_losses.device(), " but policy_chosen_logps is on ", policy_chosen_logps.device());
  const at::Tensor wu = weigh_by_upstream(grad_losses, call.p);
  at::Tensor g = at::empty({2 * P + 1}, call.p.pc.options());
  dpo::forward_outputs o;
  o.grad_chosen = g.data_ptr<double>();
  o.grad_rejected = o.grad_chosen + P;
  o.nll_token_grad = o.grad_chosen + 2 * P;
  call.run(o);
  const double scale = static_cast<double>(P);
  const at::Tensor gc = (g.narrow(0, 0, P) + g.narrow(0, 2 * P, 1)) * scale;
  const at::Tensor gr = g.narrow(0, P, P) * scale;
  return {gc.to(policy_chosen_logps.scalar_type()), gr.to(policy_rejected_logps.scalar_type())};
}

/// A backend's kernel of the dpo_forward operator (its schema is in ops.cpp); returns loss,
/// metrics, pair values, row_lse and row_coef. inplace_backward is read by the autograd
/// formula only.
#define DPO_FORWARD_KERNEL(NAME)                                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> NAME(                         \
      const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens, \
      const std::optional<at::Tensor>& reference_chosen_logps,                                        \
      const std::optional<at::Tensor>& reference_rejected_logps,                                      \
      const std::optional<at::Tensor>& ref_logits, std::int64_t ignore_index, DPO_CONFIG_PARAMS,      \
      bool compute_metrics, bool /*inplace_backward*/)

/// Registers one backend's kernel of every operator (the list of operators with a kernel per
/// backend lives here once). KEY: the dispatch key (CPU, CUDA); SFX: the suffix of that
/// backend's functions (sequence_logps_SFX, ...) and of its pair-level backend (SFX_pairs).
#define DPO_KERNELS_IMPL(KEY, SFX)                                              \
  TORCH_LIBRARY_IMPL(dpo_kernels, KEY, m) {                                     \
    m.impl("sequence_logps", &sequence_logps_##SFX);                            \
    m.impl("sequence_logps_backward", &sequence_logps_backward_##SFX);          \
    m.impl("pair_loss", &pair_loss_op<SFX##_pairs>);                            \
    m.impl("pair_loss_backward", &pair_loss_backward_op<SFX##_pairs>);          \
    m.impl("dpo_forward", &dpo_forward_##SFX);                                  \
    m.impl("dpo_backward", &dpo_backward_##SFX);                                \
    m.impl("dpo_backward_", &dpo_backward_inplace_##SFX);                       \
  }

}  // namespace dpo_kernels
