// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The tensors of the dpo_forward op's outputs and the dpo::forward_outputs that point into
// them: one adapter for both backends, whose entry points take the same caller-owned
// outputs (dpo/core/outputs.hpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
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

}  // namespace dpo_kernels
