// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Edge cases of the CPU path against the oracle: vocabulary sizes (1, prime, around the
// vector width and the 2048-column chunk, multi-chunk), where the completion tokens sit,
// fully masked sequences, extreme margins, NaN and -inf logits, and bitwise determinism
// across thread counts.
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "catch.hpp"
#include "checks.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

using fixture::config_named;
using fixture::layout;
using fixture::run_options;

namespace {

/// Sets every label of a sequence: `active(t)` says whether row t is a completion token.
template <class F>
void relabel(oracle::sequence& s, std::int64_t V, F active) {
  for (std::int64_t t = 0; t < s.rows(); ++t) s.y[t] = active(t) ? (7 * t + 3) % V : -1;
}

}  // namespace

TEST_CASE("vocabulary sizes: 1, around the vector width and the chunk, prime, multi-chunk", "[edge]") {
  for (std::int64_t V : {1, 2, 15, 16, 17, 2047, 2048, 2049, 4099}) {
    INFO("V = " << V);
    fixture::batch_spec sp = fixture::spec(2, V > 100 ? 3 : 5, V, 50 + static_cast<std::uint64_t>(V));
    const oracle::batch bf = fixture::rounded_random_batch<float>(sp);
    const oracle::batch bb = fixture::rounded_random_batch<Eigen::bfloat16>(sp);
    run_options o;
    o.stride_extra = V % 3;
    for (const char* name : {"sigmoid", "mpo+wpo"}) {
      fixture::check_forward<float, std::int64_t>(config_named(name), bf, o);
      fixture::check_forward<Eigen::bfloat16, std::int32_t>(config_named(name), bb, o);
      // Differences over every logit for small V, through the token log-probs for large V.
      fixture::check_backward<float, std::int64_t>(config_named(name), bf, o, false, V > 64);
      fixture::check_backward<Eigen::bfloat16, std::int32_t>(config_named(name), bb, o, true, V > 64);
    }
  }
}

TEST_CASE("completion tokens at the first and last rows, or masked there", "[edge]") {
  fixture::batch_spec sp = fixture::spec(2, 5, 9, 61);
  for (int pattern = 0; pattern < 3; ++pattern) {
    INFO("pattern " << pattern);
    oracle::batch b = fixture::rounded_random_batch<float>(sp);
    for (auto* side : {&b.chosen, &b.rejected})
      for (oracle::sequence& s : *side)
        relabel(s, sp.vocab, [&](std::int64_t t) {
          if (pattern == 0) return true;                            // every row
          if (pattern == 1) return t == 0 || t == s.rows() - 1;     // first and last only
          return t != 0 && t != s.rows() - 1;                       // all but first and last
        });
    for (layout k : {layout::padded, layout::packed}) {
      run_options o;
      o.kind = k;
      for (const char* name : {"sigmoid", "mpo+wpo", "sigmoid+ld_alpha", "ipo"}) {
        fixture::check_forward<float, std::int64_t>(config_named(name), b, o);
        fixture::check_backward<float, std::int64_t>(config_named(name), b, o, false);
        o.ignore_index = -1;
        fixture::check_backward<float, std::int32_t>(config_named(name), b, o, true);
        o.ignore_index = -100;
      }
    }
  }
}

TEST_CASE("fully masked sequences: sum 0, count 0, lengths divide as max(count, 1)", "[edge]") {
  fixture::batch_spec sp = fixture::spec(3, 4, 6, 62);
  oracle::batch b = fixture::rounded_random_batch<double>(sp);
  relabel(b.chosen[1], sp.vocab, [](std::int64_t) { return false; });
  relabel(b.rejected[2], sp.vocab, [](std::int64_t) { return false; });
  for (const auto& nc : fixture::all_configs()) {
    // ORPO's log-odds need average log-probs < 0; an empty sequence has average 0, where
    // log(1 - exp(0)) = -inf (TRL's value is not finite either).
    if (nc.cfg.terms[0].type == dpo::loss_type::orpo) continue;
    fixture::check_forward<double, std::int64_t>(nc, b, {});
    fixture::check_backward<double, std::int64_t>(nc, b, {}, false);
  }
  // A batch whose chosen side is empty everywhere: NLL(chosen) = 0 / max(0, 1) = 0.
  oracle::batch e = b;
  for (oracle::sequence& s : e.chosen) relabel(s, sp.vocab, [](std::int64_t) { return false; });
  const auto& mpo = config_named("mpo");
  const dpo::cpu::forward_result r = fixture::check_forward<double, std::int64_t>(mpo, e, {});
  CHECK(r.metrics.nll_loss == 0.0);
  CHECK(r.metrics.mean_token_accuracy == 0.0);
  CHECK(r.metrics.logits_chosen == 0.0);
  fixture::check_backward<double, std::int64_t>(mpo, e, {}, true);

  fixture::buffers<double, std::int64_t> buf(b, layout::padded);
  std::vector<double> sums(2 * buf.P, -7.0);
  std::vector<std::int64_t> counts(2 * buf.P, -7);
  auto v = buf.view().chosen;
  v.num_seqs = 2 * buf.P;
  dpo::cpu::sequence_logps(v, sums.data(), counts.data());
  CHECK(sums[1] == 0.0);
  CHECK(counts[1] == 0);
  CHECK(sums[buf.P + 2] == 0.0);
  CHECK(counts[buf.P + 2] == 0);
}

TEST_CASE("extreme margins stay finite for every loss type (token level)", "[edge]") {
  fixture::batch_spec sp = fixture::spec(3, 4, 8, 63);
  const oracle::batch b = fixture::rounded_random_batch<float>(sp);
  std::vector<oracle::ld> pc, pr;
  oracle::pair_logps(b, 1.0, pc, pr);
  for (double m : {1e4, -1e4, 88.0, -88.0, 0.0}) {
    for (const auto& nc : fixture::every_loss_type()) {
      INFO(nc.name << " beta * margin = " << m);
      // beta (D_c - D_r) = m with D_c = m / (2 beta), D_r = -m / (2 beta).
      std::vector<double> rc, rr;
      for (std::size_t i = 0; i < pc.size(); ++i) {
        rc.push_back(double(pc[i]) - m / (2 * nc.cfg.beta));
        rr.push_back(double(pr[i]) + m / (2 * nc.cfg.beta));
      }
      fixture::buffers<float, std::int64_t> buf(b, layout::padded, 1);
      const auto view = buf.view();
      const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, rc.data(), rr.data(), nc.cfg);
      CHECK(std::isfinite(r.loss));
      test_support::check_pairs_finite(r.losses, r.grad_chosen, r.grad_rejected);
      const std::vector<oracle::ld> orc = fixture::to_ld(rc), orr = fixture::to_ld(rr);
      fixture::compare_forward(r, oracle::forward(nc.cfg, b, fixture::needs_reference(nc.cfg) ? orc : std::vector<oracle::ld>{},
                                                  fixture::needs_reference(nc.cfg) ? orr : std::vector<oracle::ld>{}),
                               fixture::tolerances<float>(b), nc.cfg, true, m == 0.0);
      dpo::cpu::dpo_backward(view, r, buf.grad_view());
      bool finite = true;
      for (std::size_t k = 0; k < buf.grad.size(); ++k)
        if (k % static_cast<std::size_t>(buf.stride) < static_cast<std::size_t>(buf.V))
          finite = finite && std::isfinite(buf.grad[k]);
      CHECK(finite);
    }
  }
}

TEST_CASE("NaN in one logits row stays in its pair for per-pair losses", "[edge]") {
  fixture::batch_spec sp = fixture::spec(4, 4, 10, 64);
  const oracle::batch clean = fixture::rounded_random_batch<float>(sp);
  for (int nan_side = 0; nan_side < 2; ++nan_side) {
    // A completion row of pair 1's chosen or rejected sequence gets one NaN logit.
    oracle::batch b = clean;
    oracle::sequence& q = nan_side == 0 ? b.chosen[1] : b.rejected[1];
    std::int64_t row = -1;
    for (std::int64_t t = 0; t < q.rows(); ++t)
      if (q.y[t] >= 0) row = t;
    REQUIRE(row >= 0);
    q.z[row][3] = std::numeric_limits<double>::quiet_NaN();
    for (const auto& nc : fixture::every_loss_type()) {
      const dpo::loss_type t = nc.cfg.terms[0].type;
      // The sorts of aot / aot_unpaired move NaN to a sorted position, and NLL(chosen) over
      // the batch (sft, cpo, orpo) spreads a chosen NaN to every pair, by their formulas.
      const bool nll = t == dpo::loss_type::sft || t == dpo::loss_type::cpo || t == dpo::loss_type::orpo;
      if (t == dpo::loss_type::aot || t == dpo::loss_type::aot_unpaired || (nan_side == 0 && nll)) continue;
      INFO(nc.name << (nan_side == 0 ? ", NaN in a chosen row" : ", NaN in a rejected row"));
      fixture::buffers<float, std::int64_t> buf(b, layout::padded, 2);
      const fixture::reference ref = fixture::make_reference(nc.cfg, clean, 7);
      const auto view = buf.view();
      const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), nc.cfg);
      if (t == dpo::loss_type::sft) {
        CHECK(std::isfinite(r.loss));  // sft reads chosen rows only
      } else {
        CHECK(std::isnan(r.loss));
        CHECK(std::isnan(r.losses[1]));
      }
      dpo::cpu::dpo_backward(view, r, buf.grad_view());
      for (int i : {0, 2, 3}) {
        CHECK(std::isfinite(r.losses[i]));
        CHECK(std::isfinite(r.grad_chosen[i]));
        CHECK(std::isfinite(r.grad_rejected[i]));
        for (int side = 0; side < 2; ++side)
          for (std::int64_t k = 0; k < buf.seq_len; ++k)
            for (std::int64_t v = 0; v < buf.V; ++v) REQUIRE(std::isfinite(buf.at(false, side, i, k, v)));
      }
    }
  }
  SECTION("a NaN in a masked row or a padding column is never read") {
    oracle::batch m = clean;
    for (std::int64_t t = 0; t < m.chosen[0].rows(); ++t)
      if (m.chosen[0].y[t] < 0) m.chosen[0].z[t][0] = std::numeric_limits<double>::quiet_NaN();
    run_options o;
    o.stride_extra = 3;  // the fixture fills the padding columns with NaN
    for (const auto& nc : fixture::all_configs()) {
      const dpo::cpu::forward_result r = fixture::check_forward<float, std::int64_t>(nc, m, o);
      CHECK(std::isfinite(r.loss));
    }
  }
}

TEST_CASE("-inf logits: zero probability, finite loss and gradient", "[edge]") {
  // Vocab 2100: two chunks; one row has its whole first chunk at -inf.
  fixture::batch_spec sp = fixture::spec(2, 4, 2100, 65);
  oracle::batch b = fixture::rounded_random_batch<float>(sp);
  const double ninf = -std::numeric_limits<double>::infinity();
  for (auto* side : {&b.chosen, &b.rejected})
    for (oracle::sequence& s : *side)
      for (std::int64_t t = 0; t < s.rows(); ++t)
        for (std::int64_t v = 0; v < sp.vocab; v += 3)
          if (v != s.y[t]) s.z[t][v] = ninf;
  // Pair 0's first chosen completion row: -inf on every column of the first chunk.
  for (std::int64_t t = 0; t < b.chosen[0].rows(); ++t) {
    if (b.chosen[0].y[t] < 0) continue;
    b.chosen[0].y[t] = 2050;
    for (std::int64_t v = 0; v < 2048; ++v) b.chosen[0].z[t][v] = ninf;
    break;
  }
  for (const char* name : {"sigmoid", "mpo+wpo"}) {
    const auto& nc = config_named(name);
    const dpo::cpu::forward_result r = fixture::check_forward<float, std::int64_t>(nc, b, {});
    CHECK(std::isfinite(r.loss));
    CHECK(r.metrics.logits_chosen == -INFINITY);  // the mean logit of a row with -inf is -inf
    CHECK(std::isfinite(r.metrics.entropy));
    fixture::check_backward<float, std::int64_t>(nc, b, {}, false, true);
    fixture::check_backward<float, std::int64_t>(nc, b, {}, true, true);
  }
}

namespace {

template <class T>
void bitwise_across_threads(const fixture::named_config& nc, layout k) {
  INFO(nc.name << " " << fixture::name_of(k));
  fixture::batch_spec sp = fixture::spec(5, 7, 2500, 70);
  sp.varying_rows = k == layout::packed;
  const oracle::batch b = fixture::rounded_random_batch<T>(sp);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
  dpo::cpu::forward_result first;
  std::vector<T> first_grad, first_grad_r;
  std::vector<double> first_tok;
  for (int threads : {1, 2, 3, 7}) {
    INFO("threads " << threads);
    fixture::buffers<T, std::int64_t> buf(b, k, 1);
    dpo::cpu::options o;
    o.num_threads = threads;
    const auto view = buf.view();
    const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), nc.cfg, o);
    dpo::cpu::dpo_backward(view, r, buf.grad_view(), 1.0, o);
    auto v = view.chosen;
    if (k != layout::separate) v.num_seqs = 2 * buf.P;  // the whole buffer as one view
    std::vector<double> sums(2 * buf.P), tok(static_cast<std::size_t>(v.row_end(v.num_seqs - 1) - v.row_begin(0)));
    std::vector<std::int64_t> counts(2 * buf.P);
    dpo::cpu::sequence_logps(v, sums.data(), counts.data(), tok.data(), o);
    if (threads == 1) {
      first = r;
      first_grad = buf.grad;
      first_grad_r = buf.grad_r;
      first_tok = tok;
      continue;
    }
    const auto same = [](const void* a, const void* c, std::size_t n) { return n == 0 || std::memcmp(a, c, n) == 0; };
    CHECK(same(&r.loss, &first.loss, sizeof(double)));
    CHECK(same(&r.metrics, &first.metrics, sizeof(r.metrics)));
    CHECK(same(r.losses.data(), first.losses.data(), sizeof(double) * buf.P));
    CHECK(same(r.chosen_logps.data(), first.chosen_logps.data(), sizeof(double) * buf.P));
    CHECK(same(r.rejected_logps.data(), first.rejected_logps.data(), sizeof(double) * buf.P));
    CHECK(same(r.grad_chosen.data(), first.grad_chosen.data(), sizeof(double) * buf.P));
    CHECK(same(r.grad_rejected.data(), first.grad_rejected.data(), sizeof(double) * buf.P));
    CHECK(same(r.weights.data(), first.weights.data(), sizeof(double) * buf.P));
    CHECK(same(buf.grad.data(), first_grad.data(), sizeof(T) * buf.grad.size()));
    CHECK(same(buf.grad_r.data(), first_grad_r.data(), sizeof(T) * buf.grad_r.size()));
    CHECK(same(tok.data(), first_tok.data(), sizeof(double) * tok.size()));
  }
}

}  // namespace

TEST_CASE("results are bitwise identical for 1, 2, 3 and 7 threads", "[edge][threads]") {
  for (const char* name : {"sigmoid", "mpo+wpo", "aot", "ipo+ld_alpha0+wpo"}) {
    bitwise_across_threads<float>(config_named(name), layout::padded);
    bitwise_across_threads<Eigen::bfloat16>(config_named(name), layout::packed);
  }
  bitwise_across_threads<double>(config_named("sigmoid"), layout::separate);
  bitwise_across_threads<Eigen::half>(config_named("sigmoid"), layout::padded);
}

namespace {

/// Four tied maxima at `big` (columns 0, 2, 3, 5 of 7; the others |big| lower, probability
/// 0): softmax 0.25 on each maximum whatever the magnitude, as torch.log_softmax gives.
template <class T>
std::vector<double> tied_maxima_row(double big) {
  std::vector<double> z(7, fixture::rounded<T>(big - std::fabs(big) * (big > 0 ? 2 : 1)));
  for (int c : {0, 2, 3, 5}) z[static_cast<std::size_t>(c)] = fixture::rounded<T>(big);
  return z;
}

/// Tolerance of a gradient element of T (its rounding and the accumulation's).
template <class T>
double tied_tol() {
  if constexpr (std::is_same_v<T, double>) {
    return 1e-14;
  } else if constexpr (std::is_same_v<T, float>) {
    return 2e-6;
  } else {
    return 4e-3;
  }
}

/// One batch of one pair whose every completion row is a tied-maxima row: chosen labelled
/// at a maximum (column 2), rejected at column 0.
template <class T>
oracle::batch tied_maxima_batch(double big) {
  oracle::batch b;
  oracle::sequence s;
  s.z = {tied_maxima_row<T>(big)};
  s.y = {2};
  b.chosen.push_back(s);
  s.y = {0};
  b.rejected.push_back(s);
  return b;
}

/// The row of a loss whose gradient there is coef * (onehot(label) - softmax): -coef * 0.75
/// at the label, coef * 0.25... with the sign of coef * (onehot - p): label coef * 0.75,
/// other maxima -coef * 0.25, the rest 0, summing to 0.
template <class T, class Get>
void check_tied_row(const Get& g, std::int64_t label, double coef) {
  const double tol = tied_tol<T>() * std::fabs(coef);
  double sum = 0;
  for (std::int64_t v = 0; v < 7; ++v) {
    const bool max = v == 0 || v == 2 || v == 3 || v == 5;
    const double want = coef * ((v == label ? 1.0 : 0.0) - (max ? 0.25 : 0.0));
    INFO("column " << v << ": got " << g(v) << " want " << want);
    CHECK(std::fabs(g(v) - want) <= tol);
    sum += g(v);
  }
  INFO("row sum " << sum);
  CHECK(std::fabs(sum) <= 4 * tol);
}

template <class T>
void check_tied_maxima(double big) {
  INFO("dtype size " << sizeof(T) << ", maxima at " << big);
  using A = dpo::cpu::acc_t<T>;
  const oracle::batch b = tied_maxima_batch<T>(big);
  const double log_quarter = std::log(0.25);
  const double lp_tol = std::is_same_v<A, double> ? 1e-15 : 1e-6;
  fixture::buffers<T, std::int64_t> buf(b, layout::padded);
  const auto view = buf.view();
  // sequence_logps and its backward, seq_grad -1 (the loss -logp): label -0.75, others 0.25.
  {
    double sum = 0;
    std::int64_t count = 0;
    std::vector<double> row_lse(2, 0.0);
    dpo::cpu::sequence_logps(view.chosen, &sum, &count, nullptr, row_lse.data());
    CHECK(count == 1);
    CHECK(std::fabs(sum - log_quarter) <= lp_tol);
    const double seq_grad = -1.0;
    dpo::cpu::sequence_logps_backward(view.chosen, row_lse.data(), &seq_grad, buf.grad.data(), buf.stride);
    check_tied_row<T>([&](std::int64_t v) { return buf.at(false, 0, 0, 0, v); }, 2, -1.0);
  }
  // The fused path with sft (the loss is NLL(chosen) = -logp): the same row, rejected 0.
  {
    buf.reset_grad();
    const dpo::loss_config c = fixture::of(dpo::loss_type::sft);
    const double ref = 0.0;
    const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, &ref, &ref, c);
    CHECK(std::fabs(r.chosen_logps[0] - log_quarter) <= lp_tol);
    CHECK(std::fabs(r.rejected_logps[0] - log_quarter) <= lp_tol);
    CHECK(std::fabs(r.loss + log_quarter) <= lp_tol);
    dpo::cpu::dpo_backward(view, r, buf.grad_view());
    check_tied_row<T>([&](std::int64_t v) { return buf.at(false, 0, 0, 0, v); }, 2, -1.0);
    for (std::int64_t v = 0; v < 7; ++v) CHECK(buf.at(false, 1, 0, 0, v) == 0.0);
    // In place, with a pair loss whose rejected coefficient is not 0 either.
    const dpo::loss_config s = fixture::of(dpo::loss_type::sigmoid);
    const dpo::cpu::forward_result q = dpo::cpu::dpo_forward(view, &ref, &ref, s);
    CHECK(std::fabs(q.chosen_logps[0] - log_quarter) <= lp_tol);
    fixture::buffers<T, std::int64_t> ip(b, layout::padded);
    dpo::cpu::dpo_backward(ip.view(), q, ip.inplace_view());
    check_tied_row<T>([&](std::int64_t v) { return ip.at(true, 0, 0, 0, v); }, 2, q.grad_chosen[0]);
    check_tied_row<T>([&](std::int64_t v) { return ip.at(true, 1, 0, 0, v); }, 0, q.grad_rejected[0]);
  }
}

}  // namespace

TEST_CASE("tied maxima at large magnitudes: exact log-probs and gradients in every dtype",
          "[edge][issue16]") {
  // (z - m) - log(s) in the forward, (z - hi) - lo in the backward (and the row's statistics
  // recomputed where a double lse is too coarse): torch.log_softmax's answers. z - (m + log s)
  // gave -0.749 / -0.632 at the label for fp32 at 1e5 / 1e7, 0 (row sum 3) for fp64 at 1e17.
  for (double big : {1e5, 1e7, -1e7, 3e9, 1e30, -1e30}) check_tied_maxima<float>(big);
  for (double big : {1e5, 1e17, -1e17, 1e300}) check_tied_maxima<double>(big);
  for (double big : {1e4, 1e6, 1e30}) check_tied_maxima<Eigen::bfloat16>(big);
  for (double big : {1e4, 3e4, -3e4}) check_tied_maxima<Eigen::half>(big);
}

namespace {

/// Sets the label logit of a sequence's first completion row to -inf, so its log-prob is
/// -inf (a token the policy gives probability 0).
void set_first_label_logit_neg_inf(oracle::sequence& s) {
  std::int64_t row = -1;
  for (std::int64_t t = 0; t < s.rows() && row < 0; ++t)
    if (s.y[t] >= 0) row = t;
  REQUIRE(row >= 0);
  s.z[row][static_cast<std::size_t>(s.y[row])] = -INFINITY;
}

}  // namespace

TEST_CASE("a -inf rejected label logit: the loss is the limit and the gradient finite",
          "[edge][issue16]") {
  // The rejected completion's label logit is -inf, so pi_r = -inf: sigmoid's loss is
  // -log_sigmoid(+inf) = 0 with a zero gradient for that pair (TRL's answer), not
  // 0 * inf = NaN, and every other pair keeps its value.
  fixture::batch_spec sp = fixture::spec(3, 4, 9, 1616);
  oracle::batch b = fixture::rounded_random_batch<float>(sp);
  set_first_label_logit_neg_inf(b.rejected[1]);
  std::vector<fixture::named_config> configs = {{"sigmoid", fixture::of(dpo::loss_type::sigmoid)},
                                                config_named("mpo"), config_named("sigmoid+wpo"),
                                                config_named("sigmoid_norm/forward_kl")};
  // Both batch terms, eps = 0: with eps > 0 aot's loss at a +inf key is +inf, as the formula.
  dpo::loss_config both = config_named("aot+aot_unpaired").cfg;
  both.label_smoothing = 0.0;
  configs.push_back({"aot+aot_unpaired, eps 0", both});
  for (const auto& nc : configs) {
    for (bool in_place : {false, true}) {
      INFO(nc.name << (in_place ? " in place" : ""));
      fixture::buffers<float, std::int64_t> buf(b, layout::padded);
      fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
      ref.r[1] = -20.0;  // drawn near the policy's -inf otherwise
      const auto view = buf.view();
      const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), nc.cfg);
      CHECK(r.rejected_logps[1] == -INFINITY);
      CHECK(std::isfinite(r.loss));
      for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
        CHECK(std::isfinite(r.losses[i]));
        CHECK(std::isfinite(r.grad_chosen[i]));
        CHECK(std::isfinite(r.grad_rejected[i]));
      }
      const oracle::result o = oracle::forward(nc.cfg, b, fixture::to_ld(ref.c), fixture::to_ld(ref.r));
      CHECK(r.loss == Approx(double(o.loss)).epsilon(1e-5).margin(1e-6));
      if (nc.name == "sigmoid") {
        CHECK(r.losses[1] == 0.0);
        CHECK(r.grad_rejected[1] == 0.0);
      }
      dpo::cpu::dpo_backward(view, r, in_place ? buf.inplace_view() : buf.grad_view());
      std::int64_t nonfinite = 0;
      for (int side = 0; side < 2; ++side)
        for (std::int64_t i = 0; i < buf.P; ++i)
          for (std::int64_t t = 0; t < buf.seq_len; ++t)
            for (std::int64_t v = 0; v < buf.V; ++v) nonfinite += std::isfinite(buf.at(in_place, side, i, t, v)) ? 0 : 1;
      CHECK(nonfinite == 0);
    }
  }
}

TEST_CASE("an infinite row coefficient under a zero upstream gradient gives a zero gradient",
          "[edge][issue16]") {
  // ipo's loss is +inf at pi_r = -inf and so are its pair gradients (the limit is infinite).
  // With grad_output = 0 the loss does not count: its rows get exact zeros, not
  // 0 * inf = NaN (found by the fuzzer's no-NaN-at-the-limits property).
  fixture::batch_spec sp = fixture::spec(2, 3, 7, 1717);
  oracle::batch b = fixture::rounded_random_batch<double>(sp);
  set_first_label_logit_neg_inf(b.rejected[0]);
  const dpo::loss_config cfg = fixture::of(dpo::loss_type::ipo);
  fixture::buffers<double, std::int64_t> buf(b, layout::padded);
  fixture::reference ref = fixture::make_reference(cfg, b, 7);
  ref.r[0] = -20.0;  // drawn near the policy's -inf otherwise
  const auto view = buf.view();
  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), cfg);
  REQUIRE(std::isinf(r.losses[0]));
  REQUIRE(std::isinf(r.grad_rejected[0]));
  dpo::cpu::dpo_backward(view, r, buf.grad_view(), 0.0);
  for (int side = 0; side < 2; ++side)
    for (std::int64_t i = 0; i < buf.P; ++i)
      for (std::int64_t t = 0; t < buf.seq_len; ++t)
        for (std::int64_t v = 0; v < buf.V; ++v) {
          INFO("side " << side << " pair " << i << " row " << t << " col " << v);
          CHECK(buf.at(false, side, i, t, v) == 0.0);
        }
}

TEST_CASE("aot and aot_unpaired from logits: the combination is the weighted sum of the terms",
          "[edge][issue16]") {
  // The report's shape: 4 pairs, 3 rows, vocab 5, float64, loss_type ["aot", "aot_unpaired"]
  // in either order.
  fixture::batch_spec sp = fixture::spec(4, 3, 5, 1617);
  const oracle::batch b = fixture::random_batch(sp);
  fixture::buffers<double, std::int64_t> buf(b, layout::padded);
  const dpo::loss_config one = fixture::of(dpo::loss_type::aot);
  const fixture::reference ref = fixture::make_reference(one, b, 9);
  const auto view = buf.view();
  const auto run = [&](std::initializer_list<dpo::loss_term> terms) {
    return dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), dpo::loss_config::combination(terms));
  };
  const dpo::cpu::forward_result ra = run({{dpo::loss_type::aot, 1.0}});
  const dpo::cpu::forward_result ru = run({{dpo::loss_type::aot_unpaired, 1.0}});
  for (bool swapped : {false, true}) {
    INFO((swapped ? "aot_unpaired first" : "aot first"));
    const dpo::cpu::forward_result r =
        swapped ? run({{dpo::loss_type::aot_unpaired, 1.0}, {dpo::loss_type::aot, 1.0}})
                : run({{dpo::loss_type::aot, 1.0}, {dpo::loss_type::aot_unpaired, 1.0}});
    CHECK(r.loss == Approx(ra.loss + ru.loss).epsilon(1e-14));
    const oracle::result o = oracle::forward(
        dpo::loss_config::combination({{dpo::loss_type::aot, 1.0}, {dpo::loss_type::aot_unpaired, 1.0}}), b,
        fixture::to_ld(ref.c), fixture::to_ld(ref.r));
    CHECK(r.loss == Approx(double(o.loss)).epsilon(1e-12));
    for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
      CHECK(r.grad_chosen[i] == Approx(ra.grad_chosen[i] + ru.grad_chosen[i]).epsilon(1e-14));
      CHECK(r.grad_rejected[i] == Approx(ra.grad_rejected[i] + ru.grad_rejected[i]).epsilon(1e-14));
    }
  }
}
