// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU API: sequence log-probs, the pair-level loss, and the fused loss + metrics forward
// and gradient backward over the logits. Pipeline (mirrored by the CUDA backend):
//   rows:      one read of each logits row -> log-sum-exp, label log-prob, metric terms
//   sequences: ordered sums of the row values (LD-DPO weights applied here)
//   pairs:     losses, rewards, dL/dpi from dpo/core/pair_batch.hpp
//   rows:      backward, one more read and one write: coef * (onehot - softmax)
// Every stage is deterministic and independent of the thread count.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "dpo/core/pair_batch.hpp"
#include "dpo/cpu/check.hpp"
#include "dpo/cpu/parallel.hpp"
#include "dpo/cpu/rows.hpp"

namespace dpo {
namespace cpu {

/// Run-time options of the CPU entry points.
struct options {
  /// Worker threads over rows; 0 uses every hardware thread. Results are bitwise identical
  /// for every value.
  int num_threads = 0;
  /// Compute the logged metrics (entropy, logits mean, token accuracy) in the forward pass.
  /// They cost extra arithmetic per logit but no extra memory traffic.
  bool metrics = true;
};

/// The metrics TRL's DPOTrainer logs (docs/losses.md), from one pass over the logits.
struct metrics {
  double rewards_chosen = 0;      // mean beta * D_c
  double rewards_rejected = 0;    // mean beta * D_r
  double rewards_margins = 0;     // mean (beta * D_c - beta * D_r)
  double rewards_accuracies = 0;  // mean 1[beta * D_c > beta * D_r]
  double logps_chosen = 0;        // mean pi_c
  double logps_rejected = 0;      // mean pi_r
  double logits_chosen = 0;       // mean over chosen completion tokens of the row's mean logit
  double logits_rejected = 0;
  double entropy = 0;              // mean entropy over all completion tokens
  double mean_token_accuracy = 0;  // share of chosen completion tokens whose argmax is the label
  double nll_loss = 0;             // mean token cross-entropy over chosen completion tokens
};

/// Per-row values of one side, kept from the forward pass for the backward pass.
struct side_rows {
  std::int64_t row0 = 0;     // first row of the side's sequences in its buffer
  std::vector<double> lse;   // log-sum-exp of each row
  std::vector<double> logp;  // label log-prob of each row (0 for masked rows)
  std::vector<double> coef;  // dL/dlogp_t of each row, 0 for masked rows
};

/// Everything the forward pass produces. Pair vectors have P entries.
struct forward_result {
  double loss = 0;
  dpo::cpu::metrics metrics;
  Eigen::VectorXd losses;            // per-pair loss; the batch loss is their mean
  Eigen::VectorXd chosen_rewards;    // beta * (pi_c - rho_c)
  Eigen::VectorXd rejected_rewards;  // beta * (pi_r - rho_r)
  Eigen::VectorXd chosen_logps;      // pi_c (LD-DPO weighted when ld_alpha < 1)
  Eigen::VectorXd rejected_logps;    // pi_r
  Eigen::VectorXd chosen_tokens;     // completion-token counts L_c
  Eigen::VectorXd rejected_tokens;   // L_r
  Eigen::VectorXd weights;           // WPO weight W_i per pair (1 without use_weighting)
  Eigen::VectorXd grad_chosen;       // dL/dpi_c per pair
  Eigen::VectorXd grad_rejected;     // dL/dpi_r per pair
  double nll_token_grad = 0;         // dL/dlogp of each chosen completion token from NLL terms
  side_rows chosen_rows;             // per-row state for dpo_backward
  side_rows rejected_rows;
  std::int64_t vocab = 0;
};

namespace detail {

using dpo::detail::row_stats;

/// Per-row forward values of one side.
struct row_values {
  std::vector<double> lse, logp, entropy, zmean, wpo;
  std::vector<std::uint8_t> hit;
  std::vector<std::int64_t> target;
};

template <bool Metrics, class T, class L>
void forward_rows_impl(const token_view<T, L>& v, row_values& out, int threads) {
  using A = acc_t<T>;
  const std::int64_t r0 = v.row_begin(0), r1 = v.row_end(v.num_seqs - 1);
  const std::int64_t n = r1 - r0;
  out.lse.assign(n, 0.0);
  out.logp.assign(n, 0.0);
  out.target.assign(n, -1);
  if (Metrics) {
    out.entropy.assign(n, 0.0);
    out.zmean.assign(n, 0.0);
    out.wpo.assign(n, 0.0);
    out.hit.assign(n, 0);
  }
  parallel_for(n, threads, [&](std::int64_t b, std::int64_t e) {
    row_scratch<A> scratch;
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t r = r0 + i;
      if (!v.in_sequence(r)) continue;  // a gap row: target stays -1, nothing is read
      const std::int64_t y = v.target(r);
      out.target[i] = y;
      if (y < 0) continue;  // masked rows are never read
      const T* z = v.logits + r * v.row_stride;
      const row_stats<A> st = row_forward<Metrics>(z, v.vocab, scratch);
      // Both from m and log(s) apart, never z - lse: lse rounds at the scale of m.
      const double lp = st.log_softmax(to_acc<A>(z[y]));
      out.lse[i] = st.logsumexp_double();
      out.logp[i] = lp;
      if (Metrics) {
        out.entropy[i] = st.entropy();
        out.zmean[i] = st.zsum / static_cast<A>(v.vocab);
        // WPO's per-token term: logp - log sum_v p_v^2 = logp - (lse(2z) - 2 lse(z)).
        out.wpo[i] = lp - st.log_sum_p2();
        out.hit[i] = st.argmax == y ? 1 : 0;
      }
    }
  });
}

template <class T, class L>
void forward_rows(const token_view<T, L>& v, row_values& out, bool metrics, int threads) {
  if (v.num_seqs == 0) return;
  if (metrics) {
    forward_rows_impl<true>(v, out, threads);
  } else {
    forward_rows_impl<false>(v, out, threads);
  }
}

/// Completion-token count of each sequence (labels only, no logits read).
template <class T, class L>
std::vector<double> token_counts(const token_view<T, L>& v) {
  std::vector<double> n(static_cast<std::size_t>(v.num_seqs), 0.0);
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    std::int64_t c = 0;
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) c += v.target(r) >= 0 ? 1 : 0;
    n[s] = static_cast<double>(c);
  }
  return n;
}

/// LD-DPO weight of the j-th (0-based) completion token of a sequence whose pair shares
/// `shared` tokens: 1 inside the shared length, ld_alpha past it.
inline double ld_weight(std::int64_t j, double shared, double ld_alpha) {
  return static_cast<double>(j) < shared ? 1.0 : ld_alpha;
}

/// Sums of row values over each sequence, in row order (so deterministic).
struct seq_sums {
  std::vector<double> logp;     // LD-weighted when ld_alpha < 1
  std::vector<double> logp_plain;
  std::vector<double> entropy, zmean, wpo, hit;
};

template <class T, class L>
seq_sums sum_sequences(const token_view<T, L>& v, const row_values& rows,
                       const std::vector<double>& shared, double ld_alpha, bool metrics) {
  seq_sums out;
  const std::size_t P = static_cast<std::size_t>(v.num_seqs);
  out.logp.assign(P, 0.0);
  out.logp_plain.assign(P, 0.0);
  if (metrics) {
    out.entropy.assign(P, 0.0);
    out.zmean.assign(P, 0.0);
    out.wpo.assign(P, 0.0);
    out.hit.assign(P, 0.0);
  }
  if (v.num_seqs == 0) return out;
  const std::int64_t r0 = v.row_begin(0);
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    std::int64_t j = 0;
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
      const std::size_t i = static_cast<std::size_t>(r - r0);
      if (rows.target[i] < 0) continue;
      out.logp[s] += dpo::detail::times(ld_weight(j, shared[s], ld_alpha), rows.logp[i]);
      out.logp_plain[s] += rows.logp[i];
      if (metrics) {
        out.entropy[s] += rows.entropy[i];
        out.zmean[s] += rows.zmean[i];
        out.wpo[s] += rows.wpo[i];
        out.hit[s] += rows.hit[i];
      }
      ++j;
    }
  }
  return out;
}

/// The LD-DPO shared length of each pair (min of the two counts); +inf disables LD-DPO.
inline std::vector<double> shared_lengths(const std::vector<double>& nc,
                                          const std::vector<double>& nr, double ld_alpha) {
  std::vector<double> s(nc.size(), INFINITY);
  if (ld_alpha != 1.0)
    for (std::size_t i = 0; i < nc.size(); ++i) s[i] = std::min(nc[i], nr[i]);
  return s;
}

/// One batch term's keys, sorted, and ranks (stable ascending, NaN last).
struct aot_scratch {
  std::vector<double> a, b, sa, sb;
  std::vector<std::int64_t> ra, rb;
};

inline void sort_with_ranks(const std::vector<double>& x, std::vector<double>& sorted,
                            std::vector<std::int64_t>& rank) {
  const std::size_t n = x.size();
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) {
    const double xi = x[i], xj = x[j];
    if (xi != xi) return false;
    if (xj != xj) return true;
    return xi < xj;
  });
  sorted.resize(n);
  rank.resize(n);
  for (std::size_t k = 0; k < n; ++k) {
    sorted[k] = x[order[k]];
    rank[order[k]] = static_cast<std::int64_t>(k);
  }
}

/// Runs the pair stage over a batch: per-pair losses, rewards, dL/dpi. `in` has every
/// per-pair pointer and the batch scalars set except the aot fields, which this fills.
inline void run_pairs(const loss_config& c, dpo::detail::pair_batch_in in, forward_result& r) {
  const std::int64_t P = in.num_pairs;
  // aot and aot_unpaired sort different keys: each present type gets its own sort.
  aot_scratch aot[2];
  for (const loss_type t : {loss_type::aot, loss_type::aot_unpaired}) {
    if (!dpo::detail::has_term(c, t)) continue;
    aot_scratch& s = aot[dpo::detail::batch_sort_index(t)];
    s.a.resize(P);
    s.b.resize(P);
    for (std::int64_t i = 0; i < P; ++i)
      dpo::detail::aot_keys(c, dpo::detail::pair_at(in, i), t, &s.a[i], &s.b[i]);
    sort_with_ranks(s.a, s.sa, s.ra);
    sort_with_ranks(s.b, s.sb, s.rb);
    dpo::detail::batch_sort& so = in.sorts[dpo::detail::batch_sort_index(t)];
    so.sorted_a = s.sa.data();
    so.sorted_b = s.sb.data();
    so.rank_a = s.ra.data();
    so.rank_b = s.rb.data();
  }
  r.losses.resize(P);
  r.chosen_rewards.resize(P);
  r.rejected_rewards.resize(P);
  r.grad_chosen.resize(P);
  r.grad_rejected.resize(P);
  double total = 0.0;
  for (std::int64_t i = 0; i < P; ++i) {
    const dpo::detail::pair_contribution pc = dpo::detail::contribution(c, in, i);
    r.losses[i] = pc.loss;
    r.grad_chosen[i] = pc.g_c;
    r.grad_rejected[i] = pc.g_r;
    dpo::detail::pair_rewards(c, dpo::detail::pair_at(in, i), &r.chosen_rewards[i],
                              &r.rejected_rewards[i]);
    total += pc.loss;
  }
  r.loss = total / static_cast<double>(P);
  double sc = 0, sr = 0, acc = 0;
  for (std::int64_t i = 0; i < P; ++i) {
    sc += r.chosen_rewards[i];
    sr += r.rejected_rewards[i];
    acc += r.chosen_rewards[i] > r.rejected_rewards[i] ? 1.0 : 0.0;
  }
  r.metrics.rewards_chosen = sc / P;
  r.metrics.rewards_rejected = sr / P;
  r.metrics.rewards_margins = (sc - sr) / P;
  r.metrics.rewards_accuracies = acc / P;
}

/// dL/dlogp_t of each row of one side: g_seq * LD weight + NLL share (chosen side only);
/// exactly 0 on masked rows.
template <class T, class L>
void row_coefficients(const token_view<T, L>& v, const row_values& rows,
                      const Eigen::VectorXd& g_seq, const std::vector<double>& shared,
                      double ld_alpha, double nll_grad, side_rows& out) {
  out.row0 = v.row_begin(0);
  out.lse = rows.lse;
  out.logp = rows.logp;
  out.coef.assign(rows.target.size(), 0.0);
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    std::int64_t j = 0;
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
      const std::size_t i = static_cast<std::size_t>(r - out.row0);
      if (rows.target[i] < 0) continue;
      // An LD-DPO weight of 0 drops the token even where g_seq is infinite.
      out.coef[i] = dpo::detail::times(ld_weight(j, shared[s], ld_alpha), g_seq[s]) + nll_grad;
      ++j;
    }
  }
}

}  // namespace detail

/// Per-sequence log-probs (forward only, e.g. the reference model), with the per-row
/// log-sum-exp that sequence_logps_backward reads.
///
/// `in`: any token_view (padded, with or without gaps, or packed; T = float, double,
/// Eigen::half, Eigen::bfloat16; L = int32 or int64). Writes sums[s] = sum of
/// completion-token log-probs of sequence s (accumulated in fp32 per row, fp64 for double
/// input, summed in fp64) and counts[s] = its completion-token count ([num_seqs] each).
/// Optional outputs (null: not written), [row_end(num_seqs - 1) - row_begin(0)] doubles
/// for token_logps, and for row_lse an array indexed by the logits buffer's row (as the
/// gradient), so at least row_end(num_seqs - 1) doubles:
///   token_logps[r - row_begin(0)]  the log-prob of row r (0 for non-completion rows);
///   row_lse[r]                     the row's log-sum-exp, max + log(sum), formed in double
///                                  from the accumulation type's max and sum; 0 for
///                                  non-completion rows.
/// Only rows of the view's sequences are written (not the gaps of a padded view with
/// seq_stride > seq_len, nor packed rows outside every sequence). Deterministic and
/// independent of options::num_threads; throws dpo::error (writing nothing) on bad input.
template <class T, class L>
void sequence_logps(const token_view<T, L>& in, double* sums, std::int64_t* counts,
                    double* token_logps, double* row_lse, const options& opt = {}) {
  detail::check_view(in, "logits");
  if (in.num_seqs > 0 && (sums == nullptr || counts == nullptr))
    dpo::detail::fail(sums == nullptr ? "sums" : "counts", " is null");
  if (in.num_seqs == 0) return;
  detail::row_values rows;
  detail::forward_rows(in, rows, false, opt.num_threads);
  const std::vector<double> none(static_cast<std::size_t>(in.num_seqs), INFINITY);
  const detail::seq_sums s = detail::sum_sequences(in, rows, none, 1.0, false);
  const std::vector<double> n = detail::token_counts(in);
  for (std::int64_t i = 0; i < in.num_seqs; ++i) {
    sums[i] = s.logp[i];
    counts[i] = static_cast<std::int64_t>(n[i]);
  }
  if (token_logps == nullptr && row_lse == nullptr) return;
  const std::int64_t r0 = in.row_begin(0);
  for (std::int64_t q = 0; q < in.num_seqs; ++q) {
    for (std::int64_t r = in.row_begin(q); r < in.row_end(q); ++r) {
      const std::size_t i = static_cast<std::size_t>(r - r0);
      if (token_logps != nullptr) token_logps[i] = rows.logp[i];
      if (row_lse != nullptr) row_lse[r] = rows.lse[i];
    }
  }
}

/// sequence_logps without row_lse.
template <class T, class L>
void sequence_logps(const token_view<T, L>& in, double* sums, std::int64_t* counts,
                    double* token_logps = nullptr, const options& opt = {}) {
  sequence_logps(in, sums, counts, token_logps, static_cast<double*>(nullptr), opt);
}

/// The gradient of sum_s seq_grad[s] * sums[s] (sums of sequence_logps) with respect to the
/// logits: row r of sequence s gets seq_grad[s] * (onehot(y_r) - softmax(z_r)) on completion
/// rows and exact zeros on the sequence's other rows, rounded to T. Averaged log-probs
/// (sums[s] / counts[s]) are the caller's: pass seq_grad[s] / max(counts[s], 1).
///
/// `in` as given to sequence_logps; row_lse: its row_lse output (indexed by the buffer's
/// row; only completion rows are read); seq_grad: [num_seqs] doubles; grad: rows indexed as
/// the logits, `grad_stride` >= vocab elements apart (columns [vocab, grad_stride) are not
/// touched). Only rows of the view's sequences are written: gap rows of a padded view and
/// packed rows outside every sequence keep their contents. In place when grad == in.logits
/// and grad_stride == in.row_stride (the logits are overwritten); any other overlap of grad
/// and the logits rows is rejected. One read of the logits rows, one write of the gradient.
/// A row whose seq_grad is 0 gets zeros without being read (NaN logits there give 0).
/// Deterministic and independent of options::num_threads; throws dpo::error (writing
/// nothing) on bad input.
template <class T, class L>
void sequence_logps_backward(const token_view<T, L>& in, const double* row_lse,
                             const double* seq_grad, T* grad, std::int64_t grad_stride,
                             const options& opt = {}) {
  using A = acc_t<T>;
  detail::check_view(in, "logits");
  if (in.num_seqs > 0 && seq_grad == nullptr) dpo::detail::fail("seq_grad is null");
  detail::check_seq_grad(in, row_lse, seq_grad, grad, grad_stride);
  if (!detail::has_rows(in)) return;
  const std::int64_t r0 = in.row_begin(0);
  const std::int64_t n = in.row_end(in.num_seqs - 1) - r0;
  detail::parallel_for(n, opt.num_threads, [&](std::int64_t b, std::int64_t e) {
    detail::row_scratch<A> scratch;
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t r = r0 + i;
      if (!in.in_sequence(r)) continue;
      const std::int64_t y = in.target(r);
      const A coef = y >= 0 ? static_cast<A>(seq_grad[in.seq_of_row(r)]) : A(0);
      detail::row_backward<T, A>(in.logits + r * in.row_stride, grad + r * grad_stride, in.vocab,
                                 y >= 0 ? row_lse[r] : 0.0, coef, y, scratch);
    }
  });
}

/// Sequence log-probs of both sides of a batch of pairs, with LD-DPO weighting when
/// ld_alpha < 1 (use this for the reference model so policy and reference are weighted
/// alike). Writes chosen[i], rejected[i] for i < P. Throws dpo::error on bad input.
template <class T, class L>
void pair_logps(const pair_view<T, L>& in, double ld_alpha, double* chosen, double* rejected,
                const options& opt = {}) {
  detail::check_pairs(in, "logits");
  detail::check_unit(ld_alpha, "ld_alpha");
  if (chosen == nullptr || rejected == nullptr)
    dpo::detail::fail(chosen == nullptr ? "chosen" : "rejected", " is null");
  detail::row_values rc, rr;
  detail::forward_rows(in.chosen, rc, false, opt.num_threads);
  detail::forward_rows(in.rejected, rr, false, opt.num_threads);
  const std::vector<double> shared = detail::shared_lengths(
      detail::token_counts(in.chosen), detail::token_counts(in.rejected), ld_alpha);
  const detail::seq_sums sc = detail::sum_sequences(in.chosen, rc, shared, ld_alpha, false);
  const detail::seq_sums sr = detail::sum_sequences(in.rejected, rr, shared, ld_alpha, false);
  std::copy(sc.logp.begin(), sc.logp.end(), chosen);
  std::copy(sr.logp.begin(), sr.logp.end(), rejected);
}

/// The pair loss's sequence-level inputs (see dpo/core/layout.hpp).
using dpo::pair_logps_in;


/// The pair-level loss from sequence log-probs: loss, per-pair losses, rewards and dL/dpi.
/// NLL terms (sft, cpo, orpo) take NLL(chosen) = -sum(chosen_logps) / sum(chosen_tokens).
/// Throws dpo::error on a bad configuration or null input. Deterministic.
inline forward_result dpo_loss(const pair_logps_in& in, const loss_config& cfg) {
  detail::check_config(cfg);
  detail::check_logps_in(in, cfg);
  const std::int64_t P = in.num_pairs;
  forward_result r;
  const std::vector<double> ones(static_cast<std::size_t>(P), 1.0);
  r.chosen_logps = Eigen::Map<const Eigen::VectorXd>(in.chosen_logps, P);
  r.rejected_logps = Eigen::Map<const Eigen::VectorXd>(in.rejected_logps, P);
  r.chosen_tokens = Eigen::Map<const Eigen::VectorXd>(in.chosen_tokens ? in.chosen_tokens : ones.data(), P);
  r.rejected_tokens =
      Eigen::Map<const Eigen::VectorXd>(in.rejected_tokens ? in.rejected_tokens : ones.data(), P);
  r.weights = Eigen::Map<const Eigen::VectorXd>(in.weights ? in.weights : ones.data(), P);
  dpo::detail::pair_batch_in b;
  b.num_pairs = P;
  b.pi_c = in.chosen_logps;
  b.pi_r = in.rejected_logps;
  b.rho_c = in.ref_chosen_logps;
  b.rho_r = in.ref_rejected_logps;
  b.len_c = r.chosen_tokens.data();
  b.len_r = r.rejected_tokens.data();
  b.weights = in.weights;
  const double tokens = r.chosen_tokens.sum();
  b.nll = -r.chosen_logps.sum() / dpo::detail::clamp_len(tokens);
  b.mean_weight = r.weights.mean();
  detail::run_pairs(cfg, b, r);
  r.nll_token_grad = dpo::detail::nll_token_grad(cfg, b.mean_weight, tokens);
  r.metrics.logps_chosen = r.chosen_logps.mean();
  r.metrics.logps_rejected = r.rejected_logps.mean();
  r.metrics.nll_loss = b.nll;
  return r;
}

/// The fused forward pass: per-token log-probs of the policy logits, their sequence sums,
/// the pair losses against the reference log-probs (P each; null for reference-free
/// losses) and every metric, with one read of the logits. The result also holds what
/// dpo_backward needs. Throws dpo::error (nothing computed) on bad input. NaN in a logits row
/// makes its sequence, its pair and the batch loss NaN; batch-coupled terms (sft, cpo, orpo,
/// aot, WPO) spread it to the whole batch, as their formulas do.
template <class T, class L>
forward_result dpo_forward(const pair_view<T, L>& policy, const double* ref_chosen,
                           const double* ref_rejected, const loss_config& cfg,
                           const options& opt = {}) {
  detail::check_config(cfg);
  detail::check_pairs(policy, "logits");
  detail::check_reference(cfg, ref_chosen, ref_rejected);
  const bool needs_ref = dpo::detail::needs_reference(cfg);
  const std::int64_t P = policy.num_pairs();
  const bool metrics = opt.metrics || cfg.use_weighting;
  detail::row_values rc, rr;
  detail::forward_rows(policy.chosen, rc, metrics, opt.num_threads);
  detail::forward_rows(policy.rejected, rr, metrics, opt.num_threads);
  const std::vector<double> nc = detail::token_counts(policy.chosen);
  const std::vector<double> nr = detail::token_counts(policy.rejected);
  const std::vector<double> shared = detail::shared_lengths(nc, nr, cfg.ld_alpha);
  const detail::seq_sums sc = detail::sum_sequences(policy.chosen, rc, shared, cfg.ld_alpha, metrics);
  const detail::seq_sums sr = detail::sum_sequences(policy.rejected, rr, shared, cfg.ld_alpha, metrics);

  forward_result r;
  r.vocab = policy.chosen.vocab;
  r.chosen_logps = Eigen::Map<const Eigen::VectorXd>(sc.logp.data(), P);
  r.rejected_logps = Eigen::Map<const Eigen::VectorXd>(sr.logp.data(), P);
  r.chosen_tokens = Eigen::Map<const Eigen::VectorXd>(nc.data(), P);
  r.rejected_tokens = Eigen::Map<const Eigen::VectorXd>(nr.data(), P);
  r.weights = Eigen::VectorXd::Ones(P);
  if (cfg.use_weighting) {
    for (std::int64_t i = 0; i < P; ++i) {
      const double wc = sc.wpo[i] / dpo::detail::clamp_len(nc[i]);
      const double wr = sr.wpo[i] / dpo::detail::clamp_len(nr[i]);
      r.weights[i] = std::exp(wc + wr);
    }
  }
  const double chosen_tokens = r.chosen_tokens.sum();
  const double plain_chosen = std::accumulate(sc.logp_plain.begin(), sc.logp_plain.end(), 0.0);
  dpo::detail::pair_batch_in b;
  b.num_pairs = P;
  b.pi_c = sc.logp.data();
  b.pi_r = sr.logp.data();
  b.rho_c = needs_ref ? ref_chosen : nullptr;
  b.rho_r = needs_ref ? ref_rejected : nullptr;
  b.len_c = nc.data();
  b.len_r = nr.data();
  b.weights = cfg.use_weighting ? r.weights.data() : nullptr;
  b.nll = -plain_chosen / dpo::detail::clamp_len(chosen_tokens);
  b.mean_weight = r.weights.mean();
  detail::run_pairs(cfg, b, r);
  r.nll_token_grad = dpo::detail::nll_token_grad(cfg, b.mean_weight, chosen_tokens);

  r.metrics.logps_chosen = r.chosen_logps.mean();
  r.metrics.logps_rejected = r.rejected_logps.mean();
  r.metrics.nll_loss = b.nll;
  if (metrics) {
    const double rejected_tokens = r.rejected_tokens.sum();
    const auto total = [](const std::vector<double>& x) {
      return std::accumulate(x.begin(), x.end(), 0.0);
    };
    const auto ratio = [](double num, double den) { return den > 0 ? num / den : 0.0; };
    r.metrics.logits_chosen = ratio(total(sc.zmean), chosen_tokens);
    r.metrics.logits_rejected = ratio(total(sr.zmean), rejected_tokens);
    r.metrics.entropy = ratio(total(sc.entropy) + total(sr.entropy), chosen_tokens + rejected_tokens);
    r.metrics.mean_token_accuracy = ratio(total(sc.hit), chosen_tokens);
  }
  detail::row_coefficients(policy.chosen, rc, r.grad_chosen, shared, cfg.ld_alpha,
                           r.nll_token_grad, r.chosen_rows);
  detail::row_coefficients(policy.rejected, rr, r.grad_rejected, shared, cfg.ld_alpha, 0.0,
                           r.rejected_rows);
  return r;
}

/// The fused forward pass with reference logits instead of reference log-probs: a
/// forward-only pass over `reference` (same layout and labels as `policy`, LD-DPO weighted
/// alike), then dpo_forward.
template <class T, class L>
forward_result dpo_forward(const pair_view<T, L>& policy, const pair_view<T, L>& reference,
                           const loss_config& cfg, const options& opt = {}) {
  detail::check_config(cfg);
  detail::check_pairs(reference, "ref_logits");
  detail::check_reference_pairs(policy, reference);
  std::vector<double> rc(static_cast<std::size_t>(reference.num_pairs()));
  std::vector<double> rr(rc.size());
  pair_logps(reference, cfg.ld_alpha, rc.data(), rr.data(), opt);
  return dpo_forward(policy, rc.data(), rr.data(), cfg, opt);
}

/// The gradient of grad_output * loss with respect to the policy logits, written to `grad`
/// (dtype T, one buffer per side, rows indexed as the side's logits; columns [vocab, stride)
/// untouched). In place when grad points at the logits with the same stride: the logits are
/// then overwritten. One read of the logits and one write of the gradient. Masked rows get
/// exact zeros; gap rows of a padded view (seq_stride > seq_len) are not written. Throws dpo::error (writing nothing) on bad input or unsupported aliasing.
template <class T, class L>
void dpo_backward(const pair_view<T, L>& policy, const forward_result& fwd,
                  const pair_grad_view<T>& grad, double grad_output = 1.0,
                  const options& opt = {}) {
  using A = acc_t<T>;
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  detail::check_finite(grad_output, "grad_output");
  if (fwd.vocab != policy.chosen.vocab || fwd.grad_chosen.size() != policy.num_pairs())
    dpo::detail::fail("forward_result does not match logits: it was computed for ",
                      fwd.grad_chosen.size(), " pairs and vocab ", fwd.vocab);
  // Both sides are checked before either is written, so a mismatch writes nothing.
  const auto check_rows = [](const token_view<T, L>& v, const side_rows& rows) {
    if (v.row_end(v.num_seqs - 1) - v.row_begin(0) != static_cast<std::int64_t>(rows.coef.size()) ||
        rows.row0 != v.row_begin(0))
      dpo::detail::fail("forward_result does not match logits: row ranges differ");
  };
  check_rows(policy.chosen, fwd.chosen_rows);
  check_rows(policy.rejected, fwd.rejected_rows);
  const auto side = [&](const token_view<T, L>& v, const side_rows& rows, T* g,
                        std::int64_t g_stride) {
    const std::int64_t n = static_cast<std::int64_t>(rows.coef.size());
    detail::parallel_for(n, opt.num_threads, [&](std::int64_t b, std::int64_t e) {
      detail::row_scratch<A> scratch;
      for (std::int64_t i = b; i < e; ++i) {
        const std::int64_t r = rows.row0 + i;
        if (!v.in_sequence(r)) continue;  // gap rows of a padded view are not written
        const A coef = static_cast<A>(rows.coef[i] * grad_output);
        detail::row_backward<T, A>(v.logits + r * v.row_stride, g + r * g_stride, v.vocab,
                                   rows.lse[i], coef, v.target(r), scratch);
      }
    });
  };
  side(policy.chosen, fwd.chosen_rows, grad.chosen, grad.chosen_stride);
  side(policy.rejected, fwd.rejected_rows, grad.rejected, grad.rejected_stride);
}

/// dpo_forward then dpo_backward: two reads and one write of the logits in all.
template <class T, class L>
forward_result dpo_forward_backward(const pair_view<T, L>& policy, const double* ref_chosen,
                                    const double* ref_rejected, const loss_config& cfg,
                                    const pair_grad_view<T>& grad, const options& opt = {}) {
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  forward_result r = dpo_forward(policy, ref_chosen, ref_rejected, cfg, opt);
  dpo_backward(policy, r, grad, 1.0, opt);
  return r;
}

/// dpo_forward_backward with reference logits instead of reference log-probs (as the
/// reference-logits dpo_forward): the gradient arguments are checked before either pass.
template <class T, class L>
forward_result dpo_forward_backward(const pair_view<T, L>& policy,
                                    const pair_view<T, L>& reference, const loss_config& cfg,
                                    const pair_grad_view<T>& grad, const options& opt = {}) {
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  forward_result r = dpo_forward(policy, reference, cfg, opt);
  dpo_backward(policy, r, grad, 1.0, opt);
  return r;
}

}  // namespace cpu
}  // namespace dpo
