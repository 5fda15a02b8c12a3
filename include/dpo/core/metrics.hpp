// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The metrics TRL's DPOTrainer logs, as one unit both backends share: the table of metrics
// (order and logging names), the struct generated from it, the named batch totals the
// backends reduce, and the one finalize() that turns those totals into the metrics. A
// backend decides only how it sums (a loop, a block reduction), never which sum feeds which
// metric.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dpo/core/math.hpp"

/// The metrics in output order (the order of the `metrics` output of the PyTorch op and of
/// dpo::metrics' fields): X(field, TRL logging name, meaning).
#define DPO_METRICS(X)                                                                              \
  X(rewards_chosen, "rewards/chosen", "mean beta * D_c")                                          \
  X(rewards_rejected, "rewards/rejected", "mean beta * D_r")                                      \
  X(rewards_accuracies, "rewards/accuracies", "mean 1[beta * D_c > beta * D_r]")                  \
  X(rewards_margins, "rewards/margins", "mean (beta * D_c - beta * D_r)")                         \
  X(logps_chosen, "logps/chosen", "mean pi_c")                                                    \
  X(logps_rejected, "logps/rejected", "mean pi_r")                                                \
  X(logits_chosen, "logits/chosen", "mean over chosen completion tokens of the row's mean logit") \
  X(logits_rejected, "logits/rejected", "the same over rejected completion tokens")               \
  X(entropy, "entropy", "mean entropy over all completion tokens")                                \
  X(mean_token_accuracy, "mean_token_accuracy",                                                   \
    "share of chosen completion tokens whose argmax is the label")                                \
  X(nll_loss, "nll_loss", "mean token cross-entropy over chosen completion tokens")

namespace dpo {

/// The metrics TRL's DPOTrainer logs (docs/losses.md), fields in output order
/// (DPO_METRICS). Plain doubles only: the struct can be copied straight into a [num_metrics]
/// double buffer, field k at index k.
struct metrics {
#define DPO_METRIC_FIELD(field, name, doc) double field = 0;
  DPO_METRICS(DPO_METRIC_FIELD)
#undef DPO_METRIC_FIELD
};

#define DPO_METRIC_COUNT(field, name, doc) +1
/// Number of metrics (fields of dpo::metrics).
inline constexpr int num_metrics = 0 DPO_METRICS(DPO_METRIC_COUNT);
#undef DPO_METRIC_COUNT

static_assert(sizeof(metrics) == num_metrics * sizeof(double),
              "dpo::metrics must be num_metrics doubles, in output order");

/// TRL's logging name of each metric, in output order.
inline constexpr const char* metric_names[num_metrics] = {
#define DPO_METRIC_NAME(field, name, doc) name,
    DPO_METRICS(DPO_METRIC_NAME)
#undef DPO_METRIC_NAME
};

/// The fields of token_totals: sums over the batch's completion tokens (per-sequence sums
/// added over the pairs). X(field, meaning).
#define DPO_TOKEN_TOTALS(X)                                                      \
  X(chosen_tokens, "completion-token count, chosen side")                       \
  X(rejected_tokens, "completion-token count, rejected side")                   \
  X(chosen_logps, "plain (not LD-weighted) chosen token log-probs: the NLL's sum") \
  X(logits_chosen, "row mean logits, chosen completion tokens")                 \
  X(logits_rejected, "row mean logits, rejected completion tokens")             \
  X(entropy, "row entropies, both sides")                                       \
  X(chosen_hits, "chosen completion tokens whose argmax is the label")

/// The fields of pair_totals: sums over the batch's pairs. X(field, meaning).
#define DPO_PAIR_TOTALS(X)                                   \
  X(loss, "per-pair losses")                                \
  X(rewards_chosen, "beta * D_c")                           \
  X(rewards_rejected, "beta * D_r")                         \
  X(accuracies, "pairs with beta * D_c > beta * D_r")       \
  X(logps_chosen, "pi_c")                                   \
  X(logps_rejected, "pi_r")

#define DPO_TOTALS_FIELD(field, doc) double field;
#define DPO_TOTALS_ADD(field, doc) field += o.field;

/// Sums over the batch's completion tokens (DPO_TOKEN_TOTALS). Trivial (no initializers),
/// so it can sit in CUDA shared memory: value-initialize it, `{}`.
struct token_totals {
  DPO_TOKEN_TOTALS(DPO_TOTALS_FIELD)

  DPO_HOST_DEVICE token_totals& operator+=(const token_totals& o) {
    DPO_TOKEN_TOTALS(DPO_TOTALS_ADD)
    return *this;
  }
};

DPO_HOST_DEVICE inline token_totals operator+(token_totals a, const token_totals& b) { return a += b; }

/// Sums over the batch's pairs (DPO_PAIR_TOTALS). Trivial, as token_totals: value-initialize
/// it, `{}`.
struct pair_totals {
  DPO_PAIR_TOTALS(DPO_TOTALS_FIELD)

  /// Adds pair i's values.
  DPO_HOST_DEVICE void add_pair(double pair_loss, double reward_c, double reward_r,
                                double logp_c, double logp_r) {
    loss += pair_loss;
    rewards_chosen += reward_c;
    rewards_rejected += reward_r;
    accuracies += reward_c > reward_r ? 1.0 : 0.0;
    logps_chosen += logp_c;
    logps_rejected += logp_r;
  }

  DPO_HOST_DEVICE pair_totals& operator+=(const pair_totals& o) {
    DPO_PAIR_TOTALS(DPO_TOTALS_ADD)
    return *this;
  }
};

#undef DPO_TOTALS_ADD
#undef DPO_TOTALS_FIELD

DPO_HOST_DEVICE inline pair_totals operator+(pair_totals a, const pair_totals& b) { return a += b; }

/// A sum functor for block reductions of the totals (cub::BlockReduce takes any struct).
struct totals_sum {
  template <class S>
  DPO_HOST_DEVICE S operator()(const S& a, const S& b) const {
    return a + b;
  }
};

/// NLL(chosen): the mean token cross-entropy over the batch's chosen completion tokens.
DPO_HOST_DEVICE inline double batch_nll(const token_totals& t) {
  return -t.chosen_logps / (t.chosen_tokens < 1.0 ? 1.0 : t.chosen_tokens);
}

/// The token metrics from the token totals: TRL's means over completion tokens (0 where a
/// side has none). The other fields of m are left as they are.
DPO_HOST_DEVICE inline void set_token_metrics(metrics& m, const token_totals& t) {
  const auto ratio = [](double num, double den) { return den > 0 ? num / den : 0.0; };
  m.logits_chosen = ratio(t.logits_chosen, t.chosen_tokens);
  m.logits_rejected = ratio(t.logits_rejected, t.rejected_tokens);
  m.entropy = ratio(t.entropy, t.chosen_tokens + t.rejected_tokens);
  m.mean_token_accuracy = ratio(t.chosen_hits, t.chosen_tokens);
}

/// TRL's metrics of a batch of P pairs from its totals. `token_metrics` false (the logits
/// were not read for them) leaves the token metrics 0.
DPO_HOST_DEVICE inline metrics finalize(const pair_totals& p, const token_totals& t,
                                        std::int64_t num_pairs, bool token_metrics) {
  const double P = static_cast<double>(num_pairs);
  metrics m;
  m.rewards_chosen = p.rewards_chosen / P;
  m.rewards_rejected = p.rewards_rejected / P;
  m.rewards_accuracies = p.accuracies / P;
  m.rewards_margins = (p.rewards_chosen - p.rewards_rejected) / P;
  m.logps_chosen = p.logps_chosen / P;
  m.logps_rejected = p.logps_rejected / P;
  m.nll_loss = batch_nll(t);
  if (token_metrics) set_token_metrics(m, t);
  return m;
}

}  // namespace dpo
