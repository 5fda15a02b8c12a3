// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM head on a vocabulary shard on CUDA (dpo/cuda/linear_shard.cuh) against
// dpo::cpu's sharded head (dpo/cpu/linear_shard.hpp, itself checked against the unsharded
// head in tests/test_cpu_shard_linear.cpp) and against the unsharded CPU head (dpo/cpu/
// linear.hpp) on the same batch: each rank holds rows [start, end) of the weight (2 and 3
// shards, uneven ones among them), the ranks' phase-1 records are combined on the host as the
// two all-reduces would (max, rebase, sum), then every rank's phase 2 and backward run; the
// summed dHidden partials and each shard's dWeight / dBias rows are compared with the
// unsharded gradients. Every dtype (fp32 and bf16 at V = 1001 too), a bias and logit
// transforms, masked and ignored rows, and the argument and device-data errors (nothing
// written). Runs on a GPU, or on the emulator with its reference GEMM standing in for
// cuBLASLt (tests/cuda/emu).
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <dpo/cpu/linear_dpo.hpp>
#include <dpo/cpu/linear_shard.hpp>

#include "catch.hpp"
#include "checks.hpp"
#include "../fixtures.hpp"
#include "dtype_bytes.hpp"
#include "shard_linear_harness.hpp"

namespace {

using dpo_cuda_test::dtype;
using dpo_cuda_test::shard_linear_case;
using dpo_cuda_test::shard_linear_out;
using test_support::check_close;
constexpr int F = dpo::shard_fields;

/// `count` values uniform in [-amp, amp) as raw bytes of `t`.
std::vector<unsigned char> random_values(dtype t, std::int64_t count, double amp, std::mt19937& rng) {
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  std::uniform_real_distribution<double> u(-amp, amp);
  std::vector<unsigned char> b(static_cast<std::size_t>(count) * es, 0);
  for (std::int64_t i = 0; i < count; ++i) dpo_cuda_test::put(t, b.data() + i * es, u(rng));
  return b;
}

/// A whole head's weight [V, H] and bias [V] (or none) in `t`, and the rows of shard `sh`.
struct head_bytes {
  dtype t = dtype::f32;
  std::int64_t H = 0;
  std::vector<unsigned char> weight, bias;
  dpo::logit_transforms transforms;
  void shard(const dpo::vocab_shard& sh, std::vector<unsigned char>* w, std::vector<unsigned char>* b) const {
    const std::size_t es = dpo_cuda_test::dtype_size(t), row = static_cast<std::size_t>(H) * es;
    w->assign(weight.begin() + sh.start * row, weight.begin() + sh.end * row);
    if (!bias.empty()) b->assign(bias.begin() + sh.start * es, bias.begin() + sh.end * es);
  }
};

head_bytes make_head_bytes(dtype t, std::int64_t H, std::int64_t V, bool bias, std::mt19937& rng) {
  head_bytes h{t, H, random_values(t, V * H, 2.0 / std::sqrt(static_cast<double>(H)), rng), {}, {}};
  if (bias) h.bias = random_values(t, V, 0.5, rng);
  return h;
}

/// Tolerances relative to the largest magnitude: values (the logits differ by the GEMMs'
/// summation order) and gradients (for bf16 the CUDA GEMMs take dZ rounded to bf16 where the
/// CPU keeps fp32, and dHidden is a sum of per-rank partials each rounded to bf16).
double value_tol(dtype t) { return dpo_cuda_test::per_dtype(t, 2e-6, 2e-6, 2e-6, 1e-12); }
double grad_tol(dtype t) { return dpo_cuda_test::per_dtype(t, 2e-2, 4e-3, 3e-6, 1e-11); }

std::vector<double> decode(const std::vector<unsigned char>& b, dtype t) {
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  std::vector<double> out(b.size() / es);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = dpo_cuda_test::get(t, b.data() + i * es);
  return out;
}

/// Gradients as the tests compare them (double): dHidden summed over the shards, the
/// shards' dWeight / dBias rows concatenated.
struct grad_sums {
  std::vector<double> dhidden, dweight, dbias;

  /// Adds a host dHidden (E) to the sum.
  template <class E>
  void add_hidden(const std::vector<E>& dh) {
    dhidden.resize(dh.size(), 0.0);
    for (std::size_t i = 0; i < dh.size(); ++i) dhidden[i] += static_cast<double>(dh[i]);
  }
  /// One CUDA rank's gradients (raw bytes of t): dHidden's first `n` values added, its
  /// dWeight / dBias rows appended.
  void add_rank(dtype t, const std::vector<unsigned char>& dh, const std::vector<unsigned char>& dw,
                const std::vector<unsigned char>& db, std::size_t n) {
    const std::vector<double> h = decode(dh, t), w = decode(dw, t), b = decode(db, t);
    dhidden.resize(h.size(), 0.0);
    for (std::size_t i = 0; i < n && i < h.size(); ++i) dhidden[i] += h[i];
    dweight.insert(dweight.end(), w.begin(), w.end());
    dbias.insert(dbias.end(), b.begin(), b.end());
  }
  /// Against `want` within tol of the largest magnitude.
  void check(const grad_sums& want, double tol) const {
    check_close(dhidden, want.dhidden, tol, "dhidden (summed over the shards)");
    check_close(dweight, want.dweight, tol, "dweight rows");
    if (!want.dbias.empty()) check_close(dbias, want.dbias, tol, "dbias rows");
  }
};

/// A batch of hidden rows and a whole head [V, H] in `t` (rows stride H): labels global,
/// every 5th row ignored, every 7th masked; upstream gradients for the backward.
struct problem : head_bytes {
  std::int64_t N = 0, V = 0;
  std::vector<unsigned char> hidden;
  std::vector<std::int64_t> labels;
  std::vector<std::uint8_t> mask;
  std::vector<double> grad_logps, grad_entropy;
};

problem make_problem(dtype t, std::int64_t N, std::int64_t H, std::int64_t V, unsigned seed, bool bias) {
  problem p;
  std::mt19937 rng(seed);
  p.hidden = random_values(t, N * H, 2.0, rng);
  static_cast<head_bytes&>(p) = make_head_bytes(t, H, V, bias, rng);
  p.N = N;
  p.V = V;
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<std::int64_t> lab(0, V - 1);
  for (std::int64_t r = 0; r < N; ++r) {
    p.labels.push_back(r % 5 == 3 ? -100 : lab(rng));
    p.mask.push_back(r % 7 == 5 ? 0 : 1);
    p.grad_logps.push_back(u(rng));
    p.grad_entropy.push_back(u(rng));
  }
  return p;
}

/// Rank `sh`'s phase-1 case: the shard's weight and bias rows.
shard_linear_case shard_case(const problem& p, const dpo::vocab_shard& sh, bool metrics) {
  shard_linear_case c;
  c.type = p.t;
  c.rows = p.N;
  c.hidden_cols = p.H;
  c.sh = sh;
  c.hidden = p.hidden;
  p.shard(sh, &c.weight, &c.bias);
  c.labels = p.labels;
  c.mask = p.mask;
  c.transforms = p.transforms;
  c.metrics = metrics;
  c.chunk_rows = 5;
  c.chunk_vocab = 16;
  return c;
}

/// The per-row values and gradients of one head (double), as the tests compare them.
struct head_out : grad_sums {
  std::vector<double> logp, lse, entropy, zmean, wpo, hit;
};

/// The two all-reduces on the host: max of the maxima, rebase, sum of the records.
void combine(std::vector<std::vector<double>>& recs, const std::vector<std::vector<double>>& maxes,
             std::vector<double>* M, std::vector<double>* S) {
  const std::size_t N = maxes[0].size();
  M->assign(N, -INFINITY);
  S->assign(N * F, 0.0);
  for (const auto& m : maxes)
    for (std::size_t r = 0; r < N; ++r) (*M)[r] = std::max((*M)[r], m[r]);
  for (auto& rec : recs) {
    dpo::cpu::shard_rebase(0, static_cast<std::int64_t>(N), M->data(), rec.data());
    for (std::size_t i = 0; i < N * F; ++i) (*S)[i] += rec[i];
  }
}

template <class E>
std::vector<E> typed(const std::vector<unsigned char>& b) {
  std::vector<E> v(b.size() / sizeof(E));
  if (!b.empty()) std::memcpy(static_cast<void*>(v.data()), b.data(), b.size());
  return v;
}

template <class E>
std::vector<double> doubles(const std::vector<E>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// dpo::cpu on the host types of the problem: the unsharded head (`cuts` = {0, V}) or the
/// sharded one over `cuts`, the ranks' records combined as the two all-reduces would;
/// dHidden summed over the ranks in double, dWeight / dBias rows concatenated.
template <class E>
head_out cpu_head(const problem& p, const std::vector<std::int64_t>& cuts, bool metrics) {
  const std::int64_t N = p.N, H = p.H, V = p.V;
  const std::size_t n = static_cast<std::size_t>(N);
  const std::vector<E> hidden = typed<E>(p.hidden), weight = typed<E>(p.weight), bias = typed<E>(p.bias);
  const auto view = [&](std::int64_t start, std::int64_t end) {
    const dpo::linear_head<E> head = dpo::make_linear_head(weight.data() + start * H, end - start, H, H,
                                                           bias.empty() ? nullptr : bias.data() + start, p.transforms);
    return dpo::linear_view_of(hidden.data(), N, H, head, p.labels.data(), p.mask.data());
  };
  head_out o;
  o.logp.assign(n, 0);
  o.lse.assign(n, 0);
  o.entropy.assign(n, 0);
  o.zmean.assign(n, 0);
  std::vector<double> lsp(n, 0);
  std::vector<std::uint8_t> top1(n, 0);
  dpo::cpu::linear_outputs extra;
  extra.entropy = o.entropy.data();
  extra.log_sum_sq_probs = lsp.data();
  extra.mean_logits = o.zmean.data();
  extra.is_top1 = top1.data();
  const double* ge = metrics ? p.grad_entropy.data() : nullptr;
  const double* ent = metrics ? o.entropy.data() : nullptr;
  std::vector<E> dh(n * H), dw(static_cast<std::size_t>(V * H), E(0.0f)), db(static_cast<std::size_t>(V), E(0.0f));
  const auto grads = [&](std::int64_t start) {
    dpo::cpu::linear_grads<E, E> g;
    g.hidden = dh.data();
    g.hidden_stride = H;
    g.weight = dw.data() + start * H;
    g.weight_stride = H;
    g.bias = bias.empty() ? nullptr : db.data() + start;
    return g;
  };
  const int W = static_cast<int>(cuts.size()) - 1;
  if (W == 1) {
    dpo::cpu::linear_logps(view(0, V), o.logp.data(), extra, o.lse.data());
    dpo::cpu::linear_logps_backward(view(0, V), o.lse.data(), p.grad_logps.data(), ent, ge, grads(0));
    o.add_hidden(dh);
  } else {
    std::vector<std::vector<double>> recs(W, std::vector<double>(n * F)), maxes(W, std::vector<double>(n));
    for (int t = 0; t < W; ++t)
      dpo::cpu::linear_shard_partials(view(cuts[t], cuts[t + 1]), {V, cuts[t], cuts[t + 1]}, recs[t].data(),
                                      maxes[t].data(), metrics);
    std::vector<double> M, S;
    combine(recs, maxes, &M, &S);
    dpo::cpu::linear_shard_logps(view(0, V), V, M.data(), S.data(), o.logp.data(), extra, o.lse.data());
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      dpo::cpu::linear_shard_backward(view(sh.start, sh.end), sh, M.data(), S.data(), p.grad_logps.data(), ent, ge,
                                      grads(sh.start));
      o.add_hidden(dh);
    }
  }
  for (std::size_t r = 0; r < n; ++r) {
    o.wpo.push_back(o.logp[r] - lsp[r]);
    o.hit.push_back(top1[r]);
  }
  o.dweight = doubles(dw);
  if (!bias.empty()) o.dbias = doubles(db);
  return o;
}

head_out cpu_reference(const problem& p, const std::vector<std::int64_t>& cuts, bool metrics) {
  return dpo_cuda_test::with_host_types(p.t, false, [&](auto e, auto) { return cpu_head<decltype(e)>(p, cuts, metrics); });
}

/// Rank c.sh's call through the harness's `run`, which must succeed (status and error word).
template <class Case, class Run>
auto run_checked(const Case& c, Run&& run) {
  const auto o = run(c);
  INFO("shard [" << c.sh.start << ", " << c.sh.end << "): " << o.message << " " << o.device_message);
  REQUIRE(o.code == 0);
  REQUIRE(o.device_error == 0);
  return o;
}

shard_linear_out run_ok(const shard_linear_case& c) { return run_checked(c, dpo_cuda_test::run_shard_linear); }

/// CUDA records against dpo::cpu's (`mx`: the CPU's maxima, -inf on rows that do not count,
/// whose empty record must match exactly); the logits differ by the GEMMs' summation order
/// only, so the argmax flags agree exactly on random data.
void compare_records(const std::vector<double>& got_records, const std::vector<double>& rec,
                     const std::vector<double>& mx, const dpo::vocab_shard& sh, double tol) {
  const std::size_t n = mx.size();
  REQUIRE(got_records.size() == rec.size());
  for (int f = 0; f < F; ++f) {
    std::vector<double> got, want;
    for (std::size_t r = 0; r < n; ++r) {
      const bool counted = std::isfinite(mx[r]);
      got.push_back(counted || f != F - 1 ? got_records[r * F + f] : 0.0);
      want.push_back(counted || f != F - 1 ? rec[r * F + f] : 0.0);
      if (!counted) CHECK(got_records[r * F + f] == rec[r * F + f]);  // the empty record, exactly
    }
    INFO("shard [" << sh.start << ", " << sh.end << ") field " << f);
    const bool flag = f == dpo::detail::at(dpo::shard_field::max_at_label) ||
                      f == dpo::detail::at(dpo::shard_field::max_before_label);
    if (flag) {
      CHECK(got == want);
    } else {
      check_close(got, want, tol, "records");
    }
  }
}

/// The records of one rank, CUDA against dpo::cpu::linear_shard_partials (the logits differ
/// by the GEMMs' summation order only; the argmax flags agree exactly on random data).
template <class E>
void check_records(const problem& p, const shard_linear_case& c, const shard_linear_out& o, double tol) {
  const std::vector<E> hidden = typed<E>(p.hidden), weight = typed<E>(c.weight), bias = typed<E>(c.bias);
  const dpo::linear_head<E> head = dpo::make_linear_head(weight.data(), c.sh.width(), p.H, p.H,
                                                         bias.empty() ? nullptr : bias.data(), p.transforms);
  const std::size_t n = static_cast<std::size_t>(p.N);
  std::vector<double> rec(n * F), mx(n);
  dpo::cpu::linear_shard_partials(dpo::linear_view_of(hidden.data(), p.N, p.H, head, p.labels.data(), p.mask.data()),
                                  c.sh, rec.data(), mx.data(), c.metrics);
  compare_records(o.records, rec, mx, c.sh, tol);
  CHECK(o.row_max.size() == n);
}

/// The gradients hold their start values: dHidden's poison, dWeight / dBias zeros.
template <class Out>
void grads_untouched(const Out& o) {
  for (unsigned char x : o.dhidden) CHECK(x == 0x7f);
  for (unsigned char x : o.dweight) CHECK(x == 0);
  for (unsigned char x : o.dbias) CHECK(x == 0);
}

/// A rejected call: its status failed naming `name`, and its outputs are untouched(o).
template <class Out, class Untouched>
void rejected_naming(const Out& o, const char* name, Untouched&& untouched) {
  INFO(o.message);
  CHECK((o.code != 0 && o.message.find(name) != std::string::npos));
  untouched(o);
}

/// Every rank's case over `cuts` (make(sh): rank sh's), phase 1 run on each (`run(k, case)`:
/// its CUDA output, checked there) and the records combined on the host as the two
/// all-reduces would: the cases for phase 2, each with the combined maxima and records.
template <class Make, class Run>
auto ranks_phase1(const std::vector<std::int64_t>& cuts, std::int64_t V, Make&& make, Run&& run) {
  std::vector<decltype(make(dpo::vocab_shard{}))> cs;
  std::vector<std::vector<double>> recs, maxes;
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) {
    cs.push_back(make(dpo::vocab_shard{V, cuts[k], cuts[k + 1]}));
    const auto o = run(k, cs.back());
    recs.push_back(o.records);
    maxes.push_back(o.row_max);
  }
  std::vector<double> M, S;
  combine(recs, maxes, &M, &S);
  for (auto& c : cs) {
    c.row_max = M;
    c.records = S;
  }
  return cs;
}

/// Runs the problem on CUDA over `cuts` and checks every result against dpo::cpu's sharded
/// head on the same cuts and against the unsharded head.
void check_split(const problem& p, const std::vector<std::int64_t>& cuts, bool metrics) {
  const int W = static_cast<int>(cuts.size()) - 1;
  INFO("V = " << p.V << " over " << W << " shards, dtype " << static_cast<int>(p.t) << ", metrics " << metrics
              << ", bias " << !p.bias.empty());
  const double vt = value_tol(p.t), gt = grad_tol(p.t);
  const std::vector<shard_linear_case> cs = ranks_phase1(
      cuts, p.V, [&](const dpo::vocab_shard& sh) { return shard_case(p, sh, metrics); },
      [&](std::size_t, const shard_linear_case& c) {
        const shard_linear_out o = run_ok(c);
        dpo_cuda_test::with_host_types(p.t, false, [&](auto e, auto) { check_records<decltype(e)>(p, c, o, vt); });
        return o;
      });
  head_out got;
  for (int t = 0; t < W; ++t) {
    shard_linear_case c = cs[t];
    c.grad_logps = p.grad_logps;
    if (metrics) c.grad_entropy = p.grad_entropy;
    const shard_linear_out o = run_ok(c);
    if (t == 0) {
      got.logp = o.logp;
      got.lse = o.lse;
      got.entropy = o.entropy;
      got.zmean = o.zmean;
      got.wpo = o.wpo;
      got.hit = o.hit;
    } else {
      CHECK(o.logp == got.logp);  // every rank computes the same values, bitwise
      CHECK(o.entropy == got.entropy);
    }
    got.add_rank(p.t, o.dhidden, o.dweight, o.dbias, static_cast<std::size_t>(p.N * p.H));
  }
  // Rows that do not count: zeros everywhere, dHidden included.
  for (std::int64_t r = 0; r < p.N; ++r) {
    if (p.labels[r] >= 0 && p.mask[r] != 0) continue;
    INFO("row " << r);
    CHECK(got.logp[r] == 0.0);
    CHECK(got.lse[r] == 0.0);
    for (std::int64_t k = 0; k < p.H; ++k) CHECK(got.dhidden[r * p.H + k] == 0.0);
  }
  for (const bool sharded : {true, false}) {
    INFO((sharded ? "against dpo::cpu's sharded head" : "against the unsharded head"));
    const head_out want = cpu_reference(p, sharded ? cuts : std::vector<std::int64_t>{0, p.V}, metrics);
    check_close(got.logp, want.logp, vt, "logp");
    check_close(got.lse, want.lse, vt, "lse");
    if (metrics) {
      check_close(got.entropy, want.entropy, vt, "entropy");
      check_close(got.zmean, want.zmean, vt, "mean logit");
      check_close(got.wpo, want.wpo, vt, "wpo");
      CHECK(got.hit == want.hit);
    }
    got.check(want, gt);
  }
}

}  // namespace

TEST_CASE("cuda linear shard: two shards of a small head match dpo::cpu and the unsharded head",
          "[cuda][linear][shard][sanitize]") {
  problem p = make_problem(dtype::f32, 9, 8, 37, 3, true);
  check_split(p, {0, 20, 37}, true);
}

TEST_CASE("cuda linear shard: 2 and 3 shards, even and uneven, every dtype, bias, transforms, metrics",
          "[cuda][linear][shard]") {
  unsigned seed = 21;
  for (const dtype t : {dtype::f32, dtype::bf16, dtype::f16, dtype::f64}) {
    for (int variant = 0; variant < 4; ++variant) {
      problem p = make_problem(t, 13, 24, 67, seed++, variant & 1);
      if (variant & 2) p.transforms = {1.3, 2.5, 0.7};  // scale, softcap, temperature (Gemma-like)
      check_split(p, {0, 33, 67}, variant != 1);
      check_split(p, {0, 5, 40, 67}, variant != 2);
    }
  }
}

TEST_CASE("cuda linear shard: V = 1001 over 3 uneven shards", "[cuda][linear][shard]") {
  for (const dtype t : {dtype::f32, dtype::bf16}) {
    const problem p = make_problem(t, 11, 16, 1001, 7, true);
    check_split(p, {0, 200, 650, 1001}, true);
  }
}

TEST_CASE("cuda linear shard: bad input is a status naming the argument, and nothing is written",
          "[cuda][linear][shard][sanitize]") {
  const problem p = make_problem(dtype::f32, 6, 8, 37, 5, true);
  // Phase 1's outputs, or phase 2's and the backward's, still hold their poison.
  const auto untouched = [](const shard_linear_out& o) {
    for (const auto* v : {&o.records, &o.row_max, &o.logp, &o.lse, &o.entropy, &o.zmean, &o.wpo, &o.hit})
      if (o.logp.empty() || (v != &o.records && v != &o.row_max))
        for (double x : *v) CHECK(x == 12345.0);
    grads_untouched(o);
  };
  const auto rejected = [&](const shard_linear_case& c, const char* name) {
    rejected_naming(dpo_cuda_test::run_shard_linear(c), name, untouched);
  };
  SECTION("the shard's range against the weight rows and the vocabulary") {
    shard_linear_case c = shard_case(p, {37, 0, 20}, true);
    c.width = 19;  // the weight holds 20 rows, not 19
    c.weight.resize(static_cast<std::size_t>(19 * 8 * 4));
    c.bias.resize(19 * 4);
    rejected(c, "holds 20 columns but the shard's logits have vocab = 19");
    c = shard_case(p, {37, 20, 37}, true);
    c.sh.end = 40;  // past the vocabulary
    c.width = 17;
    rejected(c, "vocab_shard [start, end) = [20, 40) is invalid");
    c.sh = {0, 20, 37};
    rejected(c, "vocab_shard.vocab = 0");
    c.sh = {37, -1, 16};
    rejected(c, "vocab_shard [start, end) = [-1, 16) is invalid");
  }
  SECTION("null records") {
    shard_linear_case c = shard_case(p, {37, 0, 20}, true);
    c.null_records = true;
    rejected(c, "records is null");
    c.records.assign(6 * F, 0.0);
    c.row_max.assign(6, 0.0);
    c.grad_logps = p.grad_logps;
    rejected(c, "records is null");
  }
  SECTION("a label outside the global vocabulary: the error word, nothing written") {
    shard_linear_case c = shard_case(p, {37, 20, 37}, true);
    c.labels[2] = 37;
    c.mask[2] = 1;
    const shard_linear_out o = dpo_cuda_test::run_shard_linear(c);
    REQUIRE(o.code == 0);
    INFO(o.device_message);
    CHECK(o.device_error != 0);
    CHECK(o.device_message.find("labels") != std::string::npos);
    CHECK(o.device_message.find("37") != std::string::npos);
    untouched(o);
    // The backward too: dHidden keeps its poison, dWeight / dBias their zeros.
    c.records.assign(6 * F, 0.0);
    c.row_max.assign(6, 0.0);
    c.grad_logps = p.grad_logps;
    const shard_linear_out b = dpo_cuda_test::run_shard_linear(c);
    REQUIRE(b.code == 0);
    CHECK(b.device_error != 0);
    REQUIRE(!b.dhidden.empty());
    for (unsigned char x : b.dhidden) CHECK(x == 0x7f);
    for (unsigned char x : b.dweight) CHECK(x == 0);
    for (unsigned char x : b.dbias) CHECK(x == 0);
  }
  SECTION("labels of another shard and ignored labels are fine") {
    shard_linear_case c = shard_case(p, {37, 20, 37}, true);
    c.labels = {0, 19, 20, 36, -100, 5};
    const shard_linear_out o = run_ok(c);
    CHECK(o.records[4 * F + dpo::detail::at(dpo::shard_field::shard_max)] == -INFINITY);
  }
}

TEST_CASE("cuda linear shard: linear_shard_logps refuses outputs on its inputs or on each other",
          "[cuda][linear][shard]") {
  const char* names[] = {"out.logp overlaps row_max", "out.lse overlaps records", "out.logp overlaps out.entropy",
                         "out.hit overlaps labels"};
  for (int which = 0; which < 4; ++which) {
    INFO("case " << which);
    bool written = true;
    const std::string msg = dpo_cuda_test::linear_shard_logps_alias_error(which, &written);
    CHECK(msg.find(names[which]) != std::string::npos);
    CHECK_FALSE(written);
  }
}

TEST_CASE("cuda linear shard: gradients and records may overlap no input the call reads, nor each other",
          "[cuda][linear][shard][sanitize]") {
  // The audit's probes: each call was accepted (or refused only after the first hidden
  // buffer's records were written) and wrote into the aliased input: the backward's dHidden
  // or dBias over row_max, phase 1's records or maxima over the other buffer's hidden rows or
  // the mask, the sequences' seq over the labels, the pair backward's gradients over
  // nll_token_grad, grad_output or the mask (and over seq_grad, refused but named
  // "row_lse / row_coef"); linear_pair_logps' chosen over rejected or the hidden rows.
  const dpo_cuda_test::shard_linear_alias_out r = dpo_cuda_test::shard_linear_alias_errors();
  REQUIRE(r.cases.size() == 12);
  test_support::check_alias_cases(r.cases);  // "call: A on B": the message names both A and B
  for (const auto& c : r.cases) {
    INFO(c.what << " -> " << c.message);
    CHECK_FALSE(c.written);
  }
}

TEST_CASE("cuda linear shard: head calls without rows leave this call's error word", "[cuda][linear][shard]") {
  // linear_logps, linear_logps_backward, linear_shard_partials and linear_shard_backward with
  // rows = 0 returned before any kernel, so read_device_error reported the workspace's old
  // bytes or the previous call's label error after a valid call.
  for (int which = 0; which < 4; ++which)
    for (const bool previous : {false, true}) {
      INFO("call " << which << ", previous error " << previous);
      CHECK(dpo_cuda_test::linear_empty_call_error(which, previous) == "");
    }
}

TEST_CASE("cuda linear shard: results are bitwise the same run to run", "[cuda][linear][shard]") {
  const problem p = make_problem(dtype::bf16, 12, 16, 101, 9, true);
  shard_linear_case c = shard_case(p, {101, 30, 101}, true);
  const shard_linear_out a = run_ok(c), b = run_ok(c);
  CHECK(test_support::bitwise_equal(a.records, b.records));
  CHECK(test_support::bitwise_equal(a.row_max, b.row_max));
  c.records = a.records;
  c.row_max = a.row_max;
  dpo::cpu::shard_rebase(0, p.N, c.row_max.data(), c.records.data());  // world size 1 of this shard
  c.grad_logps = p.grad_logps;
  c.grad_entropy = p.grad_entropy;
  const shard_linear_out x = run_ok(c), y = run_ok(c);
  CHECK(test_support::bitwise_equal(x.logp, y.logp));
  CHECK(x.dhidden == y.dhidden);
  CHECK(x.dweight == y.dweight);
  CHECK(x.dbias == y.dbias);
}

// ---- DPO from hidden states on head shards: the pair calls ---------------------------------

namespace {

using dpo_cuda_test::pair_shard_case;
using dpo_cuda_test::pair_shard_out;

/// TRL's concatenated batch of 2P sequences over hidden rows: padded [2P, T] or packed by
/// cu_seqlens (lengths varying, one trailing row past the last sequence), prompts and padding
/// labelled -100, and a whole head [V, H]; a reference and upstream values for the pair stage.
struct pair_problem : head_bytes {
  std::int64_t P = 0, T = 0, R = 0, V = 0;
  bool packed = false;
  std::vector<std::int64_t> cu;
  std::vector<unsigned char> hidden;
  std::vector<std::int64_t> labels;
  std::vector<double> ref_c, ref_r;
};

pair_problem make_pairs(dtype t, std::int64_t P, std::int64_t T, std::int64_t H, std::int64_t V, bool packed,
                        bool bias, unsigned seed) {
  pair_problem p;
  std::mt19937 rng(seed);
  static_cast<head_bytes&>(p) = make_head_bytes(t, H, V, bias, rng);
  p.P = P;
  p.T = T;
  p.V = V;
  p.packed = packed;
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<std::int64_t> lab(0, V - 1);
  p.cu.push_back(0);
  for (std::int64_t s = 0; s < 2 * P; ++s) {
    const std::int64_t n = packed ? T - (s * 3) % T / 2 : T;
    for (std::int64_t k = 0; k < n; ++k) p.labels.push_back(k < 1 + s % 2 || (!packed && k >= n - s % 3) ? -100 : lab(rng));
    p.cu.push_back(p.cu.back() + n);
  }
  if (packed) p.labels.push_back(lab(rng));  // a row past the last sequence: not read
  p.R = static_cast<std::int64_t>(p.labels.size());
  p.hidden = random_values(t, p.R * H, 2.0, rng);
  for (std::int64_t q = 0; q < P; ++q) {
    p.ref_c.push_back(-20.0 + 5.0 * u(rng));
    p.ref_r.push_back(-20.0 + 5.0 * u(rng));
  }
  return p;
}

/// Rank `sh`'s case: the shard's weight and bias rows.
pair_shard_case pair_case(const pair_problem& p, const dpo::vocab_shard& sh, bool metrics, double ld_alpha) {
  pair_shard_case c;
  c.type = p.t;
  c.num_seqs = 2 * p.P;
  c.seq_len = p.packed ? 0 : p.T;
  c.rows = p.R;
  c.hidden_cols = p.H;
  if (p.packed) c.cu_seqlens = p.cu;
  c.sh = sh;
  c.hidden = p.hidden;
  p.shard(sh, &c.weight, &c.bias);
  c.labels = p.labels;
  c.transforms = p.transforms;
  c.metrics = metrics;
  c.ld_alpha = ld_alpha;
  c.chunk_rows = 7;
  return c;
}

/// What the pair pipeline yields: the combined sequence sums, the pair stage's loss, metrics,
/// dL/dpi and NLL token gradient, and the gradients (dHidden summed over the shards).
struct pair_result : grad_sums {
  std::vector<double> seq, loss_metrics, seq_grad;
  double nll = 0;
};

/// The pair stage on the host (dpo::cpu::shard_pair_stage) from the sequence sums.
void pair_stage(const pair_problem& p, const dpo::loss_config& cfg, bool metrics, pair_result& r) {
  double loss = 0;
  dpo::metrics m;
  dpo::forward_outputs out;
  out.loss = &loss;
  out.metrics = &m;
  out.nll_token_grad = &r.nll;
  r.seq_grad.assign(static_cast<std::size_t>(2 * p.P), 0.0);
  dpo::cpu::shard_pair_stage(p.P, r.seq.data(), p.ref_c.data(), p.ref_r.data(), cfg, metrics, out, r.seq_grad.data());
  r.loss_metrics = {loss};
  const double* mp = reinterpret_cast<const double*>(&m);
  r.loss_metrics.insert(r.loss_metrics.end(), mp, mp + dpo::num_metrics);
}

/// dpo::cpu on the host types: the pair calls of dpo/cpu/linear_shard.hpp over `cuts` (the
/// ranks' records combined as the all-reduces would), or, `cuts` = {}, the unsharded
/// linear_dpo (loss, metrics and gradients only). rank_records: each rank's phase-1 records.
template <class E>
pair_result cpu_pairs(const pair_problem& p, const std::vector<std::int64_t>& cuts, const dpo::loss_config& cfg,
                      bool metrics, std::vector<std::vector<double>>* rank_records) {
  const std::int64_t H = p.H, R = p.R, S = 2 * p.P;
  const std::vector<E> hidden = typed<E>(p.hidden), weight = typed<E>(p.weight), bias = typed<E>(p.bias);
  const dpo::hidden_pairs<E, std::int64_t> pairs =
      p.packed ? dpo::linear_packed_pairs<E, std::int64_t>(hidden.data(), H, H, p.labels.data(), p.cu.data(), S)
               : dpo::linear_padded_pairs<E, std::int64_t>(hidden.data(), H, H, p.labels.data(), S, p.T);
  const auto head = [&](std::int64_t a, std::int64_t b) {
    return dpo::make_linear_head(weight.data() + a * H, b - a, H, H, bias.empty() ? nullptr : bias.data() + a,
                                 p.transforms);
  };
  std::vector<E> dh(static_cast<std::size_t>(R * H), E(0.0f)), dw(static_cast<std::size_t>(p.V * H), E(0.0f)),
      db(static_cast<std::size_t>(p.V), E(0.0f));
  const auto grads = [&](std::int64_t start) {
    dpo::linear_dpo_grads<E, E> g;
    g.chosen_hidden = g.rejected_hidden = dh.data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = H;
    g.weight = dw.data() + start * H;
    g.weight_stride = H;
    g.bias = bias.empty() ? nullptr : db.data() + start;
    return g;
  };
  pair_result r;
  dpo::cpu::linear_dpo_options opt;
  opt.metrics = metrics;  // the pair calls compute the metric fields for WPO too (the caller's choice)
  if (cuts.empty()) {
    double loss = 0;
    dpo::metrics m;
    dpo::forward_outputs out;
    out.loss = &loss;
    out.metrics = &m;
    dpo::cpu::linear_dpo(pairs, head(0, p.V), p.ref_c.data(), p.ref_r.data(), cfg, out, grads(0), opt);
    r.loss_metrics = {loss};
    const double* mp = reinterpret_cast<const double*>(&m);
    r.loss_metrics.insert(r.loss_metrics.end(), mp, mp + dpo::num_metrics);
    r.add_hidden(dh);
  } else {
    const int W = static_cast<int>(cuts.size()) - 1;
    std::vector<std::vector<double>> recs, maxes;
    for (int k = 0; k < W; ++k) {
      std::vector<double> rec(static_cast<std::size_t>(R * F), 0.0), mx(static_cast<std::size_t>(R), -INFINITY);
      for (std::int64_t i = 0; i < R; ++i) dpo::detail::empty_shard_record(rec.data() + i * F);
      dpo::cpu::linear_pair_shard_partials(pairs, head(cuts[k], cuts[k + 1]), {p.V, cuts[k], cuts[k + 1]},
                                           mx.data(), rec.data(), mx.data(), rec.data(), opt);
      recs.push_back(rec);
      maxes.push_back(mx);
    }
    if (rank_records != nullptr) *rank_records = recs;
    std::vector<double> M, Sm;
    combine(recs, maxes, &M, &Sm);
    r.seq.assign(static_cast<std::size_t>(dpo::seq_fields * S), 0.0);
    dpo::cpu::linear_pair_shard_sequences(pairs, {p.V, cuts[0], cuts[1]}, M.data(), Sm.data(), M.data(), Sm.data(),
                                          cfg.ld_alpha, r.seq.data(), metrics || cfg.use_weighting);
    pair_stage(p, cfg, metrics || cfg.use_weighting, r);
    for (int k = 0; k < W; ++k) {
      const dpo::vocab_shard sh{p.V, cuts[k], cuts[k + 1]};
      dpo::cpu::linear_pair_shard_backward(pairs, head(sh.start, sh.end), sh, M.data(), Sm.data(), M.data(),
                                           Sm.data(), r.seq_grad.data(), r.nll, cfg.ld_alpha, grads(sh.start));
      r.add_hidden(dh);
    }
  }
  r.dweight = doubles(dw);
  if (!bias.empty()) r.dbias = doubles(db);
  return r;
}

pair_result cpu_pair_reference(const pair_problem& p, const std::vector<std::int64_t>& cuts,
                               const dpo::loss_config& cfg, bool metrics,
                               std::vector<std::vector<double>>* rank_records = nullptr) {
  return dpo_cuda_test::with_host_types(
      p.t, false, [&](auto e, auto) { return cpu_pairs<decltype(e)>(p, cuts, cfg, metrics, rank_records); });
}

pair_shard_out run_pair_ok(const pair_shard_case& c) { return run_checked(c, dpo_cuda_test::run_pair_shard); }

/// The pair pipeline on CUDA over `cuts` (phase 1 per rank, the all-reduces on the host,
/// the sequences per rank, the pair stage on the host, the backward per rank), each call
/// against dpo::cpu's pair calls on the same cuts and the result against the unsharded
/// dpo::cpu::linear_dpo.
void check_pairs(const pair_problem& p, const std::vector<std::int64_t>& cuts, const dpo::loss_config& cfg,
                 bool metrics) {
  const int W = static_cast<int>(cuts.size()) - 1;
  const bool m = metrics || cfg.use_weighting;
  INFO("pairs: V = " << p.V << " over " << W << " shards, dtype " << static_cast<int>(p.t) << ", packed "
                     << p.packed << ", bias " << !p.bias.empty() << ", metrics " << metrics << ", ld_alpha "
                     << cfg.ld_alpha);
  const double vt = value_tol(p.t), gt = grad_tol(p.t);
  std::vector<std::vector<double>> cpu_recs;
  const pair_result want = cpu_pair_reference(p, cuts, cfg, m, &cpu_recs);
  const auto phase1 = [&](std::size_t k, const pair_shard_case& c) {
    const pair_shard_out o = run_pair_ok(c);
    std::vector<double> cpu_max(static_cast<std::size_t>(p.R));
    for (std::int64_t r = 0; r < p.R; ++r) cpu_max[r] = cpu_recs[k][r * F + dpo::detail::at(dpo::shard_field::shard_max)];
    compare_records(o.records, cpu_recs[k], cpu_max, c.sh, vt);
    return o;
  };
  const std::vector<pair_shard_case> cs = ranks_phase1(
      cuts, p.V, [&](const dpo::vocab_shard& sh) { return pair_case(p, sh, m, cfg.ld_alpha); }, phase1);
  pair_result got;
  for (int k = 0; k < W; ++k) {
    pair_shard_case c = cs[k];
    if (k == 0) {  // the pair stage reads the first rank's sums (every rank has the same)
      c.seq_grad.assign(static_cast<std::size_t>(2 * p.P), 0.0);
      const pair_shard_out o = run_pair_ok(c);
      got.seq = o.seq;
      pair_stage(p, cfg, m, got);
    }
    c.seq_grad = got.seq_grad;
    c.nll_token_grad = got.nll;
    const pair_shard_out o = run_pair_ok(c);
    CHECK(test_support::bitwise_equal(o.seq, got.seq));
    // Rows past the last sequence (packed) are not written: they keep their poison.
    const std::size_t written = static_cast<std::size_t>(p.cu.back() * p.H);
    for (std::size_t i = written * dpo_cuda_test::dtype_size(p.t); i < o.dhidden.size(); ++i)
      CHECK(o.dhidden[i] == 0x7f);
    got.add_rank(p.t, o.dhidden, o.dweight, o.dbias, written);
  }
  // The sequence sums against the CPU's (field by field: counts are exact).
  for (int f = 0; f < dpo::seq_fields; ++f) {
    INFO("seq field " << f);
    const auto col = [&](const std::vector<double>& v) {
      return std::vector<double>(v.begin() + f * 2 * p.P, v.begin() + (f + 1) * 2 * p.P);
    };
    if (f == dpo::detail::at(dpo::seq_field::tokens) || f == dpo::detail::at(dpo::seq_field::hits)) {
      CHECK(col(got.seq) == col(want.seq));
    } else {
      check_close(col(got.seq), col(want.seq), vt, "sequence sums");
    }
  }
  const pair_result whole = cpu_pair_reference(p, {}, cfg, metrics);
  for (const pair_result* w : {&want, &whole}) {
    INFO((w == &want ? "against dpo::cpu's pair shard calls" : "against the unsharded dpo::cpu::linear_dpo"));
    // WPO without metrics: the pair calls computed the token metrics, linear_dpo reports 0.
    if (w == &want || m == metrics) {
      check_close(got.loss_metrics, w->loss_metrics, vt, "loss and metrics", 1e-12);
    } else {
      CHECK(std::fabs(got.loss_metrics[0] - w->loss_metrics[0]) <= vt * std::max(1.0, std::fabs(w->loss_metrics[0])));
    }
    got.check(*w, gt);
  }
}

}  // namespace

TEST_CASE("cuda linear shard pairs: two shards of a small padded batch match dpo::cpu and linear_dpo",
          "[cuda][linear][shard][pairs][sanitize]") {
  const pair_problem p = make_pairs(dtype::f32, 2, 6, 8, 37, false, true, 41);
  check_pairs(p, {0, 20, 37}, fixture::config_named("sigmoid").cfg, true);
}

TEST_CASE("cuda linear shard pairs: 2 and 3 shards, every dtype, padded and packed, bias, LD-DPO, metrics",
          "[cuda][linear][shard][pairs]") {
  unsigned seed = 51;
  for (const dtype t : {dtype::f32, dtype::bf16, dtype::f16, dtype::f64}) {
    for (int variant = 0; variant < 4; ++variant) {
      pair_problem p = make_pairs(t, 3, 7, 16, 67, variant & 1, variant != 2, seed++);
      if (variant & 2) p.transforms = {1.3, 2.5, 0.7};
      const char* cfg = variant == 0 ? "sigmoid" : variant == 1 ? "sigmoid+ld_alpha" : variant == 2 ? "mpo+wpo"
                                                                                                  : "ipo+ld_alpha0+wpo";
      check_pairs(p, {0, 33, 67}, fixture::config_named(cfg).cfg, variant != 1);
      check_pairs(p, {0, 5, 40, 67}, fixture::config_named(cfg).cfg, variant != 3);
    }
  }
}

TEST_CASE("cuda linear shard pairs: V = 1001 over 3 uneven shards", "[cuda][linear][shard][pairs]") {
  for (const dtype t : {dtype::f32, dtype::bf16})
    for (const bool packed : {false, true})
      check_pairs(make_pairs(t, 2, 6, 16, 1001, packed, true, 61), {0, 200, 650, 1001},
                  fixture::config_named("sigmoid+ld_alpha").cfg, true);
}

TEST_CASE("cuda linear shard pairs: bad input is a status naming the argument, and nothing is written",
          "[cuda][linear][shard][pairs][sanitize]") {
  const pair_problem p = make_pairs(dtype::f32, 2, 5, 8, 37, false, true, 71);
  // The outputs of the calls that were made still hold their poison (phase 1's when it ran).
  const auto untouched = [](const pair_shard_out& o) {
    for (double x : o.seq) CHECK(x == 12345.0);
    if (o.seq.empty())
      for (const auto* v : {&o.records, &o.row_max})
        for (double x : *v) CHECK(x == 12345.0);
    grads_untouched(o);
  };
  const auto rejected = [&](const pair_shard_case& c, const char* name) {
    rejected_naming(dpo_cuda_test::run_pair_shard(c), name, untouched);
  };
  // Phase 2 and the backward of a case, from some combined records.
  const auto combined = [](pair_shard_case c) {
    c.records.assign(static_cast<std::size_t>(c.rows * F), 0.0);
    c.row_max.assign(static_cast<std::size_t>(c.rows), 0.0);
    c.seq_grad.assign(static_cast<std::size_t>(c.num_seqs), 0.5);
    return c;
  };
  // Device data rejected: the calls succeed, the error word names `what`, nothing is written.
  const auto device_rejected = [&](const pair_shard_case& c, const char* what) {
    const pair_shard_out o = dpo_cuda_test::run_pair_shard(c);
    REQUIRE(o.code == 0);
    INFO(o.device_message);
    CHECK(o.device_error != 0);
    CHECK(o.device_message.find(what) != std::string::npos);
    untouched(o);
  };
  SECTION("the shard against the head and the vocabulary") {
    pair_shard_case c = pair_case(p, {37, 20, 37}, true, 1.0);
    c.sh.end = 40;
    rejected(c, "vocab_shard [start, end) = [20, 40) is invalid");
    c.sh = {37, 20, 37};
    c.width = 16;  // the weight holds 17 rows, the head says 16
    rejected(c, "holds 17 columns but the shard's logits have vocab = 16");
  }
  SECTION("two arrays for a concatenated layout") {
    pair_shard_case c = pair_case(p, {37, 0, 20}, true, 1.0);
    c.two_arrays = true;
    rejected(c, "chosen_records == rejected_records");
    rejected(combined(c), "chosen_records == rejected_records");
  }
  SECTION("ld_alpha outside [0, 1]") {
    pair_shard_case c = combined(pair_case(p, {37, 0, 20}, true, 1.0));
    c.ld_alpha = 1.5;
    rejected(c, "ld_alpha");
  }
  SECTION("a label outside the global vocabulary: the error word, nothing written") {
    for (const bool phase2 : {false, true}) {
      pair_shard_case c = pair_case(p, {37, 20, 37}, true, 1.0);
      c.labels[7] = 37;
      device_rejected(phase2 ? combined(c) : c, "37");
    }
  }
  SECTION("a bad cu_seqlens: the error word, nothing written") {
    const pair_problem q = make_pairs(dtype::f32, 2, 5, 8, 37, true, true, 72);
    for (const bool phase2 : {false, true}) {
      pair_shard_case c = pair_case(q, {37, 0, 20}, true, 1.0);
      c.cu_seqlens[2] = c.cu_seqlens[1] - 1;
      device_rejected(phase2 ? combined(c) : c, "cu_seqlens");
    }
  }
}

TEST_CASE("cuda linear shard pairs: results are bitwise the same run to run", "[cuda][linear][shard][pairs]") {
  const pair_problem p = make_pairs(dtype::bf16, 2, 6, 16, 101, true, true, 81);
  pair_shard_case c = pair_case(p, {101, 30, 101}, true, 0.5);
  const pair_shard_out a = run_pair_ok(c), b = run_pair_ok(c);
  CHECK(test_support::bitwise_equal(a.records, b.records));
  c.records = a.records;
  c.row_max = a.row_max;
  dpo::cpu::shard_rebase(0, p.R, c.row_max.data(), c.records.data());
  c.seq_grad.assign(static_cast<std::size_t>(2 * p.P), 0.25);
  c.nll_token_grad = 0.125;
  c.grad_output = 0.5;
  const pair_shard_out x = run_pair_ok(c), y = run_pair_ok(c);
  CHECK(test_support::bitwise_equal(x.seq, y.seq));
  CHECK(x.dhidden == y.dhidden);
  CHECK(x.dweight == y.dweight);
  CHECK(x.dbias == y.dbias);
}

TEST_CASE("cuda linear shard: a -inf label logit is never top-1, as in the unsharded head", "[cuda][linear][shard]") {
  // fp32 logits without a soft cap or temperature keep the bias's -inf. First the first
  // shard's columns get a -inf bias (its labels: a -inf logit below a finite maximum), then
  // every column: each row's first maximum is column 0, yet no label is top-1
  // (dpo::detail::shard_label_is_top1), and phase 2 equals the unsharded CPU head, NaN and
  // infinities included.
  const std::vector<std::int64_t> cuts = {0, 20, 37};
  for (const bool whole_row : {false, true}) {
    INFO("whole row -inf: " << whole_row);
    problem p = make_problem(dtype::f32, 9, 8, 37, 5, true);
    for (std::int64_t j = 0; j < (whole_row ? p.V : cuts[1]); ++j)
      dpo_cuda_test::put(dtype::f32, p.bias.data() + j * 4, -INFINITY);
    for (std::int64_t r = 0; r < p.N; ++r)
      if (p.labels[r] >= 0) p.labels[r] = r % 2 == 0 ? 0 : 3 + r;  // in the first shard
    std::vector<shard_linear_case> cs;
    std::vector<std::vector<double>> recs, maxes;
    for (int t = 0; t < 2; ++t) {
      cs.push_back(shard_case(p, {p.V, cuts[t], cuts[t + 1]}, true));
      const shard_linear_out o = run_ok(cs.back());
      recs.push_back(o.records);
      maxes.push_back(o.row_max);
    }
    shard_linear_case c = cs[0];
    combine(recs, maxes, &c.row_max, &c.records);
    c.grad_logps = p.grad_logps;
    const shard_linear_out got = run_ok(c);
    const head_out want = cpu_reference(p, {0, p.V}, true);
    CHECK(got.hit == want.hit);
    CHECK(got.hit == std::vector<double>(static_cast<std::size_t>(p.N), 0.0));
    test_support::check_values(got.logp, want.logp, 2e-6, "logp");
    test_support::check_values(got.lse, want.lse, 2e-6, "lse");
    test_support::check_values(got.entropy, want.entropy, 2e-6, "entropy");
    test_support::check_values(got.zmean, want.zmean, 2e-6, "mean logit");
    test_support::check_values(got.wpo, want.wpo, 2e-6, "wpo");
  }
}
