// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Chunk planning of DPO from hidden states (issue 12, item 2), shared by the CPU and CUDA
// fused heads: from a workspace budget and the completion rows of each pair, which pairs go
// into each chunk and whether the call runs three GEMM passes over the weight (logits,
// dHidden, dWeight: every chunk holds whole pairs, so each row's dL/dlogp is known before its
// chunk's backward products) or four (sequence log-probs first, then the backward
// recomputes the logits). Host code; nothing here allocates device memory or depends on a
// backend. Memory model and the decision: docs/linear.md.
#pragma once

#include <cstdint>
#include <string>

#include "dpo/core/check.hpp"
#include "dpo/core/loss.hpp"
#include "dpo/core/pair_batch.hpp"

namespace dpo {

/// How a DPO-from-hidden call computes its gradients.
enum class linear_mode {
  automatic,   // three passes when the plan allows, else four
  three_pass,  // logits once per chunk of whole pairs; fails when the plan does not allow it
  four_pass,   // sequence log-probs first, then the backward recomputes the logits
};

/// The sizes a plan needs: the head, the element sizes of the backend's buffers and the
/// caller's budget. Byte counts are per element.
struct linear_plan_in {
  std::int64_t vocab = 0;          // V
  std::int64_t hidden = 0;         // H
  std::int64_t acc_bytes = 4;      // the accumulation type (float, double for double heads)
  bool convert_weight = false;     // the weight is converted to A one block at a time (bf16, half)
  bool keep_transform_grad = false;  // a soft cap: do/du is kept per logit beside the logits
  bool hidden_grad = true;         // a dHidden accumulator per row
  std::int64_t budget = 0;         // workspace bytes the call may use
  std::int64_t chunk_rows = 0;     // a fixed number of rows per chunk (0: from the budget)
};

namespace detail {

/// Vocab rows per block of the weight converted to A (bf16 / half heads), at most.
inline constexpr std::int64_t linear_convert_block = 8192;

/// The bytes per row of a full-vocab logits chunk: the logits (and do/du with a cap) in A,
/// the row's hidden state gathered in A and its dHidden accumulator, and the row's scalars
/// (label, lse, coefficient and the forward's per-row values: 16 doubles at most).
DPO_HOST_DEVICE inline std::int64_t linear_row_bytes(const linear_plan_in& in) {
  const std::int64_t a = in.acc_bytes;
  return in.vocab * a * (in.keep_transform_grad ? 2 : 1) + in.hidden * a * (in.hidden_grad ? 2 : 1) +
         16 * 8;
}

/// Vocab rows of one converted weight block (0 when the weight is used as it is).
DPO_HOST_DEVICE inline std::int64_t linear_convert_rows(const linear_plan_in& in) {
  if (!in.convert_weight) return 0;
  return in.vocab < linear_convert_block ? in.vocab : linear_convert_block;
}

/// The bytes a chunk of `rows` full-vocab rows needs in all.
DPO_HOST_DEVICE inline std::int64_t linear_chunk_bytes(const linear_plan_in& in, std::int64_t rows) {
  return linear_convert_rows(in) * in.hidden * in.acc_bytes + rows * linear_row_bytes(in);
}

/// The most full-vocab rows a chunk may hold under the budget (or in.chunk_rows when given);
/// 0 when not even one row fits.
DPO_HOST_DEVICE inline std::int64_t linear_max_chunk_rows(const linear_plan_in& in) {
  const std::int64_t fixed = linear_chunk_bytes(in, 0);
  const std::int64_t fit = in.budget > fixed ? (in.budget - fixed) / linear_row_bytes(in) : 0;
  if (in.chunk_rows > 0) return in.chunk_rows <= fit ? in.chunk_rows : 0;
  return fit;
}

/// Whether the loss lets a chunk of whole pairs form its rows' dL/dlogp before the rest of
/// the batch is seen: not for the sorted batch terms (aot, aot_unpaired: a pair's gradient
/// depends on every pair), nor for an NLL term under WPO (its token gradient scales with
/// the batch's mean weight).
DPO_HOST_DEVICE inline bool linear_pairs_separable(const loss_config& c) {
  for (int k = 0; k < c.num_terms; ++k)
    if (is_batch_type(c.terms[k].type)) return false;
  return !(c.use_weighting && nll_weight(c) != 0.0);
}

/// The pairs of the three-pass chunk starting at pair p0: [p0, end) with the most pairs whose
/// rows (pair_rows[i]: completion rows of both sides of pair i) add up to at most max_rows.
/// Returns p0 when pair p0 alone does not fit. Pairs without completion rows ride along.
DPO_HOST_DEVICE inline std::int64_t linear_next_chunk(const std::int64_t* pair_rows,
                                                      std::int64_t num_pairs, std::int64_t p0,
                                                      std::int64_t max_rows) {
  std::int64_t rows = 0, p = p0;
  while (p < num_pairs && rows + pair_rows[p] <= max_rows) rows += pair_rows[p++];
  return p;
}

/// The rows of the largest three-pass chunk when chunks of at most max_rows rows are cut
/// greedily (linear_next_chunk): what the workspace must hold. Every pair must fit.
DPO_HOST_DEVICE inline std::int64_t linear_largest_chunk(const std::int64_t* pair_rows,
                                                         std::int64_t num_pairs,
                                                         std::int64_t max_rows) {
  std::int64_t largest = 0;
  for (std::int64_t p0 = 0; p0 < num_pairs;) {
    const std::int64_t p1 = linear_next_chunk(pair_rows, num_pairs, p0, max_rows);
    std::int64_t rows = 0;
    for (std::int64_t p = p0; p < p1; ++p) rows += pair_rows[p];
    largest = rows > largest ? rows : largest;
    p0 = p1 > p0 ? p1 : p0 + 1;
  }
  return largest;
}

/// Whether every pair fits a chunk of max_rows rows (the three-pass condition on memory).
DPO_HOST_DEVICE inline bool linear_pairs_fit(const std::int64_t* pair_rows, std::int64_t num_pairs,
                                             std::int64_t max_rows) {
  for (std::int64_t p = 0; p < num_pairs; ++p)
    if (pair_rows[p] > max_rows) return false;
  return true;
}

/// The mode a call runs in: `requested` unless automatic; automatic picks three passes when
/// the loss is separable (linear_pairs_separable) and every pair fits a chunk.
DPO_HOST_DEVICE inline linear_mode linear_choose_mode(linear_mode requested, const loss_config& c,
                                                      const std::int64_t* pair_rows,
                                                      std::int64_t num_pairs,
                                                      std::int64_t max_rows) {
  if (requested != linear_mode::automatic) return requested;
  return linear_pairs_separable(c) && linear_pairs_fit(pair_rows, num_pairs, max_rows)
             ? linear_mode::three_pass
             : linear_mode::four_pass;
}

/// Why linear_mode::three_pass is impossible, or "" when it is possible: both backends'
/// wording. `rows_what` names what pair_rows counts (the CPU: completion rows; CUDA: every
/// row of the pair's sequences, since its labels are device data). Host code.
inline std::string linear_three_pass_refusal(const loss_config& c, const std::int64_t* pair_rows,
                                             std::int64_t num_pairs, std::int64_t max_rows,
                                             const char* rows_what) {
  if (!linear_pairs_separable(c))
    return "options.mode = three_pass is impossible for this loss: aot, aot_unpaired and an NLL "
           "term under WPO couple the pairs of the batch (use automatic or four_pass)";
  if (!linear_pairs_fit(pair_rows, num_pairs, max_rows))
    return message("options.mode = three_pass is impossible: a pair's ", rows_what,
                   " do not fit a chunk of ", max_rows, " rows under options.workspace_bytes / chunk_rows");
  return {};
}

}  // namespace detail
}  // namespace dpo
