// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The test oracle: a naive, float64-input implementation of every loss of
// docs/losses.md, written straight from the formulas (and from TRL 1.16's
// DPOTrainer._compute_loss / experimental CPOTrainer / ORPOTrainer where losses.md leaves
// a detail open). It shares no math with the library: only dpo::loss_config is read, as a
// bag of hyperparameters. Everything is computed in long double, one token at a time,
// so finite differences of batch_loss() give the expected gradient to ~1e-10.
#pragma once

#include <dpo/core/loss.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace oracle {

using ld = long double;

/// One sequence: a logits row per token (already shifted) and its label; label < 0 marks
/// a token that is not a completion token (prompt, padding, ignore_index or mask 0).
struct sequence {
  std::vector<std::vector<double>> z;
  std::vector<std::int64_t> y;
  std::int64_t rows() const { return static_cast<std::int64_t>(y.size()); }
};

/// P pairs: chosen[i] is preferred over rejected[i].
struct batch {
  std::vector<sequence> chosen, rejected;
  std::int64_t pairs() const { return static_cast<std::int64_t>(chosen.size()); }
};

/// Per-token values of one logits row, naive: log-softmax by definition in long double.
struct token {
  bool active = false;
  ld logp = 0;     // z[y] - logsumexp(z)
  ld lse = 0;      // logsumexp(z)
  ld m = 0;        // max z, and log sum exp(z - m): z - lse is formed as (z - m) - log_s,
  ld log_s = 0;    // exact for the logits near the max whatever the magnitude of m
  ld log_s2 = 0;   // log sum exp(2 (z - m))
  ld lse2 = 0;     // logsumexp(2 z)
  ld entropy = 0;  // -sum p log p
  ld zmean = 0;    // sum z / V
  bool hit = false;  // first argmax == y
};

inline token token_of(const std::vector<double>& z, std::int64_t y) {
  token t;
  if (y < 0) return t;
  t.active = true;
  ld m = -std::numeric_limits<ld>::infinity();
  std::size_t arg = 0;
  ld zsum = 0;
  for (std::size_t v = 0; v < z.size(); ++v) {
    const ld x = z[v];
    zsum += x;
    if (x > m) {
      m = x;
      arg = v;
    }
  }
  ld s = 0, s2 = 0;
  bool nan = false;
  for (double x : z) {
    if (std::isnan(x)) nan = true;
    s += std::exp(ld(x) - m);
    s2 += std::exp(2 * (ld(x) - m));
  }
  t.m = m;
  t.log_s = std::log(s);
  t.lse = m + t.log_s;
  t.log_s2 = std::log(s2);
  t.lse2 = 2 * m + t.log_s2;
  for (double x : z) {
    const ld d = (ld(x) - m) - t.log_s;
    const ld p = std::exp(d);
    if (p > 0) t.entropy -= p * d;
  }
  t.zmean = zsum / ld(z.size());
  t.logp = (ld(z[static_cast<std::size_t>(y)]) - m) - t.log_s;
  t.hit = static_cast<std::int64_t>(arg) == y;
  if (nan) t.logp = t.lse = t.entropy = std::numeric_limits<ld>::quiet_NaN();
  return t;
}

inline std::vector<token> tokens_of(const sequence& s) {
  std::vector<token> out;
  for (std::int64_t t = 0; t < s.rows(); ++t) out.push_back(token_of(s.z[t], s.y[t]));
  return out;
}

inline ld count(const std::vector<token>& ts) {
  ld n = 0;
  for (const token& t : ts) n += t.active ? 1 : 0;
  return n;
}

/// Sequence log-prob with LD-DPO: completion tokens 1..shared count fully, later ones
/// times ld_alpha (TRL's shared_mask / tail_mask). shared = +inf disables it.
inline ld seq_logp(const std::vector<token>& ts, ld shared, ld ld_alpha) {
  ld sum = 0, pos = 0;
  for (const token& t : ts) {
    if (!t.active) continue;
    pos += 1;
    sum += (pos <= shared ? ld(1) : ld_alpha) * t.logp;
  }
  return sum;
}

inline ld log_sigmoid(ld x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }
inline ld sigmoid(ld x) { return 1 / (1 + std::exp(-x)); }
/// A term whose weight is 0 is absent (TRL forms 0 * -inf = NaN there at |x| = inf; the
/// limit, which the library gives, is 0).
inline ld smoothed(ld x, ld eps) {
  return (eps == 1 ? 0 : -(1 - eps) * log_sigmoid(x)) - (eps == 0 ? 0 : eps * log_sigmoid(-x));
}

/// TRL 1.16's chosen_scores / rejected_scores.
inline ld score(const dpo::loss_config& c, ld D) {
  switch (c.divergence) {
    case dpo::f_divergence::forward_kl: return 1 - std::exp(-D);
    case dpo::f_divergence::js_divergence: return std::log(ld(2)) + log_sigmoid(D);
    case dpo::f_divergence::alpha_divergence: {
      const ld a = c.alpha_divergence_coef;
      if (std::fabs(a - 1) < 1e-6L) return D;
      return (std::exp(std::min<ld>((a - 1) * D, c.alpha_exponent_clamp)) - 1) / (a - 1);
    }
    default: return D;
  }
}

/// Sequence-level inputs of the pair stage (TRL's chosen_logps ... after the forward).
struct pair_inputs {
  std::vector<ld> pi_c, pi_r;    // policy (LD-weighted) sequence log-probs
  std::vector<ld> rho_c, rho_r;  // reference; empty = reference-free loss
  std::vector<ld> len_c, len_r;  // completion-token counts, unclamped
  std::vector<ld> weights;       // WPO W_i; empty = 1
  ld nll = 0;                    // NLL(chosen): mean CE over all chosen completion tokens
};

struct result {
  ld loss = 0;
  std::vector<ld> losses;  // per-pair: sum_k w_k loss_k,i W_i (aot: at sorted position i)
  std::vector<ld> chosen_rewards, rejected_rewards;
  // Metrics as TRL logs them.
  ld rewards_chosen = 0, rewards_rejected = 0, rewards_margins = 0, rewards_accuracies = 0;
  ld logps_chosen = 0, logps_rejected = 0;
  ld logits_chosen = 0, logits_rejected = 0, entropy = 0, mean_token_accuracy = 0, nll_loss = 0;
  std::vector<ld> pi_c, pi_r, len_c, len_r, weights;
};

inline std::vector<ld> sorted(std::vector<ld> x) {
  std::sort(x.begin(), x.end());
  return x;
}

/// The per-pair losses of one loss type, as TRL writes them (per_sequence_loss).
inline std::vector<ld> per_pair(dpo::loss_type t, const dpo::loss_config& c, const pair_inputs& in) {
  using dpo::loss_type;
  const std::size_t P = in.pi_c.size();
  const ld beta = c.beta, eps = c.label_smoothing;
  const bool ref = !in.rho_c.empty() && !c.reference_free;
  std::vector<ld> Dc(P), Dr(P), sc(P), sr(P), Lc(P), Lr(P), out(P, 0);
  for (std::size_t i = 0; i < P; ++i) {
    Dc[i] = in.pi_c[i] - (ref ? in.rho_c[i] : 0);
    Dr[i] = in.pi_r[i] - (ref ? in.rho_r[i] : 0);
    sc[i] = score(c, Dc[i]);
    sr[i] = score(c, Dr[i]);
    Lc[i] = std::max<ld>(in.len_c[i], 1);
    Lr[i] = std::max<ld>(in.len_r[i], 1);
  }
  if (t == loss_type::aot || t == loss_type::aot_unpaired) {
    std::vector<ld> a(P), b(P);
    for (std::size_t i = 0; i < P; ++i) {
      if (t == loss_type::aot) {
        a[i] = in.pi_c[i] - in.pi_r[i];
        b[i] = ref ? in.rho_c[i] - in.rho_r[i] : 0;
      } else {
        a[i] = Dc[i];
        b[i] = Dr[i];
      }
    }
    a = sorted(a);
    b = sorted(b);
    for (std::size_t i = 0; i < P; ++i) out[i] = smoothed(beta * (a[i] - b[i]), eps);
    return out;
  }
  for (std::size_t i = 0; i < P; ++i) {
    const ld x = beta * (sc[i] - sr[i]);
    ld l = 0;
    switch (t) {
      case loss_type::sigmoid: l = c.cdpo_smoothing ? smoothed(x, eps) : -log_sigmoid(x); break;
      case loss_type::hinge: l = std::max<ld>(0, 1 - x); break;
      case loss_type::ipo: {
        const ld u = sc[i] / Lc[i] - sr[i] / Lr[i] - 1 / (2 * beta);
        l = u * u;
        break;
      }
      case loss_type::exo_pair:
        l = sigmoid(x) * (log_sigmoid(x) - std::log1p(-eps)) +
            sigmoid(-x) * (log_sigmoid(-x) - std::log(eps));
        break;
      case loss_type::nca_pair:
        l = -log_sigmoid(beta * Dc[i]) - 0.5L * log_sigmoid(-beta * Dc[i]) -
            0.5L * log_sigmoid(-beta * Dr[i]);
        break;
      case loss_type::robust:
        l = (-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps);
        break;
      case loss_type::bco_pair: l = -log_sigmoid(beta * Dc[i]) - log_sigmoid(-beta * Dr[i]); break;
      case loss_type::sppo_hard: {
        const ld a = Dc[i] - 0.5L / beta, b = Dr[i] + 0.5L / beta;
        l = a * a + b * b;
        break;
      }
      case loss_type::apo_zero: l = 1 - sigmoid(beta * Dc[i]) + sigmoid(beta * Dr[i]); break;
      case loss_type::apo_down:
        l = sigmoid(beta * Dc[i]) + 1 - sigmoid(beta * (Dc[i] - Dr[i]));
        break;
      case loss_type::discopop: {
        const ld tau = c.discopop_tau;
        const ld m = sigmoid(x / tau);
        // m * exp(-x) = exp(log m - x): the naive product is 0 * inf at x = -1e4.
        l = (1 - m) * (-log_sigmoid(x)) + std::exp(log_sigmoid(x / tau) - x);
        break;
      }
      case loss_type::sigmoid_norm: l = -log_sigmoid(beta * (sc[i] / Lc[i] - sr[i] / Lr[i])); break;
      case loss_type::sft: l = in.nll; break;
      case loss_type::simpo: {
        // CPOTrainer: logits = avg_c - avg_r - gamma / beta; loss on beta * logits.
        const ld u = beta * (in.pi_c[i] / Lc[i] - in.pi_r[i] / Lr[i] - c.simpo_gamma / beta);
        l = smoothed(u, eps);
        break;
      }
      case loss_type::cpo: {
        if (c.cpo_base == loss_type::ipo) {
          const ld u = in.pi_c[i] / Lc[i] - in.pi_r[i] / Lr[i] - 1 / (2 * beta);
          l = u * u;
        } else if (c.cpo_base == loss_type::hinge) {
          l = std::max<ld>(0, 1 - beta * (in.pi_c[i] - in.pi_r[i]));
        } else {
          l = smoothed(beta * (in.pi_c[i] - in.pi_r[i]), eps);
        }
        l += c.cpo_alpha * in.nll;
        break;
      }
      case loss_type::orpo: {
        const ld ac = in.pi_c[i] / Lc[i], ar = in.pi_r[i] / Lr[i];
        const ld lo = (ac - ar) - (std::log1p(-std::exp(ac)) - std::log1p(-std::exp(ar)));
        l = in.nll - beta * log_sigmoid(lo);
        break;
      }
      default: break;
    }
    out[i] = l;
  }
  return out;
}

/// The pair stage: L = sum_k w_k mean_i(loss_k,i W_i), rewards and reward metrics.
inline result pair_stage(const dpo::loss_config& c, const pair_inputs& in) {
  using dpo::loss_type;
  const std::size_t P = in.pi_c.size();
  result r;
  r.losses.assign(P, 0);
  for (int k = 0; k < c.num_terms; ++k) {
    const std::vector<ld> l = per_pair(c.terms[k].type, c, in);
    for (std::size_t i = 0; i < P; ++i)
      r.losses[i] += ld(c.terms[k].weight) * l[i] * (in.weights.empty() ? ld(1) : in.weights[i]);
  }
  for (ld l : r.losses) r.loss += l;
  r.loss /= ld(P);
  // Rewards: DPOTrainer's beta * log-ratio; CPOTrainer's beta * policy log-prob (averaged
  // for simpo, orpo and cpo-ipo, as its get_batch_logps(average_log_prob=...) does).
  const loss_type t0 = c.terms[0].type;
  const bool cpo_family = t0 == loss_type::simpo || t0 == loss_type::cpo || t0 == loss_type::orpo;
  const bool avg = t0 == loss_type::simpo || t0 == loss_type::orpo ||
                   (t0 == loss_type::cpo && c.cpo_base == loss_type::ipo);
  const bool ref = !in.rho_c.empty() && !c.reference_free && !cpo_family;
  for (std::size_t i = 0; i < P; ++i) {
    ld rc = in.pi_c[i], rr = in.pi_r[i];
    if (avg) {
      rc /= std::max<ld>(in.len_c[i], 1);
      rr /= std::max<ld>(in.len_r[i], 1);
    }
    if (ref) {
      rc -= in.rho_c[i];
      rr -= in.rho_r[i];
    }
    r.chosen_rewards.push_back(c.beta * rc);
    r.rejected_rewards.push_back(c.beta * rr);
    r.rewards_chosen += c.beta * rc / ld(P);
    r.rewards_rejected += c.beta * rr / ld(P);
    r.rewards_margins += (c.beta * rc - c.beta * rr) / ld(P);
    r.rewards_accuracies += (c.beta * rc > c.beta * rr ? ld(1) : ld(0)) / ld(P);
    r.logps_chosen += in.pi_c[i] / ld(P);
    r.logps_rejected += in.pi_r[i] / ld(P);
  }
  r.nll_loss = in.nll;
  r.pi_c = in.pi_c;
  r.pi_r = in.pi_r;
  r.len_c = in.len_c;
  r.len_r = in.len_r;
  r.weights = in.weights.empty() ? std::vector<ld>(P, 1) : in.weights;
  return r;
}

/// LD-DPO sequence log-probs of both sides of a batch (TRL's compute_ref_log_probs).
inline void pair_logps(const batch& b, double ld_alpha, std::vector<ld>& c, std::vector<ld>& r) {
  c.clear();
  r.clear();
  for (std::int64_t i = 0; i < b.pairs(); ++i) {
    const auto tc = tokens_of(b.chosen[i]), tr = tokens_of(b.rejected[i]);
    const ld shared = ld_alpha == 1.0 ? std::numeric_limits<ld>::infinity() : std::min(count(tc), count(tr));
    c.push_back(seq_logp(tc, shared, ld_alpha));
    r.push_back(seq_logp(tr, shared, ld_alpha));
  }
}

/// Tokens of a whole batch, side by side: toks[0][i] chosen, toks[1][i] rejected.
using batch_tokens = std::vector<std::vector<std::vector<token>>>;

inline batch_tokens tokens_of(const batch& b) {
  batch_tokens t(2);
  for (std::int64_t i = 0; i < b.pairs(); ++i) {
    t[0].push_back(tokens_of(b.chosen[i]));
    t[1].push_back(tokens_of(b.rejected[i]));
  }
  return t;
}

/// WPO weights W_i = w_c w_r, w = exp(mean over completion tokens of logp - log sum p^2).
inline std::vector<ld> wpo_weights(const batch_tokens& t) {
  std::vector<ld> W;
  for (std::size_t i = 0; i < t[0].size(); ++i) {
    ld w = 1;
    for (int s = 0; s < 2; ++s) {
      ld sum = 0;
      for (const token& k : t[s][i])
        if (k.active) sum += k.logp - (k.log_s2 - 2 * k.log_s);  // lse2 - 2 lse, m cancelled
      w *= std::exp(sum / std::max<ld>(count(t[s][i]), 1));
    }
    W.push_back(w);
  }
  return W;
}

/// The whole forward from per-token values. `ref_c`/`ref_r` empty for reference-free
/// losses. `fixed_weights` (when not null) replaces the WPO weights: TRL computes them
/// under no_grad, so finite differences must hold them constant.
inline result from_tokens(const dpo::loss_config& c, const batch_tokens& t,
                          const std::vector<ld>& ref_c, const std::vector<ld>& ref_r,
                          const std::vector<ld>* fixed_weights = nullptr) {
  pair_inputs in;
  const std::size_t P = t[0].size();
  ld nll_sum = 0, nll_n = 0;
  ld zc = 0, zr = 0, nc_all = 0, nr_all = 0, ent = 0, hits = 0;
  for (std::size_t i = 0; i < P; ++i) {
    const ld nc = count(t[0][i]), nr = count(t[1][i]);
    const ld shared = c.ld_alpha == 1.0 ? std::numeric_limits<ld>::infinity() : std::min(nc, nr);
    in.pi_c.push_back(seq_logp(t[0][i], shared, c.ld_alpha));
    in.pi_r.push_back(seq_logp(t[1][i], shared, c.ld_alpha));
    in.len_c.push_back(nc);
    in.len_r.push_back(nr);
    for (const token& k : t[0][i]) {
      if (!k.active) continue;
      nll_sum -= k.logp;
      nll_n += 1;
      zc += k.zmean;
      ent += k.entropy;
      hits += k.hit ? 1 : 0;
    }
    for (const token& k : t[1][i]) {
      if (!k.active) continue;
      zr += k.zmean;
      ent += k.entropy;
    }
    nc_all += nc;
    nr_all += nr;
  }
  in.nll = nll_sum / std::max<ld>(nll_n, 1);
  in.rho_c = ref_c;
  in.rho_r = ref_r;
  if (c.use_weighting) in.weights = fixed_weights ? *fixed_weights : wpo_weights(t);
  result r = pair_stage(c, in);
  r.logits_chosen = nc_all > 0 ? zc / nc_all : 0;
  r.logits_rejected = nr_all > 0 ? zr / nr_all : 0;
  r.entropy = nc_all + nr_all > 0 ? ent / (nc_all + nr_all) : 0;
  r.mean_token_accuracy = nc_all > 0 ? hits / nc_all : 0;
  return r;
}

inline result forward(const dpo::loss_config& c, const batch& b, const std::vector<ld>& ref_c,
                      const std::vector<ld>& ref_r, const std::vector<ld>* fixed_weights = nullptr) {
  return from_tokens(c, tokens_of(b), ref_c, ref_r, fixed_weights);
}

/// Gradients of the batch loss, shaped like the batch: g[side][pair][row][v].
using grads = std::vector<std::vector<std::vector<std::vector<double>>>>;

/// dL/dz by central differences of forward() over every logit (WPO weights held fixed).
inline grads fd_logits(const dpo::loss_config& c, const batch& b, const std::vector<ld>& ref_c,
                       const std::vector<ld>& ref_r, double h = 1e-5) {
  const std::vector<ld> W = wpo_weights(tokens_of(b));
  batch x = b;
  grads g(2);
  for (int s = 0; s < 2; ++s) {
    std::vector<sequence>& side = s == 0 ? x.chosen : x.rejected;
    for (sequence& q : side) {
      g[s].emplace_back();
      for (std::int64_t t = 0; t < q.rows(); ++t) {
        g[s].back().emplace_back(q.z[t].size(), 0.0);
        if (q.y[t] < 0) continue;  // a masked row never enters the loss
        for (std::size_t v = 0; v < q.z[t].size(); ++v) {
          const double z0 = q.z[t][v];
          q.z[t][v] = z0 + h;
          const ld up = forward(c, x, ref_c, ref_r, &W).loss;
          q.z[t][v] = z0 - h;
          const ld dn = forward(c, x, ref_c, ref_r, &W).loss;
          q.z[t][v] = z0;
          g[s].back()[t][v] = static_cast<double>((up - dn) / (2 * ld(h)));
        }
      }
    }
  }
  return g;
}

/// dL/dz through dL/dlogp_t: central differences over each token's log-prob (cheap for a
/// large vocabulary), then the log-softmax Jacobian dlogp/dz_v = 1[v = y] - p_v.
inline grads fd_via_tokens(const dpo::loss_config& c, const batch& b, const std::vector<ld>& ref_c,
                           const std::vector<ld>& ref_r, double h = 1e-5) {
  batch_tokens t = tokens_of(b);
  const std::vector<ld> W = wpo_weights(t);
  grads g(2);
  for (int s = 0; s < 2; ++s) {
    const std::vector<sequence>& side = s == 0 ? b.chosen : b.rejected;
    for (std::size_t i = 0; i < side.size(); ++i) {
      g[s].emplace_back();
      for (std::int64_t k = 0; k < side[i].rows(); ++k) {
        const std::vector<double>& z = side[i].z[k];
        g[s].back().emplace_back(z.size(), 0.0);
        token& tk = t[s][i][k];
        if (!tk.active) continue;
        const ld l0 = tk.logp;
        tk.logp = l0 + h;
        const ld up = from_tokens(c, t, ref_c, ref_r, &W).loss;
        tk.logp = l0 - h;
        const ld dn = from_tokens(c, t, ref_c, ref_r, &W).loss;
        tk.logp = l0;
        const ld coef = (up - dn) / (2 * ld(h));
        for (std::size_t v = 0; v < z.size(); ++v) {
          const ld p = std::exp((ld(z[v]) - tk.m) - tk.log_s);
          g[s].back()[k][v] =
              static_cast<double>(coef * ((static_cast<std::int64_t>(v) == side[i].y[k] ? 1 : 0) - p));
        }
      }
    }
  }
  return g;
}

}  // namespace oracle
