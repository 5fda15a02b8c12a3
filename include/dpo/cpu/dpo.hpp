// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU API: sequence log-probs, the pair-level loss, and the fused loss + metrics forward
// and gradient backward over the logits. Pipeline (mirrored by the CUDA backend):
//   rows:      one read of each logits row -> log-sum-exp, label log-prob, metric terms
//   sequences: ordered sums of the row values (LD-DPO weights applied here)
//   pairs:     WPO weights, the pair batch, losses, rewards, dL/dpi from
//              dpo/core/pair_batch.hpp; metrics from dpo/core/metrics.hpp (named totals,
//              dpo::finalize)
//   rows:      backward, one more read and one write: coef * (onehot - softmax)
// Every stage is deterministic and independent of the thread count. The entry points write
// caller-owned outputs (dpo::forward_outputs, as the CUDA backend) or, as a convenience, an
// owned forward_result filled by the same code.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "dpo/core/metrics.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/pair_batch.hpp"
#include "dpo/cpu/check.hpp"
#include "dpo/cpu/parallel.hpp"
#include "dpo/cpu/rows.hpp"

namespace dpo {
namespace cpu {

/// Run-time options of the CPU entry points.
struct options {
  /// Worker threads over rows, from the library's persistent pool; 0 uses every hardware
  /// thread, and more than the hardware's are capped at it unless the environment variable
  /// DPO_THREAD_LIMIT allows more (docs/api.md). Results are bitwise identical for every value.
  int num_threads = 0;
  /// Compute the logged metrics (entropy, logits mean, token accuracy) in the forward pass.
  /// They cost extra arithmetic per logit but no extra memory traffic.
  bool metrics = true;
};

/// The metrics TRL's DPOTrainer logs (docs/losses.md), from one pass over the logits: the
/// core's unit (dpo/core/metrics.hpp), shared with the CUDA backend.
using metrics = dpo::metrics;

/// Where the caller-owned dpo_forward / dpo_loss write (host pointers, each may be null).
using dpo::forward_outputs;

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

  /// f(mine, part's) on each pair of row vectors, the metric ones only with `metrics`.
  template <class F>
  void zip(const row_values& part, bool metrics, F&& f) {
    f(lse, part.lse), f(logp, part.logp), f(target, part.target);
    if (metrics) f(entropy, part.entropy), f(zmean, part.zmean), f(wpo, part.wpo), f(hit, part.hit);
  }
  /// n rows of zeros (targets: `target_fill`); the metric rows only with `metrics`.
  void reset(std::int64_t n, bool metrics, std::int64_t target_fill) {
    zip(*this, metrics, [n](auto& v, const auto&) { v.assign(static_cast<std::size_t>(n), {}); });
    target.assign(static_cast<std::size_t>(n), target_fill);
  }
  /// Copies every row of `part` to rows [at, at + its size) (the metric rows only with `metrics`).
  void place(const row_values& part, std::int64_t at, bool metrics) {
    zip(part, metrics, [at](auto& v, const auto& p) { std::copy(p.begin(), p.end(), v.begin() + at); });
  }
};

template <bool Metrics, class T, class L>
void forward_rows_impl(const token_view<T, L>& v, row_values& out, int threads) {
  using A = acc_t<T>;
  const std::int64_t r0 = v.row_begin(0), r1 = v.row_end(v.num_seqs - 1);
  const std::int64_t n = r1 - r0;
  out.reset(n, Metrics, -1);
  parallel_blocks(n, threads, [&](std::int64_t b, std::int64_t e) {
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

  /// f(mine, part's) on each pair of sum vectors, the metric ones only with `metrics`.
  template <class F>
  void zip(const seq_sums& part, bool metrics, F&& f) {
    f(logp, part.logp), f(logp_plain, part.logp_plain);
    if (metrics) f(entropy, part.entropy), f(zmean, part.zmean), f(wpo, part.wpo), f(hit, part.hit);
  }
  /// n sequences of zeros; the metric sums only with `metrics`.
  void reset(std::size_t n, bool metrics) {
    zip(*this, metrics, [n](auto& v, const auto&) { v.assign(n, {}); });
  }
  /// Copies every sequence of `part` to [at, at + its size) (the metric sums only with `metrics`).
  void place(const seq_sums& part, std::int64_t at, bool metrics) {
    zip(part, metrics, [at](auto& v, const auto& p) { std::copy(p.begin(), p.end(), v.begin() + at); });
  }
};

template <class T, class L>
seq_sums sum_sequences(const token_view<T, L>& v, const row_values& rows,
                       const std::vector<double>& shared, double ld_alpha, bool metrics) {
  seq_sums out;
  const std::size_t P = static_cast<std::size_t>(v.num_seqs);
  out.reset(P, metrics);
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

/// Runs the pair stage over a batch: per-pair losses, rewards and dL/dpi (gc, gr: always
/// written; the other per-pair outputs of `o` where set). `in` has every per-pair pointer
/// and the batch scalars set except the aot fields, which this fills. Returns the pair
/// totals of the losses, rewards and accuracies (the log-prob sums are the caller's).
inline pair_totals run_pairs(const loss_config& c, dpo::detail::pair_batch_in in,
                             const forward_outputs& o, double* gc, double* gr) {
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
  pair_totals t{};
  for (std::int64_t i = 0; i < P; ++i) {
    const dpo::detail::pair_contribution pc = dpo::detail::contribution(c, in, i);
    double rc = 0.0, rr = 0.0;
    dpo::detail::pair_rewards(c, dpo::detail::pair_at(in, i), &rc, &rr);
    gc[i] = pc.g_c;
    gr[i] = pc.g_r;
    if (o.losses) o.losses[i] = pc.loss;
    if (o.chosen_rewards) o.chosen_rewards[i] = rc;
    if (o.rejected_rewards) o.rejected_rewards[i] = rr;
    if (o.grad_chosen) o.grad_chosen[i] = pc.g_c;
    if (o.grad_rejected) o.grad_rejected[i] = pc.g_r;
    t.add_pair(pc.loss, rc, rr, 0.0, 0.0);
  }
  return t;
}

/// Sum of a per-pair array in Eigen's (vectorised) order over an aligned copy, the CPU's
/// order for these sums whatever the alignment of x.
inline double pair_sum(const double* x, std::int64_t P) {
  return Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(x, P)).sum();
}

inline double total(const std::vector<double>& x) { return std::accumulate(x.begin(), x.end(), 0.0); }

/// The batch outputs every forward writes: loss, metrics, NLL token gradient.
inline void write_batch(const forward_outputs& o, pair_totals pt, const token_totals& tt,
                        const dpo::detail::pair_batch_in& b, const loss_config& cfg,
                        bool token_metrics) {
  const std::int64_t P = b.num_pairs;
  pt.logps_chosen = pair_sum(b.pi_c, P);
  pt.logps_rejected = pair_sum(b.pi_r, P);
  if (o.loss) *o.loss = pt.loss / static_cast<double>(P);
  if (o.metrics) *o.metrics = dpo::finalize(pt, tt, P, token_metrics);
  if (o.nll_token_grad)
    *o.nll_token_grad = dpo::detail::nll_token_grad(cfg, b.mean_weight, tt.chosen_tokens);
}

inline void copy_out(double* dst, const double* src, std::int64_t n) {
  if (dst != nullptr) std::copy(src, src + n, dst);
}

/// The sequence stage of a batch: completion-token counts, LD-DPO shared lengths and the
/// sums of each side's sequences. Reads only labels and row values (never the logits), so
/// the fused head (dpo/cpu/linear_dpo.hpp) runs it on its own row values.
struct batch_sequences {
  std::vector<double> nc, nr, shared;
  seq_sums sc, sr;
};

template <class T, class L>
batch_sequences sequence_stage(const pair_view<T, L>& policy, const row_values& rc,
                               const row_values& rr, double ld_alpha, bool metrics) {
  batch_sequences b;
  b.nc = token_counts(policy.chosen);
  b.nr = token_counts(policy.rejected);
  b.shared = shared_lengths(b.nc, b.nr, ld_alpha);
  b.sc = sum_sequences(policy.chosen, rc, b.shared, ld_alpha, metrics);
  b.sr = sum_sequences(policy.rejected, rr, b.shared, ld_alpha, metrics);
  return b;
}

/// The pair stage of a batch from its sequence stage: WPO weights, token totals, the pair
/// losses and dL/dpi (gc, gr: P each), and every batch output of `out`. Returns the NLL
/// terms' dL/dlogp of each chosen completion token.
inline double pair_stage(const batch_sequences& s, const double* ref_chosen,
                         const double* ref_rejected, const loss_config& cfg,
                         const forward_outputs& out, bool metrics, std::vector<double>& gc,
                         std::vector<double>& gr) {
  const bool needs_ref = dpo::detail::needs_reference(cfg);
  const std::int64_t P = static_cast<std::int64_t>(s.nc.size());
  std::vector<double> W(static_cast<std::size_t>(P), 1.0);
  if (cfg.use_weighting)
    for (std::int64_t i = 0; i < P; ++i)
      W[i] = dpo::detail::wpo_weight(s.sc.wpo[i], s.nc[i], s.sr.wpo[i], s.nr[i]);
  token_totals tt{};
  tt.chosen_tokens = total(s.nc);
  tt.rejected_tokens = total(s.nr);
  tt.chosen_logps = total(s.sc.logp_plain);
  if (metrics) {
    tt.logits_chosen = total(s.sc.zmean);
    tt.logits_rejected = total(s.sr.zmean);
    tt.entropy = total(s.sc.entropy) + total(s.sr.entropy);
    tt.chosen_hits = total(s.sc.hit);
  }
  const dpo::detail::pair_batch_in b = dpo::detail::make_pair_batch(
      P, s.sc.logp.data(), s.sr.logp.data(), needs_ref ? ref_chosen : nullptr,
      needs_ref ? ref_rejected : nullptr, s.nc.data(), s.nr.data(),
      cfg.use_weighting ? W.data() : nullptr, tt, pair_sum(W.data(), P));
  gc.resize(static_cast<std::size_t>(P));
  gr.resize(gc.size());
  const pair_totals pt = run_pairs(cfg, b, out, gc.data(), gr.data());
  write_batch(out, pt, tt, b, cfg, metrics);
  copy_out(out.chosen_logps, s.sc.logp.data(), P);
  copy_out(out.rejected_logps, s.sr.logp.data(), P);
  copy_out(out.chosen_tokens, s.nc.data(), P);
  copy_out(out.rejected_tokens, s.nr.data(), P);
  copy_out(out.weights, W.data(), P);
  return dpo::detail::nll_token_grad(cfg, b.mean_weight, tt.chosen_tokens);
}

/// dL/dlogp of every row of a side's sequences: ld_weight(j) * g[s] + nll on the j-th
/// completion row of sequence s, 0 on other rows; fn(r, i, coef) with r the view's row and
/// i = r - row_begin(0). `target` and `shared` as the side's row values and shared lengths.
template <class T, class L, class Fn>
void side_coefs(const token_view<T, L>& v, const std::vector<std::int64_t>& target,
                const std::vector<double>& shared, double ld_alpha, const double* g, double nll,
                Fn&& fn) {
  const std::int64_t row0 = v.row_begin(0);
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    std::int64_t j = 0;
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
      const std::size_t i = static_cast<std::size_t>(r - row0);
      double coef = 0.0;
      if (target[i] >= 0) {
        // An LD-DPO weight of 0 drops the token even where g is infinite.
        coef = dpo::detail::times(ld_weight(j, shared[s], ld_alpha), g[s]) + nll;
        ++j;
      }
      fn(r, i, coef);
    }
  }
}

/// dpo_forward's pipeline: rows, sequences, the pair stage, the row coefficients. Writes
/// `out` (caller-owned) and, where rows is set, each side's per-row state in the owned
/// result's form (rows[0] chosen, rows[1] rejected). The arguments are checked.
template <class T, class L>
void forward_pipeline(const pair_view<T, L>& policy, const double* ref_chosen,
                      const double* ref_rejected, const loss_config& cfg,
                      const forward_outputs& out, const options& opt, side_rows* rows) {
  const bool metrics = opt.metrics || cfg.use_weighting;
  row_values rc, rr;
  forward_rows(policy.chosen, rc, metrics, opt.num_threads);
  forward_rows(policy.rejected, rr, metrics, opt.num_threads);
  const batch_sequences s = sequence_stage(policy, rc, rr, cfg.ld_alpha, metrics);
  std::vector<double> gc, gr;
  const double nll_grad = pair_stage(s, ref_chosen, ref_rejected, cfg, out, metrics, gc, gr);
  const auto side = [&](const token_view<T, L>& v, const row_values& rv, const std::vector<double>& g,
                        double nll, side_rows* keep) {
    if (keep != nullptr) {
      keep->row0 = v.row_begin(0);
      keep->lse = rv.lse;
      keep->logp = rv.logp;
      keep->coef.assign(rv.target.size(), 0.0);
    }
    side_coefs(v, rv.target, s.shared, cfg.ld_alpha, g.data(), nll,
               [&](std::int64_t r, std::size_t i, double coef) {
                 if (keep != nullptr) keep->coef[i] = coef;
                 if (out.row_lse != nullptr) out.row_lse[r] = rv.lse[i];
                 if (out.row_coef != nullptr) out.row_coef[r] = coef;
               });
  };
  side(policy.chosen, rc, gc, nll_grad, rows != nullptr ? &rows[0] : nullptr);
  side(policy.rejected, rr, gr, 0.0, rows != nullptr ? &rows[1] : nullptr);
}

/// The backward of one side: coef * (onehot - softmax) per row of its sequences, rounded to
/// T; lse_at(r, i) and coef_at(r, i) give the row's state (r: buffer row, i: r - row0).
/// Gap rows (outside every sequence) are not written.
template <class T, class L, class Lse, class Coef>
void backward_side(const token_view<T, L>& v, Lse lse_at, Coef coef_at, double grad_output,
                   T* g, std::int64_t g_stride, int threads) {
  using A = acc_t<T>;
  if (v.num_seqs == 0) return;
  const std::int64_t row0 = v.row_begin(0);
  const std::int64_t n = v.row_end(v.num_seqs - 1) - row0;
  parallel_blocks(n, threads, [&](std::int64_t b, std::int64_t e) {
    row_scratch<A> scratch;
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t r = row0 + i;
      if (!v.in_sequence(r)) continue;
      const A coef = static_cast<A>(dpo::detail::times(coef_at(r, i), grad_output));
      row_backward<T, A>(v.logits + r * v.row_stride, g + r * g_stride, v.vocab, lse_at(r, i), coef,
                         v.target(r), scratch);
    }
  });
}

/// Row state indexed by the buffer's row (forward_outputs::row_lse / row_coef) needs one
/// logits buffer for both sides, each side on rows of its own: otherwise the row indices
/// would collide (dpo::detail::check_row_state).
template <class T, class L>
void check_one_buffer(const pair_view<T, L>& policy, const char* what) {
  throw_if(dpo::detail::check_row_state(policy, what, "logits", "use the owned forward_result and dpo_backward",
                                        dpo::detail::cpu_policy()));
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
  detail::throw_if(dpo::detail::check_sequence_outputs(in, sums, counts, token_logps, row_lse, nullptr, 0,
                                                       dpo::detail::cpu_policy()));
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
  detail::parallel_blocks(n, opt.num_threads, [&](std::int64_t b, std::int64_t e) {
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
  detail::throw_if(dpo::detail::check_pair_logps_outputs(in, chosen, rejected, nullptr, 0, dpo::detail::cpu_policy()));
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


/// The pair-level loss from sequence log-probs into caller-owned outputs (host pointers,
/// each may be null; the token metrics and row state are not written: the metrics' token
/// fields are 0). Per-pair outputs have P entries: losses, rewards and dL/dpi; chosen_logps
/// etc. are copies of the inputs (tokens and weights: 1 where null). NLL terms (sft, cpo,
/// orpo) take NLL(chosen) = -sum(chosen_logps) / sum(chosen_tokens). The outputs may overlap
/// neither each other nor the reference log-probs. Throws dpo::error (writing nothing) on a
/// bad configuration, null input, a token count that is negative or not finite, or
/// overlapping outputs. Deterministic. Mirrors dpo::cuda::dpo_loss.
inline void dpo_loss(const pair_logps_in& in, const loss_config& cfg, const forward_outputs& out) {
  detail::check_config(cfg);
  detail::check_logps_in(in, cfg);
  const std::int64_t P = in.num_pairs;
  detail::throw_if(dpo::detail::check_token_counts(in.chosen_tokens, P, "chosen_tokens"));
  detail::throw_if(dpo::detail::check_token_counts(in.rejected_tokens, P, "rejected_tokens"));
  // Outputs on each other and on the reference log-probs (read where they are): the policy's
  // inputs are copied first (out.chosen_logps may be in.chosen_logps itself).
  {
    const dpo::detail::named_range ins[2] = {dpo::detail::range_of(in.ref_chosen_logps, 1, P, P, "ref_chosen_logps"),
                                             dpo::detail::range_of(in.ref_rejected_logps, 1, P, P, "ref_rejected_logps")};
    detail::throw_if(dpo::detail::check_forward_outputs(out, P, 0, ins, 2));
  }
  // Aligned copies: the sums then take Eigen's order whatever the caller's alignment.
  const auto vec = [P](const double* x) {
    return x != nullptr ? Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(x, P))
                        : Eigen::VectorXd(Eigen::VectorXd::Ones(P));
  };
  const Eigen::VectorXd lc = vec(in.chosen_logps), lr = vec(in.rejected_logps);
  const Eigen::VectorXd nc = vec(in.chosen_tokens), nr = vec(in.rejected_tokens);
  const Eigen::VectorXd W = vec(in.weights);
  token_totals tt{};
  tt.chosen_tokens = nc.sum();
  tt.rejected_tokens = nr.sum();
  tt.chosen_logps = lc.sum();
  const dpo::detail::pair_batch_in b = dpo::detail::make_pair_batch(
      P, lc.data(), lr.data(), in.ref_chosen_logps, in.ref_rejected_logps, nc.data(), nr.data(),
      in.weights != nullptr ? W.data() : nullptr, tt, W.sum());
  std::vector<double> gc(static_cast<std::size_t>(P)), gr(gc.size());
  const pair_totals pt = detail::run_pairs(cfg, b, out, gc.data(), gr.data());
  detail::write_batch(out, pt, tt, b, cfg, false);
  detail::copy_out(out.chosen_logps, lc.data(), P);
  detail::copy_out(out.rejected_logps, lr.data(), P);
  detail::copy_out(out.chosen_tokens, nc.data(), P);
  detail::copy_out(out.rejected_tokens, nr.data(), P);
  detail::copy_out(out.weights, W.data(), P);
}

namespace detail {

/// The owned result's per-pair vectors, sized for P pairs, as caller-owned outputs.
inline forward_outputs owned_outputs(forward_result& r, std::int64_t P) {
  forward_outputs o;
  o.loss = &r.loss;
  o.metrics = &r.metrics;
  o.nll_token_grad = &r.nll_token_grad;
#define DPO_DETAIL_BIND(name) \
  r.name.resize(P);           \
  o.name = r.name.data();
  DPO_PAIR_OUTPUTS(DPO_DETAIL_BIND)
#undef DPO_DETAIL_BIND
  return o;
}

}  // namespace detail

/// The pair-level loss from sequence log-probs: loss, per-pair losses, rewards and dL/dpi,
/// as an owned result (the caller-owned dpo_loss above, into its vectors).
/// Throws dpo::error on a bad configuration or null input. Deterministic.
inline forward_result dpo_loss(const pair_logps_in& in, const loss_config& cfg) {
  forward_result r;
  const std::int64_t P = in.num_pairs > 0 ? in.num_pairs : 0;
  dpo_loss(in, cfg, detail::owned_outputs(r, P));
  return r;
}

namespace detail {

template <class T, class L>
void check_forward_args(const pair_view<T, L>& policy, const double* ref_chosen,
                   const double* ref_rejected, const loss_config& cfg) {
  check_config(cfg);
  check_pairs(policy, "logits");
  check_reference(cfg, ref_chosen, ref_rejected);
}

/// A forward call's outputs may overlap neither each other nor its inputs: both sides'
/// logits rows, labels, mask and cu_seqlens (the core's view_ranges, as CUDA's), and the
/// reference log-probs (null for none). row_lse / row_coef span the buffer's rows up to the
/// last sequence's end.
template <class T, class L>
void check_forward_outputs(const pair_view<T, L>& p, const double* ref_chosen, const double* ref_rejected,
                           const forward_outputs& out) {
  const dpo::detail::check_policy pol = dpo::detail::cpu_policy();
  const std::int64_t P = p.num_pairs();
  dpo::detail::named_range ins[10];
  dpo::detail::view_ranges(p.chosen, pol, dpo::detail::pair_view_names[0], ins);
  dpo::detail::view_ranges(p.rejected, pol, dpo::detail::pair_view_names[1], ins + 4);
  ins[8] = dpo::detail::range_of(ref_chosen, 1, P, P, "ref_chosen_logps");
  ins[9] = dpo::detail::range_of(ref_rejected, 1, P, P, "ref_rejected_logps");
  const std::int64_t rows = std::max(dpo::detail::rows_of(p.chosen, pol).end, dpo::detail::rows_of(p.rejected, pol).end);
  throw_if(dpo::detail::check_forward_outputs(out, P, rows, ins, 10));
}

/// The reference-logits overloads' forward-only pass over `reference` (in its own dtype R):
/// its pair log-probs, LD-DPO weighted as the policy's.
template <class T, class R, class L>
void reference_logps(const pair_view<T, L>& policy, const pair_view<R, L>& reference,
                     const loss_config& cfg, const options& opt, std::vector<double>& rc,
                     std::vector<double>& rr) {
  check_config(cfg);
  check_pairs(reference, "ref_logits");
  check_reference_pairs(policy, reference);
  rc.resize(static_cast<std::size_t>(reference.num_pairs()));
  rr.resize(rc.size());
  pair_logps(reference, cfg.ld_alpha, rc.data(), rr.data(), opt);
}

}  // namespace detail

/// The fused forward pass into caller-owned outputs (host pointers, each may be null: not
/// written), mirroring dpo::cuda::dpo_forward minus workspace and stream: per-token
/// log-probs of the policy logits, their sequence sums, the pair losses against the
/// reference log-probs (P each; null for reference-free losses) and every metric, with one
/// read of the logits. out.row_lse / out.row_coef (at least row_end(last) doubles, indexed
/// by the logits buffer's row; entries of rows outside every sequence are not written) hold
/// what dpo_backward_rows needs; they need one logits buffer for both sides (padded or
/// packed pairs). Bitwise the same values as the owned-result dpo_forward. The outputs may
/// overlap neither each other nor the logits, labels or reference log-probs. Throws
/// dpo::error (nothing written) on bad input. Deterministic and independent of
/// options::num_threads.
template <class T, class L>
void dpo_forward(const pair_view<T, L>& policy, const double* ref_chosen,
                 const double* ref_rejected, const loss_config& cfg, const forward_outputs& out,
                 const options& opt = {}) {
  detail::check_forward_args(policy, ref_chosen, ref_rejected, cfg);
  if (out.row_lse != nullptr || out.row_coef != nullptr)
    detail::check_one_buffer(policy, "out.row_lse / out.row_coef");
  detail::check_forward_outputs(policy, ref_chosen, ref_rejected, out);
  detail::forward_pipeline(policy, ref_chosen, ref_rejected, cfg, out, opt, nullptr);
}

/// The caller-owned dpo_forward with reference logits instead of reference log-probs: a
/// forward-only pass over `reference` (same layout and labels as `policy`, LD-DPO weighted
/// alike; its own element type R, e.g. fp32 reference logits for a bf16 policy, read as they
/// are), then dpo_forward.
template <class T, class R, class L>
void dpo_forward(const pair_view<T, L>& policy, const pair_view<R, L>& reference,
                 const loss_config& cfg, const forward_outputs& out, const options& opt = {}) {
  std::vector<double> rc, rr;
  detail::check_pairs(policy, "logits");
  if (out.row_lse != nullptr || out.row_coef != nullptr)
    detail::check_one_buffer(policy, "out.row_lse / out.row_coef");
  detail::check_forward_outputs(policy, nullptr, nullptr, out);  // before the reference pass
  detail::reference_logps(policy, reference, cfg, opt, rc, rr);
  dpo_forward(policy, rc.data(), rr.data(), cfg, out, opt);
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
  detail::check_forward_args(policy, ref_chosen, ref_rejected, cfg);
  forward_result r;
  r.vocab = policy.chosen.vocab;
  side_rows rows[2];
  detail::forward_pipeline(policy, ref_chosen, ref_rejected, cfg,
                           detail::owned_outputs(r, policy.num_pairs()), opt, rows);
  r.chosen_rows = std::move(rows[0]);
  r.rejected_rows = std::move(rows[1]);
  return r;
}

/// The fused forward pass with reference logits instead of reference log-probs: a
/// forward-only pass over `reference` (same layout and labels as `policy`, LD-DPO weighted
/// alike; its own element type R, read as it is), then dpo_forward.
template <class T, class R, class L>
forward_result dpo_forward(const pair_view<T, L>& policy, const pair_view<R, L>& reference,
                           const loss_config& cfg, const options& opt = {}) {
  std::vector<double> rc, rr;
  detail::reference_logps(policy, reference, cfg, opt, rc, rr);
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
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  detail::check_grad_inputs(policy, grad);
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
    detail::backward_side(
        v, [&](std::int64_t, std::int64_t i) { return rows.lse[i]; },
        [&](std::int64_t, std::int64_t i) { return rows.coef[i]; }, grad_output, g, g_stride,
        opt.num_threads);
  };
  side(policy.chosen, fwd.chosen_rows, grad.chosen, grad.chosen_stride);
  side(policy.rejected, fwd.rejected_rows, grad.rejected, grad.rejected_stride);
}

/// The gradient of grad_output * loss from per-row state the caller kept (out.row_lse and
/// out.row_coef of a caller-owned dpo_forward, indexed by the logits buffer's row), as
/// dpo::cuda::dpo_backward_rows: nothing else has to stay between forward and backward.
/// Same writes, aliasing rules and determinism as dpo_backward (bitwise the same gradient
/// from the same forward); rows whose label is masked get zeros without reading their
/// state. Throws dpo::error (writing nothing) on bad input.
template <class T, class L>
void dpo_backward_rows(const pair_view<T, L>& policy, const double* row_lse,
                       const double* row_coef, const pair_grad_view<T>& grad,
                       double grad_output = 1.0, const options& opt = {}) {
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  detail::check_finite(grad_output, "grad_output");
  // Read only on rows of the sequences: without any (T = 0, packed sequences all empty) they
  // may be null, as an empty tensor's data pointer is.
  if ((detail::has_rows(policy.chosen) || detail::has_rows(policy.rejected)) &&
      (row_lse == nullptr || row_coef == nullptr))
    dpo::detail::fail(row_lse == nullptr ? "row_lse" : "row_coef", " is null");
  detail::check_one_buffer(policy, "row_lse / row_coef");
  {
    const dpo::detail::check_policy p = dpo::detail::cpu_policy();
    const std::int64_t rows = std::max(dpo::detail::rows_of(policy.chosen, p).end, dpo::detail::rows_of(policy.rejected, p).end);
    detail::check_grad_inputs(policy, grad, {dpo::detail::range_of(row_lse, 1, rows, rows, "row_lse"),
                                             dpo::detail::range_of(row_coef, 1, rows, rows, "row_coef")});
  }
  const auto side = [&](const token_view<T, L>& v, T* g, std::int64_t g_stride) {
    detail::backward_side(
        v, [&](std::int64_t r, std::int64_t) { return v.target(r) >= 0 ? row_lse[r] : 0.0; },
        [&](std::int64_t r, std::int64_t) { return v.target(r) >= 0 ? row_coef[r] : 0.0; },
        grad_output, g, g_stride, opt.num_threads);
  };
  side(policy.chosen, grad.chosen, grad.chosen_stride);
  side(policy.rejected, grad.rejected, grad.rejected_stride);
}

/// dpo_forward then dpo_backward: two reads and one write of the logits in all.
template <class T, class L>
forward_result dpo_forward_backward(const pair_view<T, L>& policy, const double* ref_chosen,
                                    const double* ref_rejected, const loss_config& cfg,
                                    const pair_grad_view<T>& grad, const options& opt = {}) {
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  detail::check_grad_inputs(policy, grad);
  forward_result r = dpo_forward(policy, ref_chosen, ref_rejected, cfg, opt);
  dpo_backward(policy, r, grad, 1.0, opt);
  return r;
}

/// dpo_forward_backward with reference logits instead of reference log-probs (as the
/// reference-logits dpo_forward): the gradient arguments are checked before either pass.
template <class T, class R, class L>
forward_result dpo_forward_backward(const pair_view<T, L>& policy,
                                    const pair_view<R, L>& reference, const loss_config& cfg,
                                    const pair_grad_view<T>& grad, const options& opt = {}) {
  detail::check_pairs(policy, "logits");
  detail::check_grad(policy, grad);
  detail::check_grad_inputs(policy, grad);
  forward_result r = dpo_forward(policy, reference, cfg, opt);
  dpo_backward(policy, r, grad, 1.0, opt);
  return r;
}

}  // namespace cpu
}  // namespace dpo
