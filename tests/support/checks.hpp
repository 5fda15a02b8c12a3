// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Checks the tests share: the largest magnitude of a vector, a closeness check that reports
// the worst element, bitwise equality of double vectors, a dpo::error that names an argument,
// and the DPO_THREAD_LIMIT override that lets a test run more threads than there are cores.
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

}  // namespace test_support
