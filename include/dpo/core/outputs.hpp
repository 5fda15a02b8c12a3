// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Where the forward entry points of both backends write their results: caller-owned memory
// (host pointers for dpo::cpu, device pointers for dpo::cuda).
#pragma once

#include <cstdint>

#include "dpo/core/metrics.hpp"

namespace dpo {

/// The per-pair outputs of dpo_forward and dpo_loss, by field name, in the order of
/// forward_outputs (and of the CPU's owned forward_result): X(name) once each. Code that
/// handles every per-pair output (binds it, sizes it, compares it) expands this list
/// instead of naming the ten fields again.
#define DPO_PAIR_OUTPUTS(X)                                                                       \
  X(losses) X(chosen_rewards) X(rejected_rewards) X(chosen_logps) X(rejected_logps)            \
  X(chosen_tokens) X(rejected_tokens) X(weights) X(grad_chosen) X(grad_rejected)

namespace detail {
#define DPO_DETAIL_COUNT(name) +1
inline constexpr int num_pair_outputs = 0 DPO_PAIR_OUTPUTS(DPO_DETAIL_COUNT);
#undef DPO_DETAIL_COUNT
}  // namespace detail

/// How many per-pair outputs DPO_PAIR_OUTPUTS lists.
inline constexpr int num_pair_outputs = detail::num_pair_outputs;

/// Where dpo_forward and dpo_loss write their results; each pointer may be null (not
/// written). Per-pair arrays have P entries.
struct forward_outputs {
  double* loss = nullptr;              // [1] the batch loss
  dpo::metrics* metrics = nullptr;     // [1]
  double* losses = nullptr;            // per-pair loss; the batch loss is their mean
  double* chosen_rewards = nullptr;    // beta * (pi_c - rho_c)
  double* rejected_rewards = nullptr;  // beta * (pi_r - rho_r)
  double* chosen_logps = nullptr;      // pi_c (LD-DPO weighted when ld_alpha < 1)
  double* rejected_logps = nullptr;    // pi_r
  double* chosen_tokens = nullptr;     // completion-token counts L_c
  double* rejected_tokens = nullptr;   // L_r
  double* weights = nullptr;           // WPO weight W_i (1 without use_weighting)
  double* grad_chosen = nullptr;       // dL/dpi_c per pair
  double* grad_rejected = nullptr;     // dL/dpi_r per pair
  double* nll_token_grad = nullptr;    // [1] dL/dlogp of each chosen completion token (NLL terms)
  /// Per-row backward state, indexed by the logits' row (the buffer's rows; entries of rows
  /// outside every sequence are not written): log-sum-exp and dL/dlogp of the row (0 for
  /// masked rows). With these, dpo_backward_rows needs no other state. Both sides must then
  /// live in one logits buffer (padded or packed pairs).
  double* row_lse = nullptr;
  double* row_coef = nullptr;

  /// Points every per-pair output at its own [P] slice of `base`, which holds
  /// num_pair_outputs * P doubles, in DPO_PAIR_OUTPUTS order (losses first).
  void set_pair_outputs(double* base, std::int64_t P) {
    std::int64_t k = 0;
#define DPO_DETAIL_SET(name) name = base + (k++) * P;
    DPO_PAIR_OUTPUTS(DPO_DETAIL_SET)
#undef DPO_DETAIL_SET
  }
};

}  // namespace dpo
