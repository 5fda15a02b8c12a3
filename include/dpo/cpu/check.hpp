// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Argument checks of the CPU API. Every check runs before anything is written, and each
// failure throws dpo::error naming the argument and its value.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "dpo/core/layout.hpp"
#include "dpo/core/validate.hpp"
#include "dpo/error.hpp"

namespace dpo {
namespace cpu {
namespace detail {

using dpo::detail::fail;

inline void check_config(const loss_config& c) {
  const std::string msg = validate_config(c);
  if (!msg.empty()) fail(msg);
}

/// Whether any sequence of a (shape-checked) view owns a row.
template <class T, class L>
bool has_rows(const token_view<T, L>& v) {
  if (v.num_seqs <= 0) return false;
  if (v.cu_seqlens == nullptr) return v.seq_len > 0;
  return v.row_end(v.num_seqs - 1) > v.row_begin(0);
}

/// Shapes, offsets and labels of one view. `name` prefixes the argument names in messages.
template <class T, class L>
void check_view(const token_view<T, L>& v, const char* name) {
  if (v.num_seqs < 0) fail(name, ".num_seqs = ", v.num_seqs, " is invalid: must be >= 0");
  if (v.vocab < 1) fail(name, ".vocab = ", v.vocab, " is invalid: must be >= 1");
  if (v.row_stride < v.vocab)
    fail(name, ".row_stride = ", v.row_stride, " is invalid: must be >= vocab = ", v.vocab);
  if (v.first_seq < 0) fail(name, ".first_seq = ", v.first_seq, " is invalid: must be >= 0");
  if (v.cu_seqlens == nullptr && v.seq_len < 0)
    fail(name, ".seq_len = ", v.seq_len, " is invalid: must be >= 0");
  if (v.cu_seqlens == nullptr && v.seq_stride != 0 && v.seq_stride < v.seq_len)
    fail(name, ".seq_stride = ", v.seq_stride, " is invalid: must be 0 (= seq_len) or >= seq_len = ",
         v.seq_len);
  if (v.num_seqs == 0) return;
  if (v.cu_seqlens != nullptr) {
    const std::int64_t* cu = v.cu_seqlens + v.first_seq;
    if (cu[0] < 0) fail(name, ".cu_seqlens[", v.first_seq, "] = ", cu[0], " is invalid: must be >= 0");
    for (std::int64_t s = 0; s < v.num_seqs; ++s) {
      if (cu[s + 1] < cu[s])
        fail(name, ".cu_seqlens is not non-decreasing: cu_seqlens[", v.first_seq + s + 1, "] = ",
             cu[s + 1], " < cu_seqlens[", v.first_seq + s, "] = ", cu[s]);
    }
  }
  if (has_rows(v)) {
    if (v.logits == nullptr) fail(name, ".logits is null");
    if (v.labels == nullptr) fail(name, ".labels is null");
  }
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {  // sequence by sequence: gaps are not read
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
      const std::int64_t y = v.target(r);
      if (y != token_view<T, L>::masked && (y < 0 || y >= v.vocab)) {
        fail(name, ".labels[", r, "] = ", static_cast<std::int64_t>(v.labels[r]),
             " is outside [0, vocab = ", v.vocab, ") and is not ignore_index = ", v.ignore_index);
      }
    }
  }
}

template <class T, class L>
void check_pairs(const pair_view<T, L>& p, const char* name) {
  if (p.concatenated_seqs % 2 != 0)
    fail(name, ".num_seqs = ", p.concatenated_seqs,
         " is odd: the paired layout needs rows [0, P) chosen and [P, 2P) rejected");
  if (p.chosen.num_seqs != p.rejected.num_seqs)
    fail(name, ": chosen.num_seqs = ", p.chosen.num_seqs, " != rejected.num_seqs = ",
         p.rejected.num_seqs);
  if (p.chosen.num_seqs < 1) fail(name, ".num_pairs = ", p.chosen.num_seqs, " is invalid: must be >= 1");
  if (p.chosen.vocab != p.rejected.vocab)
    fail(name, ": chosen.vocab = ", p.chosen.vocab, " != rejected.vocab = ", p.rejected.vocab);
  check_view(p.chosen, (std::string(name) + ".chosen").c_str());
  check_view(p.rejected, (std::string(name) + ".rejected").c_str());
}

/// The byte range [lo, hi) a side's rows occupy in a buffer of the given stride.
struct byte_range {
  const char* lo;
  const char* hi;
};

/// Gap rows of a padded view lie inside the range: the overlap checks are conservative there.
template <class T, class L>
byte_range rows_range(const T* base, std::int64_t stride, const token_view<T, L>& v) {
  if (!has_rows(v) || base == nullptr) return {nullptr, nullptr};
  const std::int64_t r0 = v.row_begin(0), r1 = v.row_end(v.num_seqs - 1);
  if (r1 <= r0) return {nullptr, nullptr};
  const char* lo = reinterpret_cast<const char*>(base + r0 * stride);
  const char* hi = reinterpret_cast<const char*>(base + (r1 - 1) * stride + v.vocab);
  return {lo, hi};
}

inline bool overlaps(byte_range a, byte_range b) {
  return a.lo != nullptr && b.lo != nullptr && a.lo < b.hi && b.lo < a.hi;
}

/// The gradient buffers: non-null, stride >= vocab, and either exactly the logits (in place,
/// same pointer and stride) or disjoint from every logits row that is read.
template <class T, class L>
void check_grad(const pair_view<T, L>& p, const pair_grad_view<T>& g) {
  struct side {
    const char* name;
    T* ptr;
    std::int64_t stride;
    const token_view<T, L>* v;
  } sides[2] = {{"grad.chosen", g.chosen, g.chosen_stride, &p.chosen},
                {"grad.rejected", g.rejected, g.rejected_stride, &p.rejected}};
  for (const side& s : sides) {
    // As for the logits, a side with no rows may pass null (an empty tensor's pointer).
    if (s.ptr == nullptr && has_rows(*s.v)) fail(s.name, " is null");
    if (s.stride < s.v->vocab)
      fail(s.name, "_stride = ", s.stride, " is invalid: must be >= vocab = ", s.v->vocab);
  }
  for (const side& s : sides) {
    const byte_range out = rows_range<T, L>(s.ptr, s.stride, *s.v);
    const bool in_place = s.ptr == s.v->logits && s.stride == s.v->row_stride;
    for (const side& o : sides) {
      const byte_range in = rows_range<T, L>(o.v->logits, o.v->row_stride, *o.v);
      if (&o == &s && in_place) continue;
      if (overlaps(out, in))
        fail(s.name, " overlaps the logits without being the logits buffer itself (same pointer ",
             "and stride): unsupported aliasing");
    }
  }
  const byte_range oc = rows_range<T, L>(g.chosen, g.chosen_stride, p.chosen);
  const byte_range orr = rows_range<T, L>(g.rejected, g.rejected_stride, p.rejected);
  if (overlaps(oc, orr)) fail("grad.chosen and grad.rejected overlap: unsupported aliasing");
}

/// The row_lse input and gradient output of sequence_logps_backward: non-null when the view
/// has rows, stride >= vocab, and grad either exactly the logits (in place) or disjoint from
/// the rows read.
template <class T, class L>
void check_seq_grad(const token_view<T, L>& v, const double* row_lse, const T* grad,
                    std::int64_t grad_stride) {
  if (has_rows(v) && row_lse == nullptr) fail("row_lse is null");
  if (has_rows(v) && grad == nullptr) fail("grad is null");
  if (grad_stride < v.vocab)
    fail("grad_stride = ", grad_stride, " is invalid: must be >= vocab = ", v.vocab);
  const bool in_place = grad == v.logits && grad_stride == v.row_stride;
  if (!in_place && overlaps(rows_range<T, L>(grad, grad_stride, v),
                            rows_range<T, L>(v.logits, v.row_stride, v)))
    fail("grad overlaps the logits without being the logits buffer itself (same pointer and ",
         "stride): unsupported aliasing");
}

inline void check_finite(double v, const char* name) {
  if (!std::isfinite(v)) fail(name, " = ", v, " is invalid: must be finite");
}

}  // namespace detail
}  // namespace cpu
}  // namespace dpo
