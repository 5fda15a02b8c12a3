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
#include "fixtures.hpp"
#include "oracle.hpp"

using fixture::layout;
using fixture::run_options;

namespace {

template <class T>
oracle::batch rounded_batch(fixture::batch_spec sp) {
  oracle::batch b = fixture::random_batch(sp);
  fixture::round_batch<T>(b);
  return b;
}

const fixture::named_config& config_named(const std::string& name) {
  static const std::vector<fixture::named_config> all = fixture::all_configs();
  for (const auto& c : all)
    if (c.name == name) return c;
  FAIL("no configuration " << name);
  return all[0];
}

/// Sets every label of a sequence: `active(t)` says whether row t is a completion token.
template <class F>
void relabel(oracle::sequence& s, std::int64_t V, F active) {
  for (std::int64_t t = 0; t < s.rows(); ++t) s.y[t] = active(t) ? (7 * t + 3) % V : -1;
}

}  // namespace

TEST_CASE("vocabulary sizes: 1, around the vector width and the chunk, prime, multi-chunk", "[edge]") {
  for (std::int64_t V : {1, 2, 15, 16, 17, 2047, 2048, 2049, 4099}) {
    INFO("V = " << V);
    fixture::batch_spec sp;
    sp.pairs = 2;
    sp.rows = V > 100 ? 3 : 5;
    sp.vocab = V;
    sp.seed = 50 + static_cast<std::uint64_t>(V);
    const oracle::batch bf = rounded_batch<float>(sp);
    const oracle::batch bb = rounded_batch<Eigen::bfloat16>(sp);
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
  fixture::batch_spec sp;
  sp.pairs = 2;
  sp.rows = 5;
  sp.vocab = 9;
  sp.seed = 61;
  for (int pattern = 0; pattern < 3; ++pattern) {
    INFO("pattern " << pattern);
    oracle::batch b = rounded_batch<float>(sp);
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
  fixture::batch_spec sp;
  sp.pairs = 3;
  sp.rows = 4;
  sp.vocab = 6;
  sp.seed = 62;
  oracle::batch b = rounded_batch<double>(sp);
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
  fixture::batch_spec sp;
  sp.pairs = 3;
  sp.rows = 4;
  sp.vocab = 8;
  sp.seed = 63;
  const oracle::batch b = rounded_batch<float>(sp);
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
      for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
        CHECK(std::isfinite(r.losses[i]));
        CHECK(std::isfinite(r.grad_chosen[i]));
        CHECK(std::isfinite(r.grad_rejected[i]));
      }
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
  fixture::batch_spec sp;
  sp.pairs = 4;
  sp.rows = 4;
  sp.vocab = 10;
  sp.seed = 64;
  const oracle::batch clean = rounded_batch<float>(sp);
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
  fixture::batch_spec sp;
  sp.pairs = 2;
  sp.rows = 4;
  sp.vocab = 2100;  // two chunks; one row has its whole first chunk at -inf
  sp.seed = 65;
  oracle::batch b = rounded_batch<float>(sp);
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
  fixture::batch_spec sp;
  sp.pairs = 5;
  sp.rows = 7;
  sp.vocab = 2500;
  sp.seed = 70;
  sp.varying_rows = k == layout::packed;
  const oracle::batch b = rounded_batch<T>(sp);
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
