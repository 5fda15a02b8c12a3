// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Every per-pair DPO-family loss of docs/losses.md with its derivatives with respect to the
// policy sequence log-probs, as DPO_HOST_DEVICE functions shared by the CPU path and the
// CUDA kernels. Pair-level math runs in double on both backends: it touches O(pairs)
// numbers, so the precision is free.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "dpo/core/math.hpp"

namespace dpo {

/// The loss registry: one row per loss type, the single place a type is declared. Everything
/// else that lists loss types is generated from it: the enum, num_loss_types, to_string and
/// parse_loss_type (core/validate.hpp), the trait predicates below, the error messages that
/// list the allowed types, and the Python binding's names. Adding a loss type is one row
/// here plus its formula and derivative in pair_loss() (and its tests and docs).
///
/// Columns:
///   id     the enumerator, and TRL's `loss_type` string
///   ref    `based`: reads the reference log-probs; `free`: TRL's CPO-trainer losses (simpo,
///          cpo, orpo), which are never combined with other types; `none`: reads neither
///          (sft)
///   batch  `pair`: a loss per pair; `sorted`: defined over the batch's sorted keys (aot),
///          coupled across pairs, and incompatible with per-pair WPO weights
///   eps    when the term reads label_smoothing: `never`, `always`, `cdpo` (only with
///          cdpo_smoothing), `cpo_sigmoid` (only when cpo_base is sigmoid)
///   fdiv   whether TRL defines the type for an f-divergence other than reverse_kl
///   nll    the weight of NLL(chosen) the term adds to every pair: `none`, `one`, `cpo_alpha`
///   avg    whether its rewards use length-averaged log-probs: `no`, `yes`, `cpo_ipo` (cpo
///          with cpo_base ipo)
// clang-format off
#define DPO_LOSS_TYPES(X)                                                   \
  /* id,          ref,   batch,  eps,         fdiv,  nll,       avg */     \
  X(sigmoid,      based, pair,   cdpo,        true,  none,      no)        \
  X(hinge,        based, pair,   never,       true,  none,      no)        \
  X(ipo,          based, pair,   never,       true,  none,      no)        \
  X(exo_pair,     based, pair,   always,      true,  none,      no)        \
  X(nca_pair,     based, pair,   never,       false, none,      no)        \
  X(robust,       based, pair,   always,      true,  none,      no)        \
  X(bco_pair,     based, pair,   never,       false, none,      no)        \
  X(sppo_hard,    based, pair,   never,       false, none,      no)        \
  X(aot,          based, sorted, always,      false, none,      no)        \
  X(aot_unpaired, based, sorted, always,      false, none,      no)        \
  X(apo_zero,     based, pair,   never,       false, none,      no)        \
  X(apo_down,     based, pair,   never,       false, none,      no)        \
  X(discopop,     based, pair,   never,       true,  none,      no)        \
  X(sigmoid_norm, based, pair,   never,       true,  none,      no)        \
  X(sft,          none,  pair,   never,       true,  one,       no)        \
  X(simpo,        free,  pair,   always,      false, none,      yes)       \
  X(cpo,          free,  pair,   cpo_sigmoid, false, cpo_alpha, cpo_ipo)   \
  X(orpo,         free,  pair,   never,       false, one,       yes)
// clang-format on

/// The loss families of TRL's DPOTrainer (plus the reference-free CPO/SimPO/ORPO losses),
/// in registry order. The values are the row numbers (they cross the Python boundary).
enum class loss_type : std::int32_t {
#define DPO_X(id, ...) id,
  DPO_LOSS_TYPES(DPO_X)
#undef DPO_X
};

/// The number of rows of the registry.
inline constexpr int num_loss_types = 0
#define DPO_X(id, ...) +1
    DPO_LOSS_TYPES(DPO_X)
#undef DPO_X
    ;

/// The f-divergences of TRL's `f_divergence_type`, one row each (id = TRL's string).
#define DPO_F_DIVERGENCES(X) \
  X(reverse_kl)              \
  X(forward_kl)              \
  X(js_divergence)           \
  X(alpha_divergence)

/// The score f applied to each log-ratio D = pi - rho before the pair loss.
enum class f_divergence : std::int32_t {
#define DPO_X(id) id,
  DPO_F_DIVERGENCES(DPO_X)
#undef DPO_X
};

inline constexpr int num_f_divergences = 0
#define DPO_X(id) +1
    DPO_F_DIVERGENCES(DPO_X)
#undef DPO_X
    ;

inline constexpr int max_loss_terms = 8;

/// One weighted term of a combined loss, e.g. MPO = {sigmoid 0.8, bco_pair 0.2, sft 1.0}.
struct loss_term {
  loss_type type = loss_type::sigmoid;
  double weight = 1.0;
};

/// Every hyperparameter of the loss, TRL's names and defaults. A plain struct (no heap
/// members) so it can be passed by value to CUDA kernels.
struct loss_config {
  loss_term terms[max_loss_terms] = {{loss_type::sigmoid, 1.0}};
  int num_terms = 1;
  double beta = 0.1;
  /// eps of losses.md. Used by exo_pair, robust, aot, aot_unpaired, simpo, cpo (sigmoid
  /// base) and, only with cdpo_smoothing, by sigmoid; rejected as non-zero otherwise.
  double label_smoothing = 0.0;
  /// TRL <= 0.28's conservative-DPO smoothing of the sigmoid loss; off by default, as in TRL 1.x.
  bool cdpo_smoothing = false;
  f_divergence divergence = f_divergence::reverse_kl;
  double alpha_divergence_coef = 0.5;
  /// Clamp of the alpha-divergence exponent: 80 for fp32/fp64 log-probs, 11 for fp16.
  double alpha_exponent_clamp = 80.0;
  double discopop_tau = 0.05;
  double simpo_gamma = 0.5;
  double cpo_alpha = 1.0;
  /// The loss CPO applies to pi_c - pi_r: sigmoid, hinge or ipo.
  loss_type cpo_base = loss_type::sigmoid;
  /// rho = 0 for the reference-based losses (TRL <= 0.28's `reference_free=True`).
  bool reference_free = false;
  /// WPO: weight each pair by w_c * w_r (needs the logits; see the token-level API).
  bool use_weighting = false;
  /// LD-DPO: completion tokens past min(L_c, L_r) count with this weight; 1 disables it.
  double ld_alpha = 1.0;

  /// A single loss type with weight 1.
  static loss_config of(loss_type t) {
    loss_config c;
    c.terms[0] = {t, 1.0};
    return c;
  }
  /// A weighted sum of loss types, e.g. MPO: combination({{sigmoid, 0.8}, {bco_pair, 0.2},
  /// {sft, 1.0}}). More than max_loss_terms terms is reported by validate_config().
  static loss_config combination(std::initializer_list<loss_term> list) {
    loss_config c;
    c.num_terms = static_cast<int>(list.size());
    int k = 0;
    for (const loss_term& t : list) {
      if (k < max_loss_terms) c.terms[k] = t;
      ++k;
    }
    return c;
  }
};

namespace detail {

/// The registry's trait columns as values (see DPO_LOSS_TYPES).
enum class ref_kind { based, free, none };
enum class batch_kind { pair, sorted };
enum class eps_kind { never, always, cdpo, cpo_sigmoid };
enum class nll_kind { none, one, cpo_alpha };
enum class avg_kind { no, yes, cpo_ipo };

/// One row of the registry.
struct loss_traits {
  ref_kind ref;
  batch_kind batch;
  eps_kind eps;
  bool f_divergence;
  nll_kind nll;
  avg_kind avg;
};

/// The registry row of a loss type (a switch, so device code can use it too). An out-of-range
/// value (rejected by validate_config) reads as a plain reference-based pair loss.
DPO_HOST_DEVICE inline loss_traits traits(loss_type t) {
  switch (t) {
#define DPO_X(id, ref, batch, eps, fdiv, nll, avg) \
  case loss_type::id:                              \
    return {ref_kind::ref, batch_kind::batch, eps_kind::eps, fdiv, nll_kind::nll, avg_kind::avg};
    DPO_LOSS_TYPES(DPO_X)
#undef DPO_X
  }
  return {ref_kind::based, batch_kind::pair, eps_kind::never, false, nll_kind::none, avg_kind::no};
}

/// Whether a loss type is one of the reference-free CPO-trainer losses.
DPO_HOST_DEVICE inline bool is_reference_free_type(loss_type t) {
  return traits(t).ref == ref_kind::free;
}

/// Whether a loss type is defined over the whole batch rather than pair by pair.
DPO_HOST_DEVICE inline bool is_batch_type(loss_type t) {
  return traits(t).batch == batch_kind::sorted;
}

/// The weight of NLL(chosen) (mean token cross-entropy over the batch's chosen completion
/// tokens) that a term adds to every pair's loss.
DPO_HOST_DEVICE inline double nll_multiplier(loss_type t, const loss_config& c) {
  switch (traits(t).nll) {
    case nll_kind::one: return 1.0;
    case nll_kind::cpo_alpha: return c.cpo_alpha;
    case nll_kind::none: break;
  }
  return 0.0;
}

/// Whether a loss type's rewards use policy log-probs averaged over tokens (TRL's CPO
/// trainer computes averaged log-probs for these).
DPO_HOST_DEVICE inline bool rewards_use_average(loss_type t, const loss_config& c) {
  switch (traits(t).avg) {
    case avg_kind::yes: return true;
    case avg_kind::cpo_ipo: return c.cpo_base == loss_type::ipo;
    case avg_kind::no: break;
  }
  return false;
}

/// Whether a term of this type reads label_smoothing under this configuration.
DPO_HOST_DEVICE inline bool uses_label_smoothing(loss_type t, const loss_config& c) {
  switch (traits(t).eps) {
    case eps_kind::always: return true;
    case eps_kind::cdpo: return c.cdpo_smoothing;
    case eps_kind::cpo_sigmoid: return c.cpo_base == loss_type::sigmoid;
    case eps_kind::never: break;
  }
  return false;
}

/// Whether TRL defines the loss type for an f-divergence other than reverse_kl.
DPO_HOST_DEVICE inline bool supports_f_divergence(loss_type t) { return traits(t).f_divergence; }

/// Whether the configuration reads reference log-probs: not for the reference-free types nor
/// with reference_free (rho = 0).
DPO_HOST_DEVICE inline bool needs_reference(const loss_config& c) {
  return !c.reference_free && !is_reference_free_type(c.terms[0].type);
}

/// f(D) and f'(D) of the configured f-divergence.
struct score {
  double f;
  double df;
};

/// TRL 1.x's scores f'(exp(D)): the constants (1, log 2, -1/(a-1)) cancel in d = s_c - s_r
/// but not in ipo and sigmoid_norm, which divide each score by its own length.
DPO_HOST_DEVICE inline score f_score(const loss_config& c, double D) {
  using std::exp;
  using std::fabs;
  switch (c.divergence) {
    case f_divergence::forward_kl: {
      const double e = exp(-D);
      return {1.0 - e, e};
    }
    case f_divergence::js_divergence:
      return {0.6931471805599453 + log_sigmoid(D), sigmoid(-D)};
    case f_divergence::alpha_divergence: {
      const double am1 = c.alpha_divergence_coef - 1.0;
      if (fabs(am1) < 1e-6) return {D, 1.0};
      const double x = am1 * D;
      // Past the clamp the score is constant, so its derivative is 0 (torch.clamp's).
      if (x > c.alpha_exponent_clamp) return {(exp(c.alpha_exponent_clamp) - 1.0) / am1, 0.0};
      const double e = exp(x);
      return {(e - 1.0) / am1, e};
    }
    case f_divergence::reverse_kl:
    default:
      return {D, 1.0};
  }
}

/// -(1-eps) logsig(x) - eps logsig(-x) and its derivative in x: the smoothed logistic loss
/// of cDPO, aot, simpo and cpo.
struct scalar_grad {
  double value;
  double d;
};

DPO_HOST_DEVICE inline scalar_grad smoothed_logistic(double x, double eps) {
  // eps = 0 at x = +inf (or 1 - eps = 0 at -inf) is 0 * inf: the term is absent, so 0.
  const double v = -times(1.0 - eps, log_sigmoid(x)) - times(eps, log_sigmoid(-x));
  const double d = -(1.0 - eps) * sigmoid(-x) + eps * sigmoid(x);
  return {v, d};
}

/// The sequence-level numbers one pair's loss reads. len_* are completion-token counts,
/// already clamped to >= 1.
struct pair_values {
  double pi_c;
  double pi_r;
  double rho_c;
  double rho_r;
  double len_c;
  double len_r;
};

/// One pair's loss (without its NLL part) and its derivatives with respect to pi_c, pi_r.
struct pair_grad {
  double loss;
  double d_c;
  double d_r;
};

/// The per-pair loss of type t. Batch types (aot, aot_unpaired) are handled by
/// batch_term() and give 0 here; sft is all NLL and gives 0 here too.
DPO_HOST_DEVICE inline pair_grad pair_loss(loss_type t, const loss_config& c,
                                           const pair_values& v) {
  using std::exp;
  using std::expm1;
  const double beta = c.beta;
  const double eps = c.label_smoothing;
  const double rho_c = c.reference_free ? 0.0 : v.rho_c;
  const double rho_r = c.reference_free ? 0.0 : v.rho_r;
  const double Dc = v.pi_c - rho_c;
  const double Dr = v.pi_r - rho_r;
  const score sc = f_score(c, Dc);
  const score sr = f_score(c, Dr);
  const double d = sc.f - sr.f;
  // dL/d(d) -> (dL/dpi_c, dL/dpi_r) through s_c = f(D_c), s_r = f(D_r). A saturated loss
  // (dd = 0) passes no gradient even through an infinite f' (forward_kl at D = -4999): dd
  // falls like exp(-beta e^-D) where f' grows like e^-D.
  auto through_d = [&](double loss, double dd) -> pair_grad {
    return {loss, times(dd, sc.df), -times(dd, sr.df)};
  };
  switch (t) {
    case loss_type::sigmoid: {
      const scalar_grad g = smoothed_logistic(beta * d, c.cdpo_smoothing ? eps : 0.0);
      return through_d(g.value, beta * g.d);
    }
    case loss_type::hinge: {
      const double u = 1.0 - beta * d;
      // relu'(0) = 0, as torch defines it.
      return through_d(u > 0.0 ? u : (u == u ? 0.0 : u), u > 0.0 ? -beta : 0.0);
    }
    case loss_type::ipo: {
      const double u = sc.f / v.len_c - sr.f / v.len_r - 1.0 / (2.0 * beta);
      return {u * u, times(2.0 * u, sc.df) / v.len_c, -times(2.0 * u, sr.df) / v.len_r};
    }
    case loss_type::exo_pair: {
      const double x = beta * d;
      const double p = sigmoid(x);
      const double q = sigmoid(-x);
      using std::log;
      using std::log1p;
      const double l1e = log1p(-eps);
      const double le = log(eps);
      // At |x| = inf a saturated sigmoid times an infinite log-sigmoid: the limit is 0.
      const double loss = times(p, log_sigmoid(x) - l1e) + times(q, log_sigmoid(-x) - le);
      return through_d(loss, beta * times(p * q, x - l1e + le));
    }
    case loss_type::nca_pair: {
      const double xc = beta * sc.f;
      const double xr = beta * sr.f;
      const double loss = -log_sigmoid(xc) - 0.5 * log_sigmoid(-xc) - 0.5 * log_sigmoid(-xr);
      const double dxc = -sigmoid(-xc) + 0.5 * sigmoid(xc);
      const double dxr = 0.5 * sigmoid(xr);
      return {loss, times(beta * dxc, sc.df), times(beta * dxr, sr.df)};
    }
    case loss_type::robust: {
      const double x = beta * d;
      const double k = 1.0 / (1.0 - 2.0 * eps);
      const double loss = (-times(1.0 - eps, log_sigmoid(x)) + times(eps, log_sigmoid(-x))) * k;
      const double dx = (-(1.0 - eps) * sigmoid(-x) - eps * sigmoid(x)) * k;
      return through_d(loss, beta * dx);
    }
    case loss_type::bco_pair: {
      const double xc = beta * sc.f;
      const double xr = beta * sr.f;
      const double loss = -log_sigmoid(xc) - log_sigmoid(-xr);
      return {loss, times(-beta * sigmoid(-xc), sc.df), times(beta * sigmoid(xr), sr.df)};
    }
    case loss_type::sppo_hard: {
      const double h = 1.0 / (2.0 * beta);
      const double a = sc.f - h;
      const double b = sr.f + h;
      return {a * a + b * b, times(2.0 * a, sc.df), times(2.0 * b, sr.df)};
    }
    case loss_type::apo_zero: {
      const double pc = sigmoid(beta * Dc);
      const double pr = sigmoid(beta * Dr);
      const double loss = (1.0 - pc) + pr;
      return {loss, -beta * pc * (1.0 - pc), beta * pr * (1.0 - pr)};
    }
    case loss_type::apo_down: {
      const double pc = sigmoid(beta * Dc);
      const double pd = sigmoid(beta * d);
      const double loss = pc + (1.0 - pd);
      const double dd = -beta * pd * (1.0 - pd);
      return {loss, beta * pc * (1.0 - pc) + times(dd, sc.df), -times(dd, sr.df)};
    }
    case loss_type::discopop: {
      const double tau = c.discopop_tau;
      const double x = beta * d;
      const double m = sigmoid(x / tau);
      const double ls_x = log_sigmoid(x);
      const double ls_g = log_sigmoid(x / tau);
      const double ls_ng = log_sigmoid(-x / tau);
      // m * exp(-x) and m' * exp(-x) in log space: exp(-x) overflows where m underflows.
      // log(m) - x for x < 0 as x (1/tau - 1) - log1p(exp(x / tau)), which has the limit
      // -inf, 0 or +inf at x = -inf (tau <, =, > 1) where ls_g - x is -inf + inf.
      using std::log1p;
      const double lg_x = x < 0.0 ? times(x, 1.0 / tau - 1.0) - log1p(exp(x / tau)) : ls_g - x;
      const double m_expx = exp(lg_x);
      const double dm_expx = exp(lg_x + ls_ng) / tau;
      const double dm = m * (1.0 - m) / tau;
      const double loss = times(1.0 - m, -ls_x) + m_expx;
      // (m exp(-x))' = m exp(-x) ((1 - m) / tau - 1): as one product where m exp(-x) is
      // infinite (tau > 1, x -> -inf), where the difference would be inf - inf.
      const double dmx = m_expx < INFINITY ? dm_expx - m_expx : m_expx * (sigmoid(-x / tau) / tau - 1.0);
      const double dx = times(dm, ls_x) - times(1.0 - m, sigmoid(-x)) + dmx;
      return through_d(loss, beta * dx);
    }
    case loss_type::sigmoid_norm: {
      const double x = beta * (sc.f / v.len_c - sr.f / v.len_r);
      const double dx = -sigmoid(-x);
      return {-log_sigmoid(x), times(beta * dx, sc.df) / v.len_c, -times(beta * dx, sr.df) / v.len_r};
    }
    case loss_type::simpo: {
      const double x = beta * (v.pi_c / v.len_c - v.pi_r / v.len_r) - c.simpo_gamma;
      const scalar_grad g = smoothed_logistic(x, eps);
      return {g.value, beta * g.d / v.len_c, -beta * g.d / v.len_r};
    }
    case loss_type::cpo: {
      if (c.cpo_base == loss_type::ipo) {
        const double u = v.pi_c / v.len_c - v.pi_r / v.len_r - 1.0 / (2.0 * beta);
        return {u * u, 2.0 * u / v.len_c, -2.0 * u / v.len_r};
      }
      const double x = beta * (v.pi_c - v.pi_r);
      if (c.cpo_base == loss_type::hinge) {
        const double u = 1.0 - x;
        const double dx = u > 0.0 ? -beta : 0.0;
        return {u > 0.0 ? u : (u == u ? 0.0 : u), dx, -dx};
      }
      const scalar_grad g = smoothed_logistic(x, eps);
      return {g.value, beta * g.d, -beta * g.d};
    }
    case loss_type::orpo: {
      const double ac = v.pi_c / v.len_c;
      const double ar = v.pi_r / v.len_r;
      const double lo = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
      // d lo / d a = 1 + e^a / (1 - e^a) = -1 / expm1(a).
      const double dlo_r = 1.0 / expm1(ar);
      const double dl = -beta * sigmoid(-lo);
      // The chosen side as one fraction: sigmoid(-lo) / (1 - e^ac) =
      // 1 / ((1 - e^ac) + e^(ac - ar) (1 - e^ar)), a sum of non-negative terms. It stays finite
      // at ac = 0 (a chosen sequence with no completion token), where the product form is
      // 0 * inf = NaN while the gradient's limit is finite.
      const double dl_c = -beta / (-expm1(ac) - exp(ac - ar) * expm1(ar));
      return {-beta * log_sigmoid(lo), dl_c / v.len_c, dl * dlo_r / v.len_r};
    }
    case loss_type::sft:
    case loss_type::aot:
    case loss_type::aot_unpaired:
    default:
      return {0.0, 0.0, 0.0};
  }
}

/// The aot / aot_unpaired loss of one sorted position: x = sorted(a)[k] - sorted(b)[k].
DPO_HOST_DEVICE inline scalar_grad batch_term(const loss_config& c, double x) {
  const scalar_grad g = smoothed_logistic(c.beta * x, c.label_smoothing);
  return {g.value, c.beta * g.d};
}

/// Position of values[i] in the ascending stable sort of values[0..n): the number of
/// elements that sort before it (smaller, or equal with a lower index). Deterministic and
/// usable per thread on a device. NaN sorts last, as torch.sort puts it.
DPO_HOST_DEVICE inline std::int64_t stable_rank(const double* values, std::int64_t n,
                                                std::int64_t i) {
  const double x = values[i];
  const bool x_nan = x != x;
  std::int64_t r = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    if (j == i) continue;
    const double y = values[j];
    const bool y_nan = y != y;
    bool before;
    if (x_nan || y_nan) {
      before = (!y_nan) || (y_nan && x_nan && j < i);
    } else {
      before = y < x || (y == x && j < i);
    }
    r += before ? 1 : 0;
  }
  return r;
}

/// Rewards of one pair: beta * (pi - rho), raw log-ratios (beta * average log-prob for the
/// reference-free losses that average).
DPO_HOST_DEVICE inline void pair_rewards(const loss_config& c, const pair_values& v,
                                         double* chosen, double* rejected) {
  const loss_type t0 = c.terms[0].type;
  if (is_reference_free_type(t0)) {
    const bool avg = rewards_use_average(t0, c);
    *chosen = c.beta * (avg ? v.pi_c / v.len_c : v.pi_c);
    *rejected = c.beta * (avg ? v.pi_r / v.len_r : v.pi_r);
    return;
  }
  const double rc = c.reference_free ? 0.0 : v.rho_c;
  const double rr = c.reference_free ? 0.0 : v.rho_r;
  *chosen = c.beta * (v.pi_c - rc);
  *rejected = c.beta * (v.pi_r - rr);
}

}  // namespace detail
}  // namespace dpo
