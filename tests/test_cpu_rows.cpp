// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU row kernels (dpo/cpu/rows.hpp) one by one: the vectorisable exp in ulp, the bf16
// rounding against Eigen's, and one row's statistics against the oracle's token values,
// including argmax ties and chunk boundaries. End-to-end tolerances are bounds; these pin
// the primitives themselves.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <dpo/cpu/rows.hpp>

#include "catch.hpp"
#include "oracle.hpp"

namespace {

/// |got - want| in units of the float spacing at want.
double ulps(float got, double want) {
  const float w = static_cast<float>(want);
  const double spacing = std::nextafter(std::fabs(w), INFINITY) - std::fabs(w);
  return std::fabs(static_cast<double>(got) - want) / spacing;
}

}  // namespace

TEST_CASE("float exp_lane: within 2 ulp over [-87, 88]; 0 for -inf, NaN for NaN", "[rows]") {
  using dpo::cpu::detail::exp_lane;
  double worst = 0, at = 0;
  const int n = 400000;
  for (int i = 0; i <= n; ++i) {
    const float x = static_cast<float>(-87.0 + 175.0 * i / n);
    const double e = ulps(exp_lane(x), std::exp(static_cast<double>(x)));
    if (e > worst) {
      worst = e;
      at = x;
    }
  }
  INFO("worst " << worst << " ulp at x = " << at);
  CHECK(worst <= 2.0);
  // Small arguments, where r is tiny and 1 + r + ... must round right.
  for (float x : {0.0f, -1e-7f, 1e-7f, -1e-3f, 0.5f, -0.5f, -0.34657359f, 0.34657359f}) {
    INFO("x = " << x);
    CHECK(ulps(exp_lane(x), std::exp(static_cast<double>(x))) <= 2.0);
  }
  CHECK(exp_lane(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(exp_lane(-1000.0f) == 0.0f);
  CHECK(std::isnan(exp_lane(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isfinite(exp_lane(1000.0f)));
  CHECK(exp_lane(-std::numeric_limits<double>::infinity()) == 0.0);
}

TEST_CASE("bf16 rounding of gradients equals Eigen's round-to-nearest-even", "[rows]") {
  using dpo::cpu::detail::from_acc;
  std::mt19937 rng(5);
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 1.00390625f, 1.005859375f, 1.0078125f, 3.0e38f, -3.4e38f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min()};
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t bits = rng();
    float x;
    std::memcpy(&x, &bits, sizeof x);
    xs.push_back(x);
  }
  for (float x : xs) {
    const Eigen::bfloat16 got = from_acc<Eigen::bfloat16>(x);
    const Eigen::bfloat16 want(x);
    if (std::isnan(x)) {
      CHECK(std::isnan(static_cast<float>(got)));
    } else if (got.value != want.value) {
      FAIL_CHECK("x = " << x << ": got bits " << got.value << ", Eigen " << want.value);
    }
  }
}

namespace {

template <class T>
void row_stats_against_oracle(std::int64_t V, std::uint64_t seed) {
  INFO("V = " << V);
  using A = dpo::cpu::acc_t<T>;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nrm(0.0, 3.0);
  std::vector<T> row(static_cast<std::size_t>(V));
  std::vector<double> z(static_cast<std::size_t>(V));
  for (std::int64_t v = 0; v < V; ++v) {
    row[v] = T(static_cast<A>(nrm(rng)));
    z[v] = static_cast<double>(static_cast<A>(row[v]));
  }
  // A tie for the maximum in two chunks (and two lanes): the first index must win.
  if (V > 3000) {
    const std::int64_t a = 2100, b = 2500;
    row[a] = row[b] = T(static_cast<A>(20.0));
    z[a] = z[b] = 20.0;
  } else if (V > 40) {
    row[17] = row[33] = T(static_cast<A>(20.0));
    z[17] = z[33] = 20.0;
  }
  dpo::cpu::detail::row_scratch<A> scratch;
  const auto st = dpo::cpu::detail::row_forward<true>(row.data(), V, scratch);
  const oracle::token want = oracle::token_of(z, 0);
  // Accumulation in A: a few ulp per operation, V / 16 sequential adds per lane.
  const double u = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  const double tol = 2 * u * (8.0 + V / 16.0 + 3 * std::log2(double(V)) + std::fabs(double(want.lse)));
  CHECK(std::fabs(double(st.logsumexp()) - double(want.lse)) <= tol);
  CHECK(std::fabs(double(st.logsumexp2()) - double(want.lse2)) <= 2 * tol + 2 * u * std::fabs(double(want.lse2)));
  CHECK(std::fabs(double(st.entropy()) - double(want.entropy)) <= tol);
  CHECK(std::fabs(double(st.zsum) / V - double(want.zmean)) <= tol);
  std::int64_t first = 0;
  for (std::int64_t v = 1; v < V; ++v)
    if (z[v] > z[first]) first = v;
  CHECK(st.argmax == first);
}

}  // namespace

TEST_CASE("row_forward: statistics of one row against the oracle, ties go to the first index", "[rows]") {
  for (std::int64_t V : {1, 3, 16, 17, 41, 2048, 2049, 4099, 6200}) {
    row_stats_against_oracle<float>(V, 80 + V);
    row_stats_against_oracle<double>(V, 81 + V);
    row_stats_against_oracle<Eigen::bfloat16>(V, 82 + V);
    row_stats_against_oracle<Eigen::half>(V, 83 + V);
  }
}
