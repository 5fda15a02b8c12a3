// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The instruction-set levels of the CPU row kernels (dpo/cpu/isa.hpp, issue 17): every level
// this CPU supports gives bitwise the same forward, backward and sequence log-probs for every
// dtype and loss type, except what docs/performance.md says differs (a baseline compiled
// without FMA rounds the fused multiply-adds of the other levels twice: it must then agree
// to a few ulp). The level's vector exp stays within 2 ulp of exp, and the DPO_CPU_ISA /
// set_cpu_isa errors name what is wrong.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"

using dpo::cpu::isa;
using fixture::layout;

namespace {

std::vector<isa> supported_levels() {
  std::vector<isa> v;
  for (isa l : {isa::baseline, isa::avx2, isa::avx512, isa::avx512_bf16})
    if (static_cast<int>(l) <= static_cast<int>(dpo::cpu::cpu_isa_supported())) v.push_back(l);
  return v;
}

/// Whether `level` fuses the multiply-adds of the kernels (FMA). Levels that do agree bitwise.
bool fuses(isa level) { return level != isa::baseline || dpo::cpu::detail::baseline_fma; }

/// Sets a level for one scope, then goes back to the best one.
struct with_level {
  explicit with_level(isa l) { dpo::cpu::set_cpu_isa(l); }
  ~with_level() { dpo::cpu::set_cpu_isa(dpo::cpu::cpu_isa_supported()); }
};

template <class T>
using outputs = fixture::run_outputs<T>;

/// One run on 2 threads, row stride + 3, with or without metrics.
template <class T>
outputs<T> run_all(const fixture::named_config& nc, const oracle::batch& b, const fixture::reference& ref,
                   layout k, bool metrics) {
  return fixture::run_all<T>(nc, b, ref, k, 3, 2, metrics);
}

/// The doubles a run produced, in a fixed order (metrics included).
template <class T>
std::vector<double> doubles_of(const outputs<T>& a) {
  std::vector<double> d{a.r.loss, a.r.nll_token_grad};
  const auto add = [&](const auto& x) {
    for (Eigen::Index i = 0; i < static_cast<Eigen::Index>(x.size()); ++i) d.push_back(x[i]);
  };
  add(a.r.losses);
  add(a.r.chosen_rewards);
  add(a.r.rejected_rewards);
  add(a.r.chosen_logps);
  add(a.r.rejected_logps);
  add(a.r.weights);
  add(a.r.grad_chosen);
  add(a.r.grad_rejected);
  add(a.sums);
  add(a.tok);
  for (const auto* rows : {&a.r.chosen_rows, &a.r.rejected_rows}) {
    add(rows->lse);
    add(rows->logp);
    add(rows->coef);
  }
  const std::size_t n = sizeof(a.r.metrics) / sizeof(double);
  static_assert(sizeof(a.r.metrics) % sizeof(double) == 0, "metrics are doubles");
  std::vector<double> m(n);
  std::memcpy(m.data(), &a.r.metrics, sizeof(a.r.metrics));
  d.insert(d.end(), m.begin(), m.end());
  return d;
}

template <class T>
double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
double to_double<double>(double x) {
  return x;
}

/// Everything two runs wrote: bitwise equal (NaN payloads aside: none occur here), or, for
/// the baseline without FMA against a fused level, the same up to the rounding of the fused
/// products (relative 1e-5 for the doubles, 2 units of T's precision for the gradients).
template <class T>
void check_outputs(const outputs<T>& a, const outputs<T>& b, bool bitwise) {
  const std::vector<double> da = doubles_of(a), db = doubles_of(b);
  REQUIRE(da.size() == db.size());
  for (std::size_t i = 0; i < da.size(); ++i) {
    INFO("double output " << i << ": " << da[i] << " vs " << db[i]);
    if (bitwise) {
      CHECK(std::memcmp(&da[i], &db[i], sizeof(double)) == 0);
    } else {
      CHECK((da[i] == db[i] || std::fabs(da[i] - db[i]) <= 1e-5 * std::max(1.0, std::fabs(db[i]))));
    }
  }
  const double eps = bitwise                            ? 0.0
                     : std::is_same_v<T, double>        ? 1e-12
                     : std::is_same_v<T, float>         ? 1e-5
                     : std::is_same_v<T, Eigen::half>   ? std::ldexp(1.0, -9)
                                                        : std::ldexp(1.0, -6);
  for (const auto* g : {&a.grad, &a.grad_r}) {
    const auto* h = g == &a.grad ? &b.grad : &b.grad_r;
    REQUIRE(g->size() == h->size());
    std::size_t far = 0;
    for (std::size_t i = 0; i < g->size(); ++i) {
      const bool same = bitwise ? std::memcmp(&(*g)[i], &(*h)[i], sizeof(T)) == 0 : [&] {
        const double x = to_double((*g)[i]), y = to_double((*h)[i]);
        return x == y || std::fabs(x - y) <= eps * std::fabs(y) + 1e-30;
      }();
      if (!same && far++ == 0) UNSCOPED_INFO("first differing gradient " << i);
    }
    CHECK(far == 0);
  }
}

/// A batch over several row chunks with a tail (V = 2 * 2048 + 37), with logits the clamps
/// and the -inf handling see: -inf, very negative and very large values.
template <class T>
oracle::batch isa_batch(std::uint64_t seed) {
  fixture::batch_spec sp = fixture::spec(2, 4, 2 * 2048 + 37, seed);
  sp.scale = 4.0;
  oracle::batch b = fixture::random_batch(sp);
  for (auto* side : {&b.chosen, &b.rejected})
    for (auto& s : *side)
      for (std::size_t t = 0; t < s.z.size(); ++t) {
        auto& row = s.z[t];
        const auto set = [&](std::size_t at, double x) {
          if (static_cast<std::int64_t>(at % row.size()) != s.y[t]) row[at % row.size()] = x;  // never the label
        };
        set(7 * t + 3, -std::numeric_limits<double>::infinity());
        set(11 * t + 5, -200.0);
        set(13 * t + 1, 60.0 + static_cast<double>(t));
      }
  fixture::round_batch<T>(b);
  return b;
}

template <class T>
void levels_agree(const char* dtype) {
  const std::vector<isa> levels = supported_levels();
  for (const fixture::named_config& nc : fixture::every_loss_type()) {
    for (layout k : {layout::padded, layout::packed}) {
      for (bool metrics : {true, false}) {
        INFO(dtype << " " << nc.name << " " << fixture::name_of(k) << " metrics " << metrics);
        const oracle::batch b = isa_batch<T>(17);
        const fixture::reference ref = fixture::make_reference(nc.cfg, b, 5);
        outputs<T> best;
        {
          with_level w(levels.back());
          best = run_all<T>(nc, b, ref, k, metrics);
        }
        for (isa l : levels) {
          if (l == levels.back()) continue;
          INFO("level " << dpo::cpu::isa_name(l) << " against " << dpo::cpu::isa_name(levels.back()));
          with_level w(l);
          const outputs<T> got = run_all<T>(nc, b, ref, k, metrics);
          check_outputs(got, best, fuses(l) == fuses(levels.back()) || std::is_same_v<T, double>);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("isa: every supported level gives the same results, every dtype and loss type", "[isa]") {
  INFO("best level here: " << dpo::cpu::isa_name(dpo::cpu::cpu_isa_supported())
                           << ", baseline FMA: " << dpo::cpu::detail::baseline_fma);
  levels_agree<float>("float");
  levels_agree<Eigen::bfloat16>("bf16");
  levels_agree<Eigen::half>("half");
  levels_agree<double>("double");
}

TEST_CASE("isa: every level's exp (through the backward kernel) is within 2 ulp of exp", "[isa]") {
  const int n = 200003;
  std::vector<float> z(static_cast<std::size_t>(n)), g(z.size());
  for (int i = 0; i < n; ++i) z[i] = static_cast<float>(-87.0 + 175.0 * i / (n - 1));
  for (isa l : supported_levels()) {
    INFO("level " << dpo::cpu::isa_name(l));
    with_level w(l);
    dpo::cpu::detail::backward_row<float, float>(z.data(), g.data(), n, dpo::detail::lse_parts<float>(0.0f, 0.0f),
                                                 -1.0f);
    double worst = 0;
    for (int i = 0; i < n; ++i) {
      const double want = std::exp(static_cast<double>(z[i]));
      const float wf = static_cast<float>(want);
      const double spacing = std::nextafter(std::fabs(wf), INFINITY) - std::fabs(wf);
      worst = std::max(worst, std::fabs(-static_cast<double>(g[i]) - want) / spacing);
    }
    CHECK(worst <= 2.0);
    // -inf gives 0, NaN gives NaN, at every position of a register and in the tail.
    for (int V : {16, 37}) {
      std::vector<float> x(static_cast<std::size_t>(V), -INFINITY), y(x.size(), 1.0f);
      x[3] = std::numeric_limits<float>::quiet_NaN();
      dpo::cpu::detail::backward_row<float, float>(x.data(), y.data(), V, dpo::detail::lse_parts<float>(0.0f, 0.0f),
                                                   -1.0f);
      for (int i = 0; i < V; ++i) {
        if (i == 3) {
          CHECK(std::isnan(y[i]));
        } else {
          CHECK(std::memcmp(&y[i], "\0\0\0\x80", 4) == 0);  // -0: exp = +0 times -1
        }
      }
    }
  }
}

TEST_CASE("isa: every level's gradient c exp(z) below the normal range (docs/api.md)", "[isa]") {
  // AVX-512 scales by 2^k with vscalefps: c exp(z) rounded once, down into the subnormals
  // (within one unit of the smallest, 2^-149, below 2^-126), c folded into the polynomial.
  // The other levels build 2^k from its exponent bits: the same while exp(z) >= 2^-126.5,
  // then +0, even where c exp(z) is a normal float (c large). Every level, every coefficient: -inf gives exactly 0 (a large coefficient times
  // the clamped exponential must not leave a subnormal).
  const int n = 40001;
  std::vector<float> z(static_cast<std::size_t>(n)), g(z.size());
  for (int i = 0; i < n; ++i) z[i] = static_cast<float>(-210.0 + 210.0 * i / (n - 1));
  z[17] = -INFINITY;
  const double unit = std::ldexp(1.0, -149), normal = std::ldexp(1.0, -126);
  for (isa l : supported_levels()) {
    for (float c : {-1.0f, -0.37f, 12.5f, -3e30f, 2e-30f}) {
      INFO("level " << dpo::cpu::isa_name(l) << ", coefficient " << c);
      with_level w(l);
      dpo::cpu::detail::backward_row<float, float>(z.data(), g.data(), n, dpo::detail::lse_parts<float>(0.0f, 0.0f),
                                                   c);
      const bool avx512 = l == isa::avx512 || l == isa::avx512_bf16;
      std::size_t bad = 0;
      for (int i = 0; i < n; ++i) {
        const double want = static_cast<double>(c) * std::exp(static_cast<double>(z[i]));
        const double got = g[i], err = std::fabs(got - want);
        const double tol = 3.0 * std::ldexp(std::fabs(want), -24) + (std::fabs(want) >= normal ? 0.0 : unit);
        const bool flushed = !avx512 && std::exp(static_cast<double>(z[i])) < 1.1 * normal;  // (c large: want normal)
        const bool ok = i == 17 ? got == 0.0 : flushed ? got == 0.0 || err <= tol : err <= tol;
        if (!ok && bad++ == 0) UNSCOPED_INFO("z = " << z[i] << ": " << got << " against " << want);
      }
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("isa: half and bf16 rounding of the gradient match the scalar conversions at every level", "[isa]") {
  // Values across the half range, its subnormals, overflow and bf16 ties: g = -exp(z) * -c
  // with coef = 1 gives round(exp(z)); compare with Eigen's conversion of the same float.
  // coef = 3e-36 puts the floats in bf16's subnormal range and below (the AVX512_BF16
  // conversion flushes those: the kernels must not), and a NaN logit checks the NaN's bits.
  // coef = 6e-39 (itself subnormal) and 3e36 (the largest gradients overflow to infinity) take the
  // AVX512_BF16 level's integer rounding throughout and its conversion throughout.
  const int n = 4099;
  std::vector<float> zf(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) zf[i] = static_cast<float>(-20.0 + 32.0 * i / (n - 1));
  zf[1001] = std::numeric_limits<float>::quiet_NaN();
  for (isa l : supported_levels()) {
    for (float coef : {1.0f, 3e-36f, 6e-39f, 3e36f}) {
      INFO("level " << dpo::cpu::isa_name(l) << ", coef " << coef);
      with_level w(l);
      const dpo::detail::lse_parts<float> lse(0.0f, 0.0f);
      // The same exponentials rounded to half and bf16 by the kernels: from logits that are
      // exactly representable in each type, so compare each with its own float run.
      std::vector<Eigen::half> zh(zf.size()), gh(zf.size());
      std::vector<Eigen::bfloat16> zb(zf.size()), gb(zf.size());
      for (int i = 0; i < n; ++i) {
        zh[i] = Eigen::half(zf[i]);
        zb[i] = Eigen::bfloat16(zf[i]);
      }
      std::vector<float> zhf(zf.size()), zbf(zf.size()), eh(zf.size()), eb(zf.size());
      for (int i = 0; i < n; ++i) {
        zhf[i] = static_cast<float>(zh[i]);
        zbf[i] = static_cast<float>(zb[i]);
      }
      dpo::cpu::detail::backward_row<float, float>(zhf.data(), eh.data(), n, lse, coef);
      dpo::cpu::detail::backward_row<float, float>(zbf.data(), eb.data(), n, lse, coef);
      dpo::cpu::detail::backward_row<Eigen::half, float>(zh.data(), gh.data(), n, lse, coef);
      dpo::cpu::detail::backward_row<Eigen::bfloat16, float>(zb.data(), gb.data(), n, lse, coef);
      std::size_t bad_h = 0, bad_b = 0, subnormal_b = 0;
      for (int i = 0; i < n; ++i) {
        const std::uint16_t h = Eigen::numext::bit_cast<std::uint16_t>(gh[i]);
        // NaN: a half NaN of any payload (F16C keeps part of it); bf16: Eigen's bits.
        bad_h += std::isnan(eh[i]) ? !Eigen::numext::isnan(gh[i])
                                   : h != Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(eh[i]));
        const std::uint16_t b = Eigen::numext::bit_cast<std::uint16_t>(gb[i]);
        bad_b += b != Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(eb[i]));
        subnormal_b += (b & 0x7f80u) == 0 && (b & 0x7fu) != 0;
      }
      CHECK(bad_h == 0);
      CHECK(bad_b == 0);
      if (coef < 1.0f) CHECK(subnormal_b > 100);
    }
  }
}

TEST_CASE("isa: set_cpu_isa rejects levels this CPU lacks, naming them; cpu_isa reports the choice", "[isa]") {
  const isa best = dpo::cpu::cpu_isa_supported();
  CHECK(dpo::cpu::cpu_isa() == best);  // DPO_CPU_ISA is not set for this test
  if (best != isa::avx512_bf16) {
    try {
      dpo::cpu::set_cpu_isa(isa::avx512_bf16);
      FAIL("no error");
    } catch (const dpo::error& e) {
      CHECK(std::string(e.what()).find("avx512_bf16 is not supported by this CPU") != std::string::npos);
    }
    CHECK(dpo::cpu::cpu_isa() == best);
  }
  try {
    dpo::cpu::set_cpu_isa(static_cast<isa>(7));
    FAIL("no error");
  } catch (const dpo::error& e) {
    CHECK(std::string(e.what()).find("set_cpu_isa: level = 7 is invalid") != std::string::npos);
  }
  for (isa l : supported_levels()) {
    with_level w(l);
    CHECK(dpo::cpu::cpu_isa() == l);
  }
  CHECK(dpo::cpu::cpu_isa() == best);
}

TEST_CASE("isa: DPO_CPU_ISA names a level; unknown names and missing levels are errors naming it", "[isa]") {
#ifdef _WIN32
  SUCCEED("setenv is POSIX");
#else
  const char* old = std::getenv("DPO_CPU_ISA");
  const std::string saved = old != nullptr ? old : "";
  const auto env = [](const char* v) { REQUIRE(setenv("DPO_CPU_ISA", v, 1) == 0); };
  env("baseline");
  CHECK(dpo::cpu::detail::isa_from_env() == isa::baseline);
  env("auto");
  CHECK(dpo::cpu::detail::isa_from_env() == dpo::cpu::cpu_isa_supported());
  env("");
  CHECK(dpo::cpu::detail::isa_from_env() == dpo::cpu::cpu_isa_supported());
  env("avx9");
  try {
    dpo::cpu::detail::isa_from_env();
    FAIL("no error");
  } catch (const dpo::error& e) {
    CHECK(std::string(e.what()).find("DPO_CPU_ISA=avx9 is invalid: must be auto, baseline, avx2, avx512 or avx512_bf16") !=
          std::string::npos);
  }
  if (dpo::cpu::cpu_isa_supported() != isa::avx512_bf16) {
    env("avx512_bf16");
    try {
      dpo::cpu::detail::isa_from_env();
      FAIL("no error");
    } catch (const dpo::error& e) {
      CHECK(std::string(e.what()).find("DPO_CPU_ISA=avx512_bf16 is not supported by this CPU") != std::string::npos);
    }
  }
  if (old != nullptr) {
    env(saved.c_str());
  } else {
    unsetenv("DPO_CPU_ISA");
  }
#endif
}
