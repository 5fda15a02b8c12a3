// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The linear head (dpo/cpu/linear.hpp, dpo/core/transforms.hpp) against a float64 reference
// written here from the formulas (GEMM, bias, scale / soft cap / temperature, log-softmax,
// entropy, and the gradient of docs/linear.md), against central finite differences of the
// library itself in double, over chunk shapes and thread counts, and with bad inputs.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <dpo/cpu/linear.hpp>

#include "catch.hpp"
#include "checks.hpp"

namespace {

// More threads than this machine may have cores, through the documented override, so that 7
// threads really run as 7 (the library reads it once, at the first parallel call).
const bool thread_limit_set = test_support::preset_thread_limit("16");

using dpo::cpu::linear_grads;
using dpo::cpu::linear_logps;
using dpo::cpu::linear_logps_backward;
using dpo::cpu::linear_options;
using dpo::cpu::linear_view;
using label_t = std::int64_t;
using test_support::bitwise_equal;
using test_support::check_close;
using test_support::expect_error;
using test_support::max_abs;

/// A head and its inputs, in T, with padded strides (hidden: H + 3, weight: H + 2).
template <class T>
struct problem {
  std::int64_t N, H, V, hs, ws;
  std::vector<T> hidden, weight, bias;
  std::vector<label_t> labels;
  std::vector<std::uint8_t> mask;
  dpo::logit_transforms tr;
  bool with_bias = false, with_mask = false;
  std::vector<double> gl, ge;  // upstream gradients of logps and entropy

  problem(std::int64_t n, std::int64_t h, std::int64_t v, unsigned seed, bool b = true, double scale = 1.0)
      : N(n), H(h), V(v), hs(h + 3), ws(h + 2), with_bias(b) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    const double amp = scale / std::sqrt(static_cast<double>(h));
    hidden.assign(static_cast<std::size_t>(n * hs), T(0));
    weight.assign(static_cast<std::size_t>(v * ws), T(0));
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = 0; c < h; ++c) hidden[r * hs + c] = T(2.0 * u(rng));
    for (std::int64_t j = 0; j < v; ++j)
      for (std::int64_t c = 0; c < h; ++c) weight[j * ws + c] = T(amp * 2.0 * u(rng));
    bias.resize(static_cast<std::size_t>(v));
    for (auto& x : bias) x = T(0.5 * u(rng));
    labels.resize(static_cast<std::size_t>(n));
    mask.assign(static_cast<std::size_t>(n), 1);
    std::uniform_int_distribution<label_t> lab(0, v - 1);
    for (std::int64_t r = 0; r < n; ++r) labels[r] = (r % 5 == 3) ? -100 : lab(rng);
    for (std::int64_t r = 0; r < n; ++r) mask[r] = (r % 7 == 5) ? 0 : 1;
    gl.resize(static_cast<std::size_t>(n));
    ge.resize(static_cast<std::size_t>(n));
    for (auto& x : gl) x = u(rng);
    for (auto& x : ge) x = u(rng);
  }

  linear_view<T, label_t> view() const {
    const dpo::linear_head<T> head =
        dpo::make_linear_head(weight.data(), V, H, ws, with_bias ? bias.data() : nullptr, tr);
    return dpo::linear_view_of(hidden.data(), N, hs, head, labels.data(), with_mask ? mask.data() : nullptr);
  }
  std::int64_t target(std::int64_t r) const {
    if (labels[r] == -100 || (with_mask && mask[r] == 0)) return -1;
    return labels[r];
  }
};

/// The float64 reference: everything from the T inputs converted to double.
struct reference {
  std::vector<double> logp, ent, lse, dh, dw, db;
};

template <class T>
reference reference_of(const problem<T>& p, bool entropy_grad) {
  const std::int64_t N = p.N, H = p.H, V = p.V;
  reference R;
  R.logp.assign(N, 0.0);
  R.ent.assign(N, 0.0);
  R.lse.assign(N, 0.0);
  R.dh.assign(N * H, 0.0);
  R.dw.assign(V * H, 0.0);
  R.db.assign(V, 0.0);
  const double s = p.tr.scale, c = p.tr.softcap, t = p.tr.temperature;
  std::vector<double> o(V), d(V), dz(V);
  for (std::int64_t r = 0; r < N; ++r) {
    const std::int64_t y = p.target(r);
    if (y < 0) continue;
    for (std::int64_t v = 0; v < V; ++v) {
      double u = p.with_bias ? static_cast<double>(p.bias[v]) : 0.0;
      for (std::int64_t k = 0; k < H; ++k)
        u += static_cast<double>(p.hidden[r * p.hs + k]) * static_cast<double>(p.weight[v * p.ws + k]);
      double x = s * u, dx = s;
      if (c != 0.0) {
        dx = s * (1.0 - std::tanh(x / c) * std::tanh(x / c));
        x = c * std::tanh(x / c);
      }
      o[v] = x / t;
      d[v] = dx / t;
    }
    double m = -INFINITY;
    for (double x : o) m = std::max(m, x);
    double sum = 0;
    for (double x : o) sum += std::exp(x - m);
    const double lse = m + std::log(sum);
    double H_ = 0;
    for (double x : o) H_ -= std::exp(x - lse) * (x - lse);
    R.lse[r] = lse;
    R.logp[r] = o[y] - lse;
    R.ent[r] = H_;
    const double a = p.gl[r], b = entropy_grad ? p.ge[r] : 0.0;
    for (std::int64_t v = 0; v < V; ++v) {
      const double pv = std::exp(o[v] - lse);
      // dlogp/do = onehot - p; dH/do = -p (log p + H)
      dz[v] = (a * ((v == y ? 1.0 : 0.0) - pv) - b * pv * ((o[v] - lse) + H_)) * d[v];
    }
    for (std::int64_t v = 0; v < V; ++v) {
      R.db[v] += dz[v];
      for (std::int64_t k = 0; k < H; ++k) {
        R.dh[r * H + k] += dz[v] * static_cast<double>(p.weight[v * p.ws + k]);
        R.dw[v * H + k] += dz[v] * static_cast<double>(p.hidden[r * p.hs + k]);
      }
    }
  }
  return R;
}

/// What the library returns (gradients dense [N, H], [V, H], [V] in double).
struct result {
  std::vector<double> logp, ent, lse, dh, dw, db;
};

template <class T, class G = T>
result run(const problem<T>& p, const linear_options& opt, bool entropy = true, bool backward = true) {
  result out;
  const std::int64_t N = p.N, H = p.H, V = p.V;
  out.logp.assign(N, -7.0);
  out.ent.assign(N, -7.0);
  out.lse.assign(N, -7.0);
  const auto v = p.view();
  linear_logps(v, out.logp.data(), entropy ? out.ent.data() : nullptr, out.lse.data(), opt);
  if (!backward) return out;
  std::vector<T> dh(static_cast<std::size_t>(N * (H + 1)), T(5.0f));  // written: no zeros needed
  std::vector<G> dw(static_cast<std::size_t>(V * (H + 4)), G(0.0f));
  std::vector<G> db(static_cast<std::size_t>(V), G(0.0f));
  linear_grads<T, G> g;
  g.hidden = dh.data();
  g.hidden_stride = H + 1;
  g.weight = dw.data();
  g.weight_stride = H + 4;
  if (p.with_bias) g.bias = db.data();
  linear_logps_backward(v, out.lse.data(), p.gl.data(), entropy ? out.ent.data() : nullptr,
                        entropy ? p.ge.data() : nullptr, g, opt);
  for (std::int64_t r = 0; r < N; ++r)
    for (std::int64_t k = 0; k < H; ++k) out.dh.push_back(static_cast<double>(dh[r * (H + 1) + k]));
  for (std::int64_t j = 0; j < V; ++j)
    for (std::int64_t k = 0; k < H; ++k) out.dw.push_back(static_cast<double>(dw[j * (H + 4) + k]));
  for (std::int64_t j = 0; j < V; ++j) out.db.push_back(p.with_bias ? static_cast<double>(db[j]) : 0.0);
  return out;
}

void check_bitwise(const result& a, const result& b) {
  CHECK(bitwise_equal(a.logp, b.logp));
  CHECK(bitwise_equal(a.ent, b.ent));
  CHECK(bitwise_equal(a.lse, b.lse));
  CHECK(bitwise_equal(a.dh, b.dh));
  CHECK(bitwise_equal(a.dw, b.dw));
  CHECK(bitwise_equal(a.db, b.db));
}

/// Relative tolerances per dtype: the products accumulate in float (double for double); the
/// gradients are rounded to T (dHidden) or G.
template <class T>
double tol_fwd() {
  return std::is_same_v<T, double> ? 1e-11 : 2e-5;
}
template <class T>
double tol_grad() {
  if (std::is_same_v<T, double>) return 1e-11;
  if (std::is_same_v<T, float>) return 2e-5;
  if (std::is_same_v<T, Eigen::half>) return 2e-3;
  return 1e-2;  // bf16: 8 bits of mantissa
}

const dpo::logit_transforms transform_cases[] = {
    {1.0, 0.0, 1.0}, {1.7, 0.0, 1.0}, {1.0, 1.5, 1.0}, {1.0, 0.0, 0.6}, {2.5, 1.2, 0.7}};

template <class T, class G>
void check_against_reference() {
  for (bool with_bias : {false, true}) {
    for (const auto& tr : transform_cases) {
      problem<T> p(23, 19, 53, 7, with_bias, 3.0);
      p.tr = tr;
      p.with_mask = true;
      INFO("bias " << with_bias << ", scale " << tr.scale << ", softcap " << tr.softcap
                   << ", temperature " << tr.temperature);
      linear_options opt;
      opt.chunk_rows = 7;
      opt.chunk_vocab = 20;
      const reference R = reference_of(p, true);
      const result got = run<T, G>(p, opt);
      check_close(got.logp, R.logp, tol_fwd<T>(), "logp", tol_fwd<T>());
      check_close(got.ent, R.ent, tol_fwd<T>(), "entropy", tol_fwd<T>());
      check_close(got.lse, R.lse, tol_fwd<T>(), "lse", tol_fwd<T>());
      check_close(got.dh, R.dh, tol_grad<T>(), "dhidden");
      const double tw = std::is_same_v<G, T> ? tol_grad<T>() : tol_grad<float>();
      check_close(got.dw, R.dw, tw, "dweight");
      if (with_bias) check_close(got.db, R.db, tw, "dbias");
    }
  }
}

}  // namespace

TEST_CASE("transforms: value and derivative in TRL's order", "[linear]") {
  const dpo::logit_transforms t{2.0, 3.0, 0.5};
  const dpo::detail::transform_params<double> p(t);
  for (double u : {-40.0, -2.0, -0.3, 0.0, 0.7, 5.0, 1e3}) {
    INFO("u = " << u);
    CHECK(dpo::detail::transform_logit(p, u) == Approx(3.0 * std::tanh(2.0 * u / 3.0) / 0.5));
    const double h = 1e-6;
    const double fd =
        (dpo::detail::transform_logit(p, u + h) - dpo::detail::transform_logit(p, u - h)) / (2 * h);
    CHECK(dpo::detail::transform_logit_grad(p, u) == Approx(fd).margin(1e-8));
  }
  // Saturated: sech^2 underflows to exactly 0, never NaN.
  CHECK(dpo::detail::transform_logit_grad(dpo::detail::transform_params<float>(t), 1e30f) == 0.0f);
  CHECK(dpo::logit_transforms{}.identity());
  double bad = 0;
  CHECK(dpo::detail::invalid_transform({1.0, 0.0, 1.0}, &bad) == nullptr);
  CHECK(std::string(dpo::detail::invalid_transform({0.0, 0.0, 1.0}, &bad)) == "scale");
  CHECK(std::string(dpo::detail::invalid_transform({1.0, -1.0, 1.0}, &bad)) == "softcap");
  CHECK(std::string(dpo::detail::invalid_transform({1.0, 0.0, NAN}, &bad)) == "temperature");
}

TEST_CASE("linear head: float64 reference, every dtype, with and without bias, each transform",
          "[linear]") {
  SECTION("double") { check_against_reference<double, double>(); }
  SECTION("float") { check_against_reference<float, float>(); }
  SECTION("bf16, dWeight in bf16") { check_against_reference<Eigen::bfloat16, Eigen::bfloat16>(); }
  SECTION("bf16, dWeight accumulated in float") { check_against_reference<Eigen::bfloat16, float>(); }
  SECTION("half, dWeight in half") { check_against_reference<Eigen::half, Eigen::half>(); }
  SECTION("half, dWeight accumulated in float") { check_against_reference<Eigen::half, float>(); }
}

TEST_CASE("linear head: finite differences of the library in double", "[linear]") {
  for (const auto& tr : transform_cases) {
    for (bool entropy : {false, true}) {
      problem<double> p(4, 3, 6, 11, true, 2.0);
      p.tr = tr;
      p.labels[1] = -100;
      INFO("entropy " << entropy << ", scale " << tr.scale << ", softcap " << tr.softcap
                      << ", temperature " << tr.temperature);
      linear_options opt;
      const result got = run<double>(p, opt, entropy);
      // L = sum_r gl_r logp_r (+ ge_r H_r)
      const auto loss = [&](const problem<double>& q) {
        const result f = run<double>(q, opt, true, false);
        double L = 0;
        for (std::int64_t r = 0; r < q.N; ++r) L += q.gl[r] * f.logp[r] + (entropy ? q.ge[r] * f.ent[r] : 0.0);
        return L;
      };
      const double h = 1e-6;
      const auto fd = [&](std::vector<double> problem<double>::*field, std::size_t i) {
        problem<double> a = p, b = p;
        (a.*field)[i] += h;
        (b.*field)[i] -= h;
        return (loss(a) - loss(b)) / (2 * h);
      };
      std::vector<double> want_dh, want_dw, want_db;
      for (std::int64_t r = 0; r < p.N; ++r)
        for (std::int64_t k = 0; k < p.H; ++k) want_dh.push_back(fd(&problem<double>::hidden, r * p.hs + k));
      for (std::int64_t j = 0; j < p.V; ++j)
        for (std::int64_t k = 0; k < p.H; ++k) want_dw.push_back(fd(&problem<double>::weight, j * p.ws + k));
      for (std::int64_t j = 0; j < p.V; ++j) want_db.push_back(fd(&problem<double>::bias, j));
      check_close(got.dh, want_dh, 0, "dhidden", 1e-7);
      check_close(got.dw, want_dw, 0, "dweight", 1e-7);
      check_close(got.db, want_db, 0, "dbias", 1e-7);
      // The ignored row: exact zeros.
      for (std::int64_t k = 0; k < p.H; ++k) CHECK(got.dh[1 * p.H + k] == 0.0);
    }
  }
}

TEST_CASE("linear head: chunk sweeps agree to GEMM rounding and repeat bitwise", "[linear]") {
  problem<float> p(13, 17, 37, 3, true, 4.0);  // prime V
  p.tr = {1.3, 2.0, 0.8};
  const reference R = reference_of(p, true);
  const std::int64_t shapes[][2] = {{1, 1}, {1, 37}, {13, 37}, {5, 7}, {4, 300}, {100, 10}, {6, 0}, {0, 0}};
  for (const auto& s : shapes) {
    linear_options opt;
    opt.chunk_rows = s[0];
    opt.chunk_vocab = s[1];
    INFO("chunk " << s[0] << " x " << s[1]);
    const result a = run<float>(p, opt);
    check_close(a.logp, R.logp, 2e-5, "logp", 2e-5);
    check_close(a.ent, R.ent, 2e-5, "entropy", 2e-5);
    check_close(a.dh, R.dh, 2e-5, "dhidden");
    check_close(a.dw, R.dw, 2e-5, "dweight");
    check_close(a.db, R.db, 2e-5, "dbias");
    check_bitwise(a, run<float>(p, opt));
  }
  // A small budget picks narrower chunks; same answer to rounding.
  linear_options small;
  small.workspace_bytes = dpo::cpu::linear_workspace_size(p.view(), small).workspace_bytes;
  CHECK(dpo::cpu::linear_workspace_size(p.view(), small).rows == 13);
  small.workspace_bytes = 1500;
  const auto ch = dpo::cpu::linear_workspace_size(p.view(), small);
  CHECK(ch.workspace_bytes <= 1500);
  CHECK(ch.rows < 13);
  check_close(run<float>(p, small).logp, R.logp, 2e-5, "logp, 1500-byte budget", 2e-5);
}

TEST_CASE("linear head: thread counts 1, 2, 7 give bitwise-identical results", "[linear]") {
  REQUIRE(thread_limit_set);
  REQUIRE(dpo::cpu::detail::resolve_threads(7) == 7);
  problem<Eigen::bfloat16> pb(300, 24, 2000, 5, true, 3.0);
  pb.tr = {1.0, 5.0, 1.0};
  problem<float> pf(300, 24, 2000, 5, true, 3.0);
  for (int bw : {0, 1}) {
    linear_options opt;
    opt.chunk_rows = 290;   // two row chunks; 3 row tiles of dHidden in the first
    opt.chunk_vocab = 1800;  // 8 vocab tiles, then 1
    opt.num_threads = 1;
    const result a = bw ? run<Eigen::bfloat16, float>(pb, opt) : run<float>(pf, opt);
    for (int t : {2, 7}) {
      INFO("threads " << t << (bw ? " bf16" : " float"));
      opt.num_threads = t;
      check_bitwise(a, bw ? run<Eigen::bfloat16, float>(pb, opt) : run<float>(pf, opt));
    }
  }
}

TEST_CASE("linear head: V = 1, H = 1, prime V, N = 0", "[linear]") {
  {
    problem<float> p(6, 1, 1, 2);  // one class: logp = 0, entropy = 0, zero gradients
    const result r = run<float>(p, {});
    for (std::int64_t i = 0; i < p.N; ++i) {
      CHECK(r.logp[i] == 0.0);
      CHECK(r.ent[i] == 0.0);
    }
    CHECK(max_abs(r.dh) == 0.0);
    CHECK(max_abs(r.dw) == 0.0);
    CHECK(max_abs(r.db) == 0.0);
  }
  for (std::int64_t V : {2, 31, 257}) {
    problem<double> p(9, 1, V, 4);
    p.tr = {0.9, 3.0, 1.1};
    const reference R = reference_of(p, true);
    const result r = run<double>(p, {});
    INFO("V = " << V);
    check_close(r.logp, R.logp, 1e-12, "logp", 1e-12);
    check_close(r.dh, R.dh, 1e-12, "dhidden");
    check_close(r.dw, R.dw, 1e-12, "dweight");
  }
  problem<float> p(0, 4, 5, 1);
  linear_logps(p.view(), nullptr, nullptr, nullptr);
  linear_logps_backward(p.view(), nullptr, nullptr, nullptr, nullptr, linear_grads<float>{});
}

TEST_CASE("linear head: ignored rows give 0 and contribute exact zeros, even holding NaN",
          "[linear]") {
  problem<float> p(20, 8, 50, 9);
  p.with_mask = true;
  const result clean = run<float>(p, {});
  problem<float> q = p;
  for (std::int64_t r = 0; r < p.N; ++r)
    if (p.target(r) < 0)
      for (std::int64_t k = 0; k < p.H; ++k) q.hidden[r * p.hs + k] = NAN;
  const result dirty = run<float>(q, {});
  check_bitwise(clean, dirty);
  for (std::int64_t r = 0; r < p.N; ++r) {
    if (p.target(r) >= 0) continue;
    CHECK(clean.logp[r] == 0.0);
    CHECK(clean.ent[r] == 0.0);
    for (std::int64_t k = 0; k < p.H; ++k) CHECK(clean.dh[r * p.H + k] == 0.0);
  }
  // A counted row with zero upstream gradients is skipped the same way.
  problem<float> z = q;
  z.hidden[0] = NAN;
  z.gl[0] = 0;
  z.ge[0] = 0;
  const result skipped = run<float>(z, {});
  CHECK(std::isnan(skipped.logp[0]));
  for (double x : skipped.dw) CHECK(std::isfinite(x));
}

TEST_CASE("linear head: NaN in one hidden row stays in that row", "[linear]") {
  problem<float> p(12, 6, 40, 13);
  p.labels[4] = 3;
  const result clean = run<float>(p, {});
  p.hidden[4 * p.hs + 2] = NAN;
  const result r = run<float>(p, {});
  for (std::int64_t i = 0; i < p.N; ++i) {
    INFO("row " << i);
    if (i == 4) {
      CHECK(std::isnan(r.logp[i]));
      CHECK(std::isnan(r.lse[i]));
      continue;
    }
    CHECK(r.logp[i] == clean.logp[i]);
    CHECK(r.ent[i] == clean.ent[i]);
    for (std::int64_t k = 0; k < p.H; ++k) CHECK(r.dh[i * p.H + k] == clean.dh[i * p.H + k]);
  }
}

TEST_CASE("linear head: dHidden accumulates when asked, dWeight and dBias always", "[linear]") {
  problem<float> p(10, 5, 30, 21);
  const result once = run<float>(p, {});
  const auto v = p.view();
  std::vector<float> dh(p.N * p.H, 1.0f), dw(p.V * p.H, 0.0f), db(p.V, 0.0f);
  linear_grads<float> g;
  g.hidden = dh.data();
  g.hidden_stride = p.H;
  g.accumulate_hidden = true;
  g.weight = dw.data();
  g.weight_stride = p.H;
  g.bias = db.data();
  for (int k = 0; k < 2; ++k)
    linear_logps_backward(v, once.lse.data(), p.gl.data(), once.ent.data(), p.ge.data(), g);
  for (std::size_t i = 0; i < dh.size(); ++i) CHECK(dh[i] == Approx(1.0 + 2.0 * once.dh[i]).margin(1e-6));
  for (std::size_t i = 0; i < dw.size(); ++i) CHECK(dw[i] == Approx(2.0 * once.dw[i]).margin(1e-6));
  for (std::size_t i = 0; i < db.size(); ++i) CHECK(db[i] == Approx(2.0 * once.db[i]).margin(1e-6));
  // Only some gradients wanted: dHidden alone.
  linear_grads<float> only;
  std::vector<float> dh2(p.N * p.H, 3.0f);
  only.hidden = dh2.data();
  only.hidden_stride = p.H;
  linear_logps_backward(v, once.lse.data(), p.gl.data(), once.ent.data(), p.ge.data(), only);
  for (std::size_t i = 0; i < dh2.size(); ++i) CHECK(dh2[i] == static_cast<float>(once.dh[i]));
}

TEST_CASE("linear head: bad inputs raise dpo::error naming the argument, nothing written",
          "[linear]") {
  problem<float> p(6, 4, 9, 17);
  const auto good = p.view();
  std::vector<double> lp(p.N, -7.0), ent(p.N, -7.0), lse(p.N, -7.0);
  const auto untouched = [&] {
    for (std::int64_t i = 0; i < p.N; ++i) CHECK((lp[i] == -7.0 && ent[i] == -7.0 && lse[i] == -7.0));
  };
  const auto fwd = [&](const linear_view<float, label_t>& v, linear_options o = {}) {
    linear_logps(v, lp.data(), ent.data(), lse.data(), o);
  };
  auto v = good;
  v.weight_cols = 5;
  expect_error("weight_cols", [&] { fwd(v); });
  v = good;
  v.hidden_stride = 3;
  expect_error("hidden_stride", [&] { fwd(v); });
  v = good;
  v.bias_size = 8;
  expect_error("bias_size", [&] { fwd(v); });
  v = good;
  v.bias = nullptr;
  expect_error("bias", [&] { fwd(v); });
  v = good;
  v.hidden = nullptr;
  expect_error("hidden is null", [&] { fwd(v); });
  v = good;
  v.vocab = 0;
  expect_error("vocab", [&] { fwd(v); });
  std::vector<label_t> bad = p.labels;
  bad[2] = 9;
  v = good;
  v.labels = bad.data();
  expect_error("labels[2] = 9", [&] { fwd(v); });
  bad[2] = -1;
  expect_error("labels[2] = -1", [&] { fwd(v); });
  for (const auto& tr : {dpo::logit_transforms{0.0, 0.0, 1.0}, dpo::logit_transforms{-1.0, 0.0, 1.0},
                         dpo::logit_transforms{INFINITY, 0.0, 1.0}}) {
    v = good;
    v.transforms = tr;
    expect_error("transforms.scale", [&] { fwd(v); });
  }
  for (double c : {-2.0, double(NAN), double(INFINITY)}) {
    v = good;
    v.transforms.softcap = c;
    expect_error("transforms.softcap", [&] { fwd(v); });
  }
  for (double t : {0.0, -0.5, double(NAN)}) {
    v = good;
    v.transforms.temperature = t;
    expect_error("transforms.temperature", [&] { fwd(v); });
  }
  linear_options tiny;
  tiny.workspace_bytes = 16;
  expect_error("workspace_bytes", [&] { fwd(good, tiny); });
  tiny = {};
  tiny.chunk_rows = -1;
  expect_error("chunk_rows", [&] { fwd(good, tiny); });
  expect_error("logps is null", [&] { linear_logps(good, nullptr, nullptr, lse.data()); });
  expect_error("row_lse is null", [&] { linear_logps(good, lp.data(), nullptr, nullptr); });
  expect_error("logps overlaps row_lse", [&] { linear_logps(good, lse.data(), nullptr, lse.data() + 2); });
  untouched();
  // Outputs over inputs: a double buffer placed over the labels.
  std::vector<label_t> labels_copy = p.labels;
  v = good;
  v.labels = labels_copy.data();
  expect_error("logps overlaps labels", [&] {
    linear_logps(v, reinterpret_cast<double*>(labels_copy.data()), nullptr, lse.data());
  });
  untouched();

  // Backward.
  const result r = run<float>(p, {});
  std::vector<float> dh(p.N * p.H, 9.0f), dw(p.V * p.H, 9.0f), db(p.V, 9.0f);
  linear_grads<float> g;
  g.hidden = dh.data();
  g.hidden_stride = p.H;
  g.weight = dw.data();
  g.weight_stride = p.H;
  g.bias = db.data();
  const auto bwd = [&](const linear_grads<float>& gg, const double* e, const double* ge) {
    linear_logps_backward(good, r.lse.data(), p.gl.data(), e, ge, gg);
  };
  auto gg = g;
  gg.hidden_stride = 2;
  expect_error("grads.hidden_stride", [&] { bwd(gg, nullptr, nullptr); });
  gg = g;
  gg.weight_stride = 3;
  expect_error("grads.weight_stride", [&] { bwd(gg, nullptr, nullptr); });
  expect_error("grad_entropy", [&] { bwd(g, r.ent.data(), nullptr); });
  expect_error("entropy", [&] { bwd(g, nullptr, p.ge.data()); });
  expect_error("grad_logps is null", [&] {
    linear_logps_backward(good, r.lse.data(), static_cast<const double*>(nullptr), nullptr, nullptr, g);
  });
  expect_error("row_lse is null", [&] {
    linear_logps_backward(good, static_cast<const double*>(nullptr), p.gl.data(), nullptr, nullptr, g);
  });
  gg = g;
  gg.hidden = const_cast<float*>(p.hidden.data());
  gg.hidden_stride = p.hs;
  expect_error("grads.hidden overlaps hidden", [&] { bwd(gg, nullptr, nullptr); });
  gg = g;
  gg.weight = const_cast<float*>(p.weight.data());
  gg.weight_stride = p.ws;
  expect_error("grads.weight overlaps weight", [&] { bwd(gg, nullptr, nullptr); });
  gg = g;
  gg.bias = dw.data() + 3;
  expect_error("grads.weight overlaps grads.bias", [&] { bwd(gg, nullptr, nullptr); });
  auto nb = good;
  nb.bias = nullptr;
  nb.bias_size = 0;
  expect_error("grads.bias", [&] { linear_logps_backward(nb, r.lse.data(), p.gl.data(), nullptr, nullptr, g); });
  for (float x : dh) CHECK(x == 9.0f);
  for (float x : dw) CHECK(x == 9.0f);
  for (float x : db) CHECK(x == 9.0f);
}

namespace {

/// The optional row outputs (linear_outputs) in float64 from the T inputs: log sum_v p_v^2,
/// the mean transformed logit, the first argmax, and the gap between the top two logits (the
/// margin an approximate is_top1 can be trusted at).
struct extras_reference {
  std::vector<double> lssp, mean, gap;
  std::vector<std::int64_t> argmax;
};

template <class T>
extras_reference extras_of(const problem<T>& p) {
  extras_reference R;
  const double s = p.tr.scale, c = p.tr.softcap, t = p.tr.temperature;
  for (std::int64_t r = 0; r < p.N; ++r) {
    std::vector<double> o(p.V);
    for (std::int64_t v = 0; v < p.V; ++v) {
      double u = p.with_bias ? static_cast<double>(p.bias[v]) : 0.0;
      for (std::int64_t k = 0; k < p.H; ++k)
        u += static_cast<double>(p.hidden[r * p.hs + k]) * static_cast<double>(p.weight[v * p.ws + k]);
      double x = s * u;
      if (c != 0.0) x = c * std::tanh(x / c);
      o[v] = x / t;
    }
    double m = -INFINITY, second = -INFINITY, sum = 0, sum2 = 0, zs = 0;
    std::int64_t am = -1;
    for (std::int64_t v = 0; v < p.V; ++v) {
      if (o[v] > m) {
        second = m;
        m = o[v];
        am = v;
      } else if (o[v] > second) {
        second = o[v];
      }
    }
    for (double x : o) {
      sum += std::exp(x - m);
      sum2 += std::exp(2 * (x - m));
      zs += x;
    }
    R.lssp.push_back(std::log(sum2) - 2 * std::log(sum));
    R.mean.push_back(zs / static_cast<double>(p.V));
    R.argmax.push_back(am);
    R.gap.push_back(m - second);
  }
  return R;
}

struct extras_result {
  std::vector<double> logp, lse, ent, lssp, mean;
  std::vector<std::uint8_t> top1;
};

template <class T>
extras_result run_extras(const problem<T>& p, const linear_options& opt) {
  extras_result out;
  out.logp.assign(p.N, -7.0);
  out.lse.assign(p.N, -7.0);
  out.ent.assign(p.N, -7.0);
  out.lssp.assign(p.N, -7.0);
  out.mean.assign(p.N, -7.0);
  out.top1.assign(p.N, 7);
  dpo::cpu::linear_outputs x;
  x.entropy = out.ent.data();
  x.log_sum_sq_probs = out.lssp.data();
  x.mean_logits = out.mean.data();
  x.is_top1 = out.top1.data();
  linear_logps(p.view(), out.logp.data(), x, out.lse.data(), opt);
  return out;
}

template <class T>
void check_extras(problem<T>& p, const linear_options& opt, double tol) {
  const reference R = reference_of(p, true);
  const extras_reference E = extras_of(p);
  const extras_result got = run_extras(p, opt);
  std::vector<double> want_lssp(p.N, 0.0), want_mean(p.N, 0.0);
  for (std::int64_t r = 0; r < p.N; ++r) {
    if (p.target(r) < 0) {
      CHECK(got.top1[r] == 0);
      continue;
    }
    want_lssp[r] = E.lssp[r];
    want_mean[r] = E.mean[r];
    // is_top1 is exact wherever the top two logits are apart by more than the products'
    // rounding; at a near-tie the library's (rounded) logits decide.
    if (E.gap[r] > 50 * tol * (1 + std::fabs(E.mean[r]))) {
      INFO("row " << r << ": label " << p.target(r) << ", argmax " << E.argmax[r]);
      CHECK(got.top1[r] == (E.argmax[r] == p.target(r) ? 1 : 0));
    } else {
      CHECK((got.top1[r] == 0 || got.top1[r] == 1));
    }
  }
  check_close(got.logp, R.logp, tol, "logp", tol);
  check_close(got.ent, R.ent, tol, "entropy", tol);
  check_close(got.lssp, want_lssp, tol, "log_sum_sq_probs", tol);
  check_close(got.mean, want_mean, tol, "mean_logits", tol);
  // The extras change nothing else: logps and row_lse are bitwise those of the plain call.
  std::vector<double> lp(p.N), lse(p.N);
  linear_logps(p.view(), lp.data(), nullptr, lse.data(), opt);
  CHECK(bitwise_equal(lp, got.logp));
  CHECK(bitwise_equal(lse, got.lse));
}

}  // namespace

TEST_CASE("linear head: log_sum_sq_probs, mean_logits, is_top1 against float64", "[linear]") {
  // V = 700 over chunks of 300 columns (tiles of 256 + 44): the argmax crosses tiles and chunks.
  for (const auto& tr : transform_cases) {
    INFO("scale " << tr.scale << ", softcap " << tr.softcap << ", temperature " << tr.temperature);
    linear_options opt;
    opt.chunk_rows = 7;
    opt.chunk_vocab = 300;
    problem<double> pd(23, 19, 700, 31, true, 6.0);
    pd.tr = tr;
    pd.with_mask = true;
    // Make some labels the argmax, so is_top1 is 1 on some rows.
    const extras_reference E = extras_of(pd);
    for (std::int64_t r = 0; r < pd.N; r += 2)
      if (pd.target(r) >= 0) pd.labels[r] = E.argmax[r];
    check_extras(pd, opt, 1e-11);
    problem<float> pf(23, 19, 700, 31, false, 6.0);
    pf.tr = tr;
    const extras_reference Ef = extras_of(pf);
    for (std::int64_t r = 0; r < pf.N; r += 2)
      if (pf.target(r) >= 0) pf.labels[r] = Ef.argmax[r];
    check_extras(pf, opt, 2e-5);
    problem<Eigen::bfloat16> pb(23, 19, 700, 31, true, 6.0);
    pb.tr = tr;
    check_extras(pb, opt, 2e-5);
    check_extras(pb, linear_options{}, 2e-5);
  }
}

TEST_CASE("linear head: is_top1 is the first maximum, across tiles and chunks", "[linear]") {
  // H = 1, hidden = 1: each logit is its weight, exactly, so ties are exact.
  problem<float> p(4, 1, 600, 3, false);
  for (std::int64_t r = 0; r < p.N; ++r) p.hidden[r * p.hs] = 1.0f;
  for (std::int64_t v = 0; v < p.V; ++v) p.weight[v * p.ws] = static_cast<float>(v % 50) / 50.0f;
  p.weight[10 * p.ws] = 2.0f;   // tile 0
  p.weight[300 * p.ws] = 2.0f;  // tile 1 (and, below, chunk 2)
  p.weight[590 * p.ws] = 2.0f;  // tile 2
  p.labels = {10, 300, 590, 11};
  for (std::int64_t cv : {0, 256, 290, 600}) {
    INFO("chunk_vocab " << cv);
    linear_options opt;
    opt.chunk_vocab = cv;
    opt.chunk_rows = 3;
    const extras_result got = run_extras(p, opt);
    CHECK(got.top1 == std::vector<std::uint8_t>{1, 0, 0, 0});
  }
  p.weight[10 * p.ws] = 1.5f;  // now 300 is the first maximum
  CHECK(run_extras(p, {}).top1 == std::vector<std::uint8_t>{0, 1, 0, 0});
  // A row of only -inf logits (an -inf bias) has no top-1.
  problem<float> q(2, 1, 3, 5, true);
  q.hidden = {1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
  q.weight.assign(q.V * q.ws, 0.0f);
  q.bias.assign(3, -INFINITY);
  q.labels = {0, 1};
  CHECK(run_extras(q, {}).top1 == std::vector<std::uint8_t>{0, 0});
}

TEST_CASE("linear head: the extra outputs are checked for overlap and zero on ignored rows",
          "[linear]") {
  problem<float> p(9, 4, 30, 11);
  p.with_mask = true;
  const extras_result got = run_extras(p, {});
  for (std::int64_t r = 0; r < p.N; ++r) {
    if (p.target(r) >= 0) continue;
    CHECK(got.lssp[r] == 0.0);
    CHECK(got.mean[r] == 0.0);
    CHECK(got.top1[r] == 0);
  }
  std::vector<double> lp(p.N, -7.0), lse(p.N, -7.0), buf(2 * p.N, -7.0);
  dpo::cpu::linear_outputs x;
  x.log_sum_sq_probs = buf.data();
  x.mean_logits = buf.data() + 3;
  expect_error("mean_logits", [&] { linear_logps(p.view(), lp.data(), x, lse.data()); });
  x.mean_logits = lp.data();
  expect_error("logps overlaps mean_logits", [&] { linear_logps(p.view(), lp.data(), x, lse.data()); });
  for (double v : lp) CHECK(v == -7.0);
  for (double v : buf) CHECK(v == -7.0);
}
