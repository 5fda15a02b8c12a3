// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The GEMM hook of the CPU linear head (dpo/cpu/gemm.hpp): the default Eigen GEMM against a
// float64 GEMM written here, for every operand shape, alpha and beta (beta = 0 never reads
// C); and a plugged GEMM (the same float64-accumulating GEMM, counting its calls) in the head
// of linear_logps / linear_logps_backward and linear_dpo: it is called, for the right
// scalar type, and gives the default's results within the rounding of the products, bitwise
// the same for every thread count. A null GEMM is a clear error.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <dpo/cpu/gemm.hpp>
#include <dpo/cpu/linear.hpp>
#include <dpo/cpu/linear_dpo.hpp>

#include "catch.hpp"
#include "checks.hpp"

namespace {

const bool thread_limit_set = test_support::preset_thread_limit("16");

using test_support::bitwise_equal;
using test_support::check_close;
using test_support::expect_error;

/// op(X)[i, j] of a row-major X with leading dimension ld.
template <class S>
double at(const S* x, std::int64_t ld, bool transpose, std::int64_t i, std::int64_t j) {
  return static_cast<double>(transpose ? x[j * ld + i] : x[i * ld + j]);
}

/// The float64 GEMM: every sum in double, one rounding to S per element of C.
template <class S>
void naive_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, S alpha, const S* a,
                std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < k; ++p) s += at(a, lda, ta, i, p) * at(b, ldb, tb, p, j);
      const double old = beta == S(0) ? 0.0 : static_cast<double>(beta) * static_cast<double>(c[i * ldc + j]);
      c[i * ldc + j] = static_cast<S>(static_cast<double>(alpha) * s + old);
    }
}

/// The calls a plugged GEMM received, per scalar type (context of the hook).
struct calls {
  std::atomic<long> s{0}, d{0};
};

template <class S>
void counting_gemm(void* context, bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, S alpha,
                   const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c, std::int64_t ldc) {
  auto* count = static_cast<calls*>(context);
  (std::is_same_v<S, float> ? count->s : count->d).fetch_add(1);
  naive_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

dpo::cpu::linear_gemm plugged(calls* count) {
  dpo::cpu::linear_gemm g;
  g.sgemm = &counting_gemm<float>;
  g.dgemm = &counting_gemm<double>;
  g.context = count;
  return g;
}

template <class S>
std::vector<S> random_values(std::int64_t n, unsigned seed, double amp) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-amp, amp);
  std::vector<S> x(static_cast<std::size_t>(n));
  for (S& v : x) v = static_cast<S>(u(rng));
  return x;
}

template <class S>
std::vector<double> widen(const std::vector<S>& x) {
  return std::vector<double>(x.begin(), x.end());
}

/// The default GEMM against the float64 one over the four operand shapes, padded leading
/// dimensions, and alpha / beta in {0, 1, other}; C starts as NaN where beta is 0.
template <class S>
void check_default_gemm(double rtol) {
  const std::int64_t m = 37, n = 29, k = 300;  // large enough for Eigen's blocked GEMM
  for (const bool ta : {false, true})
    for (const bool tb : {false, true})
      for (const double alpha : {1.0, -0.75})
        for (const double beta : {0.0, 1.0, 0.5}) {
          INFO("transpose_a " << ta << ", transpose_b " << tb << ", alpha " << alpha << ", beta " << beta);
          const std::int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 5;
          const std::vector<S> a = random_values<S>((ta ? k : m) * lda, 1, 1.0);
          const std::vector<S> b = random_values<S>((tb ? n : k) * ldb, 2, 1.0);
          std::vector<S> c = random_values<S>(m * ldc, 3, 1.0);
          if (beta == 0.0) std::fill(c.begin(), c.end(), std::numeric_limits<S>::quiet_NaN());
          std::vector<S> want = c;
          naive_gemm<S>(ta, tb, m, n, k, S(alpha), a.data(), lda, b.data(), ldb, S(beta), want.data(), ldc);
          const dpo::cpu::linear_gemm g;
          g.of<S>()(nullptr, ta, tb, m, n, k, S(alpha), a.data(), lda, b.data(), ldb, S(beta), c.data(), ldc);
          std::vector<double> got_c, want_c;  // the m x n elements (the padding is not C's)
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
              got_c.push_back(static_cast<double>(c[i * ldc + j]));
              want_c.push_back(static_cast<double>(want[i * ldc + j]));
            }
          check_close(got_c, want_c, rtol, "C");
        }
}

/// A head over random inputs and its outputs in double, for one GEMM and thread count.
template <class T>
struct head_run {
  std::vector<double> logp, ent, dh, dw, db;
};

template <class T>
head_run<T> run_head(const dpo::cpu::linear_gemm& gemm, int threads) {
  const std::int64_t N = 45, H = 40, V = 700;
  const std::vector<T> hidden = random_values<T>(N * H, 11, 2.0);
  const std::vector<T> weight = random_values<T>(V * H, 12, 2.0 / std::sqrt(double(H)));
  const std::vector<T> bias = random_values<T>(V, 13, 0.5);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < N; ++r) labels[r] = r % 6 == 4 ? -100 : (r * 131) % V;
  const auto head = dpo::make_linear_head(weight.data(), V, H, H, bias.data());
  const auto v = dpo::linear_view_of(hidden.data(), N, H, head, labels.data());
  dpo::cpu::linear_options opt;
  opt.num_threads = threads;
  opt.gemm = gemm;
  opt.chunk_rows = 16;  // several row chunks and vocab tiles: accumulation across calls
  opt.chunk_vocab = 300;
  head_run<T> out;
  out.logp.resize(N);
  out.ent.resize(N);
  std::vector<double> lse(N);
  dpo::cpu::linear_logps(v, out.logp.data(), out.ent.data(), lse.data(), opt);
  const std::vector<double> gl = random_values<double>(N, 14, 1.0), ge = random_values<double>(N, 15, 1.0);
  using A = dpo::cpu::acc_t<T>;
  std::vector<T> dh(static_cast<std::size_t>(N * H));
  std::vector<A> dw(static_cast<std::size_t>(V * H), A(0)), db(static_cast<std::size_t>(V), A(0));
  dpo::cpu::linear_grads<T, A> g;
  g.hidden = dh.data();
  g.hidden_stride = H;
  g.weight = dw.data();
  g.weight_stride = H;
  g.bias = db.data();
  dpo::cpu::linear_logps_backward(v, lse.data(), gl.data(), out.ent.data(), ge.data(), g, opt);
  for (const T& x : dh) out.dh.push_back(static_cast<double>(x));
  out.dw = widen(dw);
  out.db = widen(db);
  return out;
}

template <class T>
void check_head_hook(double rtol) {
  const head_run<T> def = run_head<T>(dpo::cpu::linear_gemm{}, 2);
  calls count;
  const head_run<T> one = run_head<T>(plugged(&count), 1);
  const bool dbl = std::is_same_v<T, double>;
  CHECK((dbl ? count.d.load() : count.s.load()) > 0);
  CHECK((dbl ? count.s.load() : count.d.load()) == 0);
  check_close(one.logp, def.logp, rtol, "logp", rtol);
  check_close(one.ent, def.ent, rtol, "entropy", rtol);
  check_close(one.dh, def.dh, rtol, "dhidden");
  check_close(one.dw, def.dw, rtol, "dweight");
  check_close(one.db, def.db, rtol, "dbias");
  // A deterministic plugged GEMM keeps the head's thread-count independence.
  const head_run<T> three = run_head<T>(plugged(&count), 3);
  CHECK(bitwise_equal(one.logp, three.logp));
  CHECK(bitwise_equal(one.dh, three.dh));
  CHECK(bitwise_equal(one.dw, three.dw));
  CHECK(bitwise_equal(one.db, three.db));
}

}  // namespace

TEST_CASE("gemm hook: the default Eigen GEMM against float64, every operand shape, alpha and beta",
          "[gemm]") {
  check_default_gemm<float>(1e-5);
  check_default_gemm<double>(1e-13);
}

TEST_CASE("gemm hook: a plugged GEMM runs every product of linear_logps and its backward", "[gemm]") {
  SECTION("float") { check_head_hook<float>(2e-5); }
  SECTION("double") { check_head_hook<double>(1e-11); }
  // bf16 inputs reach the GEMM converted to float: the float GEMM, accumulating in float.
  SECTION("bf16") { check_head_hook<Eigen::bfloat16>(1e-2); }
}

TEST_CASE("gemm hook: a plugged GEMM runs the products of linear_dpo, both modes", "[gemm]") {
  const std::int64_t pairs = 2, seq = 12, H = 24, V = 500, N = 2 * pairs * seq;
  const std::vector<float> hidden = random_values<float>(N * H, 21, 2.0);
  const std::vector<float> weight = random_values<float>(V * H, 22, 0.4);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < N; ++r) labels[r] = r % seq < 3 ? -100 : (r * 37) % V;
  const std::vector<double> ref = {-60.0, -55.0, -58.0, -61.0};
  dpo::cpu::linear_head<float> head;
  head.weight = weight.data();
  head.vocab = V;
  head.hidden = H;
  head.weight_stride = H;
  for (const dpo::linear_mode mode : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
    INFO("mode " << (mode == dpo::linear_mode::three_pass ? "three_pass" : "four_pass"));
    const auto run = [&](const dpo::cpu::linear_gemm& gemm, std::vector<double>& dh, std::vector<double>& dw) {
      dpo::cpu::linear_dpo_options opt;
      opt.mode = mode;
      opt.num_threads = 2;
      opt.gemm = gemm;
      double loss = 0;
      dpo::forward_outputs out;
      out.loss = &loss;
      std::vector<float> gh(static_cast<std::size_t>(N * H)), gw(static_cast<std::size_t>(V * H), 0.0f);
      dpo::cpu::linear_dpo_grads<float> g;
      g.chosen_hidden = g.rejected_hidden = gh.data();
      g.chosen_hidden_stride = g.rejected_hidden_stride = H;
      g.weight = gw.data();
      g.weight_stride = H;
      dpo::cpu::linear_dpo(dpo::cpu::linear_padded_pairs(hidden.data(), H, H, labels.data(), 2 * pairs, seq), head,
                           ref.data(), ref.data() + pairs, dpo::loss_config{}, out, g, opt);
      dh = widen(gh);
      dw = widen(gw);
      return loss;
    };
    std::vector<double> dh0, dw0, dh1, dw1;
    const double loss0 = run(dpo::cpu::linear_gemm{}, dh0, dw0);
    calls count;
    const double loss1 = run(plugged(&count), dh1, dw1);
    CHECK(count.s.load() > 0);
    CHECK(count.d.load() == 0);
    CHECK(loss1 == Approx(loss0).epsilon(2e-5));
    check_close(dh1, dh0, 2e-5, "dhidden");
    check_close(dw1, dw0, 2e-5, "dweight");
  }
}

TEST_CASE("gemm hook: a null GEMM is an error naming it, before anything is written", "[gemm]") {
  const std::vector<float> hidden(8, 1.0f), weight(12, 0.5f);
  const std::vector<std::int64_t> labels = {0, 2};
  const auto v = dpo::linear_view_of(hidden.data(), 2, 4, dpo::make_linear_head(weight.data(), 3, 4, 4),
                                     labels.data());
  std::vector<double> logp(2, 7.0), lse(2, 7.0);
  dpo::cpu::linear_options opt;
  opt.gemm.sgemm = nullptr;
  expect_error("options.gemm.sgemm", [&] { dpo::cpu::linear_logps(v, logp.data(), nullptr, lse.data(), opt); });
  CHECK(logp[0] == 7.0);
  opt = dpo::cpu::linear_options{};
  opt.gemm.dgemm = nullptr;
  expect_error("options.gemm.dgemm", [&] { dpo::cpu::linear_workspace_size(v, opt); });
  dpo::cpu::linear_dpo_options dopt;
  dopt.gemm.sgemm = nullptr;
  double loss = 3.0;
  dpo::forward_outputs out;
  out.loss = &loss;
  const std::vector<double> ref = {-1.0, -1.0};
  dpo::cpu::linear_head<float> head;
  head.weight = weight.data();
  head.vocab = 3;
  head.hidden = 4;
  head.weight_stride = 4;
  expect_error("options.gemm.sgemm", [&] {
    dpo::cpu::linear_dpo(dpo::cpu::linear_padded_pairs(hidden.data(), 4, 4, labels.data(), 2, 1), head, ref.data(),
                         ref.data() + 1, dpo::loss_config{}, out, dpo::cpu::linear_dpo_grads<float>{}, dopt);
  });
  CHECK(loss == 3.0);
}
