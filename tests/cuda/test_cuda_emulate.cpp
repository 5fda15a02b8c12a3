// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA block-level row primitives, emulated on the host (emulate.cu), against the CPU
// row kernels: runs everywhere, no GPU needed. Covers odd and prime vocab, every row
// misalignment, all four dtypes, argmax ties, -inf and NaN, in-place and misaligned
// gradient rows.
#include <Eigen/Core>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "catch.hpp"
#include "dpo/cpu/rows.hpp"
#include "dtype_bytes.hpp"
#include "emulate.hpp"

namespace {

using dpo_cuda_emulate::dtype;
using dpo_cuda_test::dtype_size;
using dpo_cuda_test::get;
using dpo_cuda_test::put;

/// A byte buffer whose element `offset` sits `offset` elements past a 64-byte boundary.
struct row_buf {
  std::vector<unsigned char> bytes;
  unsigned char* p;
  row_buf(std::size_t n, std::size_t offset_bytes) : bytes(n + 128, 0xee) {
    auto a = reinterpret_cast<std::uintptr_t>(bytes.data());
    a = (a + 63) / 64 * 64 + offset_bytes;
    p = reinterpret_cast<unsigned char*>(a);
  }
};

struct cpu_stats {
  double lse, entropy, lse2, zsum;
  std::int64_t argmax;
};

template <class E, bool M>
cpu_stats cpu_row(const unsigned char* row, std::int64_t V) {
  using A = dpo::cpu::acc_t<E>;
  dpo::cpu::detail::row_scratch<A> scratch;
  const auto st = dpo::cpu::detail::row_forward<M>(reinterpret_cast<const E*>(row), V, scratch);
  return {static_cast<double>(st.logsumexp()), static_cast<double>(st.entropy()),
          static_cast<double>(st.logsumexp2()), static_cast<double>(st.zsum), st.argmax};
}

template <bool M>
cpu_stats cpu_any(dtype t, const unsigned char* row, std::int64_t V) {
  switch (t) {
    case dtype::bf16: return cpu_row<Eigen::bfloat16, M>(row, V);
    case dtype::f16: return cpu_row<Eigen::half, M>(row, V);
    case dtype::f32: return cpu_row<float, M>(row, V);
    case dtype::f64: return cpu_row<double, M>(row, V);
  }
  return {};
}

template <class E>
void cpu_grad(const unsigned char* z, unsigned char* g, std::int64_t V, double lse, double coef,
              std::int64_t y) {
  using A = dpo::cpu::acc_t<E>;
  dpo::cpu::detail::row_scratch<A> scratch;
  dpo::cpu::detail::row_backward<E, A>(reinterpret_cast<const E*>(z), reinterpret_cast<E*>(g), V,
                                       static_cast<A>(lse), static_cast<A>(coef), y, scratch);
}

void cpu_grad_any(dtype t, const unsigned char* z, unsigned char* g, std::int64_t V, double lse,
                  double coef, std::int64_t y) {
  switch (t) {
    case dtype::bf16: return cpu_grad<Eigen::bfloat16>(z, g, V, lse, coef, y);
    case dtype::f16: return cpu_grad<Eigen::half>(z, g, V, lse, coef, y);
    case dtype::f32: return cpu_grad<float>(z, g, V, lse, coef, y);
    case dtype::f64: return cpu_grad<double>(z, g, V, lse, coef, y);
  }
}

double rel_tol(dtype t) { return dpo_cuda_test::per_dtype(t, 8e-3, 1e-3, 2e-6, 1e-12); }

const dtype all_types[] = {dtype::bf16, dtype::f16, dtype::f32, dtype::f64};
const std::int64_t vocabs[] = {1, 2, 7, 8, 9, 15, 16, 17, 255, 1031, 4099, 32003};

}  // namespace

TEST_CASE("cuda emulated: block_row_stats matches the CPU row kernel", "[cuda_emulate]") {
  std::mt19937_64 rng(42);
  std::normal_distribution<double> nd(0.0, 3.0);
  for (dtype t : all_types) {
    const std::size_t es = dtype_size(t);
    for (std::int64_t V : vocabs) {
      for (std::size_t off = 0; off < 16 / es; ++off) {
        for (int pattern = 0; pattern < 5; ++pattern) {
          row_buf b(static_cast<std::size_t>(V) * es, off * es);
          for (std::int64_t i = 0; i < V; ++i) {
            double x = nd(rng);
            if (pattern == 1) x = std::round(x / 3.0);  // many ties of the max
            if (pattern == 2 && i % 5 == 1) x = -INFINITY;
            if (pattern == 3) x = -INFINITY;
            put(t, b.p + i * es, x);
          }
          if (pattern == 4) put(t, b.p + (V / 2) * es, NAN);
          INFO("dtype " << static_cast<int>(t) << " V " << V << " offset " << off << " pattern "
                        << pattern);
          for (bool metrics : {true, false}) {
            const auto e = dpo_cuda_emulate::block_row_stats(t, b.p, V, metrics);
            const cpu_stats c = metrics ? cpu_any<true>(t, b.p, V) : cpu_any<false>(t, b.p, V);
            if (pattern == 4) {
              CHECK(std::isnan(e.lse));
              continue;
            }
            if (pattern == 3) {
              CHECK(e.lse == -INFINITY);
              CHECK(c.lse == -INFINITY);
              if (metrics) CHECK(e.argmax == 0);
              continue;
            }
            const double tol = t == dtype::f64 ? 1e-12 : 3e-6;
            CHECK(e.lse == Approx(c.lse).epsilon(tol).margin(tol));
            if (!metrics) continue;
            CHECK(e.argmax == c.argmax);
            CHECK(e.entropy == Approx(c.entropy).epsilon(tol).margin(10 * tol));
            CHECK(e.lse2 == Approx(c.lse2).epsilon(tol).margin(tol));
            if (pattern != 2) CHECK(e.zsum == Approx(c.zsum).epsilon(tol).margin(tol * 3.0 * V));
            if (pattern == 2 && V > 1) CHECK(e.zsum == -INFINITY);
            // Without lse(2z) (losses without WPO): the same arithmetic for everything else.
            const auto n = dpo_cuda_emulate::block_row_stats(t, b.p, V, true, false);
            CHECK(n.lse == e.lse);
            CHECK(n.entropy == e.entropy);
            CHECK(n.argmax == e.argmax);
            CHECK((n.zsum == e.zsum || (std::isnan(n.zsum) && std::isnan(e.zsum))));
            CHECK(n.lse2 == -INFINITY);
          }
        }
      }
    }
  }
}

TEST_CASE("cuda emulated: block_row_grad matches the CPU row kernel", "[cuda_emulate]") {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd(0.0, 3.0);
  for (dtype t : all_types) {
    const std::size_t es = dtype_size(t);
    for (std::int64_t V : vocabs) {
      for (int variant = 0; variant < 4; ++variant) {
        // 0: aligned, out of place; 1: both misaligned alike; 2: misaligned differently
        // (scalar path); 3: in place, misaligned.
        const std::size_t zoff = variant == 0 ? 0 : 1, goff = variant == 2 ? 0 : zoff;
        row_buf z(static_cast<std::size_t>(V) * es, zoff * es);
        for (std::int64_t i = 0; i < V; ++i) put(t, z.p + i * es, nd(rng));
        const cpu_stats st = cpu_any<false>(t, z.p, V);
        for (double coef : {0.0, -0.37}) {
          for (std::int64_t y : {std::int64_t{-1}, std::int64_t{0}, V / 2, V - 1}) {
            INFO("dtype " << static_cast<int>(t) << " V " << V << " variant " << variant
                          << " coef " << coef << " y " << y);
            row_buf g(static_cast<std::size_t>(V) * es, goff * es);
            row_buf expect(static_cast<std::size_t>(V) * es, 0);
            row_buf zin(static_cast<std::size_t>(V) * es, zoff * es);
            std::memcpy(zin.p, z.p, static_cast<std::size_t>(V) * es);
            unsigned char* out = variant == 3 ? zin.p : g.p;
            dpo_cuda_emulate::block_row_grad(t, zin.p, out, V, st.lse, coef, y);
            cpu_grad_any(t, z.p, expect.p, V, st.lse, coef, y);
            // Relative, plus a few accumulation-type ulps of coef: 1 - p at the label cancels,
            // and exponentials far below 2^-126 are 0 on one side and subnormal on the other.
            const double abs_tol = 4.0 * std::fabs(coef) * (t == dtype::f64 ? 2.3e-16 : 1.2e-7);
            int bad = 0;
            for (std::int64_t i = 0; i < V; ++i) {
              const double a = get(t, out + i * es), c = get(t, expect.p + i * es);
              const double scale = std::max(std::fabs(a), std::fabs(c));
              if (!(std::fabs(a - c) <= rel_tol(t) * scale + abs_tol)) ++bad;
            }
            CHECK(bad == 0);
            // Nothing written past the row.
            for (std::size_t k = 0; k < 16; ++k) CHECK(out[static_cast<std::size_t>(V) * es + k] == 0xee);
          }
        }
      }
    }
  }
}
