// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The argument checks of every backend, written once. Each check returns the message of the
// first rule the arguments break, without the "dpo: " prefix, or an empty string when they
// are valid; the CPU throws it as a dpo::error (dpo/cpu/check.hpp), CUDA returns it as a
// status (dpo/cuda/dpo.cuh). The rules and their wording live here, so the backends cannot
// drift; what a backend can see on the host differs, and is given as a check_policy.
// Host code: checks run before anything is computed or launched.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "dpo/core/layout.hpp"
#include "dpo/core/loss.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/validate.hpp"

namespace dpo {
namespace detail {

/// The parts written one after the other, as dpo::detail::fail writes them.
template <class... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

/// What the host can see and what a backend's indexing allows: the only differences
/// between the backends' checks.
struct check_policy {
  /// Whether cu_seqlens and labels are host memory the checks may read (the CPU). CUDA's
  /// live on the device: its kernels check them, and packed views are bounded by num_rows.
  bool host_data = true;
  /// Packed views when !host_data: the rows of the logits buffer (cuda::options::num_rows).
  std::int64_t num_rows = -1;
  /// Whether pointers are checked (false in CUDA's size query, where they may not exist yet).
  bool pointers = true;
  /// num_seqs and vocab must be below INT_MAX (CUDA: int grid sizes and column indices).
  bool int32_extents = false;
  /// rows x row_stride must fit int64 (CUDA: the kernels index rows as int64 products).
  bool int64_rows = false;
  /// Upper bound of num_pairs (CUDA: one block per sequence of both sides in gridDim.x).
  std::int64_t max_pairs = INT64_MAX;
};

/// The CPU reads everything on the host; its loops have no int32 limit.
inline check_policy cpu_policy() { return {}; }

/// CUDA sees only the host arguments; num_rows is options::num_rows.
inline check_policy cuda_policy(std::int64_t num_rows, bool pointers) {
  return {/*host_data=*/false, num_rows, pointers, /*int32_extents=*/true, /*int64_rows=*/true,
          /*max_pairs=*/INT_MAX / 2};
}

/// The rows [begin, end) a shape-checked view may occupy in its buffer, gaps of a padded
/// view included: exact when the host can read cu_seqlens, otherwise the whole num_rows
/// buffer for a packed view. Empty when the view owns no row.
struct row_span {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int64_t size() const { return end > begin ? end - begin : 0; }
};

template <class T, class L>
row_span rows_of(const token_view<T, L>& v, const check_policy& p) {
  if (v.num_seqs <= 0) return {};
  if (v.cu_seqlens != nullptr && !p.host_data) return {0, p.num_rows};
  if (v.cu_seqlens == nullptr && v.seq_len <= 0) return {};
  return {v.row_begin(0), v.row_end(v.num_seqs - 1)};
}

template <class T, class L>
bool has_rows(const token_view<T, L>& v, const check_policy& p) {
  return rows_of(v, p).size() > 0;
}

/// The bytes [lo, hi) that the rows of `v` may occupy in the buffer (base, stride); lo == 0
/// when there are none. Gap rows of a padded view lie inside: the overlap checks are
/// conservative there.
struct byte_range {
  std::uintptr_t lo = 0;
  std::uintptr_t hi = 0;
};

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

/// The outputs of a forward call (forward_outputs) as byte ranges, num_forward_ranges of
/// them: loss, metrics, nll_token_grad, the per-pair outputs ([P] each) and row_lse /
/// row_coef ([rows] each, indexed by buffer row; rows = 0 when the call writes none).
inline constexpr int num_forward_ranges = 5 + num_pair_outputs;
inline void forward_ranges(const forward_outputs& o, std::int64_t P, std::int64_t rows, named_range* out) {
  int k = 0;
  out[k++] = range_of(o.loss, 1, 1, 1, "out.loss");
  out[k++] = range_of(reinterpret_cast<const unsigned char*>(o.metrics), 1, sizeof(dpo::metrics),
                      sizeof(dpo::metrics), "out.metrics");
  out[k++] = range_of(o.nll_token_grad, 1, 1, 1, "out.nll_token_grad");
#define DPO_DETAIL_RANGE(name) out[k++] = range_of(o.name, 1, P, P, "out." #name);
  DPO_PAIR_OUTPUTS(DPO_DETAIL_RANGE)
#undef DPO_DETAIL_RANGE
  out[k++] = range_of(o.row_lse, 1, rows, rows, "out.row_lse");
  out[k++] = range_of(o.row_coef, 1, rows, rows, "out.row_coef");
}

/// A forward call's outputs may overlap neither each other nor `ins` (the call's inputs:
/// reference log-probs, logits rows, ...): the message of the first overlap, or "".
inline std::string check_forward_outputs(const forward_outputs& o, std::int64_t P, std::int64_t rows,
                                         const named_range* ins, int n_in) {
  named_range outs[num_forward_ranges];
  forward_ranges(o, P, rows, outs);
  return check_no_overlap(outs, num_forward_ranges, ins, n_in);
}

template <class T, class L>
byte_range row_bytes(const T* base, std::int64_t stride, const token_view<T, L>& v,
                     const check_policy& p) {
  const row_span r = rows_of(v, p);
  if (r.size() == 0 || base == nullptr) return {};
  const std::uintptr_t b = reinterpret_cast<std::uintptr_t>(base);
  return {b + static_cast<std::uintptr_t>(r.begin * stride) * sizeof(T),
          b + static_cast<std::uintptr_t>((r.end - 1) * stride + v.vocab) * sizeof(T)};
}

/// Whether rows of `a` in the buffer (pa, sa) and rows of `b` in (pb, sb) can overlap. When
/// the host cannot read cu_seqlens, two views of one packed buffer with the same cu_seqlens
/// and disjoint sequence ranges still have disjoint rows (the kernels check that cu_seqlens
/// is non-decreasing); with host data the exact ranges say so already.
template <class T, class L>
bool may_overlap(const T* pa, std::int64_t sa, const token_view<T, L>& a, const T* pb,
                 std::int64_t sb, const token_view<T, L>& b, const check_policy& p) {
  if (!p.host_data && pa == pb && sa == sb && a.cu_seqlens != nullptr &&
      a.cu_seqlens == b.cu_seqlens &&
      (a.first_seq + a.num_seqs <= b.first_seq || b.first_seq + b.num_seqs <= a.first_seq))
    return false;
  const byte_range x = row_bytes(pa, sa, a, p), y = row_bytes(pb, sb, b, p);
  return x.lo != 0 && y.lo != 0 && x.lo < y.hi && y.lo < x.hi;
}

/// Whether rows of `a` and rows of `b` (row indices of one logits buffer) may coincide: exact
/// when the host can read cu_seqlens; without, two packed views with the same cu_seqlens and
/// disjoint sequence ranges never do (as for may_overlap), other packed views may.
template <class T, class L>
bool rows_may_coincide(const token_view<T, L>& a, const token_view<T, L>& b, const check_policy& p) {
  if (!p.host_data && a.cu_seqlens != nullptr && a.cu_seqlens == b.cu_seqlens &&
      (a.first_seq + a.num_seqs <= b.first_seq || b.first_seq + b.num_seqs <= a.first_seq))
    return false;
  const row_span x = rows_of(a, p), y = rows_of(b, p);
  return x.size() > 0 && y.size() > 0 && x.begin < y.end && y.begin < x.end;
}

/// Per-row state indexed by the logits buffer's row (forward_outputs::row_lse / row_coef,
/// read back by dpo_backward_rows; by hidden row on the fused head): both sides in one
/// buffer, each on rows of its own, or one entry would have to hold both sides' values.
/// `what` names the state, `buffer` the rows ("logits" or "hidden"), `otherwise` says what to
/// do instead.
template <class T, class L>
std::string check_row_state(const pair_view<T, L>& v, const char* what, const char* buffer,
                            const char* otherwise, const check_policy& p) {
  if (v.chosen.logits != v.rejected.logits)
    return message(what, " need one ", buffer, " buffer for both sides (padded or packed pairs); ",
                   otherwise);
  if (rows_may_coincide(v.chosen, v.rejected, p))
    return message(what, " need the chosen and rejected sequences on different rows of the ",
                   buffer, " buffer, but they share rows (one entry would hold both sides' ",
                   "state); ", otherwise);
  return {};
}

/// cu_seqlens[first_seq, first_seq + num_seqs] of a packed view in host memory: >= 0 and
/// non-decreasing.
template <class T, class L>
std::string check_cu_seqlens(const token_view<T, L>& v, const char* name) {
  const std::int64_t* cu = v.cu_seqlens + v.first_seq;
  if (cu[0] < 0)
    return message(name, ".cu_seqlens[", v.first_seq, "] = ", cu[0], " is invalid: must be >= 0");
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    if (cu[s + 1] < cu[s])
      return message(name, ".cu_seqlens is not non-decreasing: cu_seqlens[", v.first_seq + s + 1,
                     "] = ", cu[s + 1], " < cu_seqlens[", v.first_seq + s, "] = ", cu[s]);
  }
  return {};
}

/// The labels of the view's sequences in host memory: in [0, vocab) on completion rows
/// (label_vocab > 0: in [0, label_vocab), the global vocabulary of a vocabulary shard).
/// Sequence by sequence: the labels in the gaps of a padded view are not read.
template <class T, class L>
std::string check_labels(const token_view<T, L>& v, const char* name, std::int64_t label_vocab = 0) {
  const std::int64_t V = label_vocab > 0 ? label_vocab : v.vocab;
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
      const std::int64_t y = v.target(r);
      if (y != token_view<T, L>::masked && (y < 0 || y >= V))
        return message(name, ".labels[", r, "] = ", static_cast<std::int64_t>(v.labels[r]),
                       " is outside [0, vocab = ", V, ") and is not ignore_index = ",
                       v.ignore_index);
    }
  }
  return {};
}

/// Shapes, offsets and pointers of one view, and with host data its cu_seqlens and labels
/// (against label_vocab when > 0: a vocabulary shard's labels are global ids).
/// `name` prefixes the argument names in messages.
template <class T, class L>
std::string check_view(const token_view<T, L>& v, const char* name, const check_policy& p,
                       std::int64_t label_vocab = 0) {
  const char* extent = p.int32_extents ? ", 2^31)" : "";
  if (v.num_seqs < 0 || (p.int32_extents && v.num_seqs >= INT_MAX))
    return message(name, ".num_seqs = ", v.num_seqs, " is invalid: must be ",
                   p.int32_extents ? "in [0" : ">= 0", extent);
  if (v.vocab < 1 || (p.int32_extents && v.vocab >= INT_MAX))
    return message(name, ".vocab = ", v.vocab, " is invalid: must be ",
                   p.int32_extents ? "in [1" : ">= 1", extent);
  if (v.row_stride < v.vocab)
    return message(name, ".row_stride = ", v.row_stride, " is invalid: must be >= vocab = ",
                   v.vocab);
  if (v.first_seq < 0)
    return message(name, ".first_seq = ", v.first_seq, " is invalid: must be >= 0");
  if (v.cu_seqlens == nullptr) {
    if (v.seq_len < 0) return message(name, ".seq_len = ", v.seq_len, " is invalid: must be >= 0");
    if (v.seq_stride != 0 && v.seq_stride < v.seq_len)
      return message(name, ".seq_stride = ", v.seq_stride,
                     " is invalid: must be 0 (= seq_len) or >= seq_len = ", v.seq_len);
    const std::int64_t end_seq = v.first_seq + v.num_seqs;
    const std::int64_t pitch = v.seq_pitch();
    if (p.int64_rows && pitch > 0 &&
        (end_seq > INT64_MAX / pitch || end_seq * pitch > INT64_MAX / v.row_stride))
      return message(name, ": rows x row_stride overflows int64");
  } else if (!p.host_data) {
    if (p.num_rows < 0)
      return message("options.num_rows = ", p.num_rows, " is invalid for the packed view ", name,
                     ": give the rows of the logits buffer (>= 0)");
    if (p.int64_rows && p.num_rows > INT64_MAX / v.row_stride)
      return message(name, ": num_rows x row_stride overflows int64");
  }
  if (v.num_seqs == 0) return {};
  if (v.cu_seqlens != nullptr && p.host_data) {
    std::string m = check_cu_seqlens(v, name);
    if (!m.empty()) return m;
  }
  if (p.pointers && has_rows(v, p)) {
    if (v.logits == nullptr) return message(name, ".logits is null");
    if (v.labels == nullptr) return message(name, ".labels is null");
  }
  return p.host_data ? check_labels(v, name, label_vocab) : std::string();
}

/// A pair view: an even concatenated count, sides of equal count and vocab, at least one
/// (and at most max_pairs) pair, then each side as check_view (labels against label_vocab).
template <class T, class L>
std::string check_pairs(const pair_view<T, L>& v, const char* name, const check_policy& p,
                        std::int64_t label_vocab = 0) {
  if (v.concatenated_seqs % 2 != 0)
    return message(name, ".num_seqs = ", v.concatenated_seqs,
                   " is odd: the paired layout needs rows [0, P) chosen and [P, 2P) rejected");
  if (v.chosen.num_seqs != v.rejected.num_seqs)
    return message(name, ": chosen.num_seqs = ", v.chosen.num_seqs,
                   " != rejected.num_seqs = ", v.rejected.num_seqs);
  if (v.chosen.num_seqs < 1)
    return message(name, ".num_pairs = ", v.chosen.num_seqs, " is invalid: must be >= 1");
  if (v.chosen.num_seqs > p.max_pairs)
    return message(name, ".num_pairs = ", v.chosen.num_seqs, " is invalid: must be <= ",
                   p.max_pairs);
  if (v.chosen.vocab != v.rejected.vocab)
    return message(name, ": chosen.vocab = ", v.chosen.vocab, " != rejected.vocab = ",
                   v.rejected.vocab);
  std::string m = check_view(v.chosen, (std::string(name) + ".chosen").c_str(), p, label_vocab);
  if (!m.empty()) return m;
  return check_view(v.rejected, (std::string(name) + ".rejected").c_str(), p, label_vocab);
}

/// The reference pair view of the reference-logits overloads, after check_pairs of both (the
/// reference's element type R may differ from the policy's T: each pass reads its own).
template <class T, class R, class L>
std::string check_reference_pairs(const pair_view<T, L>& policy,
                                  const pair_view<R, L>& reference) {
  if (reference.num_pairs() != policy.num_pairs())
    return message("ref_logits.num_pairs = ", reference.num_pairs(),
                   " != logits.num_pairs = ", policy.num_pairs());
  return {};
}

/// The reference log-probs, needed unless the loss is reference-free.
inline std::string check_reference(const loss_config& cfg, const double* ref_chosen,
                                   const double* ref_rejected, const check_policy& p) {
  if (p.pointers && needs_reference(cfg) && (ref_chosen == nullptr || ref_rejected == nullptr))
    return message(ref_chosen == nullptr ? "ref_chosen_logps" : "ref_rejected_logps",
                   " is null (needed unless reference_free)");
  return {};
}

/// The gradient buffers of a pair view: non-null when the side has rows, stride >= vocab,
/// and either exactly the side's logits (in place: same pointer and stride) or disjoint from
/// every logits row that is read; the two sides' buffers disjoint.
template <class T, class L>
std::string check_grad(const pair_view<T, L>& v, const pair_grad_view<T>& g,
                       const check_policy& p) {
  const T* ptr[2] = {g.chosen, g.rejected};
  const std::int64_t stride[2] = {g.chosen_stride, g.rejected_stride};
  const token_view<T, L>* side[2] = {&v.chosen, &v.rejected};
  const char* name[2] = {"grad.chosen", "grad.rejected"};
  for (int s = 0; s < 2; ++s) {
    // As for the logits, a side with no rows may pass null (an empty tensor's pointer).
    if (ptr[s] == nullptr && has_rows(*side[s], p)) return message(name[s], " is null");
    if (stride[s] < side[s]->vocab)
      return message(name[s], "_stride = ", stride[s], " is invalid: must be >= vocab = ",
                     side[s]->vocab);
  }
  for (int s = 0; s < 2; ++s) {
    const bool in_place = ptr[s] == side[s]->logits && stride[s] == side[s]->row_stride;
    for (int o = 0; o < 2; ++o) {
      if (o == s && in_place) continue;
      if (may_overlap(ptr[s], stride[s], *side[s], side[o]->logits, side[o]->row_stride,
                      *side[o], p))
        return message(name[s], " overlaps the logits without being the logits buffer itself ",
                       "(same pointer and stride): unsupported aliasing");
    }
  }
  if (may_overlap(ptr[0], stride[0], *side[0], ptr[1], stride[1], *side[1], p))
    return "grad.chosen and grad.rejected overlap: unsupported aliasing";
  return {};
}

/// The index arrays of a view as byte ranges (compared, never read): labels and mask over the
/// rows the view may occupy (rows_of), and cu_seqlens[first_seq, first_seq + num_seqs].
/// names: labels, mask, cu_seqlens.
template <class T, class L>
void view_index_ranges(const token_view<T, L>& v, const check_policy& p, const char* const names[3],
                       named_range* out) {
  const row_span r = rows_of(v, p);
  const auto rows = [&](const auto* a, const char* name) {
    return r.size() > 0 && a != nullptr ? range_of(a + r.begin, 1, r.size(), r.size(), name) : named_range{{}, name};
  };
  out[0] = rows(v.labels, names[0]);
  out[1] = rows(v.mask, names[1]);
  const std::int64_t k = v.num_seqs > 0 ? v.num_seqs + 1 : 0;
  out[2] = v.cu_seqlens != nullptr ? range_of(v.cu_seqlens + v.first_seq, 1, k, k, names[2]) : named_range{{}, names[2]};
}

/// A view's arrays (its logits rows, then view_index_ranges): 4 entries, names[0..3].
template <class T, class L>
void view_ranges(const token_view<T, L>& v, const check_policy& p, const char* const names[4], named_range* out) {
  out[0] = {row_bytes(v.logits, v.row_stride, v, p), names[0]};
  view_index_ranges(v, p, names + 1, out + 1);
}

/// The names of view_ranges: a token view's, and a pair view's sides (then a reference's).
inline constexpr const char* seq_view_names[4] = {"logits", "labels", "mask", "cu_seqlens"};
inline constexpr const char* pair_view_names[4][4] = {
    {"logits.chosen", "labels.chosen", "mask.chosen", "cu_seqlens.chosen"},
    {"logits.rejected", "labels.rejected", "mask.rejected", "cu_seqlens.rejected"},
    {"ref_logits.chosen", "ref_labels.chosen", "ref_mask.chosen", "ref_cu_seqlens.chosen"},
    {"ref_logits.rejected", "ref_labels.rejected", "ref_mask.rejected", "ref_cu_seqlens.rejected"}};

/// sequence_logps' outputs (sums, counts: [num_seqs]; token_logps: the view's row span;
/// row_lse: rows up to the view's end) may overlap neither each other nor the view's arrays
/// (view_ranges) nor `extra` (at most 4: the workspace, ...). The message, or "".
template <class T, class L>
std::string check_sequence_outputs(const token_view<T, L>& v, const double* sums, const std::int64_t* counts,
                                   const double* token_logps, const double* row_lse, const named_range* extra,
                                   int n_extra, const check_policy& p) {
  named_range ins[8];
  view_ranges(v, p, seq_view_names, ins);
  int n = 4;
  for (int k = 0; k < n_extra && n < 8; ++k) ins[n++] = extra[k];
  const row_span r = rows_of(v, p);
  const std::int64_t S = v.num_seqs > 0 ? v.num_seqs : 0;
  const named_range outs[4] = {range_of(sums, 1, S, S, "sums"), range_of(counts, 1, S, S, "counts"),
                               range_of(token_logps, 1, r.size(), r.size(), "token_logps"),
                               range_of(row_lse, 1, r.end, r.end, "row_lse")};
  return check_no_overlap(outs, 4, ins, n);
}

/// pair_logps' outputs (chosen, rejected: [P] each) may overlap neither each other nor both
/// sides' arrays (view_ranges) nor `extra` (at most 4).
template <class T, class L>
std::string check_pair_logps_outputs(const pair_view<T, L>& v, const double* chosen, const double* rejected,
                                     const named_range* extra, int n_extra, const check_policy& p) {
  named_range ins[12];
  view_ranges(v.chosen, p, pair_view_names[0], ins);
  view_ranges(v.rejected, p, pair_view_names[1], ins + 4);
  int n = 8;
  for (int k = 0; k < n_extra && n < 12; ++k) ins[n++] = extra[k];
  const std::int64_t P = v.num_pairs() > 0 ? v.num_pairs() : 0;
  const named_range outs[2] = {range_of(chosen, 1, P, P, "chosen"), range_of(rejected, 1, P, P, "rejected")};
  return check_no_overlap(outs, 2, ins, n);
}

/// A gradient over the logits (rows of `v` in the buffer (g, stride), named `name`) may overlap
/// none of `ins`: the call's inputs other than the logits (whose rule is check_grad's / check_seq_grad's:
/// in place or disjoint), e.g. labels, mask, cu_seqlens and the row state it reads. The
/// message of the first overlap, or "".
template <class T, class L>
std::string check_grad_against(const T* g, std::int64_t stride, const token_view<T, L>& v, const char* name,
                               const named_range* ins, int n_in, const check_policy& p) {
  const named_range out{row_bytes(g, stride, v, p), name};
  return check_no_overlap(&out, 1, ins, n_in);
}

/// check_grad_against for both sides of a pair gradient, against both sides' index arrays
/// (view_index_ranges) and `extra` (n_extra entries: row state, workspace, ...).
template <class T, class L>
std::string check_pair_grad_inputs(const pair_view<T, L>& v, const pair_grad_view<T>& g, const named_range* extra,
                                   int n_extra, const check_policy& p) {
  named_range ins[16];
  view_index_ranges(v.chosen, p, pair_view_names[0] + 1, ins);
  view_index_ranges(v.rejected, p, pair_view_names[1] + 1, ins + 3);
  int n = 6;
  for (int k = 0; k < n_extra && n < 16; ++k) ins[n++] = extra[k];
  std::string e = check_grad_against(g.chosen, g.chosen_stride, v.chosen, "grad.chosen", ins, n, p);
  if (e.empty()) e = check_grad_against(g.rejected, g.rejected_stride, v.rejected, "grad.rejected", ins, n, p);
  return e;
}

/// The inputs and output of sequence_logps_backward: row_lse, seq_grad and grad non-null
/// when the view has rows (pointers are checked only with p.pointers), grad_stride >= vocab,
/// and grad either exactly the logits (in place) or disjoint from the rows read.
template <class T, class L>
std::string check_seq_grad(const token_view<T, L>& v, const double* row_lse,
                           const double* seq_grad, const T* grad, std::int64_t grad_stride,
                           const check_policy& p) {
  const bool rows = p.pointers && has_rows(v, p);
  if (rows && row_lse == nullptr) return "row_lse is null";
  if (rows && seq_grad == nullptr) return "seq_grad is null";
  if (rows && grad == nullptr) return "grad is null";
  if (grad_stride < v.vocab)
    return message("grad_stride = ", grad_stride, " is invalid: must be >= vocab = ", v.vocab);
  const bool in_place = grad == v.logits && grad_stride == v.row_stride;
  if (p.pointers && !in_place && may_overlap(grad, grad_stride, v, v.logits, v.row_stride, v, p))
    return "grad overlaps the logits without being the logits buffer itself (same pointer and "
           "stride): unsupported aliasing";
  return {};
}

/// The sequence-level inputs of dpo_loss: at least one pair (below 2^31 with
/// int32_extents), the policy log-probs, and the reference's unless reference-free.
inline std::string check_logps_in(const pair_logps_in& in, const loss_config& cfg,
                                  const check_policy& p) {
  const std::int64_t P = in.num_pairs;
  if (P < 1 || (p.int32_extents && P >= INT_MAX))
    return message("num_pairs = ", P, " is invalid: must be ",
                   p.int32_extents ? "in [1, 2^31)" : ">= 1");
  if (!p.pointers) return {};
  if (in.chosen_logps == nullptr) return "chosen_logps is null";
  if (in.rejected_logps == nullptr) return "rejected_logps is null";
  return check_reference(cfg, in.ref_chosen_logps, in.ref_rejected_logps, p);
}

/// dpo_loss's token counts (chosen_tokens or rejected_tokens, `name`), host arrays of P (null:
/// absent): each finite and >= 0. Counts below 1 then count as 1 where they divide.
inline std::string check_token_counts(const double* n, std::int64_t P, const char* name) {
  if (n == nullptr) return {};
  for (std::int64_t i = 0; i < P; ++i) {
    if (!(std::isfinite(n[i]) && n[i] >= 0.0))
      return message(name, "[", i, "] = ", n[i], " is invalid: a token count must be finite and >= 0");
  }
  return {};
}

inline std::string check_finite(double x, const char* name) {
  if (!std::isfinite(x)) return message(name, " = ", x, " is invalid: must be finite");
  return {};
}

/// A fraction such as ld_alpha: in [0, 1] (NaN is not).
inline std::string check_unit(double x, const char* name) {
  if (!(x >= 0.0 && x <= 1.0)) return message(name, " = ", x, " is invalid: must be in [0, 1]");
  return {};
}

}  // namespace detail
}  // namespace dpo
