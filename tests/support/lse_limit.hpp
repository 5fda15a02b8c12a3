// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// A double LM head whose rows sit past the lse recompute limit (|lse| >= 2^10, where a stored
// double lse is rounded by up to 2^-43 relative to the probabilities), for the CPU and CUDA
// heads' tests that the backward recomputes those rows' max and sum: H = 1 and dyadic values,
// so the logits are exact and so is the long double reference of dBias.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "catch.hpp"

namespace test_support {

struct lse_limit_case {
  static constexpr std::int64_t V = 9;
  std::vector<double> hidden{1.0, 1.0}, weight, bias;
  std::vector<std::int64_t> labels{2, 7};
  std::vector<double> grad_logps{1.0, -0.7};

  lse_limit_case() : weight(V), bias(V, 0.0) {
    for (std::int64_t v = 0; v < V; ++v) weight[v] = 1536.0 + 0.375 * static_cast<double>((v * 5) % V);
  }

  /// dBias = sum_r grad_logps[r] (1[v = y_r] - p_v), against the long double reference.
  void check_dbias(const std::vector<double>& db) const {
    using ld = long double;
    REQUIRE(static_cast<std::int64_t>(db.size()) == V);
    ld m = -INFINITY;
    for (double w : weight) m = std::max<ld>(m, w);
    ld s = 0;
    for (double w : weight) s += std::exp(ld(w) - m);
    for (std::int64_t v = 0; v < V; ++v) {
      const ld pv = std::exp((ld(weight[v]) - m) - std::log(s));
      ld want = 0;
      for (std::size_t r = 0; r < labels.size(); ++r) want += grad_logps[r] * ((labels[r] == v ? 1 : 0) - pv);
      INFO("v = " << v << ": got " << db[v] << ", want " << double(want));
      CHECK(std::fabs(db[v] - double(want)) <= 1e-15 * std::max<double>(std::fabs(double(want)), 1e-3));
    }
  }
};

}  // namespace test_support
