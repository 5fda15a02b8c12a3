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

/// The bytes [lo, hi) of an argument (lo == 0: none) and its name, for the aliasing checks.
struct named_range {
  byte_range bytes;
  const char* name = "";
};

/// The bytes of n rows of `cols` elements, `stride` apart, from p (compared, never read).
template <class U>
named_range range_of(const U* p, std::int64_t n, std::int64_t cols, std::int64_t stride, const char* name) {
  if (p == nullptr || n <= 0 || cols <= 0) return {{}, name};
  const auto lo = reinterpret_cast<std::uintptr_t>(p);
  return {{lo, lo + static_cast<std::uintptr_t>((n - 1) * stride + cols) * sizeof(U)}, name};
}

/// Outputs may overlap neither an input nor each other.
inline std::string check_no_overlap(const named_range* outs, int n_out, const named_range* ins, int n_in) {
  const auto hit = [](const named_range& a, const named_range& b) {
    return a.bytes.lo != 0 && b.bytes.lo != 0 && a.bytes.lo < b.bytes.hi && b.bytes.lo < a.bytes.hi;
  };
  for (int i = 0; i < n_out; ++i) {
    for (int j = 0; j < n_in; ++j)
      if (hit(outs[i], ins[j])) return message(outs[i].name, " overlaps ", ins[j].name, ": outputs may not alias inputs");
    for (int j = i + 1; j < n_out; ++j)
      if (hit(outs[i], outs[j])) return message(outs[i].name, " overlaps ", outs[j].name, ": unsupported aliasing");
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
  const std::int64_t bound = label_bound > 0 ? label_bound : v.vocab;
  for (std::int64_t r = 0; r < v.rows; ++r) {
    const std::int64_t y = static_cast<std::int64_t>(v.labels[r]);
    if (y == v.ignore_index || (v.mask != nullptr && v.mask[r] == 0)) continue;
    if (y < 0 || y >= bound)
      return message("labels[", r, "] = ", y, " is outside [0, vocab = ", bound, ") and is not ignore_index = ",
                     v.ignore_index);
  }
  return {};
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
