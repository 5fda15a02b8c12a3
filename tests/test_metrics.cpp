// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// dpo/core/metrics.hpp: the metrics table's order and names (the PyTorch `metrics` output
// and TRL's logging keys), the struct generated from it, and finalize() from named totals.
#include <dpo/dpo.hpp>

#include <cstddef>
#include <cstring>
#include <string>
#include <type_traits>

#include "catch.hpp"

TEST_CASE("the metrics table: output order, TRL names, the struct in that order", "[metrics]") {
  const char* const expected[] = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                  "logps/chosen",   "logps/rejected",   "logits/chosen",      "logits/rejected",
                                  "entropy",        "mean_token_accuracy", "nll_loss"};
  STATIC_REQUIRE(dpo::num_metrics == 11);
  STATIC_REQUIRE(sizeof(dpo::metrics) == dpo::num_metrics * sizeof(double));
  for (int k = 0; k < dpo::num_metrics; ++k) CHECK(std::string(dpo::metric_names[k]) == expected[k]);
  // Field k at index k: the struct can be copied straight into the output.
  CHECK(offsetof(dpo::metrics, rewards_chosen) == 0 * sizeof(double));
  CHECK(offsetof(dpo::metrics, rewards_accuracies) == 2 * sizeof(double));
  CHECK(offsetof(dpo::metrics, rewards_margins) == 3 * sizeof(double));
  CHECK(offsetof(dpo::metrics, logits_chosen) == 6 * sizeof(double));
  CHECK(offsetof(dpo::metrics, nll_loss) == 10 * sizeof(double));
  STATIC_REQUIRE(std::is_same_v<dpo::cpu::metrics, dpo::metrics>);
}

TEST_CASE("finalize: TRL's means from named totals", "[metrics]") {
  dpo::pair_totals p{};
  p.add_pair(1.0, 0.5, -0.25, -10.0, -12.0);
  p.add_pair(3.0, -1.0, 0.5, -20.0, -22.0);
  dpo::pair_totals q{};
  q.add_pair(2.0, 2.0, 1.0, -30.0, -32.0);
  const dpo::pair_totals t = p + q;
  CHECK(t.loss == 6.0);
  CHECK(t.accuracies == 2.0);
  dpo::token_totals a{}, b{};
  a.chosen_tokens = 4;
  a.rejected_tokens = 2;
  a.chosen_logps = -8.0;
  a.logits_chosen = 2.0;
  a.logits_rejected = 1.0;
  a.entropy = 3.0;
  a.chosen_hits = 1;
  b.chosen_tokens = 4;
  b.rejected_tokens = 2;
  b.chosen_logps = -4.0;
  b.entropy = 3.0;
  b.chosen_hits = 3;
  const dpo::token_totals tok = a + b;
  const dpo::metrics m = dpo::finalize(t, tok, 3, true);
  CHECK(m.rewards_chosen == 1.5 / 3);
  CHECK(m.rewards_rejected == 1.25 / 3);
  CHECK(m.rewards_margins == (1.5 - 1.25) / 3);
  CHECK(m.rewards_accuracies == 2.0 / 3);
  CHECK(m.logps_chosen == -60.0 / 3);
  CHECK(m.logps_rejected == -66.0 / 3);
  CHECK(m.nll_loss == 12.0 / 8);
  CHECK(m.logits_chosen == 2.0 / 8);
  CHECK(m.logits_rejected == 1.0 / 4);
  CHECK(m.entropy == 6.0 / 12);
  CHECK(m.mean_token_accuracy == 4.0 / 8);
  const dpo::metrics n = dpo::finalize(t, tok, 3, false);  // token metrics not computed: 0
  CHECK((n.logits_chosen == 0 && n.entropy == 0 && n.mean_token_accuracy == 0 && n.nll_loss == m.nll_loss));
  dpo::token_totals none{};
  const dpo::metrics z = dpo::finalize(t, none, 3, true);  // no tokens: 0, not NaN
  CHECK((z.logits_chosen == 0 && z.logits_rejected == 0 && z.entropy == 0 && z.mean_token_accuracy == 0));
}
