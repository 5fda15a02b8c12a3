// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The tensors of the ops' outputs and the dpo::forward_outputs that point into them: one
// adapter for both backends, whose entry points take the same caller-owned outputs
// (dpo/core/outputs.hpp). A backend's kernel checks its device and makes the library call.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "dpo/core/metrics.hpp"
#include "dpo/core/outputs.hpp"

namespace dpo_kernels {

/// dpo_forward's output tensors (double, on the logits' device) and where the library writes
/// them. The metrics struct is in output order (DPO_METRICS), so it is written straight into
/// the `metrics` output.
struct forward_tensors {
  at::Tensor loss;     // []
  at::Tensor metrics;  // [num_metrics]: the metrics struct (outputs must not alias: not one buffer with loss)
  at::Tensor pairs;    // [6, P]: chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, losses, weights
  at::Tensor row_lse;  // [view_rows()]: indexed by the view's row, 0 between sequences
  at::Tensor row_coef;
  dpo::forward_outputs out;

  forward_tensors(const row_layout& l, std::int64_t P, const at::TensorOptions& dopts) {
    // NaN until written: the CUDA backend writes nothing when the device finds invalid data.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    loss = at::full({}, nan, dopts);
    metrics = at::full({dpo::num_metrics}, nan, dopts);
    pairs = at::full({6, P}, nan, dopts);
    row_lse = at::zeros({l.view_rows()}, dopts);
    row_coef = at::zeros({l.view_rows()}, dopts);
    out.loss = loss.data_ptr<double>();
    out.metrics = reinterpret_cast<dpo::metrics*>(metrics.data_ptr<double>());
    double* p = pairs.data_ptr<double>();
    out.chosen_logps = p;
    out.rejected_logps = p + P;
    out.chosen_rewards = p + 2 * P;
    out.rejected_rewards = p + 3 * P;
    out.losses = p + 4 * P;
    out.weights = p + 5 * P;
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

/// The checked configuration of a pair-level op (pair_loss, pair_loss_backward): the
/// alpha-divergence clamp follows the log-probs' dtype, and a missing reference log-prob
/// is named as the Python argument.
inline dpo::loss_config pair_config(const at::Tensor& policy_chosen_logps,
                                    const std::optional<at::Tensor>& reference_chosen_logps,
                                    const std::optional<at::Tensor>& reference_rejected_logps,
                                    DPO_CONFIG_PARAMS) {
  const dpo::loss_config cfg = make_config(DPO_CONFIG_ARGS, clamp_for(policy_chosen_logps.scalar_type()));
  check_references(cfg, reference_chosen_logps.has_value(), reference_rejected_logps.has_value());
  return cfg;
}

/// pair_loss on either backend, after its device check: `run(in, out)` calls the backend's
/// dpo_loss with caller-owned outputs on the inputs' device. Returns (losses, chosen_rewards,
/// rejected_rewards) in the result dtype; losses_i = sum_k w_k loss_k,i W_i, whose mean is the
/// batch loss.
template <class Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_loss_op(pair_inputs& p, at::ScalarType dtype, Run&& run) {
  const std::int64_t P = p.in.num_pairs;
  at::Tensor losses = at::empty({P}, p.pc.options());
  at::Tensor chosen = at::empty({P}, p.pc.options());
  at::Tensor rejected = at::empty({P}, p.pc.options());
  dpo::forward_outputs o;
  o.losses = losses.data_ptr<double>();
  o.chosen_rewards = chosen.data_ptr<double>();
  o.rejected_rewards = rejected.data_ptr<double>();
  run(p.in, o);
  const auto out = result_dtype(dtype);
  return {losses.to(out), chosen.to(out), rejected.to(out)};
}

/// pair_loss_backward on either backend (as pair_loss_op): the vector-Jacobian product for
/// upstream gradients u is P * dL/dpi of the batch loss with weights W_i * u_i
/// (weigh_by_upstream), the NLL share added on the chosen side. In the inputs' dtypes.
template <class Run>
std::tuple<at::Tensor, at::Tensor> pair_loss_backward_op(const at::Tensor& grad_losses, pair_inputs& p,
                                                         const at::Tensor& policy_chosen_logps,
                                                         const at::Tensor& policy_rejected_logps, Run&& run) {
  const std::int64_t P = p.in.num_pairs;
  TORCH_CHECK_VALUE(grad_losses.device() == policy_chosen_logps.device(), "grad_losses is on ",
                    grad_losses.device(), " but policy_chosen_logps is on ", policy_chosen_logps.device());
  const at::Tensor wu = weigh_by_upstream(grad_losses, p);
  at::Tensor g = at::empty({2 * P + 1}, p.pc.options());
  dpo::forward_outputs o;
  o.grad_chosen = g.data_ptr<double>();
  o.grad_rejected = o.grad_chosen + P;
  o.nll_token_grad = o.grad_chosen + 2 * P;
  run(p.in, o);
  const double scale = static_cast<double>(P);
  const at::Tensor gc = (g.narrow(0, 0, P) + g.narrow(0, 2 * P, 1)) * scale;
  const at::Tensor gr = g.narrow(0, P, P) * scale;
  return {gc.to(policy_chosen_logps.scalar_type()), gr.to(policy_rejected_logps.scalar_type())};
}

}  // namespace dpo_kernels
