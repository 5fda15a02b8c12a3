// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the fused LM head reads and writes, for both backends (dpo::cpu::linear_* takes host
// pointers, dpo::cuda::linear_* device pointers; each backend names these types in its own
// namespace too): the view of hidden states and an LM head, the chunk shape a call picked,
// where the backward writes and the optional per-token outputs; for DPO from hidden states,
// the pair layouts over hidden rows and where its gradients go. Plain pointers, int64 sizes
// and strides in elements, nothing owned. Math and memory model: docs/linear.md.
#pragma once

#include <cstdint>

#include "dpo/core/layout.hpp"
#include "dpo/core/math.hpp"
#include "dpo/core/transforms.hpp"

namespace dpo {

/// An LM head: weight [vocab, weight_stride] (row-major, the nn.Linear layout; columns
/// [0, hidden) read), optional bias [vocab] (bias_size = vocab, or null and 0), and the
/// logit transforms (scale, soft cap, temperature; dpo/core/transforms.hpp).
template <class T>
struct linear_head {
  const T* weight = nullptr;
  std::int64_t vocab = 0;   // V >= 1
  std::int64_t hidden = 0;  // H >= 1: columns of the weight read
  std::int64_t weight_stride = 0;
  const T* bias = nullptr;
  std::int64_t bias_size = 0;
  logit_transforms transforms;
};

/// The head of a weight [vocab, weight_stride] (`hidden` columns read), an optional bias
/// [vocab] (null: none) and the transforms.
template <class T>
DPO_HOST_DEVICE linear_head<T> make_linear_head(const T* weight, std::int64_t vocab, std::int64_t hidden,
                                                std::int64_t weight_stride, const T* bias = nullptr,
                                                logit_transforms transforms = {}) {
  return {weight, vocab, hidden, weight_stride, bias, bias != nullptr ? vocab : 0, transforms};
}

/// An LM head applied to hidden states. Row r of `hidden` scores label r (already shifted,
/// as token_view's logits).
///
/// | field | shape / meaning |
/// |---|---|
/// | hidden, hidden_stride | [rows, hidden_stride], columns [0, hidden_cols) read |
/// | weight, weight_stride | [vocab, weight_stride], row-major nn.Linear layout, columns [0, weight_cols) read |
/// | bias, bias_size | [vocab] or null; bias_size must be vocab with a bias, 0 without |
/// | labels, mask | [rows]; a row counts when label != ignore_index and (no mask or mask[r] != 0) |
/// | transforms | scale, soft cap, temperature (dpo/core/transforms.hpp) |
///
/// T: float, double and the backend's bf16 / half types; L: int32_t or int64_t.
template <class T, class L>
struct linear_view {
  const T* hidden = nullptr;
  std::int64_t rows = 0;         // N >= 0
  std::int64_t hidden_cols = 0;  // H >= 1
  std::int64_t hidden_stride = 0;
  const T* weight = nullptr;
  std::int64_t vocab = 0;        // V >= 1 (and < 2^31 on CUDA)
  std::int64_t weight_cols = 0;  // must equal hidden_cols
  std::int64_t weight_stride = 0;
  const T* bias = nullptr;
  std::int64_t bias_size = 0;
  const L* labels = nullptr;
  const std::uint8_t* mask = nullptr;
  std::int64_t ignore_index = -100;
  logit_transforms transforms;

  /// The label of row r if it counts, else -1 (after the labels were checked; where the
  /// pointers are, host or device, this runs).
  DPO_HOST_DEVICE std::int64_t target(std::int64_t r) const {
    const std::int64_t y = static_cast<std::int64_t>(labels[r]);
    if (y == ignore_index || (mask != nullptr && mask[r] == 0)) return -1;
    return y;
  }
};

/// The linear_view of `rows` hidden states [rows, hidden_stride] (the head's `hidden`
/// columns read) through `head`, scoring `labels` (with an optional mask and ignore_index).
template <class T, class L>
DPO_HOST_DEVICE linear_view<T, L> linear_view_of(const T* hidden, std::int64_t rows, std::int64_t hidden_stride,
                                                 const linear_head<T>& head, const L* labels,
                                                 const std::uint8_t* mask = nullptr,
                                                 std::int64_t ignore_index = -100) {
  // In field order (linear_view is an aggregate).
  return {hidden,         rows,      head.hidden, hidden_stride, head.weight,  head.vocab,   head.hidden,
          head.weight_stride, head.bias, head.bias_size, labels,  mask,         ignore_index, head.transforms};
}

/// The chunk shape of a call and the workspace it needs (bytes, every buffer included).
struct linear_chunking {
  std::int64_t rows = 0;
  std::int64_t vocab = 0;
  std::int64_t workspace_bytes = 0;
};

/// Where the backward writes. Null pointers skip that gradient (a frozen head, say).
/// - hidden: [rows, hidden_stride] of T; written (accumulate_hidden = false: rows that do not
///   count, or whose upstream gradients are 0, get zeros) or added to (true: such rows are
///   untouched).
/// - weight: [vocab, weight_stride] and bias: [vocab], of G, always added to. G is T or the
///   accumulation type (float for bf16/half): with G = float the sums stay in fp32 across
///   calls (the recommended accumulation buffer for bf16/half heads); with G = bf16/half each
///   call rounds once per row chunk.
template <class T, class G = T>
struct linear_grads {
  T* hidden = nullptr;
  std::int64_t hidden_stride = 0;
  bool accumulate_hidden = false;
  G* weight = nullptr;
  std::int64_t weight_stride = 0;
  G* bias = nullptr;
};

/// The optional per-token outputs of linear_logps (both backends), each [rows] or null (not
/// computed); rows that do not count get 0. TRL's ChunkedLogProbFunction outputs, folded chunk
/// by chunk into the same row statistics as the log-sum-exp (dpo/core/math.hpp row_stats):
/// - entropy: -sum_v p_v log p_v = log s - t / s
/// - log_sum_sq_probs: log sum_v p_v^2 = log s2 - 2 log s (WPO's weight term)
/// - mean_logits: (1 / V) sum_v o_v, the mean of the transformed logits (summed in A)
/// - is_top1: 1 when the label is the row's top-1 token (dpo::detail::label_is_top1: its first
///   maximum, torch.argmax's tie rule, with a logit above -inf), else 0
/// All but is_top1 are in double; entropy is the only one the backward differentiates.
struct linear_outputs {
  double* entropy = nullptr;
  double* log_sum_sq_probs = nullptr;
  double* mean_logits = nullptr;
  std::uint8_t* is_top1 = nullptr;

  DPO_HOST_DEVICE bool any() const {
    return entropy != nullptr || log_sum_sq_probs != nullptr || mean_logits != nullptr || is_top1 != nullptr;
  }
};

/// Preference pairs over hidden rows: a pair layout of the logits path (padded TRL
/// concatenated, packed with cu_seqlens, separate chosen/rejected; dpo/core/layout.hpp) with
/// hidden states in place of the logits. In `pairs`, each token_view's `logits` points at its
/// hidden rows and `row_stride` is their stride (elements, >= hidden_size); its `vocab` is
/// not used (the head's vocab bounds the labels). Labels, mask, cu_seqlens, gaps and
/// ignore_index mean what they mean for logits. Build with linear_padded_pairs,
/// linear_packed_pairs or linear_separate_pairs.
template <class T, class L>
struct hidden_pairs {
  pair_view<T, L> pairs;
  std::int64_t hidden_size = 0;  // H of the hidden rows: must equal the head's
  DPO_HOST_DEVICE std::int64_t num_pairs() const { return pairs.num_pairs(); }
};

/// TRL's padded concatenated layout over hidden rows [num_seqs * seq_len, hidden_stride]:
/// sequences [0, P) chosen, [P, 2P) rejected (num_seqs = 2P).
template <class T, class L>
hidden_pairs<T, L> linear_padded_pairs(const T* hidden, std::int64_t hidden_size,
                                       std::int64_t hidden_stride, const L* labels,
                                       std::int64_t num_seqs, std::int64_t seq_len,
                                       const std::uint8_t* mask = nullptr,
                                       std::int64_t ignore_index = -100) {
  return {padded_pairs(hidden, labels, num_seqs, seq_len, hidden_size, hidden_stride, mask, ignore_index),
          hidden_size};
}

/// Packed pairs over hidden rows [cu_seqlens[2P], hidden_stride].
template <class T, class L>
hidden_pairs<T, L> linear_packed_pairs(const T* hidden, std::int64_t hidden_size,
                                       std::int64_t hidden_stride, const L* labels,
                                       const std::int64_t* cu_seqlens, std::int64_t num_seqs,
                                       const std::uint8_t* mask = nullptr,
                                       std::int64_t ignore_index = -100) {
  return {packed_pairs(hidden, labels, cu_seqlens, num_seqs, hidden_size, hidden_stride, mask, ignore_index),
          hidden_size};
}

/// Separate chosen and rejected hidden buffers [P * seq_len, hidden_stride] each.
template <class T, class L>
hidden_pairs<T, L> linear_separate_pairs(const T* chosen_hidden, const L* chosen_labels,
                                         const T* rejected_hidden, const L* rejected_labels,
                                         std::int64_t num_pairs, std::int64_t seq_len,
                                         std::int64_t hidden_size, std::int64_t hidden_stride,
                                         const std::uint8_t* chosen_mask = nullptr,
                                         const std::uint8_t* rejected_mask = nullptr,
                                         std::int64_t ignore_index = -100) {
  return {separate_pairs(chosen_hidden, chosen_labels, rejected_hidden, rejected_labels, num_pairs,
                         seq_len, hidden_size, hidden_stride, chosen_mask, rejected_mask, ignore_index),
          hidden_size};
}

/// Where the gradients of DPO from hidden states go; null members are skipped.
/// - chosen_hidden / rejected_hidden: dHidden in each side's hidden buffer layout (the same
///   pointer and stride for the concatenated layouts), T. Written (accumulate_hidden = false:
///   rows of the sequences that are not completion tokens get zeros) or added to (true: such
///   rows are untouched). Rows outside every sequence (gaps) are never touched.
/// - weight [vocab, weight_stride], bias [vocab]: of G (T, or float for bf16 / half heads:
///   fp32 accumulation across calls), always added to.
template <class T, class G = T>
struct linear_dpo_grads {
  T* chosen_hidden = nullptr;
  std::int64_t chosen_hidden_stride = 0;
  T* rejected_hidden = nullptr;
  std::int64_t rejected_hidden_stride = 0;
  bool accumulate_hidden = false;
  G* weight = nullptr;
  std::int64_t weight_stride = 0;
  G* bias = nullptr;
};

/// The types of DPO from hidden states that each backend also names in its own namespace
/// (dpo::cpu::hidden_pairs and dpo::cuda::hidden_pairs are dpo::hidden_pairs): the list is
/// written once here and brought in by `using namespace dpo::linear_dpo_types;`.
namespace linear_dpo_types {
using dpo::hidden_pairs;
using dpo::linear_dpo_grads;
using dpo::linear_head;
using dpo::linear_packed_pairs;
using dpo::linear_padded_pairs;
using dpo::linear_separate_pairs;
}  // namespace linear_dpo_types

}  // namespace dpo
