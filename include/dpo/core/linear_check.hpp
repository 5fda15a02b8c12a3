// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The argument checks of the fused LM head (a linear_view: dpo::cpu's or dpo::cuda's, which
// have the same fields), written once as core/check.hpp writes the logits path's: each check
// returns the message of the first rule broken, without the "dpo: " prefix, or "" when the
// arguments are valid. The wording is dpo::cpu::linear_logps'. What a backend can see differs
// (check_policy): CUDA's labels are device data (its first kernel checks them) and a size
// query has no pointers yet. Host code; nothing here reads device memory.
#pragma once

#include <climits>
#include <cstdint>
#include <string>

#include "dpo/core/check.hpp"
#include "dpo/core/transforms.hpp"

namespace dpo {
namespace detail {

/// The labels of a view's rows in host memory (v.labels non-null when v.rows > 0): each row
/// that counts (label != ignore_index, not masked) in [0, bound).
template <class View>
std::string check_linear_labels(const View& v, std::int64_t bound) {
  for (std::int64_t r = 0; r < v.rows; ++r) {
    const std::int64_t y = static_cast<std::int64_t>(v.labels[r]);
    if (y == v.ignore_index || (v.mask != nullptr && v.mask[r] == 0)) continue;
    if (y < 0 || y >= bound)
      return message("labels[", r, "] = ", y, " is outside [0, vocab = ", bound, ") and is not ignore_index = ",
                     v.ignore_index);
  }
  return {};
}

/// A linear head view's sizes, strides, bias, transforms, pointers (p.pointers) and labels
/// (p.host_data: labels in host memory; CUDA checks them on the device). `label_bound`: the
/// vocabulary the labels index (0: the view's; a vocabulary shard's view passes the global
/// vocabulary).
template <class View>
std::string check_linear_view(const View& v, const check_policy& p, std::int64_t label_bound = 0) {
  if (v.rows < 0) return message("rows = ", v.rows, " is invalid: must be >= 0");
  if (v.hidden_cols < 1) return message("hidden_cols = ", v.hidden_cols, " is invalid: must be >= 1");
  if (v.weight_cols != v.hidden_cols)
    return message("weight_cols = ", v.weight_cols, " != hidden_cols = ", v.hidden_cols,
                   ": hidden and weight must have the same hidden size");
  if (v.vocab < 1) return message("vocab = ", v.vocab, " is invalid: must be >= 1");
  if (p.int32_extents && v.vocab > INT_MAX) return message("vocab = ", v.vocab, " is too large: must be < 2^31");
  if (v.hidden_stride < v.hidden_cols)
    return message("hidden_stride = ", v.hidden_stride, " is invalid: must be >= hidden_cols = ", v.hidden_cols);
  if (v.weight_stride < v.weight_cols)
    return message("weight_stride = ", v.weight_stride, " is invalid: must be >= weight_cols = ", v.weight_cols);
  // As check_view's rows x row_stride: the byte ranges of the aliasing checks and the
  // kernels' row offsets are int64 products.
  if (p.int64_rows && v.rows > INT64_MAX / v.hidden_stride)
    return message("rows = ", v.rows, " x hidden_stride = ", v.hidden_stride, " overflows int64");
  if (p.int64_rows && v.vocab > INT64_MAX / v.weight_stride)
    return message("vocab = ", v.vocab, " x weight_stride = ", v.weight_stride, " overflows int64");
  if (p.pointers && v.weight == nullptr) return "weight is null";
  // Without pointers (a size query) a null bias with bias_size = vocab is a bias to come.
  if ((v.bias != nullptr || !p.pointers) && v.bias_size != 0 && v.bias_size != v.vocab)
    return message("bias_size = ", v.bias_size, " != vocab = ", v.vocab,
                   ": the bias must have one entry per vocab row");
  if (v.bias != nullptr && v.bias_size == 0)
    return message("bias_size = 0 != vocab = ", v.vocab, ": the bias must have one entry per vocab row");
  if (p.pointers && v.bias == nullptr && v.bias_size != 0)
    return message("bias is null but bias_size = ", v.bias_size, " (0 means no bias)");
  double value = 0;
  if (const char* field = invalid_transform(v.transforms, &value))
    return message("transforms.", field, " = ", value, " is invalid: must be finite and > 0",
                   field[1] == 'o' ? " (or 0 for no cap)" : "");
  if (v.rows == 0 || !p.pointers) return {};
  if (v.hidden == nullptr) return "hidden is null";
  if (v.labels == nullptr) return "labels is null";
  if (!p.host_data) return {};
  return check_linear_labels(v, label_bound > 0 ? label_bound : v.vocab);
}

/// The byte ranges of a view's inputs (5 entries), for check_no_overlap.
template <class View>
void linear_input_ranges(const View& v, named_range* out) {
  out[0] = range_of(v.hidden, v.rows, v.hidden_cols, v.hidden_stride, "hidden");
  out[1] = range_of(v.weight, v.vocab, v.weight_cols, v.weight_stride, "weight");
  out[2] = range_of(v.bias, 1, v.bias_size, v.bias_size, "bias");
  out[3] = range_of(v.labels, 1, v.rows, v.rows, "labels");
  out[4] = range_of(v.mask, 1, v.rows, v.rows, "mask");
}

}  // namespace detail
}  // namespace dpo
