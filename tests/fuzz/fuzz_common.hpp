// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the libFuzzer targets share: the input reader (bytes past the end read as 0), a
// splitmix64 generator for the bulk of the data, bitwise comparison with NaN == NaN, the
// property check that traps, and the loss_config decoder (some table entries invalid on
// purpose, so bad configurations are fuzzed too).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <dpo/core/loss.hpp>

/// A violated property traps, so libFuzzer keeps the input.
#define FUZZ_CHECK(cond)                                                               \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::fprintf(stderr, "%s:%d: property violated: %s\n", __FILE__, __LINE__, #cond); \
      __builtin_trap();                                                                \
    }                                                                                  \
  } while (0)

namespace fuzz {

inline const double nan_v = std::numeric_limits<double>::quiet_NaN();
inline const double inf_v = std::numeric_limits<double>::infinity();

/// Reads the input front to back; past its end every read is 0.
struct reader {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t u8() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(u16()) | (std::uint32_t{u16()} << 16); }
};

/// splitmix64: fills the bulk of the logits so that short inputs still give big shapes.
struct rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

template <std::size_t N>
double pick(const double (&table)[N], unsigned i) {
  return table[i % N];
}

/// Bitwise equality, treating any two NaNs as equal.
template <class T>
bool same(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0 || (a != a && b != b);
}

/// Boundaries [0, c_1, ..., V] of W uneven vocabulary shards (W <= V), each at least one
/// column, drawn from r.
inline std::vector<std::int64_t> random_cuts(std::int64_t V, int W, rng& r) {
  std::vector<std::int64_t> cuts{0};
  for (int t = 1; t < W; ++t) {
    // Shard t starts after shard t - 1's first column and leaves a column for each later one.
    const std::int64_t lo = cuts.back() + 1, hi = V - (W - t);
    cuts.push_back(lo + static_cast<std::int64_t>(r.next() % static_cast<std::uint64_t>(hi - lo + 1)));
  }
  cuts.push_back(V);
  return cuts;
}

/// Every rank's dpo::error message ("" when it returned) against the unsharded call: a rank
/// refuses exactly when that call refused (`accepted` false).
inline void check_same_refusal(const std::vector<std::string>& errors, bool accepted, const char* what) {
  for (const std::string& e : errors) {
    if (e.empty() != accepted)
      std::fprintf(stderr, "%s over %zu ranks: \"%s\"; unsharded %s\n", what, errors.size(), e.c_str(),
                   accepted ? "accepted the input" : "refused it");
    FUZZ_CHECK(e.empty() == accepted);
  }
}

/// check_same_refusal for a sharded call, where a context-parallel group (`context`) must
/// also refuse LD-DPO (`ld_alpha` != 1) on every rank, naming it, for input the unsharded call
/// accepted. Returns whether the sharded call was to refuse (nothing written then).
inline bool check_sharded_refusal(const std::vector<std::string>& errors, bool accepted, bool context,
                                  double ld_alpha, const char* what) {
  const bool ld_refused = context && accepted && ld_alpha != 1.0;
  if (ld_refused) {
    for (const std::string& e : errors) FUZZ_CHECK(e.find("ld_alpha") != std::string::npos);
  } else {
    check_same_refusal(errors, accepted, what);
  }
  return !accepted || ld_refused;
}

/// Decodes a loss_config; some table entries are invalid on purpose.
dpo::loss_config read_config(reader& in) {
  using dpo::loss_type;
  static const double num_terms[] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 0, 9};
  static const double weights[] = {1, 0.8, 0.2, 1, 2, -0.5, nan_v, 0};
  static const double betas[] = {0.1, 0.1, 0.5, 1, 0.01, 2, 10, 1e-3,
                                 0.1, 0.25, 5, 0, -0.1, nan_v, inf_v, 1e-6};
  static const double eps[] = {0, 0, 0.1, 0.3, 0.49, 0.5, 0.999, 1, -0.1, nan_v, 1.5, 0.2};
  static const double alpha_coef[] = {0.5, 2, 1, -1, 0.9999999, 0.1, 3, nan_v};
  static const double clamps[] = {80, 11, 1, 0};
  static const double taus[] = {0.05, 1, 0.001, 0};
  static const double gammas[] = {0.5, 0, -1, nan_v};
  static const double cpo_alphas[] = {1, 0, 0.5, -1};
  static const double ld_alphas[] = {1, 0.5, 0, 0.9, 1, 1.5, nan_v, 1};
  static const loss_type cpo_bases[] = {loss_type::sigmoid, loss_type::hinge, loss_type::ipo,
                                        loss_type::sigmoid_norm};

  dpo::loss_config c;
  c.num_terms = static_cast<int>(pick(num_terms, in.u8()));
  for (int k = 0; k < c.num_terms && k < dpo::max_loss_terms; ++k) {
    const unsigned b = in.u8();
    const int t = static_cast<int>(b % 20);
    c.terms[k].type = static_cast<loss_type>(t < 18 ? t : (t == 18 ? 18 : -1));
    c.terms[k].weight = pick(weights, b / 20);
  }
  c.beta = pick(betas, in.u8());
  c.label_smoothing = pick(eps, in.u8());
  unsigned b = in.u8();
  c.divergence = static_cast<dpo::f_divergence>(b % 5 == 4 ? 7 : b % 5);
  c.alpha_divergence_coef = pick(alpha_coef, b / 5);
  b = in.u8();
  c.alpha_exponent_clamp = pick(clamps, b);
  c.discopop_tau = pick(taus, b / 4);
  c.simpo_gamma = pick(gammas, b / 16);
  c.cpo_alpha = pick(cpo_alphas, b / 64);
  b = in.u8();
  c.cdpo_smoothing = (b & 1) != 0;
  c.reference_free = (b & 2) != 0;
  c.use_weighting = (b & 4) != 0;
  c.cpo_base = cpo_bases[(b >> 3) & 3];
  c.ld_alpha = pick(ld_alphas, b >> 5);
  return c;
}

}  // namespace fuzz
