// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Vocabulary and context parallelism without a communication layer: the record formats a
// caller's collectives combine, and the arithmetic around them, shared by every backend.
//
// Vocabulary parallelism (tensor-parallel LM head, Megatron's convention): each rank holds
// columns [start, end) of every logits row. Phase 1 writes, per row, a record of the shard's
// partial statistics relative to the shard's own max (shard_field). The caller combines the
// ranks' records with ONE max all-reduce of the [rows] shard maxima and ONE sum all-reduce of
// the [rows, shard_fields] records, with shard_rebase between the two (or gathers every
// rank's records and calls combine_shard_records). Phase 2 turns a combined record into the
// row's log-sum-exp, label log-prob and metric terms with the core's row_stats formulas.
//
// Context parallelism: each rank holds a slice of every sequence's rows. Per-sequence sums
// of the row values (seq_field, [seq_fields, S] doubles) are combined by ONE sum all-reduce;
// then every rank runs the same pair stage and has the same loss, metrics and per-sequence
// gradients, and writes the gradient of its own rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "dpo/core/check.hpp"
#include "dpo/core/math.hpp"

namespace dpo {

/// A rank's slice of the vocabulary: columns [start, end) of a global vocabulary of `vocab`
/// columns. Labels stay global token ids.
struct vocab_shard {
  std::int64_t vocab = 0;
  std::int64_t start = 0;
  std::int64_t end = 0;
  DPO_HOST_DEVICE std::int64_t width() const { return end - start; }
  DPO_HOST_DEVICE bool holds(std::int64_t y) const { return y >= start && y < end; }
};

/// The whole vocabulary as one shard (world size 1).
DPO_HOST_DEVICE inline vocab_shard whole_vocab(std::int64_t vocab) { return {vocab, 0, vocab}; }

/// Megatron's shard of `rank` among `world` equal shards of `vocab / world` columns.
DPO_HOST_DEVICE inline vocab_shard even_shard(std::int64_t vocab, std::int64_t rank, std::int64_t world) {
  const std::int64_t w = vocab / world;
  return {vocab, rank * w, (rank + 1) * w};
}

/// The fields of a row's shard record, in buffer order: X(field, meaning). Fields 0-2 are
/// relative to the shard's max until shard_rebase shifts them to the global max; the two flags
/// say where the shard's first maximum lies and count only after shard_rebase (shards whose
/// max is not the row's are zeroed).
#define DPO_SHARD_FIELDS(X)                                                                   \
  X(sum_exp, "sum over the shard of exp(z - m)")                                              \
  X(entropy_term, "sum of exp(z - m) * (z - m)")                                              \
  X(sum_exp2, "sum of exp(2 (z - m)): WPO's lse(2z)")                                         \
  X(logit_sum, "sum of the shard's logits (the mean logit's numerator)")                      \
  X(label_logit, "z[label] on the shard holding the label, 0 elsewhere")                      \
  X(max_at_label, "1 if the shard's first maximum is the label's column")                     \
  X(max_before_label, "1 if the shard's first maximum lies at a column below the label")      \
  X(shard_max, "m, the shard's max (-inf for rows that are not read); 0 after shard_rebase")

enum class shard_field : int {
#define DPO_SHARD_ENUM(field, doc) field,
  DPO_SHARD_FIELDS(DPO_SHARD_ENUM)
#undef DPO_SHARD_ENUM
};

#define DPO_SHARD_COUNT(field, doc) +1
/// Doubles per row record.
inline constexpr int shard_fields = 0 DPO_SHARD_FIELDS(DPO_SHARD_COUNT);
#undef DPO_SHARD_COUNT

/// The fields of the per-sequence partial sums of context parallelism, [seq_fields, S]
/// doubles (field-major: field f of sequence s at f * S + s): X(field, meaning).
#define DPO_SEQ_FIELDS(X)                                                           \
  X(tokens, "completion-token count")                                              \
  X(logps, "sum of token log-probs, LD-DPO weighted when enabled")                 \
  X(logps_plain, "sum of token log-probs")                                         \
  X(entropy, "sum of row entropies")                                               \
  X(mean_logits, "sum of row mean logits")                                         \
  X(wpo, "sum of WPO token terms logp - log sum_v p_v^2")                          \
  X(hits, "completion tokens whose argmax is the label")

enum class seq_field : int {
#define DPO_SEQ_ENUM(field, doc) field,
  DPO_SEQ_FIELDS(DPO_SEQ_ENUM)
#undef DPO_SEQ_ENUM
};

#define DPO_SEQ_COUNT(field, doc) +1
/// Doubles per sequence of the context-parallel partial sums.
inline constexpr int seq_fields = 0 DPO_SEQ_FIELDS(DPO_SEQ_COUNT);
#undef DPO_SEQ_COUNT

namespace detail {

DPO_HOST_DEVICE DPO_FORCEINLINE constexpr int at(shard_field f) { return static_cast<int>(f); }
DPO_HOST_DEVICE DPO_FORCEINLINE constexpr int at(seq_field f) { return static_cast<int>(f); }

/// Phase 1: the record of one completion row from the shard's statistics `st` (argmax a
/// shard column, or negative when no metric was computed), the global label y and the
/// label's logit when the shard holds it.
template <class A>
DPO_HOST_DEVICE inline void shard_record(const row_stats<A>& st, const vocab_shard& sh, std::int64_t y,
                                         A label_logit, bool metrics, double* rec) {
  rec[at(shard_field::sum_exp)] = static_cast<double>(st.s);
  rec[at(shard_field::entropy_term)] = metrics ? static_cast<double>(st.t) : 0.0;
  rec[at(shard_field::sum_exp2)] = metrics ? static_cast<double>(st.s2) : 0.0;
  rec[at(shard_field::logit_sum)] = metrics ? static_cast<double>(st.zsum) : 0.0;
  rec[at(shard_field::label_logit)] = sh.holds(y) ? static_cast<double>(label_logit) : 0.0;
  const std::int64_t a = sh.start + st.argmax;
  rec[at(shard_field::max_at_label)] = metrics && st.argmax >= 0 && a == y ? 1.0 : 0.0;
  rec[at(shard_field::max_before_label)] = metrics && st.argmax >= 0 && a < y ? 1.0 : 0.0;
  rec[at(shard_field::shard_max)] = static_cast<double>(st.m);
}

/// The record of a row that is not read (masked, or outside every sequence): it adds nothing
/// to any sum and -inf to the max.
DPO_HOST_DEVICE inline void empty_shard_record(double* rec) {
  for (int f = 0; f < shard_fields; ++f) rec[f] = 0.0;
  rec[at(shard_field::shard_max)] = -INFINITY;
}

/// Between the two collectives: shifts a shard's record from its own max to the row's
/// global max M (the max all-reduce of the shard maxima), as merge_row_stats shifts a chunk,
/// and keeps the argmax flags only where the shard's max is the row's. After this the
/// records of all shards add up (the sum all-reduce). A shard of only -inf (or a row read by
/// no shard) adds 0; a NaN stays in sum_exp.
DPO_HOST_DEVICE inline void shard_rebase(double M, double* rec) {
  using std::exp;
  const double m = rec[at(shard_field::shard_max)];
  const double d = m - M;  // <= 0
  const double f = m == -INFINITY ? 0.0 : exp(d);
  const double s = rec[at(shard_field::sum_exp)];
  rec[at(shard_field::sum_exp)] = s * f;
  rec[at(shard_field::entropy_term)] = f * rec[at(shard_field::entropy_term)] + exp_times(f, d) * s;
  rec[at(shard_field::sum_exp2)] = rec[at(shard_field::sum_exp2)] * f * f;
  if (!(m == M)) {
    rec[at(shard_field::max_at_label)] = 0.0;
    rec[at(shard_field::max_before_label)] = 0.0;
  }
  rec[at(shard_field::shard_max)] = 0.0;
}

/// Phase 2: the row's statistics from its global max M and its summed record, as row_stats
/// (argmax is 0 when the label is the row's first maximum, -1 otherwise: compare it with 0).
DPO_HOST_DEVICE inline row_stats<double> combined_row(double M, const double* rec) {
  row_stats<double> st;
  st.m = M;
  st.s = rec[at(shard_field::sum_exp)];
  st.t = rec[at(shard_field::entropy_term)];
  st.s2 = rec[at(shard_field::sum_exp2)];
  st.zsum = rec[at(shard_field::logit_sum)];
  st.argmax = rec[at(shard_field::max_at_label)] > 0.5 && rec[at(shard_field::max_before_label)] < 0.5 ? 0 : -1;
  return st;
}

/// One combined row's values, as the unsharded row kernels produce them.
struct shard_row_values {
  double lse;      // logsumexp(z), max + log(sum), in double
  double logp;     // z[y] - lse
  double entropy;  // with metrics
  double zmean;    // mean logit over the global vocabulary
  double wpo;      // logp - log sum_v p_v^2
  bool hit;        // the label is the row's first argmax (the token-accuracy metric)
};

DPO_HOST_DEVICE inline shard_row_values finish_row(double M, const double* rec, std::int64_t vocab) {
  const row_stats<double> st = combined_row(M, rec);
  shard_row_values v;
  v.lse = st.logsumexp_double();
  v.logp = st.log_softmax(rec[at(shard_field::label_logit)]);
  v.entropy = st.entropy();
  v.zmean = st.zsum / static_cast<double>(vocab);
  v.wpo = v.logp - st.log_sum_p2();
  v.hit = st.argmax == 0;
  return v;
}

/// linear_logps' is_top1 of a combined row (label_is_top1 from the record's argmax flags and
/// label logit): what both backends' linear_shard_logps write, equal to the unsharded head's.
/// finish_row's `hit` is the DPO metrics' (the first maximum alone, as the logits path).
DPO_HOST_DEVICE inline bool shard_label_is_top1(double M, const double* rec) {
  return label_is_top1(combined_row(M, rec).argmax == 0, rec[at(shard_field::label_logit)]);
}

/// The row's log-sum-exp for the shard's backward, exactly as hi + lo = M + log(sum): M is a
/// logit of the row, so hi is exact in A and no recomputation is ever needed.
template <class A>
DPO_HOST_DEVICE inline lse_parts<A> shard_lse(double M, const double* rec) {
  using std::log;
  return lse_parts<A>(static_cast<A>(M), static_cast<A>(log(rec[at(shard_field::sum_exp)])));
}

/// The shard description against the shard's logits width: 0 <= start < end <= vocab and
/// end - start == width. Empty when valid (the core checks' convention).
inline std::string check_vocab_shard(const vocab_shard& sh, std::int64_t width) {
  if (sh.vocab < 1) return message("vocab_shard.vocab = ", sh.vocab, " is invalid: must be >= 1");
  if (sh.start < 0 || sh.end <= sh.start || sh.end > sh.vocab)
    return message("vocab_shard [start, end) = [", sh.start, ", ", sh.end,
                   ") is invalid: must satisfy 0 <= start < end <= vocab = ", sh.vocab);
  if (sh.width() != width)
    return message("vocab_shard [", sh.start, ", ", sh.end, ") holds ", sh.width(),
                   " columns but the shard's logits have vocab = ", width);
  return {};
}

}  // namespace detail
}  // namespace dpo
