// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Test fixtures: random preference batches (as oracle::batch), the same batch laid out in
// the library's buffers (padded, separate or packed; any dtype, label type, row stride,
// ignore_index or explicit mask), the loss configurations under test, and the tolerances.
#pragma once

#include <dpo/dpo.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "oracle.hpp"

namespace fixture {

using ld = oracle::ld;

/// A logit rounded to T and back: the oracle must see exactly what the library reads.
template <class T>
double rounded(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(T(static_cast<float>(x))));
  }
}

template <class T>
void round_batch(oracle::batch& b) {
  for (auto* side : {&b.chosen, &b.rejected})
    for (oracle::sequence& s : *side)
      for (auto& row : s.z)
        for (double& x : row) x = rounded<T>(x);
}

struct batch_spec {
  std::int64_t pairs = 3;
  std::int64_t vocab = 11;
  std::int64_t rows = 6;      // rows per sequence (padded); packed draws 1..rows
  bool varying_rows = false;  // packed: sequences of different row counts
  double scale = 2.0;         // logits ~ scale * N(0, 1)
  std::uint64_t seed = 1;
};

/// A batch_spec of `pairs` pairs of `rows` rows over `vocab`, drawn from `seed`; the rest default.
inline batch_spec spec(std::int64_t pairs, std::int64_t rows, std::int64_t vocab, std::uint64_t seed = 1) {
  batch_spec sp;
  sp.pairs = pairs;
  sp.rows = rows;
  sp.vocab = vocab;
  sp.seed = seed;
  return sp;
}

/// TRL-like sequences: 1-2 prompt rows (masked), completion, then padding (masked); every
/// sequence keeps at least one completion token.
inline oracle::batch random_batch(const batch_spec& sp) {
  std::mt19937_64 rng(sp.seed);
  std::normal_distribution<double> nrm(0.0, sp.scale);
  oracle::batch b;
  auto make = [&]() {
    oracle::sequence s;
    std::int64_t n = sp.rows;
    if (sp.varying_rows) n = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(sp.rows));
    const std::int64_t prompt = n >= 3 ? 1 + static_cast<std::int64_t>(rng() % 2) : 0;
    const std::int64_t room = n - prompt;
    const std::int64_t comp = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(room));
    for (std::int64_t t = 0; t < n; ++t) {
      std::vector<double> z(static_cast<std::size_t>(sp.vocab));
      for (double& x : z) x = nrm(rng);
      s.z.push_back(z);
      const bool active = t >= prompt && t < prompt + comp;
      s.y.push_back(active ? static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(sp.vocab)) : -1);
    }
    return s;
  };
  for (std::int64_t i = 0; i < sp.pairs; ++i) b.chosen.push_back(make());
  for (std::int64_t i = 0; i < sp.pairs; ++i) b.rejected.push_back(make());
  return b;
}

/// random_batch with its logits rounded to T: what a T buffer of it holds.
template <class T>
oracle::batch rounded_random_batch(const batch_spec& sp) {
  oracle::batch b = random_batch(sp);
  round_batch<T>(b);
  return b;
}

/// `to` scores the same completions as `from`: its labels (and masked tokens) become
/// `from`'s, sequence by sequence (a reference batch of the policy's shapes).
inline void copy_labels(const oracle::batch& from, oracle::batch& to) {
  for (std::size_t i = 0; i < from.chosen.size(); ++i) {
    to.chosen[i].y = from.chosen[i].y;
    to.rejected[i].y = from.rejected[i].y;
  }
}

/// Reference log-probs near the policy's (log-ratios of a few units), as a trained policy
/// has: random numbers in [-spread, spread] added to the oracle's policy log-probs.
inline void random_reference(const oracle::batch& b, double ld_alpha, std::uint64_t seed,
                             std::vector<double>& rc, std::vector<double>& rr, double spread = 3.0) {
  std::vector<ld> pc, pr;
  oracle::pair_logps(b, ld_alpha, pc, pr);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-spread, spread);
  rc.clear();
  rr.clear();
  for (std::size_t i = 0; i < pc.size(); ++i) {
    rc.push_back(static_cast<double>(pc[i]) + u(rng));
    rr.push_back(static_cast<double>(pr[i]) + u(rng));
  }
}

inline std::vector<ld> to_ld(const std::vector<double>& x) { return std::vector<ld>(x.begin(), x.end()); }

enum class layout { padded, separate, packed };

/// The two batches of a layout sweep, from one spec: `padded` (equal lengths) and then
/// `packed` (varying lengths, with packed_rows rows when that is > 0).
struct batch_pair {
  oracle::batch padded, packed;
  const oracle::batch& of(layout k) const { return k == layout::packed ? packed : padded; }
};

template <class T>
batch_pair rounded_batch_pair(batch_spec sp, std::int64_t packed_rows = 0) {
  batch_pair p;
  p.padded = rounded_random_batch<T>(sp);
  sp.varying_rows = true;
  if (packed_rows > 0) sp.rows = packed_rows;
  p.packed = rounded_random_batch<T>(sp);
  return p;
}

inline const char* name_of(layout l) {
  return l == layout::padded ? "padded" : l == layout::separate ? "separate" : "packed";
}

/// The batch in the library's memory. Columns [vocab, stride) of the logits hold NaN, so a
/// read of them would show in every result; the gradient buffers start as a sentinel.
template <class T, class L>
struct buffers {
  layout kind = layout::padded;
  std::int64_t P = 0, V = 0, stride = 0, seq_len = 0, ignore_index = -100;
  bool use_mask = false;
  std::vector<T> logits, logits_r;  // logits_r only for separate
  std::vector<L> labels, labels_r;
  std::vector<std::uint8_t> mask, mask_r;
  std::vector<std::int64_t> cu;
  std::vector<T> grad, grad_r;
  // Where sequence (side, i) starts: buffer 0 (logits) or 1 (logits_r), first row.
  std::vector<std::vector<std::int64_t>> start;
  std::vector<std::vector<int>> buf;

  static T sentinel() { return T(static_cast<float>(-12345.0)); }

  /// A double as T (exact for values already rounded to T).
  static T to_t(double x) {
    if constexpr (std::is_same_v<T, double>) {
      return x;
    } else {
      return T(static_cast<float>(x));
    }
  }

  /// `vocab`: the vocabulary of a batch without any row (a context rank holding none of the
  /// sequences' rows); 0 reads it off the first row of chosen[0].
  buffers(const oracle::batch& b, layout k, std::int64_t stride_extra = 0, bool explicit_mask = false,
          std::int64_t ignore = -100, std::int64_t packed_offset = 0, std::int64_t vocab = 0)
      : kind(k), P(b.pairs()), V(vocab > 0 ? vocab : static_cast<std::int64_t>(b.chosen[0].z[0].size())),
        stride(V + stride_extra), ignore_index(ignore), use_mask(explicit_mask) {
    start.assign(2, std::vector<std::int64_t>(static_cast<std::size_t>(P)));
    buf.assign(2, std::vector<int>(static_cast<std::size_t>(P), 0));
    std::int64_t rows0 = 0, rows1 = 0;
    seq_len = b.chosen[0].rows();
    if (k == layout::packed) {
      cu.push_back(packed_offset);
      rows0 = packed_offset;
      for (int s = 0; s < 2; ++s)
        for (std::int64_t i = 0; i < P; ++i) {
          start[s][i] = rows0;
          rows0 += (s == 0 ? b.chosen : b.rejected)[i].rows();
          cu.push_back(rows0);
        }
    } else {
      for (int s = 0; s < 2; ++s)
        for (std::int64_t i = 0; i < P; ++i) {
          if (k == layout::padded) {
            start[s][i] = (s * P + i) * seq_len;
          } else {
            start[s][i] = i * seq_len;
            buf[s][i] = s;
          }
        }
      rows0 = k == layout::padded ? 2 * P * seq_len : P * seq_len;
      rows1 = k == layout::separate ? P * seq_len : 0;
    }
    alloc(logits, labels, mask, rows0);
    alloc(logits_r, labels_r, mask_r, rows1);
    for (int s = 0; s < 2; ++s)
      for (std::int64_t i = 0; i < P; ++i) {
        const oracle::sequence& q = (s == 0 ? b.chosen : b.rejected)[i];
        std::vector<T>& lg = buf[s][i] == 0 ? logits : logits_r;
        std::vector<L>& lb = buf[s][i] == 0 ? labels : labels_r;
        std::vector<std::uint8_t>& mk = buf[s][i] == 0 ? mask : mask_r;
        for (std::int64_t t = 0; t < q.rows(); ++t) {
          const std::int64_t r = start[s][i] + t;
          for (std::int64_t v = 0; v < V; ++v) lg[r * stride + v] = to_t(q.z[t][v]);
          const bool active = q.y[t] >= 0;
          if (explicit_mask) {
            // A masked row's label is never looked at, even when it is out of range.
            lb[r] = static_cast<L>(active ? q.y[t] : (t % 2 == 0 ? V + 7 : -3));
            mk[r] = active ? 1 : 0;
          } else {
            lb[r] = static_cast<L>(active ? q.y[t] : ignore);
          }
        }
      }
    reset_grad();
  }

  void alloc(std::vector<T>& lg, std::vector<L>& lb, std::vector<std::uint8_t>& mk, std::int64_t rows) {
    lg.assign(static_cast<std::size_t>(rows * stride), T(std::nanf("")));
    lb.assign(static_cast<std::size_t>(rows), static_cast<L>(ignore_index));
    mk.assign(static_cast<std::size_t>(rows), 0);
  }

  void reset_grad() {
    grad.assign(logits.size(), sentinel());
    grad_r.assign(logits_r.size(), sentinel());
  }

  const std::uint8_t* mask_ptr(const std::vector<std::uint8_t>& m) const {
    return use_mask ? m.data() : nullptr;
  }

  dpo::pair_view<T, L> view() const {
    switch (kind) {
      case layout::padded:
        return dpo::padded_pairs(logits.data(), labels.data(), 2 * P, seq_len, V, stride, mask_ptr(mask),
                                 ignore_index);
      case layout::packed:
        return dpo::packed_pairs(logits.data(), labels.data(), cu.data(), 2 * P, V, stride, mask_ptr(mask),
                                 ignore_index);
      case layout::separate:
      default:
        return dpo::separate_pairs(logits.data(), labels.data(), logits_r.data(), labels_r.data(), P, seq_len, V,
                                   stride, mask_ptr(mask), mask_ptr(mask_r), ignore_index);
    }
  }

  /// Gradient buffers of the same shape and stride as the logits (out of place).
  dpo::pair_grad_view<T> grad_view() {
    if (kind == layout::separate) return {grad.data(), stride, grad_r.data(), stride};
    return {grad.data(), stride, grad.data(), stride};
  }

  /// The logits themselves (in place).
  dpo::pair_grad_view<T> inplace_view() {
    if (kind == layout::separate) return {logits.data(), stride, logits_r.data(), stride};
    return {logits.data(), stride, logits.data(), stride};
  }

  /// g[v] of sequence (side, i), row t, read from `which` (grad or, in place, logits).
  double at(bool in_place, int side, std::int64_t i, std::int64_t t, std::int64_t v) const {
    const int bi = buf[side][i];
    const std::vector<T>& g = in_place ? (bi == 0 ? logits : logits_r) : (bi == 0 ? grad : grad_r);
    return static_cast<double>(static_cast<std::conditional_t<std::is_same_v<T, double>, double, float>>(
        g[static_cast<std::size_t>((start[side][i] + t) * stride + v)]));
  }
};

/// A loss configuration under test and the name it is reported under.
struct named_config {
  std::string name;
  dpo::loss_config cfg;
};

inline dpo::loss_config of(dpo::loss_type t, double beta = 0.1, double eps = 0.0) {
  dpo::loss_config c = dpo::loss_config::of(t);
  c.beta = beta;
  c.label_smoothing = eps;
  return c;
}

/// Every loss type once (the 18 types, cDPO smoothing and the three CPO bases). Hinge and
/// CPO-hinge use beta = 1 so that both sides of the kink occur in random batches.
inline std::vector<named_config> every_loss_type() {
  using dpo::loss_type;
  std::vector<named_config> v;
  v.push_back({"sigmoid", of(loss_type::sigmoid)});
  dpo::loss_config cdpo = of(loss_type::sigmoid, 0.1, 0.2);
  cdpo.cdpo_smoothing = true;
  v.push_back({"sigmoid+cdpo", cdpo});
  v.push_back({"hinge", of(loss_type::hinge, 1.0)});
  v.push_back({"ipo", of(loss_type::ipo, 0.5)});
  v.push_back({"exo_pair", of(loss_type::exo_pair, 0.1, 0.1)});
  v.push_back({"nca_pair", of(loss_type::nca_pair)});
  v.push_back({"robust", of(loss_type::robust, 0.1, 0.2)});
  v.push_back({"bco_pair", of(loss_type::bco_pair)});
  v.push_back({"sppo_hard", of(loss_type::sppo_hard)});
  v.push_back({"aot", of(loss_type::aot, 0.1, 0.1)});
  v.push_back({"aot_unpaired", of(loss_type::aot_unpaired, 0.1, 0.1)});
  v.push_back({"apo_zero", of(loss_type::apo_zero)});
  v.push_back({"apo_down", of(loss_type::apo_down)});
  v.push_back({"discopop", of(loss_type::discopop)});
  v.push_back({"sigmoid_norm", of(loss_type::sigmoid_norm, 0.5)});
  v.push_back({"sft", of(loss_type::sft)});
  v.push_back({"simpo", of(loss_type::simpo, 2.0, 0.1)});
  dpo::loss_config cpo = of(loss_type::cpo, 0.1, 0.1);
  v.push_back({"cpo/sigmoid", cpo});
  cpo = of(loss_type::cpo, 1.0);
  cpo.cpo_base = loss_type::hinge;
  v.push_back({"cpo/hinge", cpo});
  cpo = of(loss_type::cpo, 0.5);
  cpo.cpo_base = loss_type::ipo;
  cpo.cpo_alpha = 0.7;
  v.push_back({"cpo/ipo", cpo});
  v.push_back({"orpo", of(loss_type::orpo, 0.2)});
  return v;
}

/// Every f-divergence with every loss type TRL allows it for.
inline std::vector<named_config> every_f_divergence() {
  using dpo::f_divergence;
  using dpo::loss_type;
  std::vector<named_config> v;
  const std::pair<const char*, f_divergence> divs[] = {{"forward_kl", f_divergence::forward_kl},
                                                       {"js", f_divergence::js_divergence},
                                                       {"alpha0.5", f_divergence::alpha_divergence},
                                                       {"alpha1.3", f_divergence::alpha_divergence}};
  const std::pair<const char*, dpo::loss_config> types[] = {
      {"sigmoid", of(loss_type::sigmoid)},     {"sigmoid_norm", of(loss_type::sigmoid_norm, 0.5)},
      {"hinge", of(loss_type::hinge, 1.0)},    {"ipo", of(loss_type::ipo, 0.5)},
      {"exo_pair", of(loss_type::exo_pair, 0.1, 0.1)}, {"robust", of(loss_type::robust, 0.1, 0.2)},
      {"discopop", of(loss_type::discopop)},   {"sft", of(loss_type::sft)}};
  for (const auto& d : divs)
    for (const auto& t : types) {
      dpo::loss_config c = t.second;
      c.divergence = d.second;
      c.alpha_divergence_coef = std::string(d.first) == "alpha1.3" ? 1.3 : 0.5;
      v.push_back({std::string(t.first) + "/" + d.first, c});
    }
  return v;
}

/// Combinations and options: MPO, WPO, LD-DPO, reference_free.
inline std::vector<named_config> combinations_and_options() {
  using dpo::loss_type;
  std::vector<named_config> v;
  dpo::loss_config mpo = dpo::loss_config::combination(
      {{loss_type::sigmoid, 0.8}, {loss_type::bco_pair, 0.2}, {loss_type::sft, 1.0}});
  v.push_back({"mpo", mpo});
  dpo::loss_config three = dpo::loss_config::combination(
      {{loss_type::ipo, 0.5}, {loss_type::aot, 0.3}, {loss_type::apo_zero, 1.5}, {loss_type::hinge, 0.25}});
  three.beta = 0.3;
  v.push_back({"ipo+aot+apo_zero+hinge", three});
  dpo::loss_config w = of(loss_type::sigmoid);
  w.use_weighting = true;
  v.push_back({"sigmoid+wpo", w});
  mpo.use_weighting = true;
  v.push_back({"mpo+wpo", mpo});
  dpo::loss_config ldd = of(loss_type::sigmoid);
  ldd.ld_alpha = 0.4;
  v.push_back({"sigmoid+ld_alpha", ldd});
  dpo::loss_config ldi = of(loss_type::ipo, 0.5);
  ldi.ld_alpha = 0.0;
  ldi.use_weighting = true;
  v.push_back({"ipo+ld_alpha0+wpo", ldi});
  // aot and aot_unpaired sort different keys: one configuration holding both (issue 16).
  dpo::loss_config both = dpo::loss_config::combination({{loss_type::aot, 0.7}, {loss_type::aot_unpaired, 0.4}});
  both.label_smoothing = 0.1;
  v.push_back({"aot+aot_unpaired", both});
  dpo::loss_config rf = of(loss_type::sigmoid);
  rf.reference_free = true;
  v.push_back({"sigmoid+reference_free", rf});
  dpo::loss_config rfa = of(loss_type::aot_unpaired, 0.1, 0.05);
  rfa.reference_free = true;
  v.push_back({"aot_unpaired+reference_free", rfa});
  return v;
}

inline std::vector<named_config> all_configs() {
  std::vector<named_config> v = every_loss_type();
  for (auto& c : every_f_divergence()) v.push_back(c);
  for (auto& c : combinations_and_options()) v.push_back(c);
  return v;
}

/// The configuration of all_configs() called `name` (a test failure when there is none).
inline const named_config& config_named(const std::string& name) {
  static const std::vector<named_config> all = all_configs();
  for (const auto& c : all)
    if (c.name == name) return c;
  FAIL("no configuration " << name);
  return all[0];
}

inline bool needs_reference(const dpo::loss_config& c) {
  const dpo::loss_type t = c.terms[0].type;
  return !c.reference_free && t != dpo::loss_type::simpo && t != dpo::loss_type::cpo &&
         t != dpo::loss_type::orpo;
}

/// Round-off bound of one token's log-prob computed in accumulation type A (unit roundoff
/// u): the exponentials (~2 ulp each, plus the rounding of z - max, which weighs at most
/// u * entropy <= u log2 V on the sum), the lane sums (V / 16 sequential adds per lane, then
/// the pairwise fold), log(s), and the roundings of lse and of z[y] - lse; times 2 for
/// safety. The oracle reads the same (already rounded) inputs, so the input rounding of
/// bf16 / fp16 logits is not part of the error: what is left is the accumulation's.
template <class A>
double token_tol(std::int64_t V, double lse, double logp) {
  const double u = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  const double v = static_cast<double>(V);
  return 2.0 * u * (8.0 + v / 16.0 + 3.0 * std::log2(v) + std::fabs(lse) + std::fabs(logp));
}

/// |a - b| <= tol, with a readable failure.
inline bool near(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol;
}


/// What one forward check runs: the layout and memory options of the buffers.
struct run_options {
  layout kind = layout::padded;
  std::int64_t stride_extra = 0;
  bool explicit_mask = false;
  std::int64_t ignore_index = -100;
  int threads = 1;
  bool metrics = true;
};

/// Reference log-probs for a configuration: random ones near the policy's, or none
/// (reference-free losses take null).
struct reference {
  std::vector<double> c, r;
  const double* pc() const { return c.empty() ? nullptr : c.data(); }
  const double* pr() const { return r.empty() ? nullptr : r.data(); }
};

inline reference make_reference(const dpo::loss_config& cfg, const oracle::batch& b, std::uint64_t seed) {
  reference ref;
  if (needs_reference(cfg) || cfg.reference_free) random_reference(b, cfg.ld_alpha, seed, ref.c, ref.r);
  return ref;
}

/// The tolerances of a forward result computed from batch b in accumulation type A.
struct forward_tol {
  double tok;  // one token's log-prob (and entropy, mean logit, WPO term)
  double seq;  // a sequence sum
};

template <class A>
forward_tol tolerances(const oracle::batch& b) {
  const std::int64_t V = static_cast<std::int64_t>(b.chosen[0].z[0].size());
  forward_tol t{0, 0};
  for (auto* side : {&b.chosen, &b.rejected})
    for (const oracle::sequence& s : *side) {
      double seq = 0;
      for (const oracle::token& k : oracle::tokens_of(s)) {
        if (!k.active || !std::isfinite(double(k.logp))) continue;
        const double tok = token_tol<A>(V, double(k.lse), double(k.logp));
        t.tok = std::max(t.tok, tok);
        seq += tok;
      }
      t.seq = std::max(t.seq, seq);
    }
  return t;
}

/// Compares a forward_result with the oracle's. Loss tolerances follow from the sequence
/// tolerance through the loss's sensitivity |dL/dpi| (the library's own gradients, which
/// the backward tests check against finite differences) plus the WPO weights' relative
/// error.
/// `ties` says rewards may tie exactly (margin 0), where rewards/accuracies hangs on the
/// last bit of each side's rounding and is not compared.
inline void compare_forward(const dpo::cpu::forward_result& r, const oracle::result& o, const forward_tol& t,
                            const dpo::loss_config& cfg, bool metrics, bool ties = false) {
  const std::size_t P = o.pi_c.size();
  REQUIRE(static_cast<std::size_t>(r.losses.size()) == P);
  double sens = 0, sens_max = 0, nc = 0;
  for (std::size_t i = 0; i < P; ++i) {
    sens += std::fabs(r.grad_chosen[i]) + std::fabs(r.grad_rejected[i]);
    sens_max = std::max(sens_max, std::fabs(r.grad_chosen[i]) + std::fabs(r.grad_rejected[i]));
    nc += r.chosen_tokens[i];
  }
  sens += std::fabs(r.nll_token_grad) * nc;
  const double wrel = cfg.use_weighting ? 4 * t.tok : 0.0;
  const double loss_tol = t.seq * sens + wrel * std::fabs(double(o.loss)) + 1e-14 * (1 + std::fabs(double(o.loss)));
  CHECK(near(r.loss, double(o.loss), loss_tol));
  for (std::size_t i = 0; i < P; ++i) {
    INFO("pair " << i);
    const double pt = t.seq * (P * sens_max + std::fabs(r.nll_token_grad) * nc * P) +
                      wrel * std::fabs(double(o.losses[i])) + 1e-14 * (1 + std::fabs(double(o.losses[i])));
    CHECK(near(r.losses[i], double(o.losses[i]), pt));
    CHECK(near(r.chosen_logps[i], double(o.pi_c[i]), t.seq));
    CHECK(near(r.rejected_logps[i], double(o.pi_r[i]), t.seq));
    CHECK(r.chosen_tokens[i] == double(o.len_c[i]));
    CHECK(r.rejected_tokens[i] == double(o.len_r[i]));
    CHECK(near(r.weights[i], double(o.weights[i]), wrel * double(o.weights[i]) + 1e-15));
    CHECK(near(r.chosen_rewards[i], double(o.chosen_rewards[i]), cfg.beta * t.seq + 1e-14));
    CHECK(near(r.rejected_rewards[i], double(o.rejected_rewards[i]), cfg.beta * t.seq + 1e-14));
  }
  CHECK(near(r.metrics.rewards_chosen, double(o.rewards_chosen), cfg.beta * t.seq + 1e-14));
  CHECK(near(r.metrics.rewards_rejected, double(o.rewards_rejected), cfg.beta * t.seq + 1e-14));
  CHECK(near(r.metrics.rewards_margins, double(o.rewards_margins), 2 * cfg.beta * t.seq + 1e-14));
  if (!ties) CHECK(r.metrics.rewards_accuracies == double(o.rewards_accuracies));
  CHECK(near(r.metrics.logps_chosen, double(o.logps_chosen), t.seq));
  CHECK(near(r.metrics.logps_rejected, double(o.logps_rejected), t.seq));
  CHECK(near(r.metrics.nll_loss, double(o.nll_loss), t.tok));
  if (metrics) {
    CHECK(near(r.metrics.logits_chosen, double(o.logits_chosen), t.tok));
    CHECK(near(r.metrics.logits_rejected, double(o.logits_rejected), t.tok));
    CHECK(near(r.metrics.entropy, double(o.entropy), t.tok));
    CHECK(r.metrics.mean_token_accuracy == double(o.mean_token_accuracy));
  }
}

/// Lays out b (already rounded to T) as `opt` says, runs dpo_forward and compares.
template <class T, class L>
dpo::cpu::forward_result check_forward(const named_config& nc, const oracle::batch& b, const run_options& opt,
                                       std::uint64_t seed = 7) {
  INFO(nc.name << " layout " << name_of(opt.kind) << " stride+" << opt.stride_extra
               << (opt.explicit_mask ? " mask" : "") << " ignore " << opt.ignore_index);
  buffers<T, L> buf(b, opt.kind, opt.stride_extra, opt.explicit_mask, opt.ignore_index);
  const reference ref = make_reference(nc.cfg, b, seed);
  dpo::cpu::options o;
  o.num_threads = opt.threads;
  o.metrics = opt.metrics;
  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(buf.view(), ref.pc(), ref.pr(), nc.cfg, o);
  const oracle::result want = oracle::forward(nc.cfg, b, to_ld(ref.c), to_ld(ref.r));
  compare_forward(r, want, tolerances<dpo::cpu::acc_t<T>>(b), nc.cfg, opt.metrics || nc.cfg.use_weighting);
  return r;
}

/// Relative rounding of a gradient written as T, and the absolute floor of its subnormals.
template <class T>
double output_rel() {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) return 0x1p-8;
  if constexpr (std::is_same_v<T, Eigen::half>) return 0x1p-11;
  if constexpr (std::is_same_v<T, float>) return 0x1p-24;
  return 0.0;
}
template <class T>
double output_floor() {
  return std::is_same_v<T, Eigen::half> ? 0x1p-24 : 0.0;
}

/// Compares the gradient in `buf` (grad buffers, or the logits when in place) with the
/// oracle's finite differences `want`. An element's error is the rounding to T, plus the
/// row coefficient dL/dlogp_t times the relative error of the softmax (one token's
/// tolerance) and of the coefficient itself (a sequence's), plus the differences' own error.
/// Masked rows must be exactly 0; columns [V, stride) untouched.
template <class T, class L>
void compare_grad(const buffers<T, L>& buf, const dpo::cpu::forward_result& r, const oracle::batch& b,
                  const oracle::grads& want, bool in_place, double scale = 1.0) {
  using A = dpo::cpu::acc_t<T>;
  const forward_tol t = tolerances<A>(b);
  const double fd_rel = 1e-7, fd_abs = 1e-9;
  for (int side = 0; side < 2; ++side) {
    const std::vector<oracle::sequence>& seqs = side == 0 ? b.chosen : b.rejected;
    const dpo::cpu::side_rows& rows = side == 0 ? r.chosen_rows : r.rejected_rows;
    for (std::int64_t i = 0; i < buf.P; ++i) {
      for (std::int64_t k = 0; k < seqs[i].rows(); ++k) {
        const std::int64_t row = buf.start[side][i] + k;
        const double coef = std::fabs(rows.coef[static_cast<std::size_t>(row - rows.row0)] * scale);
        INFO("side " << side << " pair " << i << " row " << k << " coef " << coef);
        for (std::int64_t v = 0; v < buf.V; ++v) {
          const double got = buf.at(in_place, side, i, k, v);
          if (seqs[i].y[k] < 0) {
            CHECK(got == 0.0);
            continue;
          }
          const double e = want[side][i][k][v] * scale;
          const double tol = (output_rel<T>() + fd_rel) * std::fabs(e) + coef * (t.tok + t.seq) +
                             output_floor<T>() + fd_abs;
          if (!near(got, e, tol)) {
            FAIL_CHECK("v " << v << ": got " << got << " want " << e << " tol " << tol);
          }
        }
        const int bi = buf.buf[side][i];
        const std::vector<T>& g = in_place ? (bi == 0 ? buf.logits : buf.logits_r) : (bi == 0 ? buf.grad : buf.grad_r);
        for (std::int64_t v = buf.V; v < buf.stride; ++v) {
          const double x = static_cast<double>(static_cast<A>(g[static_cast<std::size_t>(row * buf.stride + v)]));
          // Untouched: the NaN the logits' padding holds, or the grad buffer's sentinel.
          if (in_place) {
            CHECK(std::isnan(x));
          } else {
            CHECK(x == static_cast<double>(static_cast<A>(buffers<T, L>::sentinel())));
          }
        }
      }
    }
  }
}

/// dpo_forward + dpo_backward (out of place or in place) against the oracle's gradient:
/// differences over every logit, or (`via_tokens`, for a large vocabulary) over every
/// token's log-prob times the log-softmax Jacobian.
template <class T, class L>
void check_backward(const named_config& nc, const oracle::batch& b, const run_options& opt, bool in_place,
                    bool via_tokens = false, double grad_output = 1.0) {
  INFO(nc.name << " layout " << name_of(opt.kind) << " stride+" << opt.stride_extra
               << (opt.explicit_mask ? " mask" : "") << (in_place ? " in place" : " out of place"));
  buffers<T, L> buf(b, opt.kind, opt.stride_extra, opt.explicit_mask, opt.ignore_index);
  const reference ref = make_reference(nc.cfg, b, 7);
  dpo::cpu::options o;
  o.num_threads = opt.threads;
  o.metrics = opt.metrics;
  const auto view = buf.view();
  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), nc.cfg, o);
  dpo::cpu::dpo_backward(view, r, in_place ? buf.inplace_view() : buf.grad_view(), grad_output, o);
  const oracle::grads want = via_tokens ? oracle::fd_via_tokens(nc.cfg, b, to_ld(ref.c), to_ld(ref.r))
                                        : oracle::fd_logits(nc.cfg, b, to_ld(ref.c), to_ld(ref.r));
  compare_grad(buf, r, b, want, in_place, grad_output);
}

/// Runs f and checks that it throws a dpo::error whose message contains `needle` (the
/// argument's name, say).
inline void expect_error(const std::function<void()>& f, const std::string& needle) {
  INFO("expected a dpo::error naming '" << needle << "'");
  bool thrown = false;
  try {
    f();
  } catch (const dpo::error& e) {
    thrown = true;
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
  CHECK(thrown);
}

/// Everything one run of forward, backward and sequence_logps writes.
template <class T>
struct run_outputs {
  dpo::cpu::forward_result r;
  std::vector<T> grad, grad_r;
  std::vector<double> sums, tok;
};

/// dpo_forward and dpo_backward of batch b laid out as k (row stride + stride_extra) on
/// `threads` threads, then sequence_logps over the chosen view (the whole buffer as one view
/// unless the layout is separate).
template <class T>
run_outputs<T> run_all(const named_config& nc, const oracle::batch& b, const reference& ref, layout k,
                       std::int64_t stride_extra, int threads, bool metrics = true) {
  buffers<T, std::int64_t> buf(b, k, stride_extra);
  dpo::cpu::options o;
  o.num_threads = threads;
  o.metrics = metrics;
  const auto view = buf.view();
  run_outputs<T> out;
  out.r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), nc.cfg, o);
  dpo::cpu::dpo_backward(view, out.r, buf.grad_view(), 1.0, o);
  out.grad = buf.grad;
  out.grad_r = buf.grad_r;
  auto v = view.chosen;
  if (k != layout::separate) v.num_seqs = 2 * buf.P;  // the whole buffer as one view
  out.sums.resize(static_cast<std::size_t>(v.num_seqs));
  out.tok.resize(static_cast<std::size_t>(v.row_end(v.num_seqs - 1) - v.row_begin(0)));
  std::vector<std::int64_t> counts(out.sums.size());
  dpo::cpu::sequence_logps(v, out.sums.data(), counts.data(), out.tok.data(), o);
  return out;
}

}  // namespace fixture
