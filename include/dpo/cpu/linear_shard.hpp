// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM head on a vocabulary shard (Megatron's column-parallel head): this rank holds
// rows [sh.start, sh.end) of the weight, `weight [end - start, H]` (and of the bias), every
// hidden row, and labels as GLOBAL token ids. The logits chunks of the shard are formed as
// the unsharded head forms them (dpo/cpu/linear.hpp: same chunk loop, same row kernels), and
// folded into the row records of the logits path (dpo/core/shard.hpp); from there on
// everything is the logits path's:
//
//   phase 1      linear_shard_partials / linear_pair_shard_partials: hidden x weight shard
//                -> per-row records + maxima (one GEMM pass over the shard)
//   collective   MAX all-reduce of the [rows] maxima (vocabulary group)
//   between      shard_rebase
//   collective   SUM all-reduce of the [rows, shard_fields] records (vocabulary group)
//   phase 2      linear_shard_logps (per token) or linear_pair_shard_sequences (per sequence,
//                the logits path's shard_pair_partials), then for DPO the context group's SUM
//                of the [seq_fields, 2P] sums (none without CP) and shard_pair_stage
//   backward     linear_shard_backward / linear_pair_shard_backward: shard-local; dWeight and
//                dBias rows of the shard (complete), dHidden a PARTIAL (the shard's columns'
//                contribution) that the caller sums over the vocabulary group: the one
//                collective of the backward, as Megatron's column-parallel head
//
// Sharded results equal the unsharded head's up to the rounding of the combination (the
// shards' sums are added in double) and of the dHidden sum across ranks. Guide:
// docs/distributed.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dpo/core/shard.hpp"
#include "dpo/cpu/linear.hpp"
#include "dpo/cpu/linear_dpo.hpp"
#include "dpo/cpu/shard.hpp"

namespace dpo {
namespace cpu {

namespace detail {

/// A view's weight holds the shard's rows: its vocab is the shard's width; labels are
/// checked against the global vocabulary.
template <class T, class L>
void check_linear_shard(const linear_view<T, L>& v, const vocab_shard& sh) {
  throw_if(dpo::detail::check_vocab_shard(sh, v.vocab));
  check_linear_view(v, sh.vocab);
}

template <bool Metrics, class T, class L>
void linear_shard_partials_impl(const linear_view<T, L>& in, const vocab_shard& sh, const linear_chunking& ch,
                                double* records, double* row_max, int threads, const linear_gemm& mm) {
  using A = acc_t<T>;
  using stats = dpo::detail::row_stats<A>;
  linear_pass<T, L> p(in, ch, threads, mm);
  p.select_counted([&](std::int64_t r) {
    dpo::detail::empty_shard_record(records + r * shard_fields);
    if (row_max != nullptr) row_max[r] = -INFINITY;
  });
  std::vector<A> zy(static_cast<std::size_t>(ch.rows));
  fold_rows<Metrics>(
      p, threads,
      [&](std::int64_t b0, std::int64_t i) {  // the shard's label column, when this chunk holds it
        const std::int64_t y = in.target(p.active[b0 + i]) - sh.start - p.v0;
        if (y >= 0 && y < p.nv) zy[i] = p.z[i * p.nv + y];
      },
      [&](std::int64_t b0, const std::vector<stats>& acc) {
        parallel_for(p.nb, threads, [&](std::int64_t i0, std::int64_t i1) {
          for (std::int64_t i = i0; i < i1; ++i) {
            const std::int64_t r = p.active[b0 + i];
            const std::int64_t y = in.target(r);
            double* rec = records + r * shard_fields;
            // fold_rows' argmax is a column of the shard, as shard_record expects.
            dpo::detail::shard_record(acc[i], sh, y, sh.holds(y) ? zy[i] : A(0), Metrics, rec);
            if (row_max != nullptr) row_max[r] = rec[dpo::detail::at(shard_field::shard_max)];
          }
        });
      });
}

/// The rows [b, e) of a side's buffer that its sequences span, as a linear_view of the head
/// over them with per-row labels (the side's target, or -1 for rows that do not count or lie
/// in a gap); `labels` holds them.
template <class T, class L>
linear_view<T, std::int64_t> side_rows(const token_view<T, L>& v, const linear_head<T>& head,
                                       std::vector<std::int64_t>& labels, std::int64_t* b) {
  *b = v.num_seqs > 0 ? v.row_begin(0) : 0;
  const std::int64_t e = rows_end(v);
  labels.assign(static_cast<std::size_t>(std::max<std::int64_t>(e - *b, 0)), -1);
  for (std::int64_t r = *b; r < e; ++r)
    if (v.in_sequence(r) && v.target(r) >= 0) labels[static_cast<std::size_t>(r - *b)] = v.target(r);
  return linear_view_of(v.logits + *b * v.row_stride, e - *b, v.row_stride, head, labels.data(), nullptr,
                        std::int64_t{-1});
}

/// Both sides' rows as views of the head (side_rows: labels, first buffer row), built once,
/// with each view's chunk budget checked (throws before anything is written).
template <class T>
struct side_views {
  std::vector<std::int64_t> labels[2];
  std::int64_t first[2] = {0, 0};
  linear_view<T, std::int64_t> views[2];
  template <class L>
  side_views(const hidden_pairs<T, L>& p, const linear_head<T>& head, const linear_options& lo) {
    views[0] = side_rows(p.pairs.chosen, head, labels[0], &first[0]);
    views[1] = side_rows(p.pairs.rejected, head, labels[1], &first[1]);
    for (const linear_view<T, std::int64_t>& v : views) (void)linear_chunks<T>(v.rows, v.hidden_cols, v.vocab, lo);
  }
  side_views(const side_views&) = delete;  // the views point into labels
  side_views& operator=(const side_views&) = delete;
};

/// Each side's rows of its row state (the rows its sequences span, as phase 1 writes them and
/// the backward reads them): chosen_max, chosen_records, rejected_max, rejected_records (4
/// entries). One array for both sides of a concatenated layout gives disjoint ranges.
template <class T, class L>
void side_state_ranges(const hidden_pairs<T, L>& p, const double* chosen_max, const double* chosen_records,
                       const double* rejected_max, const double* rejected_records, linear_range* out) {
  const token_view<T, L>& c = p.pairs.chosen;
  const token_view<T, L>& r = p.pairs.rejected;
  out[0] = side_range(chosen_max, 1, 1, c, "chosen_max");
  out[1] = side_range(chosen_records, shard_fields, shard_fields, c, "chosen_records");
  out[2] = side_range(rejected_max, 1, 1, r, "rejected_max");
  out[3] = side_range(rejected_records, shard_fields, shard_fields, r, "rejected_records");
}

/// The per-token outputs of linear_shard_logps / linear_logps_sharded as ranges ([N] each;
/// 6 entries): logps, row_lse, then linear_outputs' members.
inline void logps_output_ranges(const double* logps, const double* row_lse, const linear_outputs& extra,
                                std::int64_t N, linear_range* out) {
  out[0] = range_of(logps, 1, N, N, "logps");
  out[1] = range_of(row_lse, 1, N, N, "row_lse");
  out[2] = range_of(extra.entropy, 1, N, N, "entropy");
  out[3] = range_of(extra.log_sum_sq_probs, 1, N, N, "log_sum_sq_probs");
  out[4] = range_of(extra.mean_logits, 1, N, N, "mean_logits");
  out[5] = range_of(extra.is_top1, 1, N, N, "is_top1");
}

/// The pairs' labels and layout as the logits path's phase 2 reads them: a pair view whose
/// vocab is the shard's width (its row pointers, the hidden rows, are never read).
template <class T, class L>
pair_view<T, L> label_pairs(const hidden_pairs<T, L>& in, const vocab_shard& sh) {
  pair_view<T, L> p = in.pairs;
  for (token_view<T, L>* v : {&p.chosen, &p.rejected}) {
    v->vocab = sh.width();
    v->row_stride = sh.width();
  }
  return p;
}

/// The hidden pairs and the head shard: the layout and labels (global ids), the hidden size
/// against the head's, the head, and the shard against the head's vocab.
template <class T, class L>
void check_pair_shard(const hidden_pairs<T, L>& in, const linear_head<T>& head, const vocab_shard& sh) {
  check_head(head, "head");
  throw_if(dpo::detail::check_vocab_shard(sh, head.vocab));
  linear_head<T> global = head;
  global.vocab = sh.vocab;  // labels are global ids
  check_hidden_pairs(in, global, "policy", "head");
}

}  // namespace detail

/// Phase 1 on a weight shard: `shard` is the head over this rank's weight rows [sh.start,
/// sh.end) (shard.vocab = sh.width(), bias likewise) and every hidden row, its labels GLOBAL
/// ids in [0, sh.vocab) (or ignore_index / masked). Writes, for every row r,
/// records[r * shard_fields + f] (rows that do not count: the empty record) and, when not
/// null, row_max[r] (the buffer of the max all-reduce): what shard_partials writes for the
/// same rows of the shard's logits. metrics false leaves the metric fields 0. One GEMM pass
/// over the shard in the head's chunks (opt: as linear_logps); deterministic and independent
/// of opt.num_threads. Throws dpo::error (writing nothing) on bad input.
template <class T, class L>
void linear_shard_partials(const linear_view<T, L>& shard, const vocab_shard& sh, double* records, double* row_max,
                           bool metrics, const linear_options& opt = {}) {
  detail::check_linear_shard(shard, sh);
  const linear_chunking ch = detail::linear_chunks<T>(shard.rows, shard.hidden_cols, shard.vocab, opt);
  if (shard.rows == 0) return;
  if (records == nullptr) detail::fail("records is null");
  // records and row_max are written while the hidden rows, head, labels and mask are read.
  const std::int64_t N = shard.rows;
  detail::linear_range ins[5];
  detail::input_ranges(shard, ins);
  const detail::linear_range outs[2] = {detail::range_of(records, N, shard_fields, shard_fields, "records"),
                                        detail::range_of(row_max, 1, N, N, "row_max")};
  detail::require_no_overlap(outs, 2, ins, 5);
  const int threads = detail::resolve_threads(opt.num_threads);
  if (metrics) {
    detail::linear_shard_partials_impl<true>(shard, sh, ch, records, row_max, threads, opt.gemm);
  } else {
    detail::linear_shard_partials_impl<false>(shard, sh, ch, records, row_max, threads, opt.gemm);
  }
}

/// Phase 2 per token: linear_logps' outputs from the combined records (row_max and records
/// after the two vocabulary all-reduces), for the rows of `view` (only its labels, mask and
/// ignore_index are read; labels global ids < vocab). logps, row_lse: [rows] (row_lse may be
/// null: the shard's backward reads the records); extra as linear_logps (is_top1: the core's
/// shard_label_is_top1, the unsharded head's rule). Rows that do not count get 0. The outputs
/// may overlap neither each other nor row_max, records, labels or mask. No collective; every
/// rank of the group computes the same values.
template <class T, class L>
void linear_shard_logps(const linear_view<T, L>& view, std::int64_t vocab, const double* row_max,
                        const double* records, double* logps, const linear_outputs& extra, double* row_lse) {
  using dpo::detail::at;
  if (vocab < 1) detail::fail("vocab = ", vocab, " is invalid: must be >= 1");
  if (view.rows < 0) detail::fail("rows = ", view.rows, " is invalid: must be >= 0");
  if (view.rows > 0 && (row_max == nullptr || records == nullptr || logps == nullptr || view.labels == nullptr))
    detail::fail(row_max == nullptr   ? "row_max"
                 : records == nullptr ? "records"
                 : logps == nullptr   ? "logps"
                                      : "labels",
                 " is null");
  const std::int64_t N = view.rows;
  const detail::linear_range ins[4] = {detail::range_of(row_max, 1, N, N, "row_max"),
                                       detail::range_of(records, N, shard_fields, shard_fields, "records"),
                                       detail::range_of(view.labels, 1, N, N, "labels"),
                                       detail::range_of(view.mask, 1, N, N, "mask")};
  detail::linear_range outs[6];
  detail::logps_output_ranges(logps, row_lse, extra, N, outs);
  detail::require_no_overlap(outs, 6, ins, 4);
  detail::throw_if(dpo::detail::check_linear_labels(view, vocab));
  for (std::int64_t r = 0; r < view.rows; ++r) {
    const std::int64_t y = view.target(r);
    const double* rec = records + r * shard_fields;
    const dpo::detail::row_stats<double> st = dpo::detail::combined_row(row_max[r], rec);
    const double zy = rec[at(shard_field::label_logit)];
    const bool counts = y >= 0;
    logps[r] = counts ? st.log_softmax(zy) : 0.0;
    if (row_lse != nullptr) row_lse[r] = counts ? st.logsumexp_double() : 0.0;
    if (extra.entropy != nullptr) extra.entropy[r] = counts ? st.entropy() : 0.0;
    if (extra.log_sum_sq_probs != nullptr) extra.log_sum_sq_probs[r] = counts ? st.log_sum_p2() : 0.0;
    if (extra.mean_logits != nullptr) extra.mean_logits[r] = counts ? st.zsum / static_cast<double>(vocab) : 0.0;
    if (extra.is_top1 != nullptr)
      extra.is_top1[r] = counts && dpo::detail::shard_label_is_top1(row_max[r], rec) ? 1 : 0;
  }
}

/// The shard-local backward of sum_r grad_logps[r] * logps[r] (+ grad_entropy * entropy), as
/// linear_logps_backward with the combined records in place of row_lse (entropy: the
/// global per-row entropy of linear_shard_logps). Writes (or adds, g.accumulate_hidden) the
/// dHidden PARTIAL of the shard's columns: the caller sums it over the vocabulary group (one
/// SUM all-reduce of [rows, H]); adds dWeight and dBias of the shard's rows (complete: no
/// collective). Three GEMM passes over the shard (recompute, dHidden, dWeight); deterministic
/// and independent of opt.num_threads. Throws dpo::error (writing nothing) on bad input.
template <class T, class L, class G>
void linear_shard_backward(const linear_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                           const double* records, const double* grad_logps, const double* entropy,
                           const double* grad_entropy, const linear_grads<T, G>& g, const linear_options& opt = {}) {
  detail::throw_if(dpo::detail::check_vocab_shard(sh, shard.vocab));
  const detail::linear_shard_rows rows{sh.start, row_max, records};
  detail::linear_backward_checked(shard, sh.vocab, nullptr, &rows, grad_logps, entropy, grad_entropy, g, opt);
}

/// Phase 1 of DPO from hidden states on a head shard (head: the shard's weight rows, vocab =
/// sh.width()): each side's records and maxima indexed by its hidden buffer's rows, as
/// shard_partials indexes the logits path's (one array for both sides of a concatenated
/// layout; rows of the sides' spans that are not completion rows get the empty record).
/// opt.metrics || a WPO loss computes the metric fields. Throws dpo::error (writing nothing).
template <class T, class L>
void linear_pair_shard_partials(const hidden_pairs<T, L>& policy, const linear_head<T>& head, const vocab_shard& sh,
                                double* chosen_max, double* chosen_records, double* rejected_max,
                                double* rejected_records, const linear_dpo_options& opt = {}) {
  detail::check_pair_shard(policy, head, sh);
  // Every row a side's sequences span gets a record: a side that spans none may pass null.
  detail::check_side_state("linear_pair_shard_partials", "chosen", detail::span_rows(policy.pairs.chosen) > 0,
                           chosen_max, chosen_records);
  detail::check_side_state("linear_pair_shard_partials", "rejected", detail::span_rows(policy.pairs.rejected) > 0,
                           rejected_max, rejected_records);
  {
    // Each side's rows of its arrays are written while both sides' hidden rows, labels and
    // masks and the head are read: none may overlap those, nor the other side's rows (one
    // array for both sides of a concatenated layout writes disjoint rows of it).
    detail::linear_range ins[8], outs[4];
    const int n_in = detail::pair_input_ranges(policy, head, ins, "policy");
    detail::side_state_ranges(policy, chosen_max, chosen_records, rejected_max, rejected_records, outs);
    detail::require_no_overlap(outs, 4, ins, n_in);
  }
  const linear_options lo = detail::linear_options_of(opt);
  const detail::side_views<T> sv(policy, head, lo);  // both budgets checked before any record is written
  const std::int64_t* b = sv.first;
  const linear_view<T, std::int64_t>* views = sv.views;
  double* maxes[2] = {chosen_max, rejected_max};
  double* recs[2] = {chosen_records, rejected_records};
  for (int s = 0; s < 2; ++s) {
    // (No offset on a null buffer: a side without rows may pass null.)
    linear_shard_partials(views[s], sh, recs[s] ? recs[s] + b[s] * shard_fields : nullptr,
                          maxes[s] ? maxes[s] + b[s] : nullptr, opt.metrics, lo);
  }
}

/// Phase 2 of DPO from hidden states: the logits path's shard_pair_partials on the pairs'
/// labels and layout ([seq_fields, 2P] sums into seq; with context parallelism the caller
/// sums them over the context group), then shard_pair_stage as for logits.
template <class T, class L>
void linear_pair_shard_sequences(const hidden_pairs<T, L>& policy, const vocab_shard& sh, const double* chosen_max,
                                 const double* chosen_records, const double* rejected_max,
                                 const double* rejected_records, double ld_alpha, double* seq, bool metrics) {
  options o;
  o.metrics = metrics;
  shard_pair_partials(detail::label_pairs(policy, sh), sh, chosen_max, chosen_records, rejected_max,
                      rejected_records, ld_alpha, seq, o);
}

/// The shard-local backward of the pair loss from hidden states: each completion row's
/// dL/dlogp (from seq_grad and nll_token_grad of shard_pair_stage, times grad_output) through
/// linear_shard_backward. dWeight / dBias rows of the shard are added (complete); dHidden is
/// the shard's PARTIAL, written (rows of the sequences that are not completion rows get
/// zeros) or added (g.accumulate_hidden): the caller sums it over the vocabulary group.
/// Throws dpo::error (writing nothing) on bad input.
template <class T, class L, class G>
void linear_pair_shard_backward(const hidden_pairs<T, L>& policy, const linear_head<T>& head, const vocab_shard& sh,
                                const double* chosen_max, const double* chosen_records, const double* rejected_max,
                                const double* rejected_records, const double* seq_grad, double nll_token_grad,
                                double ld_alpha, const linear_dpo_grads<T, G>& g, double grad_output = 1.0,
                                const linear_dpo_options& opt = {}) {
  detail::check_pair_shard(policy, head, sh);
  detail::check_finite(grad_output, "grad_output");
  // seq_grad and nll_token_grad are the forward's values, NaN where the data were (as the
  // unsharded backward's coefficients): not checked for finiteness.
  detail::check_unit(ld_alpha, "ld_alpha");
  if (seq_grad == nullptr) detail::fail("linear_pair_shard_backward: seq_grad is null");
  detail::check_side_state("linear_pair_shard_backward", "chosen", detail::span_rows(policy.pairs.chosen) > 0,
                           chosen_max, chosen_records);
  detail::check_side_state("linear_pair_shard_backward", "rejected", detail::span_rows(policy.pairs.rejected) > 0,
                           rejected_max, rejected_records);
  // The gradients against every input: the pairs' hidden rows, labels and masks, the head,
  // each side's rows of the row state, and seq_grad (dHidden is zeroed before they are read).
  detail::linear_range ins[13];
  int n_in = detail::pair_input_ranges(policy, head, ins, "policy");
  detail::side_state_ranges(policy, chosen_max, chosen_records, rejected_max, rejected_records, ins + n_in);
  n_in += 4;
  ins[n_in++] = detail::range_of(seq_grad, 1, 2 * policy.num_pairs(), 2 * policy.num_pairs(), "seq_grad");
  detail::check_linear_grads(policy, head, g, ins, n_in);
  const pair_view<T, L> lp = detail::label_pairs(policy, sh);
  const std::int64_t P = policy.num_pairs();
  const std::vector<double> shared =
      detail::shared_lengths(detail::token_counts(lp.chosen), detail::token_counts(lp.rejected), ld_alpha);
  const std::vector<double> coef[2] = {detail::shard_coefs(lp.chosen, seq_grad, shared, ld_alpha, nll_token_grad),
                                       detail::shard_coefs(lp.rejected, seq_grad + P, shared, ld_alpha, 0.0)};
  const linear_options lo = detail::linear_options_of(opt);
  const detail::side_views<T> sv(policy, head, lo);  // every budget checked before anything is written
  const std::int64_t* b = sv.first;
  const linear_view<T, std::int64_t>* views = sv.views;
  if (!g.accumulate_hidden) detail::zero_hidden_rows(policy, g, true);
  const double* maxes[2] = {chosen_max, rejected_max};
  const double* recs[2] = {chosen_records, rejected_records};
  T* gh[2] = {g.chosen_hidden, g.rejected_hidden};
  const std::int64_t gs[2] = {g.chosen_hidden_stride, g.rejected_hidden_stride};
  for (int s = 0; s < 2; ++s) {
    const linear_view<T, std::int64_t>& v = views[s];
    std::vector<double> grad(coef[s].size());
    for (std::size_t i = 0; i < grad.size(); ++i) grad[i] = dpo::detail::times(coef[s][i], grad_output);
    linear_shard_backward(v, sh, maxes[s] ? maxes[s] + b[s] : nullptr,
                          recs[s] ? recs[s] + b[s] * shard_fields : nullptr, grad.data(), nullptr, nullptr,
                          detail::rows_grads(g, gh[s], gs[s], b[s]), lo);
  }
}

// ---- drivers: the building blocks around the caller's collectives ------------------------

/// What linear_logps_sharded keeps for linear_shard_backward: the rows' combined records.
struct linear_shard_state {
  std::vector<double> row_max, records;
};

/// linear_logps on a head shard: phase 1, the two vocabulary collectives (comm.vocab_max,
/// comm.vocab_sum; comm.context_sum is not used: per-token outputs need no context
/// collective), phase 2. Every rank gets the same logps / extra / row_lse (row_lse may be
/// null) and `state` for linear_shard_backward. The outputs may overlap neither each other
/// nor the view's hidden rows, head, labels or mask. Bad input throws dpo::error before any
/// collective, leaving `state` as it was.
template <class T, class L>
void linear_logps_sharded(const linear_view<T, L>& shard, const vocab_shard& sh, const collectives& comm,
                          double* logps, const linear_outputs& extra, double* row_lse, linear_shard_state& state,
                          const linear_options& opt = {}) {
  // Everything phase 2 would refuse, before any collective: the view and shard, the budget,
  // and the outputs against the view's inputs and each other (phase 2 compares them with
  // the state, which is this call's own).
  detail::check_linear_shard(shard, sh);
  (void)detail::linear_chunks<T>(shard.rows, shard.hidden_cols, shard.vocab, opt);
  const std::int64_t N = shard.rows;
  if (N > 0 && logps == nullptr) detail::fail("logps is null");
  {
    detail::linear_range ins[5];
    detail::input_ranges(shard, ins);
    detail::linear_range outs[6];
    detail::logps_output_ranges(logps, row_lse, extra, N, outs);
    detail::require_no_overlap(outs, 6, ins, 5);
  }
  // The state is replaced only once the call succeeded: a call that throws leaves it as it was.
  linear_shard_state st;
  st.row_max.assign(static_cast<std::size_t>(N), -INFINITY);
  st.records.assign(static_cast<std::size_t>(N * shard_fields), 0.0);
  linear_shard_partials(shard, sh, st.records.data(), st.row_max.data(), extra.any(), opt);
  if (comm.vocab_max) comm.vocab_max(st.row_max.data(), N);
  shard_rebase(0, N, st.row_max.data(), st.records.data());
  if (comm.vocab_sum) comm.vocab_sum(st.records.data(), N * shard_fields);
  linear_shard_logps(shard, sh.vocab, st.row_max.data(), st.records.data(), logps, extra, row_lse);
  state = std::move(st);
}

/// linear_dpo on a head shard and/or a context slice, forward and backward in one call: the
/// outputs of dpo_forward_sharded (every rank the same; out.row_lse / row_coef not written)
/// and the gradients of grad_output * loss: dWeight / dBias rows of the shard, and this
/// rank's dHidden PARTIAL, which the caller sums over the vocabulary group afterwards (one
/// more SUM all-reduce of [rows, H] per hidden buffer, the caller's, as in Megatron).
/// Collectives inside: vocab_max ([rows]) and vocab_sum ([rows, shard_fields]) per side
/// buffer, context_sum ([seq_fields, 2P] + 1) with context parallelism (ld_alpha must be 1
/// then). Bad input throws dpo::error before any collective, except a context rank's own
/// slice, which joins the context sum and makes every context rank throw (as
/// dpo_forward_sharded).
template <class T, class L, class G>
void linear_dpo_sharded(const hidden_pairs<T, L>& policy, const linear_head<T>& head, const vocab_shard& sh,
                        const double* ref_chosen, const double* ref_rejected, const loss_config& cfg,
                        const collectives& comm, const forward_outputs& out, const linear_dpo_grads<T, G>& g,
                        double grad_output = 1.0, const linear_dpo_options& opt = {}) {
  detail::check_config(cfg);
  detail::check_reference(cfg, ref_chosen, ref_rejected);
  detail::check_finite(grad_output, "grad_output");
  if (comm.context_sum && cfg.ld_alpha != 1.0)
    detail::fail("ld_alpha = ", cfg.ld_alpha,
                 " is unsupported with context parallelism (LD-DPO weights a token by its position in the whole "
                 "sequence): use ld_alpha = 1");
  const std::int64_t P = policy.num_pairs();
  if (P < 1) detail::fail("policy.num_pairs = ", P, " is invalid: must be >= 1");
  linear_dpo_options o = opt;
  o.metrics = opt.metrics || cfg.use_weighting;
  const bool one = detail::one_row_array(policy.pairs);
  const std::int64_t nc = detail::rows_end(policy.pairs.chosen), nr = detail::rows_end(policy.pairs.rejected);
  std::vector<double> cmax, crec, rmax, rrec;
  std::vector<double> seq(static_cast<std::size_t>(seq_fields * 2 * P), 0.0);
  std::string failure;
  const auto rows = [&](std::vector<double>& m, std::vector<double>& r, std::int64_t n) {
    m.assign(static_cast<std::size_t>(n), -INFINITY);
    r.assign(static_cast<std::size_t>(n * shard_fields), 0.0);
    for (std::int64_t i = 0; i < n; ++i) r[i * shard_fields + dpo::detail::at(shard_field::shard_max)] = -INFINITY;
  };
  const auto combine = [&](std::vector<double>& m, std::vector<double>& r) {
    const std::int64_t n = static_cast<std::int64_t>(m.size());
    if (comm.vocab_max) comm.vocab_max(m.data(), n);
    shard_rebase(0, n, m.data(), r.data());
    if (comm.vocab_sum) comm.vocab_sum(r.data(), n * shard_fields);
  };
  try {
    detail::check_pair_shard(policy, head, sh);
    // The gradient buffers too, before any collective or output (the backward at the end
    // checks them again; here a bad one must not leave the outputs written), and the forward
    // outputs against the inputs and the gradient buffers (the backward writes those after
    // the outputs, and reads the hidden rows).
    detail::linear_range ins[14];
    int n_in = detail::pair_input_ranges(policy, head, ins, "policy");
    n_in += detail::check_linear_grads(policy, head, g, ins, n_in, ins + n_in);
    ins[n_in++] = detail::range_of(ref_chosen, 1, P, P, "ref_chosen_logps");
    ins[n_in++] = detail::range_of(ref_rejected, 1, P, P, "ref_rejected_logps");
    detail::throw_if(dpo::detail::check_forward_outputs(out, P, 0, ins, n_in));
    rows(cmax, crec, one ? std::max(nc, nr) : nc);
    if (!one) rows(rmax, rrec, nr);
    double* rm = one ? cmax.data() : rmax.data();
    double* rr = one ? crec.data() : rrec.data();
    linear_pair_shard_partials(policy, head, sh, cmax.data(), crec.data(), rm, rr, o);
    combine(cmax, crec);
    if (!one) combine(rmax, rrec);
    linear_pair_shard_sequences(policy, sh, cmax.data(), crec.data(), rm, rr, cfg.ld_alpha, seq.data(), o.metrics);
  } catch (const dpo::error& e) {
    if (!comm.context_sum) throw;
    failure = e.what();
    std::fill(seq.begin(), seq.end(), 0.0);
  }
  if (comm.context_sum) detail::context_sum(comm, seq, failure);
  std::vector<double> seq_grad(static_cast<std::size_t>(2 * P));
  double nll = 0;
  forward_outputs fo = out;
  fo.nll_token_grad = &nll;
  shard_pair_stage(P, seq.data(), ref_chosen, ref_rejected, cfg, o.metrics, fo, seq_grad.data());
  if (out.nll_token_grad) *out.nll_token_grad = nll;
  const double* rm = one ? cmax.data() : rmax.data();
  const double* rr = one ? crec.data() : rrec.data();
  linear_pair_shard_backward(policy, head, sh, cmax.data(), crec.data(), rm, rr, seq_grad.data(), nll, cfg.ld_alpha,
                             g, grad_output, o);
}

}  // namespace cpu
}  // namespace dpo
