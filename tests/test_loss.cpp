// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The pair-level API (dpo::cpu::dpo_loss, i.e. dpo/core/loss.hpp and pair_batch.hpp) against
// the float64 oracle: every loss type, f-divergence and combination; dL/dpi against central
// differences; extreme margins.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

namespace {

using fixture::ld;

/// Sequence-level inputs of a random batch: log-probs of a few tokens each, log-ratios of a
/// few units, token counts 3..20 (so the per-token averages ORPO reads are < 0).
struct pair_data {
  std::vector<double> pc, pr, rc, rr, lc, lr, w;
};

pair_data random_pairs(std::int64_t P, std::uint64_t seed, double spread = 3.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> lp(-40.0, -5.0), d(-spread, spread), w(0.2, 1.5);
  std::uniform_int_distribution<int> len(3, 20);
  pair_data x;
  for (std::int64_t i = 0; i < P; ++i) {
    x.pc.push_back(lp(rng));
    x.pr.push_back(lp(rng));
    x.rc.push_back(x.pc.back() + d(rng));
    x.rr.push_back(x.pr.back() + d(rng));
    x.lc.push_back(len(rng));
    x.lr.push_back(len(rng));
    x.w.push_back(w(rng));
  }
  return x;
}

dpo::cpu::pair_logps_in api_input(const pair_data& x, bool weights) {
  return dpo::make_pair_logps(static_cast<std::int64_t>(x.pc.size()), x.pc.data(), x.pr.data(), x.rc.data(),
                              x.rr.data(), x.lc.data(), x.lr.data(), weights ? x.w.data() : nullptr);
}

/// The oracle's pair stage for dpo_loss's contract: NLL(chosen) = -sum(pi_c) / sum(L_c).
oracle::result oracle_pairs(const dpo::loss_config& c, const pair_data& x, bool weights) {
  oracle::pair_inputs in;
  in.pi_c = fixture::to_ld(x.pc);
  in.pi_r = fixture::to_ld(x.pr);
  in.rho_c = fixture::to_ld(x.rc);
  in.rho_r = fixture::to_ld(x.rr);
  in.len_c = fixture::to_ld(x.lc);
  in.len_r = fixture::to_ld(x.lr);
  if (weights) in.weights = fixture::to_ld(x.w);
  ld sum = 0, n = 0;
  for (std::size_t i = 0; i < x.pc.size(); ++i) {
    sum += x.pc[i];
    n += x.lc[i];
  }
  in.nll = -sum / std::max<ld>(n, 1);
  return oracle::pair_stage(c, in);
}

void check_against_oracle(const fixture::named_config& nc, const pair_data& x, bool weights) {
  INFO(nc.name << (weights ? " (weighted)" : ""));
  const dpo::loss_config& c = nc.cfg;
  const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, weights), c);
  const oracle::result o = oracle_pairs(c, x, weights);
  const std::size_t P = x.pc.size();
  // Pair-level math is double throughout: a few ulp of the values involved.
  const double tol = 1e-12;
  CHECK(fixture::near(r.loss, static_cast<double>(o.loss), tol * (1 + std::fabs(double(o.loss)))));
  for (std::size_t i = 0; i < P; ++i) {
    CHECK(fixture::near(r.losses[i], double(o.losses[i]), tol * (1 + std::fabs(double(o.losses[i])))));
    CHECK(fixture::near(r.chosen_rewards[i], double(o.chosen_rewards[i]), tol * 10));
    CHECK(fixture::near(r.rejected_rewards[i], double(o.rejected_rewards[i]), tol * 10));
  }
  CHECK(fixture::near(r.metrics.rewards_chosen, double(o.rewards_chosen), tol * 10));
  CHECK(fixture::near(r.metrics.rewards_rejected, double(o.rewards_rejected), tol * 10));
  CHECK(fixture::near(r.metrics.rewards_margins, double(o.rewards_margins), tol * 10));
  CHECK(r.metrics.rewards_accuracies == double(o.rewards_accuracies));
  CHECK(fixture::near(r.metrics.logps_chosen, double(o.logps_chosen), tol * 100));
  CHECK(fixture::near(r.metrics.logps_rejected, double(o.logps_rejected), tol * 100));
  CHECK(fixture::near(r.metrics.nll_loss, double(o.nll_loss), tol * 10));

  // dL/dpi by central differences of the oracle. grad_chosen excludes the NLL terms'
  // share, which dpo_loss reports once as nll_token_grad (dL/dlogp of each chosen token;
  // NLL reads the plain sum pi_c, so d NLL-part / d pi_c,i = nll_token_grad).
  const double h = 1e-5;
  for (std::size_t i = 0; i < P; ++i) {
    for (int side = 0; side < 2; ++side) {
      pair_data up = x, dn = x;
      (side == 0 ? up.pc : up.pr)[i] += h;
      (side == 0 ? dn.pc : dn.pr)[i] -= h;
      const double fd = static_cast<double>((oracle_pairs(c, up, weights).loss - oracle_pairs(c, dn, weights).loss) /
                                            (2 * ld(h)));
      const double g = side == 0 ? r.grad_chosen[i] + r.nll_token_grad : r.grad_rejected[i];
      INFO("pair " << i << (side == 0 ? " chosen" : " rejected") << ": fd " << fd << " api " << g);
      CHECK(fixture::near(g, fd, 1e-8 + 1e-6 * std::fabs(fd)));
    }
  }
}

}  // namespace

TEST_CASE("dpo_loss matches the oracle and finite differences for every loss type", "[loss]") {
  const pair_data x = random_pairs(6, 11);
  for (const auto& nc : fixture::every_loss_type()) check_against_oracle(nc, x, false);
}

TEST_CASE("dpo_loss: every f-divergence", "[loss]") {
  const pair_data x = random_pairs(5, 12, 1.5);
  for (const auto& nc : fixture::every_f_divergence()) check_against_oracle(nc, x, false);
}

TEST_CASE("dpo_loss: combinations, WPO weights, reference_free", "[loss]") {
  const pair_data x = random_pairs(5, 13);
  for (const auto& nc : fixture::combinations_and_options()) {
    if (nc.cfg.ld_alpha != 1.0) continue;  // LD-DPO lives in the token-level API
    check_against_oracle(nc, x, false);
    if (nc.cfg.use_weighting || nc.cfg.terms[0].type == dpo::loss_type::sigmoid)
      check_against_oracle(nc, x, true);
  }
  // Weights given to a non-WPO configuration still scale each pair (the API's contract).
  check_against_oracle({"sigmoid, weights given", fixture::of(dpo::loss_type::sigmoid)}, x, true);
}

TEST_CASE("dpo_loss: the alpha-divergence exponent clamp", "[loss]") {
  // (a - 1) D past the clamp: the score is constant, its derivative 0 (torch.clamp). A
  // clamp of 3 keeps the loss moderate, so the oracle's differences stay accurate (at the
  // default 80 the score is 1e35).
  pair_data x = random_pairs(3, 14);
  x.rc[0] = x.pc[0] + 10.0;  // D_c = -10, (0.5 - 1) * -10 = 5 > 3
  dpo::loss_config c = fixture::of(dpo::loss_type::sigmoid);
  c.divergence = dpo::f_divergence::alpha_divergence;
  c.alpha_divergence_coef = 0.5;
  c.alpha_exponent_clamp = 3.0;
  check_against_oracle({"alpha clamp", c}, x, false);
  const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, false), c);
  CHECK(r.grad_chosen[0] == 0.0);
  // |a - 1| < 1e-6 falls back to reverse KL.
  c.alpha_divergence_coef = 1.0 + 1e-7;
  dpo::loss_config rk = fixture::of(dpo::loss_type::sigmoid);
  const pair_data y = random_pairs(3, 15);
  CHECK(dpo::cpu::dpo_loss(api_input(y, false), c).loss == dpo::cpu::dpo_loss(api_input(y, false), rk).loss);
}

TEST_CASE("dpo_loss: extreme margins stay finite for every loss type", "[loss][edge]") {
  // beta * (D_c - D_r) = m with D_c = m / (2 beta), D_r = -m / (2 beta). Every loss of the
  // family is finite there mathematically (ORPO and the CPO family read pi, kept moderate).
  for (double m : {1e4, -1e4, 88.0, -88.0, 0.0, 700.0, -700.0}) {
    for (const auto& nc : fixture::every_loss_type()) {
      const dpo::loss_config& c = nc.cfg;
      INFO(nc.name << " margin " << m);
      pair_data x = random_pairs(3, 16);
      for (std::size_t i = 0; i < x.pc.size(); ++i) {
        x.rc[i] = x.pc[i] - m / (2 * c.beta);
        x.rr[i] = x.pr[i] + m / (2 * c.beta);
        if (c.terms[0].type == dpo::loss_type::orpo) {
          // ORPO needs average log-probs < 0: -1e-3 against -30 gives log-odds of +-37.
          const double hi = -1e-3, lo = m == 0.0 ? hi : -30.0;
          x.pc[i] = (m >= 0 ? hi : lo) * x.lc[i];
          x.pr[i] = (m >= 0 ? lo : hi) * x.lr[i];
        } else if (!fixture::needs_reference(c)) {
          // simpo / cpo: the margin is on the policy log-probs (per token for simpo).
          x.pc[i] = -1.0;
          x.pr[i] = -1.0 - m / c.beta * x.lr[i];
        }
      }
      const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, false), c);
      CHECK(std::isfinite(r.loss));
      const oracle::result o = oracle_pairs(c, x, false);
      CHECK(fixture::near(r.loss, double(o.loss), 1e-9 * (1 + std::fabs(double(o.loss)))));
      for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
        CHECK(std::isfinite(r.losses[i]));
        CHECK(std::isfinite(r.grad_chosen[i]));
        CHECK(std::isfinite(r.grad_rejected[i]));
      }
    }
  }
}

TEST_CASE("dpo_loss: orpo with an empty chosen sequence has a finite gradient", "[loss][edge]") {
  // A chosen sequence with no completion token has logp 0 and log-odds +inf: the loss is 0
  // and d loss / d pi_c tends to -beta e^ar / (1 - e^ar) / len_c (ar = pi_r / len_r), which
  // the product form sigmoid(-lo) * (-1 / expm1(ac)) evaluates as 0 * inf = NaN.
  dpo::loss_config c;
  c.terms[0].type = dpo::loss_type::orpo;
  c.beta = 0.2;
  pair_data x = random_pairs(2, 18);
  x.pc[0] = 0.0;
  x.lc[0] = 0.0;  // counted as 1 token
  const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, false), c);
  const double ar = x.pr[0] / x.lr[0];
  const double limit = -c.beta * std::exp(ar) / (1.0 - std::exp(ar)) / 2.0;  // mean over 2 pairs
  CHECK(r.loss == Approx(double(oracle_pairs(c, x, false).loss)).epsilon(1e-12));
  // grad_chosen is the pair term's share; ORPO's NLL term reaches pi_c through nll_token_grad.
  CHECK(r.grad_chosen[0] == Approx(limit).epsilon(1e-12));
  CHECK(std::isfinite(r.grad_rejected[0]));
  // Just inside the domain: a central difference of the oracle's loss, and near the limit.
  x.lc[0] = 1.0;
  const double pc = -1e-4, h = 1e-7;
  x.pc[0] = pc;
  const dpo::cpu::forward_result r2 = dpo::cpu::dpo_loss(api_input(x, false), c);
  x.pc[0] = pc + h;
  const double up = double(oracle_pairs(c, x, false).loss);
  x.pc[0] = pc - h;
  const double down = double(oracle_pairs(c, x, false).loss);
  CHECK(r2.grad_chosen[0] + r2.nll_token_grad == Approx((up - down) / (2 * h)).epsilon(1e-5));
  CHECK(r2.grad_chosen[0] == Approx(limit).epsilon(1e-3));
}

TEST_CASE("dpo_loss: NaN in one pair stays in that pair for per-pair losses", "[loss][edge]") {
  pair_data x = random_pairs(4, 17);
  x.pc[2] = std::nan("");
  for (const auto& nc : fixture::every_loss_type()) {
    const dpo::loss_type t = nc.cfg.terms[0].type;
    // Batch-coupled losses (sorts, NLL over the batch) spread NaN by their formula.
    if (t == dpo::loss_type::aot || t == dpo::loss_type::aot_unpaired || t == dpo::loss_type::sft ||
        t == dpo::loss_type::cpo || t == dpo::loss_type::orpo)
      continue;
    INFO(nc.name);
    const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, false), nc.cfg);
    CHECK(std::isnan(r.loss));
    CHECK(std::isnan(r.losses[2]));
    for (int i : {0, 1, 3}) {
      CHECK(std::isfinite(r.losses[i]));
      CHECK(std::isfinite(r.grad_chosen[i]));
      CHECK(std::isfinite(r.grad_rejected[i]));
    }
  }
}

TEST_CASE("loss type and f-divergence names round-trip (aot_pair is aot_unpaired)", "[loss]") {
  for (int i = 0; i < dpo::num_loss_types; ++i) {
    dpo::loss_type t{};
    REQUIRE(dpo::parse_loss_type(dpo::to_string(static_cast<dpo::loss_type>(i)), &t));
    CHECK(static_cast<int>(t) == i);
  }
  dpo::loss_type t{};
  CHECK(dpo::parse_loss_type("aot_pair", &t));
  CHECK(t == dpo::loss_type::aot_unpaired);
  CHECK_FALSE(dpo::parse_loss_type("kto", &t));
  for (int i = 0; i < 4; ++i) {
    dpo::f_divergence f{};
    REQUIRE(dpo::parse_f_divergence(dpo::to_string(static_cast<dpo::f_divergence>(i)), &f));
    CHECK(static_cast<int>(f) == i);
  }
}

TEST_CASE("dpo_loss: aot and aot_unpaired together each sort their own keys, in either order",
          "[loss][issue16]") {
  // aot sorts pi_c - pi_r and rho_c - rho_r, aot_unpaired D_c and D_r: a combination of the
  // two is the weighted sum of the terms computed alone, whatever the order of the list.
  const pair_data x = random_pairs(7, 19);
  for (bool weights : {false, true}) {
    for (bool swapped : {false, true}) {
      INFO((swapped ? "aot_unpaired first" : "aot first") << (weights ? ", weighted" : ""));
      const dpo::loss_term a{dpo::loss_type::aot, 0.7}, u{dpo::loss_type::aot_unpaired, 0.4};
      dpo::loss_config c = swapped ? dpo::loss_config::combination({u, a}) : dpo::loss_config::combination({a, u});
      c.label_smoothing = 0.1;
      dpo::loss_config ca = c, cu = c;
      ca.num_terms = cu.num_terms = 1;
      ca.terms[0] = {dpo::loss_type::aot, 1.0};
      cu.terms[0] = {dpo::loss_type::aot_unpaired, 1.0};
      const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, weights), c);
      const dpo::cpu::forward_result ra = dpo::cpu::dpo_loss(api_input(x, weights), ca);
      const dpo::cpu::forward_result ru = dpo::cpu::dpo_loss(api_input(x, weights), cu);
      const auto sum = [](double p, double q) { return 0.7 * p + 0.4 * q; };
      CHECK(r.loss == Approx(sum(ra.loss, ru.loss)).epsilon(1e-13));
      for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
        CHECK(r.losses[i] == Approx(sum(ra.losses[i], ru.losses[i])).epsilon(1e-13));
        CHECK(r.grad_chosen[i] == Approx(sum(ra.grad_chosen[i], ru.grad_chosen[i])).epsilon(1e-13));
        CHECK(r.grad_rejected[i] == Approx(sum(ra.grad_rejected[i], ru.grad_rejected[i])).epsilon(1e-13));
      }
      check_against_oracle({"aot+aot_unpaired", c}, x, weights);
    }
  }
}

namespace {

/// Whether every per-pair value and derivative of r is finite or an infinity, never NaN.
void check_no_nan(const dpo::cpu::forward_result& r) {
  CHECK_FALSE(std::isnan(r.loss));
  for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
    INFO("pair " << i);
    CHECK_FALSE(std::isnan(r.losses[i]));
    CHECK_FALSE(std::isnan(r.grad_chosen[i]));
    CHECK_FALSE(std::isnan(r.grad_rejected[i]));
  }
}

/// x at the limit against x far along the way to it: equal where the limit is finite (and
/// reached in double), the same infinity where the loss diverges, which shows as a far value
/// that grows with the distance (about 1e13 at 1e15).
void check_limit(double at_limit, double far, const char* what) {
  INFO(what << ": at the limit " << at_limit << ", far along " << far);
  if (std::isinf(at_limit)) {
    CHECK(std::fabs(far) >= 1e6);
    CHECK(std::signbit(at_limit) == std::signbit(far));
  } else {
    CHECK(at_limit == Approx(far).epsilon(1e-12).margin(1e-300));
  }
}

}  // namespace

TEST_CASE("dpo_loss: a -inf rejected log-prob gives the limit for every loss type, never 0 * inf",
          "[loss][edge][issue16]") {
  // A rejected completion whose label logit is -inf has pi_r = -inf. The limit of every loss
  // and derivative is its value at a finite pi_r far enough that every sigmoid has saturated
  // (pi_r = -1e15); the -inf case must give the same number (0 for sigmoid, where
  // eps * log_sigmoid(-x) with eps = 0 was 0 * inf = NaN), or the same infinity where the
  // loss diverges (ipo, sppo_hard, robust and aot with eps > 0).
  std::vector<fixture::named_config> configs = fixture::every_loss_type();
  for (const auto& nc : fixture::every_f_divergence()) configs.push_back(nc);
  for (const auto& nc : configs) {
    for (bool ref_side : {false, true}) {
      INFO(nc.name << (ref_side ? ", rho_r = +inf" : ", pi_r = -inf"));
      if (ref_side && !fixture::needs_reference(nc.cfg)) continue;
      pair_data inf = random_pairs(3, 20);
      pair_data far = inf;
      // The same log-ratio D_r = -inf reached through the policy or the reference side.
      (ref_side ? inf.rr : inf.pr)[1] = ref_side ? INFINITY : -INFINITY;
      (ref_side ? far.rr : far.pr)[1] = ref_side ? 1e15 : -1e15;
      const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(inf, false), nc.cfg);
      const dpo::cpu::forward_result f = dpo::cpu::dpo_loss(api_input(far, false), nc.cfg);
      check_no_nan(r);
      check_limit(r.loss, f.loss, "loss");
      for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
        INFO("pair " << i);
        check_limit(r.losses[i], f.losses[i], "losses");
        check_limit(r.grad_chosen[i], f.grad_chosen[i], "grad_chosen");
        check_limit(r.grad_rejected[i], f.grad_rejected[i], "grad_rejected");
      }
    }
  }
}

TEST_CASE("dpo_loss: the default sigmoid loss at pi_r = -inf is 0 with a zero gradient, as TRL",
          "[loss][edge][issue16]") {
  pair_data x = random_pairs(2, 21);
  x.pr[0] = -INFINITY;
  const dpo::loss_config c = fixture::of(dpo::loss_type::sigmoid);
  const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, false), c);
  CHECK(r.losses[0] == 0.0);
  CHECK(r.grad_chosen[0] == 0.0);
  CHECK(r.grad_rejected[0] == 0.0);
  // The oracle (long double, -log_sigmoid(beta d)) has the same value.
  const oracle::result o = oracle_pairs(c, x, false);
  CHECK(r.loss == Approx(double(o.loss)).epsilon(1e-12));
  CHECK(std::isfinite(r.grad_chosen[1]));
}

TEST_CASE("dpo_loss: infinite margins through the f-divergence scores give the limit",
          "[loss][edge][issue16]") {
  // Log-ratios 1999 and -4999: forward_kl's score of the rejected side is 1 - e^4999 = -inf
  // in double and its derivative e^4999 = inf, while the loss has saturated (dL/dd = 0): the
  // product through_d formed was 0 * inf = NaN. The long double oracle holds e^4999 (it is
  // below LDBL_MAX), so it evaluates the formulas without overflow: our values must match it
  // where it is within double range, and be the same infinity where it is not.
  for (const auto& nc : fixture::every_f_divergence()) {
    INFO(nc.name);
    pair_data x = random_pairs(3, 22);
    x.rc[0] = x.pc[0] - 1999.0;
    x.rr[0] = x.pr[0] + 4999.0;
    const dpo::loss_config& c = nc.cfg;
    const dpo::cpu::forward_result r = dpo::cpu::dpo_loss(api_input(x, false), c);
    check_no_nan(r);
    const oracle::result o = oracle_pairs(c, x, false);
    for (Eigen::Index i = 0; i < r.losses.size(); ++i) {
      const ld want = o.losses[static_cast<std::size_t>(i)];
      INFO("pair " << i << ": oracle " << double(want) << " api " << r.losses[i]);
      if (std::fabs(want) <= std::numeric_limits<double>::max()) {
        CHECK(fixture::near(r.losses[i], double(want), 1e-12 * (1 + std::fabs(double(want)))));
      } else {
        CHECK(std::isinf(r.losses[i]));
      }
    }
    // dL/dpi of pair 0 against central differences of the oracle where the loss is finite.
    if (std::fabs(o.losses[0]) <= 1e100) {
      const double h = 1e-5;
      for (int side = 0; side < 2; ++side) {
        pair_data up = x, dn = x;
        (side == 0 ? up.pc : up.pr)[0] += h;
        (side == 0 ? dn.pc : dn.pr)[0] -= h;
        const ld fd = (oracle_pairs(c, up, false).loss - oracle_pairs(c, dn, false).loss) / (2 * ld(h));
        const double g = side == 0 ? r.grad_chosen[0] + r.nll_token_grad : r.grad_rejected[0];
        INFO((side == 0 ? "chosen" : "rejected") << ": fd " << double(fd) << " api " << g);
        if (std::fabs(fd) < 1e100) CHECK(fixture::near(g, double(fd), 1e-8 + 1e-6 * std::fabs(double(fd))));
      }
    }
  }
}

TEST_CASE("the loss registry's traits are those TRL defines for each type", "[loss]") {
  using dpo::loss_type;
  namespace d = dpo::detail;
  dpo::loss_config c;
  for (int i = 0; i < dpo::num_loss_types; ++i) {
    const auto t = static_cast<loss_type>(i);
    INFO(dpo::to_string(t));
    CHECK(d::is_reference_free_type(t) ==
          (t == loss_type::simpo || t == loss_type::cpo || t == loss_type::orpo));
    CHECK(d::is_batch_type(t) == (t == loss_type::aot || t == loss_type::aot_unpaired));
    const bool fdiv = t == loss_type::sigmoid || t == loss_type::sigmoid_norm ||
                      t == loss_type::hinge || t == loss_type::ipo || t == loss_type::exo_pair ||
                      t == loss_type::robust || t == loss_type::discopop || t == loss_type::sft;
    CHECK(d::supports_f_divergence(t) == fdiv);
    const bool eps = t == loss_type::exo_pair || t == loss_type::robust || t == loss_type::aot ||
                     t == loss_type::aot_unpaired || t == loss_type::simpo ||
                     t == loss_type::cpo;  // cpo with its default sigmoid base
    CHECK(d::uses_label_smoothing(t, c) == eps);
    const double nll = t == loss_type::sft || t == loss_type::orpo ? 1.0
                       : t == loss_type::cpo                       ? c.cpo_alpha
                                                                   : 0.0;
    CHECK(d::nll_multiplier(t, c) == nll);
    CHECK(d::rewards_use_average(t, c) == (t == loss_type::simpo || t == loss_type::orpo));
  }
  // The configuration-dependent columns.
  c.cdpo_smoothing = true;
  CHECK(d::uses_label_smoothing(loss_type::sigmoid, c));
  c.cpo_base = loss_type::ipo;
  c.cpo_alpha = 0.25;
  CHECK_FALSE(d::uses_label_smoothing(loss_type::cpo, c));
  CHECK(d::rewards_use_average(loss_type::cpo, c));
  CHECK(d::nll_multiplier(loss_type::cpo, c) == 0.25);
  // Generated lists: every name once, in enum order, and the messages built from them.
  CHECK(dpo::loss_type_names() ==
        "sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, "
        "aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft, simpo, cpo, orpo");
  CHECK(dpo::loss_type_names(d::is_reference_free_type) == "simpo, cpo and orpo");
  CHECK(dpo::f_divergence_names() == "reverse_kl, forward_kl, js_divergence, alpha_divergence");
  CHECK(dpo::num_f_divergences == 4);
}
