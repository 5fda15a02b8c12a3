// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Checks the tests share: the largest magnitude of a vector, a closeness check that reports
// the worst element, an element-wise one that also matches NaN and infinities, bitwise
// equality of double vectors, a dpo::error that names an argument, and the DPO_THREAD_LIMIT
// override that lets a test run more threads than there are cores.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <dpo/error.hpp>

#include "catch.hpp"

namespace test_support {

inline double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

/// max |got - want| <= atol + rtol * max |want|, reporting the worst index.
inline void check_close(const std::vector<double>& got, const std::vector<double>& want, double rtol,
                        const char* what, double atol = 0) {
  REQUIRE(got.size() == want.size());
  const double tol = atol + rtol * std::max(max_abs(want), 1e-30);
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(got[i] - want[i]);
    if (!(e <= worst)) {
      worst = e;
      at = i;
    }
  }
  INFO(what << ": worst error " << worst << " at " << at << " (got " << got[at] << ", want "
            << want[at] << "), tolerance " << tol);
  CHECK(worst <= tol);
}

/// Element by element: NaN where want is NaN, the same infinity where want is infinite, else
/// |got - want| <= rtol * (1 + |want|). For outputs whose rows may be degenerate (-inf logits).
inline void check_values(const std::vector<double>& got, const std::vector<double>& want, double rtol,
                         const char* what) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO(what << "[" << i << "]: got " << got[i] << ", want " << want[i]);
    if (std::isnan(want[i])) {
      CHECK(std::isnan(got[i]));
    } else if (std::isinf(want[i])) {
      CHECK(got[i] == want[i]);
    } else {
      CHECK(std::fabs(got[i] - want[i]) <= rtol * (1.0 + std::fabs(want[i])));
    }
  }
}

/// The same size and the same bits.
inline bool bitwise_equal(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

/// Runs `call` and checks that it throws a dpo::error whose message contains `name`.
template <class E>
void expect_error(const std::string& name, E&& call) {
  try {
    call();
    FAIL("no dpo::error for " << name);
  } catch (const dpo::error& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(name) != std::string::npos);
  }
}

/// Sets DPO_THREAD_LIMIT to `limit` unless the environment already sets it, so that more
/// threads than this machine has cores really run. Call it before main (the library reads the
/// variable once, at the first parallel call): `const bool set = preset_thread_limit("16");`.
inline bool preset_thread_limit(const char* limit) {
#ifdef _WIN32
  return std::getenv("DPO_THREAD_LIMIT") != nullptr || _putenv_s("DPO_THREAD_LIMIT", limit) == 0;
#else
  return setenv("DPO_THREAD_LIMIT", limit, 0) == 0;
#endif
}

/// Every pair's loss and both gradients are finite (V: std::vector<double> or an Eigen vector).
template <class V>
void check_pairs_finite(const V& losses, const V& grad_chosen, const V& grad_rejected) {
  for (std::size_t i = 0; i < static_cast<std::size_t>(losses.size()); ++i) {
    INFO("pair " << i);
    CHECK(std::isfinite(losses[i]));
    CHECK(std::isfinite(grad_chosen[i]));
    CHECK(std::isfinite(grad_rejected[i]));
  }
}

/// Aliasing cases named "call: A on B" with the status message each got: the message says
/// "overlaps" and names both A and B.
template <class Case>
void check_alias_cases(const std::vector<Case>& cases) {
  for (const auto& c : cases) {
    INFO(c.what << " -> " << c.message);
    const std::size_t colon = c.what.find(": "), on = c.what.find(" on ");
    const std::string a = c.what.substr(colon + 2, on - colon - 2), b = c.what.substr(on + 4);
    CHECK(c.message.find(a) != std::string::npos);
    CHECK(c.message.find(b) != std::string::npos);
    CHECK(c.message.find("overlaps") != std::string::npos);
  }
}

}  // namespace test_support
