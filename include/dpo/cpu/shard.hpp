// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU backend of vocabulary- and context-parallel log-probs and DPO (formats and
// arithmetic: dpo/core/shard.hpp; guide: docs/distributed.md). No communication here: the
// building blocks below run between the caller's collectives, and the drivers at the end
// chain them around a `collectives` of the caller's all-reduces.
//
//   phase 1      shard_partials         one read of the shard's rows -> row records + maxima
//   collective   max all-reduce of the [rows] maxima (vocabulary group)
//   between      shard_rebase           records relative to the global max
//   collective   sum all-reduce of the [rows, shard_fields] records (vocabulary group)
//   phase 2      shard_sequence_partials / shard_pair_partials -> [seq_fields, S] sums
//   collective   sum all-reduce of the sequence sums (context group; none without CP)
//   pairs        shard_pair_stage       the core pair stage: loss, metrics, dL/dpi per sequence
//   backward     shard_backward / shard_sequence_backward: in place or out of place, shard-local
//
// The row values come from the same row kernel as the unsharded path (row_forward on the
// shard's columns), the sequence sums and the pair stage are the unsharded pipeline's own
// functions, and the backward is its row kernel with the exact lse of the combined record.
// Sharded results equal the unsharded ones up to the rounding of the combination: the
// shards' sums are added in double instead of folded in the accumulation type.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dpo/core/shard.hpp"
#include "dpo/cpu/dpo.hpp"

namespace dpo {
namespace cpu {

using dpo::vocab_shard;

namespace detail {

/// Shapes, labels (global ids, checked against the global vocabulary) and the shard
/// description of a shard's view.
template <class T, class L>
void check_shard_view(const token_view<T, L>& v, const vocab_shard& sh, const char* name) {
  throw_if(dpo::detail::check_vocab_shard(sh, v.vocab));
  throw_if(dpo::detail::check_view(v, name, dpo::detail::cpu_policy(), sh.vocab));
}

template <class T, class L>
void check_shard_pairs(const pair_view<T, L>& p, const vocab_shard& sh, const char* name) {
  throw_if(dpo::detail::check_vocab_shard(sh, p.chosen.vocab));
  throw_if(dpo::detail::check_pairs(p, name, dpo::detail::cpu_policy(), sh.vocab));
}

/// The rows [row_begin(0), row_end(last)) of a view with at least one sequence, else empty.
template <class T, class L>
std::int64_t rows_end(const token_view<T, L>& v) {
  return v.num_seqs > 0 ? v.row_end(v.num_seqs - 1) : 0;
}

/// How many rows [row_begin(0), row_end(last)) span (gap rows of a padded view included):
/// the rows phase 1 writes a record for. 0 for a view without rows (padded seq_len = 0 and
/// no gaps, packed sequences all empty), whose per-row buffers may then be null (an empty
/// tensor's data pointer).
template <class T, class L>
std::int64_t span_rows(const token_view<T, L>& v) {
  return v.num_seqs > 0 ? rows_end(v) - v.row_begin(0) : 0;
}

using dpo::detail::named_range;
using dpo::detail::range_of;

/// The bytes of a view's logits rows, labels, mask and cu_seqlens (4 entries, named `names`:
/// dpo::detail::seq_view_names or pair_view_names[side]), for the aliasing checks.
template <class T, class L>
void view_ranges(const token_view<T, L>& v, const char* const names[4], detail::named_range* out) {
  dpo::detail::view_ranges(v, dpo::detail::cpu_policy(), names, out);
}

/// The bytes of a row state of n rows: maxima [n] and records [n, shard_fields] (2 entries).
inline void state_ranges(const double* row_max, const double* records, std::int64_t n, const char* max_name,
                         const char* records_name, detail::named_range* out) {
  out[0] = detail::range_of(row_max, 1, n, n, max_name);
  out[1] = detail::range_of(records, n, shard_fields, shard_fields, records_name);
}

/// Rows [begin, end) of a buffer: begin >= 0 and end >= begin.
inline void check_row_range(std::int64_t begin, std::int64_t end) {
  if (begin < 0) dpo::detail::fail("begin = ", begin, " is invalid: must be >= 0");
  if (end < begin) dpo::detail::fail("end = ", end, " is invalid: must be >= begin = ", begin);
}

/// A side's row state (maxima and records) must be given when `needed` (the side has rows to
/// read or write); `what` names the entry point, `side` the side ("chosen" / "rejected").
inline void check_side_state(const char* what, const char* side, bool needed, const double* row_max,
                             const double* records) {
  if (!needed) return;
  if (row_max == nullptr) dpo::detail::fail(what, ": ", side, "_max is null");
  if (records == nullptr) dpo::detail::fail(what, ": ", side, "_records is null");
}

template <bool Metrics, class T, class L>
void shard_partials_impl(const token_view<T, L>& v, const vocab_shard& sh, double* records,
                         double* row_max, int threads) {
  using A = acc_t<T>;
  const std::int64_t r0 = v.row_begin(0);
  parallel_for(rows_end(v) - r0, threads, [&](std::int64_t b, std::int64_t e) {
    row_scratch<A> scratch;
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t r = r0 + i;
      double* rec = records + r * shard_fields;
      const std::int64_t y = v.in_sequence(r) ? v.target(r) : -1;
      if (y < 0) {
        dpo::detail::empty_shard_record(rec);
      } else {
        const T* z = v.logits + r * v.row_stride;
        const row_stats<A> st = row_forward<Metrics>(z, v.vocab, scratch);
        const A zy = sh.holds(y) ? to_acc<A>(z[y - sh.start]) : A(0);
        dpo::detail::shard_record(st, sh, y, zy, Metrics, rec);
      }
      if (row_max != nullptr) row_max[r] = rec[dpo::detail::at(shard_field::shard_max)];
    }
  });
}

/// Per-row values of a view's rows from their combined records, in forward_rows' form
/// (what sum_sequences reads).
template <class T, class L>
void rows_from_records(const token_view<T, L>& v, const vocab_shard& sh, const double* row_max,
                       const double* records, bool metrics, row_values& out) {
  const std::int64_t r0 = v.row_begin(0), n = rows_end(v) - r0;
  out.lse.assign(n, 0.0);
  out.logp.assign(n, 0.0);
  out.target.assign(n, -1);
  if (metrics) {
    out.entropy.assign(n, 0.0);
    out.zmean.assign(n, 0.0);
    out.wpo.assign(n, 0.0);
    out.hit.assign(n, 0);
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t r = r0 + i;
    if (!v.in_sequence(r)) continue;
    const std::int64_t y = v.target(r);
    out.target[i] = y;
    if (y < 0) continue;
    const dpo::detail::shard_row_values rv = dpo::detail::finish_row(row_max[r], records + r * shard_fields, sh.vocab);
    out.lse[i] = rv.lse;
    out.logp[i] = rv.logp;
    if (metrics) {
      out.entropy[i] = rv.entropy;
      out.zmean[i] = rv.zmean;
      out.wpo[i] = rv.wpo;
      out.hit[i] = rv.hit ? 1 : 0;
    }
  }
}

/// Writes one side's sequence sums into field-major `seq` ([seq_fields, S], sequences from
/// column `first`).
inline void put_sums(const std::vector<double>& tokens, const seq_sums& s, bool metrics, double* seq,
                     std::int64_t S, std::int64_t first) {
  using dpo::detail::at;
  for (std::size_t k = 0; k < tokens.size(); ++k) {
    const std::int64_t c = first + static_cast<std::int64_t>(k);
    seq[at(seq_field::tokens) * S + c] = tokens[k];
    seq[at(seq_field::logps) * S + c] = s.logp[k];
    seq[at(seq_field::logps_plain) * S + c] = s.logp_plain[k];
    seq[at(seq_field::entropy) * S + c] = metrics ? s.entropy[k] : 0.0;
    seq[at(seq_field::mean_logits) * S + c] = metrics ? s.zmean[k] : 0.0;
    seq[at(seq_field::wpo) * S + c] = metrics ? s.wpo[k] : 0.0;
    seq[at(seq_field::hits) * S + c] = metrics ? s.hit[k] : 0.0;
  }
}

/// One side's counts and sums back from field-major totals.
inline void get_sums(const double* seq, std::int64_t S, std::int64_t first, std::int64_t n,
                     std::vector<double>& tokens, seq_sums& s) {
  using dpo::detail::at;
  const auto field = [&](seq_field f, std::vector<double>& dst) {
    dst.assign(seq + at(f) * S + first, seq + at(f) * S + first + n);
  };
  field(seq_field::tokens, tokens);
  field(seq_field::logps, s.logp);
  field(seq_field::logps_plain, s.logp_plain);
  field(seq_field::entropy, s.entropy);
  field(seq_field::mean_logits, s.zmean);
  field(seq_field::wpo, s.wpo);
  field(seq_field::hits, s.hit);
}

/// The backward of a shard's view: row coefficient coef[i] (i = r - row_begin(0)) times
/// grad_output, with the row's exact lse from its record; masked rows get zeros, gap rows
/// are not written.
template <class T, class L>
void shard_rows_backward(const token_view<T, L>& v, const vocab_shard& sh, const double* row_max,
                         const double* records, const std::vector<double>& coef, double grad_output,
                         T* g, std::int64_t g_stride, int threads) {
  using A = acc_t<T>;
  if (v.num_seqs == 0) return;
  const std::int64_t r0 = v.row_begin(0);
  parallel_for(rows_end(v) - r0, threads, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t r = r0 + i;
      if (!v.in_sequence(r)) continue;
      const A c = static_cast<A>(dpo::detail::times(coef[i], grad_output));
      T* gr = g + r * g_stride;
      if (c == A(0)) {
        for (std::int64_t k = 0; k < v.vocab; ++k) gr[k] = from_acc<T>(A(0));
        continue;
      }
      const std::int64_t y = v.target(r);
      row_backward_parts<T, A>(v.logits + r * v.row_stride, gr, v.vocab,
                               dpo::detail::shard_lse<A>(row_max[r], records + r * shard_fields), c,
                               sh.holds(y) ? y - sh.start : -1);
    }
  });
}

/// Row coefficients of one view from per-sequence gradients: dpo_forward's side_coefs
/// (LD-DPO thresholds `shared`, +inf when off), indexed by r - row_begin(0).
template <class T, class L>
std::vector<double> shard_coefs(const token_view<T, L>& v, const double* seq_grad,
                                const std::vector<double>& shared, double ld_alpha, double nll) {
  const std::size_t n = static_cast<std::size_t>(v.num_seqs > 0 ? rows_end(v) - v.row_begin(0) : 0);
  std::vector<double> coef(n, 0.0);
  if (v.num_seqs == 0) return coef;
  std::vector<std::int64_t> target(n, -1);
  const std::int64_t r0 = v.row_begin(0);
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t r = r0 + static_cast<std::int64_t>(i);
    if (v.in_sequence(r)) target[i] = v.target(r);
  }
  side_coefs(v, target, shared, ld_alpha, seq_grad, nll, [&](std::int64_t, std::size_t i, double c) { coef[i] = c; });
  return coef;
}

template <class T>
void check_grad_buffer(const T* grad, std::int64_t grad_stride, std::int64_t width, bool rows) {
  if (rows && grad == nullptr) dpo::detail::fail("grad is null");
  if (grad_stride < width)
    dpo::detail::fail("grad_stride = ", grad_stride, " is invalid: must be >= the shard's vocab = ", width);
}

}  // namespace detail

/// Phase 1 of the vocabulary-parallel path: per-row partial records of a vocabulary shard.
///
/// `shard`: the rank's columns [sh.start, sh.end) of every logits row as a token_view
/// (vocab = sh.width(), any layout: padded with or without gaps, or packed; labels are
/// GLOBAL ids in [0, sh.vocab) or masked). Writes, for every row r of
/// [row_begin(0), row_end(num_seqs - 1)), records[r * shard_fields + f] (field f of
/// DPO_SHARD_FIELDS; rows that are masked or lie in a gap get the empty record: zeros and a
/// max of -inf) and, when row_max is not null, row_max[r] = the record's shard_max (the
/// buffer of the max all-reduce). Both are indexed by the logits buffer's row, so they need
/// at least row_end(num_seqs - 1) rows. opt.metrics false leaves the metric fields 0 (a WPO
/// loss needs them). One read of the shard. records and row_max may overlap neither the
/// view's logits rows, labels and mask nor each other. Deterministic and independent of the
/// thread count; throws dpo::error (writing nothing) on bad input.
template <class T, class L>
void shard_partials(const token_view<T, L>& shard, const vocab_shard& sh, double* records,
                    double* row_max, const options& opt = {}) {
  detail::check_shard_view(shard, sh, "logits");
  // A view without rows writes nothing: its buffers may be null (an empty tensor's pointer).
  if (detail::span_rows(shard) == 0) return;
  if (records == nullptr) dpo::detail::fail("records is null");
  detail::named_range in[4], out[2];
  detail::view_ranges(shard, dpo::detail::seq_view_names, in);
  detail::state_ranges(row_max, records, detail::rows_end(shard), "row_max", "records", out);
  detail::require_no_overlap(out, 2, in, 4);
  if (opt.metrics) {
    detail::shard_partials_impl<true>(shard, sh, records, row_max, opt.num_threads);
  } else {
    detail::shard_partials_impl<false>(shard, sh, records, row_max, opt.num_threads);
  }
}

/// Between the max and the sum all-reduce: shifts records [begin, end) (rows of the buffer)
/// to the global maxima row_max[r] (the max all-reduce's result), in place. row_max may not
/// overlap those records. Deterministic; throws dpo::error (writing nothing) on bad input.
inline void shard_rebase(std::int64_t begin, std::int64_t end, const double* row_max, double* records) {
  detail::check_row_range(begin, end);
  if (end == begin) return;
  if (row_max == nullptr || records == nullptr)
    dpo::detail::fail(row_max == nullptr ? "row_max" : "records", " is null");
  const std::int64_t n = end - begin;
  detail::require_no_overlap({detail::range_of(records + begin * shard_fields, n, shard_fields, shard_fields, "records")},
                             {detail::range_of(row_max + begin, 1, n, n, "row_max")});
  for (std::int64_t r = begin; r < end; ++r) dpo::detail::shard_rebase(row_max[r], records + r * shard_fields);
}

/// For callers that gather the ranks' phase-1 records themselves (an all-gather instead of
/// the two all-reduces): combines rank_records[k] (k < world, each as shard_partials wrote
/// it) for rows [begin, end) into row_max (the global maxima) and records (the summed,
/// rebased records: what the two all-reduces give). Ranks are added in index order, so
/// every rank that combines the same gathered records gets bitwise the same result.
/// row_max and records may overlap neither each other nor any rank_records[k] (rows [begin,
/// end) compared). Throws dpo::error (writing nothing) on bad input.
inline void combine_shard_records(std::int64_t begin, std::int64_t end, int world,
                                  const double* const* rank_records, double* row_max, double* records) {
  using dpo::detail::at;
  if (world < 1) dpo::detail::fail("world = ", world, " is invalid: must be >= 1");
  detail::check_row_range(begin, end);
  if (end == begin) return;
  if (rank_records == nullptr) dpo::detail::fail("rank_records is null");
  for (int k = 0; k < world; ++k)
    if (rank_records[k] == nullptr) dpo::detail::fail("rank_records[", k, "] is null");
  if (row_max == nullptr || records == nullptr)
    dpo::detail::fail(row_max == nullptr ? "row_max" : "records", " is null");
  const std::int64_t n = end - begin;
  const auto rows_of = [&](const double* p, const char* name) {
    return detail::range_of(p + begin * shard_fields, n, shard_fields, shard_fields, name);
  };
  const detail::named_range outs[2] = {rows_of(records, "records"), detail::range_of(row_max + begin, 1, n, n, "row_max")};
  std::vector<detail::named_range> ins;
  for (int k = 0; k < world; ++k) ins.push_back(rows_of(rank_records[k], "rank_records"));
  detail::throw_if(dpo::detail::check_no_overlap(outs, 2, ins.data(), world));
  double tmp[shard_fields];
  for (std::int64_t r = begin; r < end; ++r) {
    double M = -INFINITY;
    for (int k = 0; k < world; ++k) {
      const double m = rank_records[k][r * shard_fields + at(shard_field::shard_max)];
      M = m > M ? m : M;
    }
    double* out = records + r * shard_fields;
    for (int f = 0; f < shard_fields; ++f) out[f] = 0.0;
    for (int k = 0; k < world; ++k) {
      std::copy(rank_records[k] + r * shard_fields, rank_records[k] + (r + 1) * shard_fields, tmp);
      dpo::detail::shard_rebase(M, tmp);
      for (int f = 0; f < shard_fields; ++f) out[f] += tmp[f];
    }
    row_max[r] = M;
  }
}

/// Phase 2, sequences: the per-sequence sums of a view's rows from their combined records
/// (after the sum all-reduce), into field-major seq[f * S + s] (S = num_seqs, fields of
/// DPO_SEQ_FIELDS; logps = logps_plain, no LD-DPO). With context parallelism the view holds
/// this rank's rows of each sequence and the caller sums seq over the context group. The
/// whole vocabulary on one rank (sh = whole_vocab(V), records of shard_partials rebased to
/// their own maxima) gives the context-parallel path alone. seq may not overlap the labels,
/// the mask or the row state (the logits are not read). Deterministic.
template <class T, class L>
void shard_sequence_partials(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                             const double* records, double* seq, const options& opt = {}) {
  detail::check_shard_view(shard, sh, "logits");
  if (shard.num_seqs == 0) return;
  if (seq == nullptr) dpo::detail::fail("seq is null");
  // Row state is read only for rows of the sequences: none there, it may be null.
  if (detail::has_rows(shard) && (row_max == nullptr || records == nullptr))
    dpo::detail::fail(row_max == nullptr ? "row_max" : "records", " is null");
  {
    // Phase 2 reads the labels, the mask and the row state, never the logits (the fused
    // head's phase 2 passes its hidden rows there).
    detail::named_range in[6];
    detail::view_ranges(shard, dpo::detail::seq_view_names, in);
    detail::state_ranges(row_max, records, detail::rows_end(shard), "row_max", "records", in + 4);
    const std::int64_t n = seq_fields * shard.num_seqs;
    detail::require_no_overlap({detail::range_of(seq, 1, n, n, "seq")}, {in[1], in[2], in[3], in[4], in[5]});
  }
  detail::row_values rows;
  detail::rows_from_records(shard, sh, row_max, records, opt.metrics, rows);
  const std::vector<double> none(static_cast<std::size_t>(shard.num_seqs), INFINITY);
  const detail::seq_sums s = detail::sum_sequences(shard, rows, none, 1.0, opt.metrics);
  detail::put_sums(detail::token_counts(shard), s, opt.metrics, seq, shard.num_seqs, 0);
}

/// Phase 2, pairs: shard_sequence_partials of both sides of a pair view into seq
/// ([seq_fields, 2P], chosen in columns [0, P), rejected in [P, 2P)), LD-DPO weighted by
/// ld_alpha (which needs whole sequences on this rank: pass 1 under context parallelism).
/// Each side's records are indexed by its own buffer's rows (one array for both sides of a
/// concatenated layout). opt.metrics || WPO computes the metric sums. seq may not overlap the
/// labels, masks or row state (the logits are not read).
template <class T, class L>
void shard_pair_partials(const pair_view<T, L>& shard, const vocab_shard& sh, const double* chosen_max,
                         const double* chosen_records, const double* rejected_max,
                         const double* rejected_records, double ld_alpha, double* seq,
                         const options& opt = {}) {
  detail::check_shard_pairs(shard, sh, "logits");
  detail::check_unit(ld_alpha, "ld_alpha");
  if (seq == nullptr) dpo::detail::fail("shard_pair_partials: seq is null");
  // A side's row state is read only for its rows: a side without rows may pass null.
  detail::check_side_state("shard_pair_partials", "chosen", detail::has_rows(shard.chosen), chosen_max,
                           chosen_records);
  detail::check_side_state("shard_pair_partials", "rejected", detail::has_rows(shard.rejected), rejected_max,
                           rejected_records);
  {
    // Phase 2 reads the labels, masks and row state, never the logits (the fused head's
    // phase 2 passes its hidden rows there): those are blanked.
    detail::named_range in[12];
    detail::view_ranges(shard.chosen, dpo::detail::pair_view_names[0], in);
    detail::view_ranges(shard.rejected, dpo::detail::pair_view_names[1], in + 4);
    in[0] = in[4] = {};
    detail::state_ranges(chosen_max, chosen_records, detail::rows_end(shard.chosen), "chosen_max",
                         "chosen_records", in + 8);
    detail::state_ranges(rejected_max, rejected_records, detail::rows_end(shard.rejected), "rejected_max",
                         "rejected_records", in + 10);
    const std::int64_t n = seq_fields * 2 * shard.num_pairs();
    const detail::named_range o = detail::range_of(seq, 1, n, n, "seq");
    detail::throw_if(dpo::detail::check_no_overlap(&o, 1, in, 12));
  }
  detail::row_values rc, rr;
  detail::rows_from_records(shard.chosen, sh, chosen_max, chosen_records, opt.metrics, rc);
  detail::rows_from_records(shard.rejected, sh, rejected_max, rejected_records, opt.metrics, rr);
  const detail::batch_sequences s = detail::sequence_stage(shard, rc, rr, ld_alpha, opt.metrics);
  const std::int64_t P = shard.num_pairs();
  detail::put_sums(s.nc, s.sc, opt.metrics, seq, 2 * P, 0);
  detail::put_sums(s.nr, s.sr, opt.metrics, seq, 2 * P, P);
}

/// The pair stage from the batch's per-sequence totals ([seq_fields, 2P], after the context
/// all-reduce): dpo_forward's own pair stage, writing the same outputs (out.row_lse and
/// out.row_coef are not written: the shard keeps its records) and seq_grad[2P] = dL/dpi of
/// each sequence (chosen then rejected). out.nll_token_grad, when set, receives the NLL
/// terms' dL/dlogp of each chosen token, which shard_backward needs too. `metrics` says
/// whether the totals hold the metric sums. Every rank with the same totals computes
/// bitwise the same values. The outputs (seq_grad and out's) may overlap neither each other
/// nor seq_totals or the reference. Throws dpo::error (writing nothing) on bad input.
inline void shard_pair_stage(std::int64_t P, const double* seq_totals, const double* ref_chosen,
                             const double* ref_rejected, const loss_config& cfg, bool metrics,
                             const forward_outputs& out, double* seq_grad) {
  detail::check_config(cfg);
  detail::check_reference(cfg, ref_chosen, ref_rejected);
  if (P < 1) dpo::detail::fail("num_pairs = ", P, " is invalid: must be >= 1");
  if (seq_totals == nullptr || seq_grad == nullptr)
    dpo::detail::fail(seq_totals == nullptr ? "seq_totals" : "seq_grad", " is null");
  {
    // out.row_lse / out.row_coef are not written (rows 0); seq_grad is an output too.
    forward_outputs o = out;
    o.row_lse = o.row_coef = nullptr;
    detail::named_range outs[dpo::detail::num_forward_ranges + 1];
    outs[0] = detail::range_of(seq_grad, 1, 2 * P, 2 * P, "seq_grad");
    dpo::detail::forward_ranges(o, P, 0, outs + 1);
    const std::int64_t n = seq_fields * 2 * P;
    const detail::named_range ins[3] = {detail::range_of(seq_totals, 1, n, n, "seq_totals"),
                                        detail::range_of(ref_chosen, 1, P, P, "ref_chosen"),
                                        detail::range_of(ref_rejected, 1, P, P, "ref_rejected")};
    detail::throw_if(dpo::detail::check_no_overlap(outs, dpo::detail::num_forward_ranges + 1, ins, 3));
  }
  std::vector<double> gc, gr;
  detail::batch_sequences s;
  detail::get_sums(seq_totals, 2 * P, 0, P, s.nc, s.sc);
  detail::get_sums(seq_totals, 2 * P, P, P, s.nr, s.sr);
  forward_outputs o = out;
  o.row_lse = o.row_coef = nullptr;
  detail::pair_stage(s, ref_chosen, ref_rejected, cfg, o, metrics || cfg.use_weighting, gc, gr);
  std::copy(gc.begin(), gc.end(), seq_grad);
  std::copy(gr.begin(), gr.end(), seq_grad + P);
}

/// The backward of the pair loss on a shard: grad_output * dL/dz for the shard's columns of
/// every row, from the combined records (row_max and records after the all-reduces),
/// seq_grad and nll_token_grad of shard_pair_stage, and the ld_alpha of the forward. No
/// collective: every input is already global. grad: one buffer per side, rows indexed as
/// the side's logits; in place when it is the logits with the same stride. Masked rows get
/// zeros, gap rows are not written, columns past the shard's width are not touched. grad may
/// not overlap the labels, masks, row state or seq_grad. Deterministic; throws dpo::error
/// (writing nothing) on bad input.
template <class T, class L>
void shard_backward(const pair_view<T, L>& shard, const vocab_shard& sh, const double* chosen_max,
                    const double* chosen_records, const double* rejected_max,
                    const double* rejected_records, const double* seq_grad, double nll_token_grad,
                    double ld_alpha, const pair_grad_view<T>& grad, double grad_output = 1.0,
                    const options& opt = {}) {
  detail::check_shard_pairs(shard, sh, "logits");
  detail::check_grad(shard, grad);
  detail::check_finite(grad_output, "grad_output");
  // seq_grad and nll_token_grad are the forward's values, NaN where the data were (as the
  // unsharded backward's coefficients): not checked for finiteness.
  detail::check_unit(ld_alpha, "ld_alpha");
  if (seq_grad == nullptr) dpo::detail::fail("shard_backward: seq_grad is null");
  detail::check_side_state("shard_backward", "chosen", detail::has_rows(shard.chosen), chosen_max, chosen_records);
  detail::check_side_state("shard_backward", "rejected", detail::has_rows(shard.rejected), rejected_max,
                           rejected_records);
  const std::int64_t P = shard.num_pairs();
  {
    // grad against the logits and against each other: check_grad's rules (in place
    // allowed); here against every other input (labels, mask, cu_seqlens, state, seq_grad).
    detail::named_range st[4];
    detail::state_ranges(chosen_max, chosen_records, detail::rows_end(shard.chosen), "chosen_max", "chosen_records",
                         st);
    detail::state_ranges(rejected_max, rejected_records, detail::rows_end(shard.rejected), "rejected_max",
                         "rejected_records", st + 2);
    detail::check_grad_inputs(shard, grad, {st[0], st[1], st[2], st[3],
                                            detail::range_of(seq_grad, 1, 2 * P, 2 * P, "seq_grad")});
  }
  const std::vector<double> shared = detail::shared_lengths(
      detail::token_counts(shard.chosen), detail::token_counts(shard.rejected), ld_alpha);
  const std::vector<double> cc = detail::shard_coefs(shard.chosen, seq_grad, shared, ld_alpha, nll_token_grad);
  const std::vector<double> cr = detail::shard_coefs(shard.rejected, seq_grad + P, shared, ld_alpha, 0.0);
  detail::shard_rows_backward(shard.chosen, sh, chosen_max, chosen_records, cc, grad_output, grad.chosen,
                              grad.chosen_stride, opt.num_threads);
  detail::shard_rows_backward(shard.rejected, sh, rejected_max, rejected_records, cr, grad_output,
                              grad.rejected, grad.rejected_stride, opt.num_threads);
}

/// The backward of sum_s seq_grad[s] * logps[s] (the log-probs of shard_sequence_partials)
/// on a shard, as sequence_logps_backward: seq_grad[s] * (onehot(y) - softmax(z)) on the
/// shard's columns of completion rows, zeros on the sequences' other rows, gap rows not
/// written. In place when grad == shard.logits with the same stride; grad may not overlap the
/// labels, mask, row state or seq_grad. Deterministic; throws dpo::error (writing nothing) on
/// bad input.
template <class T, class L>
void shard_sequence_backward(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                             const double* records, const double* seq_grad, T* grad,
                             std::int64_t grad_stride, const options& opt = {}) {
  detail::check_shard_view(shard, sh, "logits");
  const bool rows = detail::has_rows(shard);
  if (rows && (row_max == nullptr || records == nullptr || seq_grad == nullptr))
    dpo::detail::fail(row_max == nullptr ? "row_max" : records == nullptr ? "records" : "seq_grad", " is null");
  detail::check_seq_grad(shard, row_max, seq_grad, grad, grad_stride);
  if (!rows) return;
  {
    detail::named_range in[6];
    detail::view_ranges(shard, dpo::detail::seq_view_names, in);  // the logits: check_seq_grad's rule (in place allowed)
    detail::state_ranges(row_max, records, detail::rows_end(shard), "row_max", "records", in + 4);
    in[0] = detail::range_of(seq_grad, 1, shard.num_seqs, shard.num_seqs, "seq_grad");
    const detail::named_range g{dpo::detail::row_bytes(grad, grad_stride, shard, dpo::detail::cpu_policy()), "grad"};
    detail::throw_if(dpo::detail::check_no_overlap(&g, 1, in, 6));
  }
  const std::vector<double> none(static_cast<std::size_t>(shard.num_seqs), INFINITY);
  detail::shard_rows_backward(shard, sh, row_max, records, detail::shard_coefs(shard, seq_grad, none, 1.0, 0.0),
                              1.0, grad, grad_stride, opt.num_threads);
}

// ---- drivers: the building blocks around the caller's collectives ------------------------

/// The caller's collectives: in-place elementwise reductions of n doubles across a group,
/// called in the same order on every rank of the group. Empty functions mean a group of one
/// (no call). vocab_max / vocab_sum run over the vocabulary (tensor-parallel) group,
/// context_sum over the context-parallel group.
struct collectives {
  std::function<void(double* data, std::int64_t n)> vocab_max;
  std::function<void(double* data, std::int64_t n)> vocab_sum;
  std::function<void(double* data, std::int64_t n)> context_sum;
};

/// What the sharded forward keeps for its backward: each side's combined records and maxima
/// (indexed by its buffer's rows), dL/dpi per sequence and the NLL token gradient.
struct shard_state {
  std::vector<double> chosen_max, chosen_records, rejected_max, rejected_records;
  std::vector<double> seq_grad;
  double nll_token_grad = 0;
  double ld_alpha = 1;
};

namespace detail {

/// Phase 1 and the two vocabulary collectives of the views `vs` into one array of `n` rows
/// indexed by the buffer's row (each view writes its own span of rows).
template <class T, class L>
void shard_rows(std::initializer_list<const token_view<T, L>*> vs, std::int64_t n, const vocab_shard& sh,
                const collectives& comm, std::vector<double>& row_max, std::vector<double>& records,
                const options& opt) {
  row_max.assign(static_cast<std::size_t>(n), -INFINITY);
  records.assign(static_cast<std::size_t>(n * shard_fields), 0.0);
  for (const token_view<T, L>* v : vs) shard_partials(*v, sh, records.data(), row_max.data(), opt);
  if (comm.vocab_max) comm.vocab_max(row_max.data(), n);
  shard_rebase(0, n, row_max.data(), records.data());
  if (comm.vocab_sum) comm.vocab_sum(records.data(), n * shard_fields);
}

/// Whether both sides' row state fits one array indexed by the buffer's row: one buffer, each
/// side on rows of its own (the concatenated layouts).
template <class T, class L>
bool one_row_array(const pair_view<T, L>& v) {
  return v.chosen.logits == v.rejected.logits &&
         !dpo::detail::rows_may_coincide(v.chosen, v.rejected, dpo::detail::cpu_policy());
}

/// Phase 1 and the two vocabulary collectives of both sides of a pair view into `st`: one
/// array over the buffer's rows when one_row_array (one max and one sum per call, as from the
/// PyTorch ops), else one of each per side.
template <class T, class L>
void shard_pair_rows(const pair_view<T, L>& v, const vocab_shard& sh, const collectives& comm, shard_state& st,
                     const options& opt) {
  const token_view<T, L>& c = v.chosen;
  const token_view<T, L>& r = v.rejected;
  const std::int64_t nc = rows_end(c), nr = rows_end(r);
  if (!one_row_array(v)) {
    shard_rows({&c}, nc, sh, comm, st.chosen_max, st.chosen_records, opt);
    shard_rows({&r}, nr, sh, comm, st.rejected_max, st.rejected_records, opt);
    return;
  }
  shard_rows({&c, &r}, std::max(nc, nr), sh, comm, st.rejected_max, st.rejected_records, opt);
  // Each side's state holds [0, rows_end) of the one array, as per-side arrays would.
  st.chosen_max.assign(st.rejected_max.begin(), st.rejected_max.begin() + nc);
  st.chosen_records.assign(st.rejected_records.begin(), st.rejected_records.begin() + nc * shard_fields);
  st.rejected_max.resize(static_cast<std::size_t>(nr));
  st.rejected_records.resize(static_cast<std::size_t>(nr * shard_fields));
}

/// The context group's sum of `seq` (n doubles), with one more element counting the ranks
/// whose own input was rejected (`failure`: this rank's message, or empty). A context rank's
/// labels are its own, so a bad one is found on that rank only: it still joins the sum, and
/// every rank throws after it instead of its peers waiting for it.
inline void context_sum(const collectives& comm, std::vector<double>& seq, const std::string& failure) {
  seq.push_back(failure.empty() ? 0.0 : 1.0);
  comm.context_sum(seq.data(), static_cast<std::int64_t>(seq.size()));
  const double bad = seq.back();
  seq.pop_back();
  if (!failure.empty()) throw dpo::error(failure);
  if (bad > 0)
    dpo::detail::fail(bad, " rank(s) of the context group rejected their input (their own error names the ",
                      "argument); this rank's input was valid");
}

}  // namespace detail

/// dpo_forward on a vocabulary shard and/or a context slice: `shard` holds this rank's
/// columns (sh) of this rank's rows of every sequence (with context parallelism: a padded
/// view of the rank's rows of each sequence, or packed with per-rank cu_seqlens; ld_alpha
/// must then be 1). Three collectives at most: vocab_max ([rows]), vocab_sum ([rows,
/// shard_fields]), context_sum ([seq_fields, 2P] + 1), with `rows` the rows of the one
/// logits buffer of a concatenated layout (separate buffers: a vocab_max and a vocab_sum
/// per side). Every rank gets the same outputs (the
/// fields of forward_outputs except row_lse / row_coef) and `state` for dpo_backward_sharded.
/// Throws dpo::error on bad input: before any collective, except that a context rank whose
/// own slice is rejected still takes part in the context sum (one more element, a count of
/// such ranks), after which every rank of the context group throws. A call that throws
/// leaves `state` as it was.
template <class T, class L>
void dpo_forward_sharded(const pair_view<T, L>& shard, const vocab_shard& sh, const double* ref_chosen,
                         const double* ref_rejected, const loss_config& cfg, const collectives& comm,
                         const forward_outputs& out, shard_state& state, const options& opt = {}) {
  // What every rank shares (configuration, reference, pair count) first; then this rank's own
  // slice, whose rejection the context group learns through its sum.
  detail::check_config(cfg);
  detail::check_reference(cfg, ref_chosen, ref_rejected);
  if (comm.context_sum && cfg.ld_alpha != 1.0)
    dpo::detail::fail("ld_alpha = ", cfg.ld_alpha,
                      " is unsupported with context parallelism (LD-DPO weights a token by its position in the "
                      "whole sequence): use ld_alpha = 1");
  const std::int64_t P = shard.num_pairs();
  if (P < 1) dpo::detail::fail("logits.num_pairs = ", P, " is invalid: must be >= 1");
  options o = opt;
  o.metrics = opt.metrics || cfg.use_weighting;
  std::vector<double> seq(static_cast<std::size_t>(seq_fields * 2 * P));
  std::string failure;
  shard_state next;  // `state` is replaced only when the call succeeds
  try {
    detail::check_shard_pairs(shard, sh, "logits");
    detail::shard_pair_rows(shard, sh, comm, next, o);
    shard_pair_partials(shard, sh, next.chosen_max.data(), next.chosen_records.data(), next.rejected_max.data(),
                        next.rejected_records.data(), cfg.ld_alpha, seq.data(), o);
  } catch (const dpo::error& e) {
    if (!comm.context_sum) throw;
    failure = e.what();
    std::fill(seq.begin(), seq.end(), 0.0);
  }
  if (comm.context_sum) detail::context_sum(comm, seq, failure);
  next.seq_grad.assign(static_cast<std::size_t>(2 * P), 0.0);
  forward_outputs fo = out;
  fo.nll_token_grad = &next.nll_token_grad;
  shard_pair_stage(P, seq.data(), ref_chosen, ref_rejected, cfg, o.metrics, fo, next.seq_grad.data());
  if (out.nll_token_grad) *out.nll_token_grad = next.nll_token_grad;
  next.ld_alpha = cfg.ld_alpha;
  state = std::move(next);
}

/// shard_backward from the state of dpo_forward_sharded (no collective).
template <class T, class L>
void dpo_backward_sharded(const pair_view<T, L>& shard, const vocab_shard& sh, const shard_state& state,
                          const pair_grad_view<T>& grad, double grad_output = 1.0, const options& opt = {}) {
  const auto size = [](const std::vector<double>& v) { return static_cast<std::int64_t>(v.size()); };
  const std::int64_t nc = detail::rows_end(shard.chosen), nr = detail::rows_end(shard.rejected);
  if (size(state.seq_grad) != 2 * shard.num_pairs() || size(state.chosen_max) != nc ||
      size(state.rejected_max) != nr || size(state.chosen_records) != nc * shard_fields ||
      size(state.rejected_records) != nr * shard_fields)
    dpo::detail::fail("shard_state does not match logits: it was computed for another batch");
  shard_backward(shard, sh, state.chosen_max.data(), state.chosen_records.data(), state.rejected_max.data(),
                 state.rejected_records.data(), state.seq_grad.data(), state.nll_token_grad, state.ld_alpha, grad,
                 grad_output, opt);
}

/// sequence_logps on a vocabulary shard and/or context slice: sums[s] and counts[s] of every
/// sequence (the same on every rank), and `state` (records and maxima) for
/// shard_sequence_backward. Collectives: vocab_max, vocab_sum, context_sum ([2, S] + 1, the
/// count of context ranks whose input was rejected, as in dpo_forward_sharded). sums and
/// counts may overlap neither each other nor the view's buffers; a call that throws leaves
/// `state` as it was.
template <class T, class L>
void sequence_logps_sharded(const token_view<T, L>& shard, const vocab_shard& sh, const collectives& comm,
                            double* sums, double* counts, shard_state& state, const options& opt = {}) {
  if (shard.num_seqs > 0 && (sums == nullptr || counts == nullptr))
    dpo::detail::fail(sums == nullptr ? "sums" : "counts", " is null");
  const std::int64_t S = shard.num_seqs > 0 ? shard.num_seqs : 0;
  {
    detail::named_range in[4];
    detail::view_ranges(shard, dpo::detail::seq_view_names, in);
    const detail::named_range out[2] = {detail::range_of(sums, 1, S, S, "sums"), detail::range_of(counts, 1, S, S, "counts")};
    detail::require_no_overlap(out, 2, in, 4);
  }
  options o = opt;
  o.metrics = false;
  // Only the log-probs and counts cross the context group.
  std::vector<double> two(static_cast<std::size_t>(2 * S), 0.0);
  std::string failure;
  shard_state next;  // `state` is replaced only when the call succeeds
  try {
    detail::check_shard_view(shard, sh, "logits");
    detail::shard_rows({&shard}, detail::rows_end(shard), sh, comm, next.chosen_max, next.chosen_records, o);
    if (S > 0) {
      std::vector<double> seq(static_cast<std::size_t>(seq_fields * S));
      shard_sequence_partials(shard, sh, next.chosen_max.data(), next.chosen_records.data(), seq.data(), o);
      std::copy_n(seq.data() + dpo::detail::at(seq_field::logps) * S, S, two.data());
      std::copy_n(seq.data() + dpo::detail::at(seq_field::tokens) * S, S, two.data() + S);
    }
  } catch (const dpo::error& e) {
    if (!comm.context_sum) throw;
    failure = e.what();
    std::fill(two.begin(), two.end(), 0.0);
  }
  if (comm.context_sum) detail::context_sum(comm, two, failure);
  state = std::move(next);
  if (S == 0) return;
  std::copy_n(two.data(), S, sums);
  std::copy_n(two.data() + S, S, counts);
}

}  // namespace cpu
}  // namespace dpo
