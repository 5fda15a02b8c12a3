// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Where sequences live in a logits buffer: plain structs of pointers, int64 sizes and
// strides, shared by the CPU and CUDA APIs (the CUDA ones take device pointers).
#pragma once

#include <cstdint>

#include "dpo/core/math.hpp"

namespace dpo {

/// A set of sequences inside a row-major logits buffer [rows, row_stride] (row_stride >= vocab;
/// columns [vocab, row_stride) are never read or written) with one label per row.
///
/// Sequence s (0 <= s < num_seqs) owns the rows
///   padded: [(first_seq + s) * P, (first_seq + s) * P + seq_len), P = seq_pitch()
///   packed: [cu_seqlens[first_seq + s], cu_seqlens[first_seq + s + 1])   (cu_seqlens != null)
/// A row is a completion token when its label != ignore_index and (mask == null or
/// mask[row] != 0). Completion labels must lie in [0, vocab).
/// Logits are already shifted: row t scores label t.
///
/// Padded views may leave gaps between sequences (seq_stride > seq_len), e.g. TRL's shifted
/// slice logits[:, :-1, :] of a contiguous [B, T, V] tensor without a copy: seq_len = T - 1,
/// seq_stride = T, row_stride = V, labels = labels_base + 1 (labels[:, 1:] of a contiguous
/// [B, T] tensor; labels and mask are indexed by the same row numbers as the logits). Rows in
/// a gap belong to no sequence: their logits, labels and mask are never read, and no output
/// indexed by row (gradients, row_lse, row_coef) is written there.
template <class T, class L>
struct token_view {
  const T* logits = nullptr;
  const L* labels = nullptr;
  const std::uint8_t* mask = nullptr;
  const std::int64_t* cu_seqlens = nullptr;
  std::int64_t vocab = 0;
  std::int64_t row_stride = 0;
  std::int64_t num_seqs = 0;
  std::int64_t seq_len = 0;
  std::int64_t first_seq = 0;
  std::int64_t ignore_index = -100;
  /// Padded views: rows between the first rows of consecutive sequences, >= seq_len; 0 means
  /// seq_len (no gaps). Ignored for packed views.
  std::int64_t seq_stride = 0;

  /// Rows from one padded sequence's first row to the next one's.
  DPO_HOST_DEVICE std::int64_t seq_pitch() const { return seq_stride != 0 ? seq_stride : seq_len; }
  DPO_HOST_DEVICE std::int64_t row_begin(std::int64_t s) const {
    return cu_seqlens ? cu_seqlens[first_seq + s] : (first_seq + s) * seq_pitch();
  }
  DPO_HOST_DEVICE std::int64_t row_end(std::int64_t s) const {
    return cu_seqlens ? cu_seqlens[first_seq + s + 1] : (first_seq + s) * seq_pitch() + seq_len;
  }
  /// Whether a row of [row_begin(0), row_end(num_seqs - 1)) belongs to a sequence: always for
  /// packed views (their sequences are back to back), not in the gaps of a padded view.
  DPO_HOST_DEVICE bool in_sequence(std::int64_t row) const {
    return cu_seqlens != nullptr || (seq_len > 0 && row % seq_pitch() < seq_len);
  }
  /// The sequence s (0 <= s < num_seqs) owning `row`, for a row where in_sequence() holds.
  /// Packed views: a binary search of cu_seqlens (empty sequences own no row).
  DPO_HOST_DEVICE std::int64_t seq_of_row(std::int64_t row) const {
    if (cu_seqlens == nullptr) return row / seq_pitch() - first_seq;
    std::int64_t lo = 0, hi = num_seqs - 1;  // the last s with cu_seqlens[first_seq + s] <= row
    while (lo < hi) {
      const std::int64_t mid = lo + (hi - lo + 1) / 2;
      if (cu_seqlens[first_seq + mid] <= row) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
  /// What target() returns for a masked row: negative, and no label's value, so a label of
  /// -1 (not ignore_index) still reaches the range check instead of passing as masked.
  static constexpr std::int64_t masked = INT64_MIN;
  /// The raw label of a row if it is a completion token, else `masked`. Callers test
  /// `target(r) >= 0` for "completion token" once the labels have been checked.
  DPO_HOST_DEVICE std::int64_t target(std::int64_t row) const {
    const std::int64_t y = static_cast<std::int64_t>(labels[row]);
    if (y == ignore_index) return masked;
    if (mask != nullptr && mask[row] == 0) return masked;
    return y;
  }
};

namespace detail {

/// A padded token_view of `num_seqs` sequences from sequence 0: what every layout builder
/// starts from.
template <class T, class L>
token_view<T, L> make_token_view(const T* logits, const L* labels, const std::uint8_t* mask,
                                 std::int64_t num_seqs, std::int64_t seq_len, std::int64_t vocab,
                                 std::int64_t row_stride, std::int64_t ignore_index) {
  // In field order (token_view is an aggregate); no cu_seqlens, from sequence 0.
  return {logits, labels, mask, nullptr, vocab, row_stride, num_seqs, seq_len, 0, ignore_index};
}

}  // namespace detail

/// Preference pairs: sequence i of `chosen` is paired with sequence i of `rejected`.
/// Both views may point into one buffer (TRL's concatenated layout) or into two.
template <class T, class L>
struct pair_view {
  token_view<T, L> chosen;
  token_view<T, L> rejected;
  /// 2P for the concatenated layouts (the count the caller gave, checked to be even), 0 for
  /// separate buffers.
  std::int64_t concatenated_seqs = 0;
  DPO_HOST_DEVICE std::int64_t num_pairs() const { return chosen.num_seqs; }
};

/// TRL's padded layout: logits [2P * seq_len, row_stride], rows of sequences [0, P) chosen,
/// [P, 2P) rejected. num_seqs = 2P.
template <class T, class L>
pair_view<T, L> padded_pairs(const T* logits, const L* labels, std::int64_t num_seqs,
                             std::int64_t seq_len, std::int64_t vocab, std::int64_t row_stride,
                             const std::uint8_t* mask = nullptr,
                             std::int64_t ignore_index = -100) {
  const token_view<T, L> v = detail::make_token_view(logits, labels, mask, num_seqs / 2, seq_len,
                                                     vocab, row_stride, ignore_index);
  pair_view<T, L> p{v, v, num_seqs};
  p.rejected.first_seq = num_seqs / 2;
  return p;
}

/// Packed layout: logits [cu_seqlens[2P], row_stride] holding 2P sequences back to back,
/// cu_seqlens [2P + 1] their row offsets; sequences [0, P) chosen, [P, 2P) rejected.
template <class T, class L>
pair_view<T, L> packed_pairs(const T* logits, const L* labels, const std::int64_t* cu_seqlens,
                             std::int64_t num_seqs, std::int64_t vocab, std::int64_t row_stride,
                             const std::uint8_t* mask = nullptr,
                             std::int64_t ignore_index = -100) {
  pair_view<T, L> p = padded_pairs(logits, labels, num_seqs, 0, vocab, row_stride, mask,
                                   ignore_index);
  p.chosen.cu_seqlens = cu_seqlens;
  p.rejected.cu_seqlens = cu_seqlens;
  return p;
}

/// Separate buffers: chosen logits [P * seq_len, row_stride] and rejected logits of the same
/// shape, each with its own labels (and mask).
template <class T, class L>
pair_view<T, L> separate_pairs(const T* chosen_logits, const L* chosen_labels,
                               const T* rejected_logits, const L* rejected_labels,
                               std::int64_t num_pairs, std::int64_t seq_len, std::int64_t vocab,
                               std::int64_t row_stride, const std::uint8_t* chosen_mask = nullptr,
                               const std::uint8_t* rejected_mask = nullptr,
                               std::int64_t ignore_index = -100) {
  return {detail::make_token_view(chosen_logits, chosen_labels, chosen_mask, num_pairs, seq_len,
                                  vocab, row_stride, ignore_index),
          detail::make_token_view(rejected_logits, rejected_labels, rejected_mask, num_pairs,
                                  seq_len, vocab, row_stride, ignore_index),
          0};
}

/// Where the gradient of a pair_view goes: one buffer per side, indexed by the same rows as
/// the side's logits. For the concatenated layouts both pointers are the same buffer.
/// grad == logits (same pointer and stride) is the in-place mode.
template <class T>
struct pair_grad_view {
  T* chosen = nullptr;
  std::int64_t chosen_stride = 0;
  T* rejected = nullptr;
  std::int64_t rejected_stride = 0;
};

/// Sequence-level inputs of the pair loss (TRL's dpo_loss): P doubles each (host arrays for
/// dpo::cpu::dpo_loss, device arrays for dpo::cuda::dpo_loss). Token counts are needed by
/// ipo, sigmoid_norm, simpo, orpo and cpo-ipo (null means 1 token each): finite and >= 0
/// (dpo::cpu::dpo_loss refuses others; the device's are not read on the host, so
/// dpo::cuda::dpo_loss cannot), and below 1 they count as 1 where they divide. weights: WPO's
/// W_i (null means 1), multiplying loss entry i; with aot / aot_unpaired entry i is the i-th
/// sorted position, not pair i (what a vector-Jacobian product over the entries needs; per-pair
/// weights would be misaligned there, which use_weighting refuses for that reason).
/// Reference arrays may be null for reference-free losses. The NLL terms
/// (sft, cpo, orpo) read NLL(chosen) = -sum(chosen_logps) / sum(chosen_tokens), so pass plain
/// (not LD-DPO weighted) sums with them.
struct pair_logps_in {
  std::int64_t num_pairs = 0;
  const double* chosen_logps = nullptr;
  const double* rejected_logps = nullptr;
  const double* ref_chosen_logps = nullptr;
  const double* ref_rejected_logps = nullptr;
  const double* chosen_tokens = nullptr;
  const double* rejected_tokens = nullptr;
  const double* weights = nullptr;
};

/// The pair inputs of `num_pairs` pairs from their arrays (null: absent, as above).
DPO_HOST_DEVICE inline pair_logps_in make_pair_logps(std::int64_t num_pairs, const double* chosen_logps,
                                                     const double* rejected_logps,
                                                     const double* ref_chosen_logps = nullptr,
                                                     const double* ref_rejected_logps = nullptr,
                                                     const double* chosen_tokens = nullptr,
                                                     const double* rejected_tokens = nullptr,
                                                     const double* weights = nullptr) {
  return {num_pairs,        chosen_logps,  rejected_logps,  ref_chosen_logps,
          ref_rejected_logps, chosen_tokens, rejected_tokens, weights};
}

}  // namespace dpo
