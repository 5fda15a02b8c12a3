// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target for the CPU fused path: dpo::cpu::dpo_forward + dpo_backward (and
// sequence_logps) on shapes, values, masks, labels and configurations decoded from the
// input, checking properties that hold for every input:
//   - bad input (config, shapes, labels, null reference, aliasing, grad_output) is rejected
//     with dpo::error exactly when it is bad, and nothing is written then;
//   - masked rows get exactly 0 gradient; nothing outside [0, vocab) of a sequence row is
//     written; padding columns (NaN here) are never read;
//   - pairs with moderate finite logits and reference log-probs get finite losses, rewards
//     and dL/dpi (the whole batch must be moderate for batch-coupled terms);
//   - every gradient row sums to ~0 (softmax gradient: sum_v coef * (1[v == y] - p_v) = 0);
//   - results are bitwise identical for 1 and 2 threads, and in place equals out of place;
//   - (issue 16) every completion row's log-prob and gradient match a long double
//     log-softmax formed as (z - m) - log(s) to a tolerance that does not grow with the
//     logits' magnitude (tied maxima at 1e7, rows shifted by 1e17 or 1e30), gradient rows
//     sum to 0 at any magnitude;
//   - (issue 16) -inf label logits on the rejected side and huge finite reference log-probs
//     (infinite margins) give no NaN for any single loss type: the limit, finite or inf;
//   - (issue 16) a combination of several terms (aot with aot_unpaired, MPO, ...) equals the
//     weighted sum of its terms computed one at a time, in the order given;
//   - the vocabulary- and context-parallel drivers (dpo_forward_sharded / dpo_backward_sharded
//     over 1-3 uneven vocabulary shards x 1-3 context slices of every sequence, picked by the
//     seed, ranks as threads) reject exactly what the unsharded call rejects (and LD-DPO under
//     context parallelism) and otherwise match it: token counts and accuracy exactly (ties
//     across shards), log-probs, rewards, WPO weights and the loss within bounds derived from
//     each row's, every gradient row against a long double softmax (see check_sharded); and
//     sequence_logps_sharded / shard_sequence_backward likewise against sequence_logps and the
//     exact softmax (check_sequence_sharded).
// A violated property traps, so libFuzzer keeps the input.
//
// Input layout (bytes past the end read as 0, so short inputs are valid and give defaults):
//   [0] flags: bits 0-1 dtype (float/int64, float/int32, double/int64, double/int32),
//       bits 2-3 layout (padded, packed, separate, padded), bit 4 mask, bit 5 reference
//       logits instead of reference log-probs, bit 6 metrics off
//   [1] pairs - 1 (mod 4)   [2] seq_len - 1 (mod 8)   [3-4] vocab - 1 (u16 mod 300)
//   [5] row_stride - vocab (mod 3)   [6] logit scale   [7-10] PRNG seed   [11] label mode
//   [12..] loss config (see read_config), then one knob byte (a deliberate bad argument),
//   one gradient byte, one byte per reference log-prob, then 5-byte edits [code][row][col]:
//   code 0-95 a special value (NaN, inf, huge, denormal) into a logit, 96-103 -inf into the
//   row's label logit, 104-111 the row's current max copied into a column (ties), 112-127
//   the whole row shifted by a large offset, 128-191 a label, 192-255 a mask toggle.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include <dpo/dpo.hpp>

#include "../shard_ranks.hpp"
#include "fuzz_common.hpp"

namespace {

using namespace fuzz;
using fuzz::same;  // beside the overloads below, which would hide it

bool same(const Eigen::VectorXd& a, const Eigen::VectorXd& b) {
  if (a.size() != b.size()) return false;
  for (Eigen::Index i = 0; i < a.size(); ++i)
    if (!same(a[i], b[i])) return false;
  return true;
}

bool same(const dpo::cpu::side_rows& a, const dpo::cpu::side_rows& b) {
  if (a.row0 != b.row0 || a.coef.size() != b.coef.size()) return false;
  for (std::size_t i = 0; i < a.coef.size(); ++i)
    if (!same(a.lse[i], b.lse[i]) || !same(a.logp[i], b.logp[i]) || !same(a.coef[i], b.coef[i]))
      return false;
  return true;
}

bool same(const dpo::cpu::forward_result& a, const dpo::cpu::forward_result& b) {
  const dpo::cpu::metrics& m = a.metrics;
  const dpo::cpu::metrics& n = b.metrics;
  return same(a.loss, b.loss) && same(a.losses, b.losses) &&
         same(a.chosen_rewards, b.chosen_rewards) && same(a.rejected_rewards, b.rejected_rewards) &&
         same(a.chosen_logps, b.chosen_logps) && same(a.rejected_logps, b.rejected_logps) &&
         same(a.chosen_tokens, b.chosen_tokens) && same(a.rejected_tokens, b.rejected_tokens) &&
         same(a.weights, b.weights) && same(a.grad_chosen, b.grad_chosen) &&
         same(a.grad_rejected, b.grad_rejected) && same(a.nll_token_grad, b.nll_token_grad) &&
         same(a.chosen_rows, b.chosen_rows) && same(a.rejected_rows, b.rejected_rows) &&
         same(m.rewards_chosen, n.rewards_chosen) && same(m.rewards_rejected, n.rewards_rejected) &&
         same(m.rewards_margins, n.rewards_margins) &&
         same(m.rewards_accuracies, n.rewards_accuracies) &&
         same(m.logps_chosen, n.logps_chosen) && same(m.logps_rejected, n.logps_rejected) &&
         same(m.logits_chosen, n.logits_chosen) && same(m.logits_rejected, n.logits_rejected) &&
         same(m.entropy, n.entropy) && same(m.mean_token_accuracy, n.mean_token_accuracy) &&
         same(m.nll_loss, n.nll_loss);
}

/// A deliberately bad argument, decoded from one byte (most values: none).
enum class knob {
  none,
  bad_stride,       // row_stride < vocab
  bad_count,        // odd concatenated count, or chosen/rejected counts differ
  null_reference,   // reference log-probs null (bad only when the loss needs them)
  aliased_grad,     // grad.chosen over the logits with another stride
  nan_grad_output,  // grad_output = NaN
  zero_vocab,       // vocab = 0
  vocab_mismatch,   // rejected.vocab != chosen.vocab
  decreasing_cu,    // packed: cu_seqlens not non-decreasing
  negative_seq_len  // padded / separate: seq_len < 0
};

knob read_knob(std::uint8_t b) {
  const int k = b % 32;
  return k < 20 || k > 28 ? knob::none : static_cast<knob>(k - 19);
}

enum class layout { padded, packed, separate };

/// One fuzz case: buffers, views and expectations for logits type T and labels type L.
template <class T, class L>
struct fuzz_case {
  layout lay = layout::padded;
  std::int64_t P = 1, seq_len = 1, V = 1, stride = 1, gstride = 1;
  std::int64_t ignore_index = -100;
  bool has_mask = false, ref_logits = false, metrics = true;
  knob bad = knob::none;
  double grad_output = 1.0;
  dpo::loss_config cfg;
  // Buffer 0 holds both sides except for the separate layout (buffer 1: rejected).
  int nbuf = 1;
  std::int64_t rows[2] = {0, 0};
  std::vector<T> logits[2], ref[2];
  std::vector<L> labels[2];
  std::vector<std::uint8_t> mask[2];
  std::vector<std::int64_t> cu;
  std::vector<double> ref_c, ref_r;
  std::uint32_t seed = 0;  // the PRNG seed, which also picks the vocabulary shards

  int buf_of(bool rejected) const { return rejected && nbuf == 2 ? 1 : 0; }

  /// The pair_view over logits buffers l0 (and l1), with the knob's bad shape applied.
  dpo::pair_view<T, L> view(const T* l0, const T* l1) const {
    const std::uint8_t* m0 = has_mask ? mask[0].data() : nullptr;
    dpo::pair_view<T, L> v;
    if (lay == layout::separate) {
      const std::uint8_t* m1 = has_mask ? mask[1].data() : nullptr;
      v = dpo::separate_pairs(l0, labels[0].data(), l1, labels[1].data(), P, seq_len, V, stride,
                              m0, m1, ignore_index);
      if (bad == knob::bad_count) v.rejected.num_seqs = P - 1;
    } else {
      const std::int64_t n = bad == knob::bad_count ? 2 * P + 1 : 2 * P;
      v = lay == layout::packed
              ? dpo::packed_pairs(l0, labels[0].data(), cu.data(), n, V, stride, m0, ignore_index)
              : dpo::padded_pairs(l0, labels[0].data(), n, seq_len, V, stride, m0, ignore_index);
    }
    for (dpo::token_view<T, L>* s : {&v.chosen, &v.rejected}) {
      if (bad == knob::bad_stride) s->row_stride = V - 1;
      if (bad == knob::zero_vocab) s->vocab = 0;
      if (bad == knob::negative_seq_len && lay != layout::packed) s->seq_len = -1;
    }
    if (bad == knob::vocab_mismatch) v.rejected.vocab = V + 1;
    return v;
  }

  bool shape_bad() const {
    switch (bad) {
      case knob::bad_stride:
      case knob::bad_count:
      case knob::zero_vocab:
      case knob::vocab_mismatch:
        return true;
      case knob::decreasing_cu: return lay == layout::packed;
      case knob::negative_seq_len: return lay != layout::packed;
      default: return false;
    }
  }
};

double special_value(unsigned i) {
  static const double table[] = {nan_v,  inf_v, -inf_v,  1e30,   -1e30,  3.0e38, -3.0e38, 1e300,
                                 0.0,    -0.0,  1e-40,   5e-324, 88.7,   -88.7,  1e4,     -1e4,
                                 16,     -16,   100,     -100,   709.8,  -745,   1e7,     -1e7,
                                 1e-3,   -1e-3, 2.5,     -2.5,   3.4e38, 1e-30,  -1e300,  1e15};
  return table[i % 32];
}

template <class T, class L>
void build(fuzz_case<T, L>& fc, reader& in, std::uint8_t flags) {
  static const double scales[] = {1, 4, 16, 2, 30, 1e3, 1e-3, 0};
  fc.lay = ((flags >> 2) & 3) == 1 ? layout::packed
           : ((flags >> 2) & 3) == 2 ? layout::separate
                                     : layout::padded;
  fc.has_mask = (flags & 16) != 0;
  fc.ref_logits = (flags & 32) != 0;
  fc.metrics = (flags & 64) == 0;
  fc.P = 1 + in.u8() % 4;
  fc.seq_len = 1 + in.u8() % 8;
  fc.V = 1 + in.u16() % 300;
  fc.stride = fc.V + in.u8() % 3;
  const double scale = pick(scales, in.u8());
  fc.seed = in.u32();
  rng r{fc.seed};
  const unsigned label_mode = in.u8();
  static const double ignore_share[] = {0.25, 0.0, 0.5, 0.9, 1.0};
  const double p_ignore = pick(ignore_share, label_mode);
  static const double ignore_indices[] = {-100, -1, 0};
  fc.ignore_index = static_cast<std::int64_t>(pick(ignore_indices, label_mode / 5));
  fc.cfg = read_config(in);
  fc.bad = read_knob(in.u8());
  const unsigned g = in.u8();
  static const double grad_outputs[] = {1, 1, 0.5, -2, 0, 1e-3, 1e3, 1};
  fc.gstride = fc.V + (g & 3);
  fc.grad_output = fc.bad == knob::nan_grad_output ? nan_v : pick(grad_outputs, g >> 2);

  // Row counts of each buffer.
  if (fc.lay == layout::packed) {
    fc.cu.resize(2 * fc.P + 1);
    fc.cu[0] = static_cast<std::int64_t>(r.next() % 3);  // leading rows no sequence owns
    for (std::int64_t s = 0; s < 2 * fc.P; ++s)
      fc.cu[s + 1] = fc.cu[s] + static_cast<std::int64_t>(r.next() % (fc.seq_len + 1));
    if (fc.bad == knob::decreasing_cu) fc.cu[1] = fc.cu[2] + 1;
    // Cover every row a view may read: the chosen side alone is valid even when cu[1] is bad.
    const std::int64_t last = std::max(fc.cu[1], fc.cu[2 * fc.P]);
    fc.rows[0] = last + static_cast<std::int64_t>(r.next() % 2);
  } else if (fc.lay == layout::separate) {
    fc.nbuf = 2;
    fc.rows[0] = fc.rows[1] = fc.P * fc.seq_len;
  } else {
    fc.rows[0] = 2 * fc.P * fc.seq_len;
  }

  // Logits uniform in [-scale, scale]; padding columns NaN, so reading them shows.
  for (int b = 0; b < fc.nbuf; ++b) {
    const std::int64_t n = fc.rows[b];
    for (std::vector<T>* buf : {&fc.logits[b], &fc.ref[b]}) {
      // Never empty, so in place (grad == logits) has a non-null pointer even with no rows.
      buf->assign(static_cast<std::size_t>(std::max<std::int64_t>(1, n * fc.stride)),
                  static_cast<T>(nan_v));
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t c = 0; c < fc.V; ++c)
          (*buf)[i * fc.stride + c] = static_cast<T>(scale * (2.0 * r.uniform() - 1.0));
    }
    fc.labels[b].resize(static_cast<std::size_t>(n));
    fc.mask[b].resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      fc.labels[b][i] = r.uniform() < p_ignore ? static_cast<L>(fc.ignore_index)
                                               : static_cast<L>(r.next() % fc.V);
      fc.mask[b][i] = r.uniform() < 0.8 ? 1 : 0;
    }
  }

  for (std::int64_t i = 0; i < fc.P; ++i) {
    for (std::vector<double>* v : {&fc.ref_c, &fc.ref_r}) {
      const unsigned b = in.u8();
      v->push_back(b < 200 ? -40.0 * r.uniform() : special_value(b));
    }
  }

  // Edits: [code][row u16][col u16]; code >> 6: 0, 1 logit, 2 label, 3 mask toggle.
  const std::int64_t total = fc.rows[0] + fc.rows[1];
  while (in.n >= 5 && total > 0) {
    const unsigned code = in.u8();
    const std::int64_t row = in.u16() % total;
    const std::int64_t col = in.u16() % fc.stride;
    const int b = row < fc.rows[0] ? 0 : 1;
    const std::int64_t i = b == 0 ? row : row - fc.rows[0];
    T* z = fc.logits[b].data() + i * fc.stride;
    if (code < 96) {
      z[col] = static_cast<T>(special_value(code));
    } else if (code < 104) {
      const std::int64_t y = static_cast<std::int64_t>(fc.labels[b][i]);
      if (y >= 0 && y < fc.V) z[y] = static_cast<T>(-inf_v);
    } else if (code < 112) {
      T mx = z[0];
      for (std::int64_t c = 1; c < fc.V; ++c) mx = z[c] > mx ? z[c] : mx;
      if (col < fc.V) z[col] = mx;
    } else if (code < 128) {
      static const double shifts[] = {1e4, 3e4, 1e5, 1e7, -1e7, 1e17, -1e17, 1e30,
                                      -3e4, 1e9, 3e9, -1e30, 2e5, 1e12, -1e5, 1e20};
      const double d = pick(shifts, code);
      for (std::int64_t c = 0; c < fc.V; ++c) z[c] = static_cast<T>(static_cast<double>(z[c]) + d);
    } else if (code < 192) {
      fc.labels[b][i] = static_cast<L>(static_cast<int>(code & 63) - 8);
    } else {
      fc.mask[b][i] ^= 1;
    }
  }
}

/// Whether row `row` of a view is a completion token (label not ignore_index, mask not 0)
/// whose label is outside [0, vocab): the raw label, as -1 is not a masked row.
template <class T, class L>
bool label_bad(const dpo::token_view<T, L>& v, std::int64_t row) {
  const std::int64_t y = static_cast<std::int64_t>(v.labels[row]);
  const bool masked = y == v.ignore_index || (v.mask != nullptr && v.mask[row] == 0);
  return !masked && (y < 0 || y >= v.vocab);
}

template <class T>
bool row_moderate(const T* z, std::int64_t V, double bound) {
  for (std::int64_t c = 0; c < V; ++c) {
    const double x = static_cast<double>(z[c]);
    if (!(std::fabs(x) <= bound)) return false;
  }
  return true;
}

bool is_term(const dpo::loss_config& c, std::initializer_list<dpo::loss_type> types) {
  for (int k = 0; k < c.num_terms; ++k)
    for (dpo::loss_type t : types)
      if (c.terms[k].type == t) return true;
  return false;
}

/// Whether a row holds no NaN and no +inf, and at least one finite logit: its softmax is
/// defined (-inf logits have probability 0).
template <class T>
bool row_defined(const T* z, std::int64_t V) {
  bool any = false;
  for (std::int64_t c = 0; c < V; ++c) {
    const double x = static_cast<double>(z[c]);
    if (x != x || x == inf_v) return false;
    any = any || x > -inf_v;
  }
  return any;
}

/// A row's log-softmax in long double, formed as (z - m) - log(s).
struct exact_row {
  long double m = -INFINITY, log_s = 0;
};

template <class T>
exact_row exact_of(const T* z, std::int64_t V) {
  exact_row x;
  long double s = 0;
  for (std::int64_t c = 0; c < V; ++c) x.m = std::max<long double>(x.m, static_cast<long double>(z[c]));
  for (std::int64_t c = 0; c < V; ++c) s += std::exp(static_cast<long double>(z[c]) - x.m);
  x.log_s = std::log(s);
  return x;
}

/// A gradient row against coef * (onehot(y) - p) of the exact softmax: each element within
/// rel |coef| + 2 eps |e| + 2 tiny. Returns the row's sum in long double.
template <class T>
long double check_grad_row(const T* z, const T* gr, std::int64_t V, std::int64_t y, double coef,
                           const exact_row& x, double rel, double eps, double tiny) {
  long double sum = 0;
  for (std::int64_t c = 0; c < V; ++c) {
    const long double p = std::exp((static_cast<long double>(z[c]) - x.m) - x.log_s);
    const double e = static_cast<double>(coef * ((c == y ? 1.0L : 0.0L) - p));
    FUZZ_CHECK(std::fabs(static_cast<double>(gr[c]) - e) <= rel * std::fabs(coef) + 2 * eps * std::fabs(e) + 2 * tiny);
    sum += static_cast<long double>(gr[c]);
  }
  return sum;
}

/// Issue 16, large magnitudes: each completion row's log-prob and gradient against a long
/// double log-softmax formed as (z - m) - log(s), with a tolerance that depends on the
/// vocabulary and the accumulation type, never on the magnitude of the logits (z - (m +
/// log s) in the accumulation type was off by 0.4 at tied maxima of 1e7 in fp32).
template <class T, class L>
void check_rows_exact(const fuzz_case<T, L>& fc, const dpo::pair_view<T, L>& pv,
                      const dpo::cpu::forward_result& f, const std::vector<T>* g) {
  using A = dpo::cpu::acc_t<T>;
  const double eps = std::numeric_limits<A>::epsilon();
  const double tiny = std::numeric_limits<T>::denorm_min();
  const double rel = 64 * eps * (static_cast<double>(fc.V) + 8);
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const dpo::cpu::side_rows& sr = side == 0 ? f.chosen_rows : f.rejected_rows;
    const int b = fc.buf_of(side == 1);
    for (std::int64_t i = 0; i < fc.P; ++i) {
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        const std::int64_t y = v.target(row);
        if (y < 0) continue;
        const T* z = v.logits + row * fc.stride;
        if (!row_defined(z, fc.V)) continue;
        const exact_row x = exact_of(z, fc.V);
        const long double want = (static_cast<long double>(z[y]) - x.m) - x.log_s;
        const double got = sr.logp[static_cast<std::size_t>(row - sr.row0)];
        if (std::isinf(static_cast<double>(want))) {
          FUZZ_CHECK(got == static_cast<double>(want));
        } else {
          // Plus the double rounding of z_y - m, relative to it (the label far below the max).
          const double w = static_cast<double>(want);
          FUZZ_CHECK(std::fabs(got - w) <= rel + 4 * std::numeric_limits<double>::epsilon() * std::fabs(w));
        }
        const double coef = static_cast<double>(static_cast<A>(
            dpo::detail::times(sr.coef[static_cast<std::size_t>(row - sr.row0)], fc.grad_output)));
        if (!std::isfinite(coef) || std::fabs(coef) > 1e30) continue;
        const long double sum = check_grad_row(z, g[b].data() + row * fc.gstride, fc.V, y, coef, x, rel, eps, tiny);
        FUZZ_CHECK(std::fabs(static_cast<double>(sum)) <=
                   rel * std::fabs(coef) * 4 + 2 * static_cast<double>(fc.V + 1) * tiny);
      }
    }
  }
}

/// Issue 16, 0 * inf: with one loss term, moderate chosen rows and reference log-probs (as
/// the finiteness property above), and on the rejected side any defined rows (-inf label
/// logits included) with any finite reference log-probs (infinite margins through the
/// scores), no per-pair loss or derivative is NaN, nor a gradient element of a row with a
/// finite coefficient: the limits are finite or infinite, never NaN. (Both scores of a pair
/// overflowing, e.g. forward_kl at D_c and D_r both below -709, is inf - inf: left out.)
template <class T, class L>
void check_no_nan_at_limits(const fuzz_case<T, L>& fc, const dpo::pair_view<T, L>& pv,
                            const dpo::pair_view<T, L>& rv, const dpo::cpu::forward_result& f,
                            const std::vector<T>* g) {
  const dpo::loss_config& c = fc.cfg;
  if (c.num_terms != 1 || !(c.terms[0].weight > 0)) return;
  // ORPO is -inf - -inf at an average log-prob of exactly 0 on both sides, as in TRL.
  if (c.terms[0].type == dpo::loss_type::orpo) return;
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const auto& r = side == 0 ? rv.chosen : rv.rejected;
    for (std::int64_t i = 0; i < fc.P; ++i) {
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        if (v.target(row) < 0) continue;
        const T* z = v.logits + row * fc.stride;
        if (side == 0 ? !row_moderate(z, fc.V, 16.0) : !row_defined(z, fc.V)) return;
        if (fc.ref_logits && !row_moderate(r.logits + row * r.row_stride, fc.V, side == 0 ? 16.0 : 1e300))
          return;
      }
    }
  }
  if (!fc.ref_logits && fc.bad != knob::null_reference)
    for (std::int64_t i = 0; i < fc.P; ++i)
      if (!(std::fabs(fc.ref_c[i]) <= 40.0) || !std::isfinite(fc.ref_r[i])) return;
  for (std::int64_t i = 0; i < fc.P; ++i) {
    FUZZ_CHECK(!std::isnan(f.losses[i]));
    FUZZ_CHECK(!std::isnan(f.grad_chosen[i]) && !std::isnan(f.grad_rejected[i]));
    FUZZ_CHECK(!std::isnan(f.weights[i]));
  }
  FUZZ_CHECK(!std::isnan(f.nll_token_grad));
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const dpo::cpu::side_rows& sr = side == 0 ? f.chosen_rows : f.rejected_rows;
    const int b = fc.buf_of(side == 1);
    for (std::int64_t i = 0; i < fc.P; ++i)
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        const double coef = dpo::detail::times(sr.coef[static_cast<std::size_t>(row - sr.row0)], fc.grad_output);
        FUZZ_CHECK(!std::isnan(coef));
        if (!(std::fabs(coef) <= 1e30)) continue;
        for (std::int64_t col = 0; col < fc.V; ++col)
          FUZZ_CHECK(!std::isnan(static_cast<double>(g[b][row * fc.gstride + col])));
      }
  }
}

/// Issue 16, combinations: a configuration of several terms equals the weighted sum of its
/// terms computed one at a time (aot and aot_unpaired each sort their own keys, whatever
/// the order), at the pair level from the fused pass's own sequence log-probs; and the fused
/// pass equals the pair-level one. LD-DPO is left out (the fused NLL reads the unweighted
/// sums, dpo_loss the given ones), and terms whose own configuration is invalid.
template <class T, class L>
void check_combination(const fuzz_case<T, L>& fc, const dpo::pair_view<T, L>& pv,
                       const dpo::pair_view<T, L>& rv, const dpo::cpu::forward_result& f,
                       const double* rc, const double* rr) {
  const dpo::loss_config& c = fc.cfg;
  if (c.num_terms < 2 || c.ld_alpha != 1.0) return;
  std::vector<double> ref_c(static_cast<std::size_t>(fc.P)), ref_r(ref_c.size());
  if (fc.ref_logits) {
    dpo::cpu::pair_logps(rv, 1.0, ref_c.data(), ref_r.data());
    rc = ref_c.data();
    rr = ref_r.data();
  }
  static_cast<void>(pv);
  const dpo::pair_logps_in in =
      dpo::make_pair_logps(fc.P, f.chosen_logps.data(), f.rejected_logps.data(), rc, rr, f.chosen_tokens.data(),
                           f.rejected_tokens.data(), c.use_weighting ? f.weights.data() : nullptr);
  double loss = 0, scale = 0;  // scale: the sum of |w_k loss_k,i| / P, for cancellation
  Eigen::VectorXd gc = Eigen::VectorXd::Zero(fc.P), gr = gc, mag = gc;
  double nll_grad = 0;
  for (int k = 0; k < c.num_terms; ++k) {
    dpo::loss_config one = c;
    one.num_terms = 1;
    one.terms[0] = {c.terms[k].type, 1.0};
    one.use_weighting = false;  // the weights are given (in.weights), as the fused pass's
    if (!dpo::validate_config(one).empty()) return;
    dpo::cpu::forward_result r;
    try {
      r = dpo::cpu::dpo_loss(in, one);
    } catch (const dpo::error&) {
      return;
    }
    const double w = c.terms[k].weight;
    loss += w * r.loss;
    scale += std::fabs(w) * r.losses.cwiseAbs().mean();
    gc += w * r.grad_chosen;
    gr += w * r.grad_rejected;
    mag += (w * r.grad_chosen).cwiseAbs() + (w * r.grad_rejected).cwiseAbs();
    nll_grad += w * r.nll_token_grad;
  }
  if (!std::isfinite(loss) || !std::isfinite(f.loss)) return;
  const double tol = 1e-9;
  FUZZ_CHECK(std::fabs(f.loss - loss) <= tol * (1 + scale));
  FUZZ_CHECK(std::fabs(f.nll_token_grad - nll_grad) <= tol * (1 + std::fabs(nll_grad)));
  for (std::int64_t i = 0; i < fc.P; ++i) {
    if (!std::isfinite(mag[i])) continue;
    FUZZ_CHECK(std::fabs(f.grad_chosen[i] - gc[i]) <= tol * (1 + mag[i]));
    FUZZ_CHECK(std::fabs(f.grad_rejected[i] - gr[i]) <= tol * (1 + mag[i]));
  }
}

/// What the sharded checks require of every sequence row's gradient before its values:
/// columns past the vocabulary never written, and a row that is no completion token (y < 0)
/// exactly 0. Returns whether the row is a completion row.
template <class T>
bool check_row_frame(const T* gr, std::int64_t V, std::int64_t gstride, std::int64_t y, T sentinel) {
  for (std::int64_t c = V; c < gstride; ++c) FUZZ_CHECK(same(gr[c], sentinel));
  if (y >= 0) return true;
  for (std::int64_t c = 0; c < V; ++c) FUZZ_CHECK(gr[c] == T(0));
  return false;
}

/// A context rank's copy of its rows of every sequence of one side (rows [cut(n, c, C),
/// cut(n, c + 1, C)) of each, tests/shard_ranks.hpp), packed with its own cu_seqlens, and its
/// gradient buffer (the case's gradient stride, sentinel-filled); orig maps a copy row to the
/// view's row.
template <class T, class L>
struct context_side {
  std::vector<T> z, g;
  std::vector<L> y;
  std::vector<std::uint8_t> m;
  std::vector<std::int64_t> cu{0}, orig;
  std::int64_t rows = 0;

  context_side(const dpo::token_view<T, L>& v, std::int64_t P, int c, int C, std::int64_t gstride, T sentinel) {
    const std::int64_t V = v.vocab;
    for (std::int64_t s = 0; s < P; ++s) {
      const std::int64_t n = v.row_end(s) - v.row_begin(s);
      for (std::int64_t t = shard_ranks::cut(n, c, C); t < shard_ranks::cut(n, c + 1, C); ++t) {
        const std::int64_t row = v.row_begin(s) + t;
        z.insert(z.end(), v.logits + row * v.row_stride, v.logits + row * v.row_stride + V);
        y.push_back(v.labels[row]);
        if (v.mask != nullptr) m.push_back(v.mask[row]);
        orig.push_back(row);
      }
      cu.push_back(static_cast<std::int64_t>(orig.size()));
    }
    rows = static_cast<std::int64_t>(orig.size());
    z.resize(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1) * V));  // a rank may hold no row
    y.resize(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1)), static_cast<L>(v.ignore_index));
    g.assign(static_cast<std::size_t>((rows + 1) * gstride), sentinel);  // one row past: never written
  }

  dpo::token_view<T, L> view(const dpo::token_view<T, L>& like, std::int64_t P) const {
    dpo::token_view<T, L> v = like;
    v.logits = z.data();
    v.labels = y.data();
    v.mask = like.mask != nullptr ? m.data() : nullptr;
    v.cu_seqlens = cu.data();
    v.row_stride = like.vocab;
    v.num_seqs = P;
    v.seq_len = 0;
    v.seq_stride = 0;
    v.first_seq = 0;
    return v;
  }
};

/// Vocabulary and context parallelism: dpo_forward_sharded + dpo_backward_sharded over W x C
/// ranks picked by the seed (ranks as threads with an in-process all-reduce,
/// tests/shard_ranks.hpp): 1 to 3 uneven vocabulary shards, each over 1 to 3 context ranks
/// (C > 1: each context rank holds a packed copy of its slice of every sequence, separate
/// chosen and rejected buffers), against the unsharded call `f` (null when it rejected the
/// input):
///   - every rank rejects exactly when the unsharded call does; with C > 1 an LD-DPO
///     ld_alpha != 1 is refused on every rank, naming it;
///   - every rank holds bitwise the same outputs; token counts are equal;
///   - a sequence's log-prob is NaN exactly when the unsharded one is; where every row of it
///     is defined, it is within twice check_rows_exact's bound of each row of the unsharded
///     one (both paths are within it of the exact row), bitwise equal when infinite;
///   - the mean token accuracy is equal when every completion row is defined (the first
///     maximum across shards, ties included), the mean logits and entropy within the rows'
///     bounds when every completion row is moderate;
///   - every defined completion row's gradient matches the long double softmax times the
///     sharded path's own row coefficient (check_rows_exact's bound), masked rows are 0,
///     columns past the vocabulary and gap rows are never written.
template <class T, class L>
void check_sharded(const fuzz_case<T, L>& fc, const dpo::pair_view<T, L>& pv,
                   const dpo::cpu::forward_result* f, const double* rc, const double* rr) {
  using A = dpo::cpu::acc_t<T>;
  const std::int64_t P = fc.P, V = fc.V;
  rng pick_shards{fc.seed ^ 0x5eedu};
  const int W = static_cast<int>(std::min<std::int64_t>(V, 1 + static_cast<std::int64_t>(fc.seed % 3)));
  const int C = 1 + static_cast<int>((fc.seed / 3) % 3);
  const std::vector<std::int64_t> cuts = random_cuts(V, W, pick_shards);

  const T sentinel = static_cast<T>(-12345.25);
  std::vector<T> g[2];
  for (int b = 0; b < fc.nbuf; ++b)
    g[b].assign(static_cast<std::size_t>(std::max<std::int64_t>(1, fc.rows[b] * fc.gstride)), sentinel);
  const dpo::pair_grad_view<T> gv{g[0].data(), fc.gstride, g[fc.buf_of(true)].data(), fc.gstride};
  // C > 1: context rank c's copies of its rows (sides 0 chosen, 1 rejected), its views.
  std::vector<context_side<T, L>> slices;
  std::vector<dpo::pair_view<T, L>> cviews;
  std::vector<dpo::pair_grad_view<T>> cgrads;
  if (C > 1) {
    for (int c = 0; c < C; ++c) {
      slices.emplace_back(pv.chosen, P, c, C, fc.gstride, sentinel);
      slices.emplace_back(pv.rejected, P, c, C, fc.gstride, sentinel);
    }
    for (int c = 0; c < C; ++c) {
      context_side<T, L>& sc = slices[static_cast<std::size_t>(2 * c)];
      context_side<T, L>& sr = slices[static_cast<std::size_t>(2 * c + 1)];
      cviews.push_back({sc.view(pv.chosen, P), sr.view(pv.rejected, P), 0});
      cgrads.push_back({sc.g.data(), fc.gstride, sr.g.data(), fc.gstride});
    }
  }
  dpo::cpu::options o;
  o.num_threads = 1;
  o.metrics = fc.metrics;
  std::vector<dpo::cpu::forward_result> got(static_cast<std::size_t>(W * C));
  std::vector<dpo::cpu::shard_state> states(static_cast<std::size_t>(W * C));
  shard_ranks::grid ranks(W, C);
  // Ranks write disjoint columns (and with C > 1 disjoint rows) of the gradient rows.
  const std::vector<std::string> errors = ranks.run([&](int rank, int t, int c, const dpo::cpu::collectives& comm) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    const auto view = shard_ranks::shard_of(C > 1 ? cviews[static_cast<std::size_t>(c)] : pv, sh);
    const auto grad = shard_ranks::shard_of(C > 1 ? cgrads[static_cast<std::size_t>(c)] : gv, sh);
    dpo::cpu::shard_state& st = states[static_cast<std::size_t>(rank)];
    dpo::cpu::dpo_forward_sharded(view, sh, rc, rr, fc.cfg, comm,
                                  dpo::cpu::detail::owned_outputs(got[static_cast<std::size_t>(rank)], P), st, o);
    dpo::cpu::dpo_backward_sharded(view, sh, st, grad, fc.grad_output, o);
  });
  // The context ranks' gradient rows back into the case's buffers, at their rows; the row
  // past each copy's must be untouched.
  for (const context_side<T, L>& s : slices) {
    const int b = fc.buf_of(((&s - slices.data()) & 1) != 0);  // odd: a rejected side
    for (std::int64_t i = 0; i < s.rows; ++i)
      std::copy_n(s.g.data() + i * fc.gstride, fc.gstride, g[b].data() + s.orig[static_cast<std::size_t>(i)] * fc.gstride);
    for (std::int64_t c = 0; c < fc.gstride; ++c) FUZZ_CHECK(same(s.g[static_cast<std::size_t>(s.rows * fc.gstride + c)], sentinel));
  }
  if (check_sharded_refusal(errors, f != nullptr, C > 1, fc.cfg.ld_alpha, "dpo_forward_sharded")) {
    for (int b = 0; b < fc.nbuf; ++b)
      for (T x : g[b]) FUZZ_CHECK(same(x, sentinel));
    return;
  }

  const dpo::cpu::forward_result& r = got[0];
  for (const dpo::cpu::forward_result& x : got) FUZZ_CHECK(same(x, r));

  const double eps = std::numeric_limits<A>::epsilon();
  const double deps = std::numeric_limits<double>::epsilon();
  const double tiny = std::numeric_limits<T>::denorm_min();
  const double rel = 64 * eps * (static_cast<double>(V) + 8);
  bool all_defined = true, all_moderate = true;
  double zrange = 0, zabs = 0;
  std::vector<double> seq_tol[2];
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const dpo::cpu::side_rows& sr = side == 0 ? f->chosen_rows : f->rejected_rows;
    const Eigen::VectorXd& tok = side == 0 ? f->chosen_tokens : f->rejected_tokens;
    const Eigen::VectorXd& tok_sh = side == 0 ? r.chosen_tokens : r.rejected_tokens;
    const Eigen::VectorXd& pi = side == 0 ? f->chosen_logps : f->rejected_logps;
    const Eigen::VectorXd& pi_sh = side == 0 ? r.chosen_logps : r.rejected_logps;
    for (std::int64_t i = 0; i < P; ++i) {
      FUZZ_CHECK(tok[i] == tok_sh[i]);
      FUZZ_CHECK(std::isnan(pi[i]) == std::isnan(pi_sh[i]));
      bool defined = true;
      double tol = 0;
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        if (v.target(row) < 0) continue;
        const T* z = v.logits + row * fc.stride;
        defined = defined && row_defined(z, V);
        if (!row_moderate(z, V, 1e3)) {
          all_moderate = false;
        } else {
          double lo = INFINITY, hi = -INFINITY;
          for (std::int64_t c = 0; c < V; ++c) {
            lo = std::fmin(lo, static_cast<double>(z[c]));
            hi = std::fmax(hi, static_cast<double>(z[c]));
          }
          zrange = std::fmax(zrange, hi - lo);
          zabs = std::fmax(zabs, std::fmax(std::fabs(lo), std::fabs(hi)));
        }
        tol += 2 * (rel + 4 * deps * std::fabs(sr.logp[static_cast<std::size_t>(row - sr.row0)]));
      }
      seq_tol[side].push_back(tol + 4 * deps * std::fabs(pi[i]));
      all_defined = all_defined && defined;
      if (!defined) continue;
      if (std::isfinite(pi[i]))
        FUZZ_CHECK(std::fabs(pi_sh[i] - pi[i]) <= tol + 4 * deps * std::fabs(pi[i]));
      else
        FUZZ_CHECK(same(pi_sh[i], pi[i]));
    }
  }
  // Pair level, every sequence defined: rewards within |beta| times their log-probs' bound;
  // WPO weights within the bound of their exponent (each row's WPO term within twice its
  // log-prob's); without WPO (whose weights are not differentiated), the batch loss within
  // the Lipschitz bound of both paths' dL/dpi (the larger: one-sided at a kink) and the NLL
  // token gradient, plus a second-order slack.
  if (all_defined) {
    const double slack = std::is_same_v<A, float> ? 1e-4 : 1e-9;
    double loss_tol = slack * (1 + std::fabs(f->loss));
    bool finite = std::isfinite(f->loss) && std::isfinite(r.loss);
    for (std::int64_t i = 0; i < P; ++i) {
      for (int side = 0; side < 2; ++side) {
        const double want = side == 0 ? f->chosen_rewards[i] : f->rejected_rewards[i];
        const double got = side == 0 ? r.chosen_rewards[i] : r.rejected_rewards[i];
        const double t = seq_tol[side][static_cast<std::size_t>(i)];
        if (std::isfinite(want) && std::isfinite(got))
          FUZZ_CHECK(std::fabs(got - want) <= std::fabs(fc.cfg.beta) * t + 4 * deps * std::fabs(want));
        const double g0 = side == 0 ? f->grad_chosen[i] : f->grad_rejected[i];
        const double g1 = side == 0 ? r.grad_chosen[i] : r.grad_rejected[i];
        finite = finite && std::isfinite(g0) && std::isfinite(g1) && std::isfinite(t);
        loss_tol += std::fmax(std::fabs(g0), std::fabs(g1)) * t;
        if (side == 0)
          loss_tol += std::fmax(std::fabs(f->nll_token_grad), std::fabs(r.nll_token_grad)) * t;
      }
      if (fc.cfg.use_weighting && std::isfinite(f->weights[i]) && std::isfinite(r.weights[i])) {
        const double e = 2 * seq_tol[0][static_cast<std::size_t>(i)] / dpo::detail::clamp_len(f->chosen_tokens[i]) +
                         2 * seq_tol[1][static_cast<std::size_t>(i)] / dpo::detail::clamp_len(f->rejected_tokens[i]);
        const bool near = r.weights[i] == f->weights[i] ||
                          std::fabs(r.weights[i] - f->weights[i]) <= f->weights[i] * (std::expm1(e) + 4 * deps);
        if (!near)
          std::fprintf(stderr, "pair %ld: WPO weight %.17g sharded, %.17g unsharded, bound of the exponent %g\n",
                       static_cast<long>(i), r.weights[i], f->weights[i], e);
        FUZZ_CHECK(near);
      }
    }
    if (finite && !fc.cfg.use_weighting) FUZZ_CHECK(std::fabs(r.loss - f->loss) <= loss_tol);
  }
  if (all_defined && (fc.metrics || fc.cfg.use_weighting)) {
    FUZZ_CHECK(r.metrics.mean_token_accuracy == f->metrics.mean_token_accuracy);
    if (all_moderate) {
      const double m_tol = rel * (2 + zrange + zabs);
      FUZZ_CHECK(std::fabs(r.metrics.logits_chosen - f->metrics.logits_chosen) <= m_tol);
      FUZZ_CHECK(std::fabs(r.metrics.logits_rejected - f->metrics.logits_rejected) <= m_tol);
      FUZZ_CHECK(std::fabs(r.metrics.entropy - f->metrics.entropy) <= m_tol);
    }
  }

  // Gradients: each row against the exact softmax with the sharded path's own coefficient.
  const dpo::cpu::shard_state& st = states[0];
  const std::vector<double> shared = dpo::cpu::detail::shared_lengths(
      dpo::cpu::detail::token_counts(pv.chosen), dpo::cpu::detail::token_counts(pv.rejected), st.ld_alpha);
  std::vector<char> owned[2];
  for (int b = 0; b < fc.nbuf; ++b) owned[b].assign(static_cast<std::size_t>(fc.rows[b]), 0);
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const std::vector<double> coefs = dpo::cpu::detail::shard_coefs(
        v, st.seq_grad.data() + (side == 0 ? 0 : P), shared, st.ld_alpha, side == 0 ? st.nll_token_grad : 0.0);
    const int b = fc.buf_of(side == 1);
    for (std::int64_t i = 0; i < P; ++i) {
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        owned[b][row] = 1;
        const T* gr = g[b].data() + row * fc.gstride;
        const std::int64_t y = v.target(row);
        if (!check_row_frame(gr, V, fc.gstride, y, sentinel)) continue;
        const T* z = v.logits + row * fc.stride;
        if (!row_defined(z, V)) continue;
        const double coef = static_cast<double>(static_cast<A>(
            dpo::detail::times(coefs[static_cast<std::size_t>(row - v.row_begin(0))], fc.grad_output)));
        if (!std::isfinite(coef) || std::fabs(coef) > 1e30) continue;
        check_grad_row(z, gr, V, y, coef, exact_of(z, V), rel, eps, tiny);
      }
    }
  }
  for (int b = 0; b < fc.nbuf; ++b)
    for (std::int64_t row = 0; row < fc.rows[b]; ++row)
      if (!owned[b][row])
        for (std::int64_t c = 0; c < fc.gstride; ++c) FUZZ_CHECK(same(g[b][row * fc.gstride + c], sentinel));
}

/// sequence_logps_sharded + shard_sequence_backward on the chosen side `v` over W x C ranks
/// (vocabulary shards and context slices picked by the seed, as in check_sharded but drawn
/// apart from it), against the unsharded sequence_logps (`accepted`, sums, counts) and the
/// exact log-softmax:
///   - every rank refuses exactly when sequence_logps does, and then writes nothing;
///   - every rank holds bitwise the same sums and counts; the counts are sequence_logps';
///   - each sum is NaN exactly when sequence_logps' is and, where every row of the sequence
///     is defined, within the rows' bounds of it (bitwise equal when infinite);
///   - every defined completion row's gradient is seq_grad times onehot(y) minus the long
///     double softmax, masked rows are 0, gap rows and columns past the vocabulary unwritten.
template <class T, class L>
void check_sequence_sharded(const fuzz_case<T, L>& fc, const dpo::token_view<T, L>& v, bool accepted,
                            const std::vector<double>& sums, const std::vector<std::int64_t>& counts) {
  using A = dpo::cpu::acc_t<T>;
  const std::int64_t P = fc.P, V = fc.V;
  rng pick{fc.seed ^ 0x5e9u};
  const int W = static_cast<int>(std::min<std::int64_t>(V, 1 + static_cast<std::int64_t>((fc.seed / 9) % 3)));
  const int C = 1 + static_cast<int>((fc.seed / 27) % 3);
  const std::vector<std::int64_t> cuts = random_cuts(V, W, pick);
  static const double grads[] = {1.0, -0.5, 2.5, 0.0, -3.0, 0.125};
  std::vector<double> seq_grad;
  for (std::int64_t i = 0; i < P; ++i) seq_grad.push_back(grads[pick.next() % 6]);

  const T sentinel = static_cast<T>(-12345.25);
  const int b0 = fc.buf_of(false);
  std::vector<T> g(static_cast<std::size_t>(std::max<std::int64_t>(1, fc.rows[b0] * fc.gstride)), sentinel);
  std::vector<context_side<T, L>> slices;
  for (int c = 0; c < C && C > 1; ++c) slices.emplace_back(v, P, c, C, fc.gstride, sentinel);
  dpo::cpu::options o;
  o.num_threads = 1;
  std::vector<std::vector<double>> got_sums(static_cast<std::size_t>(W * C), std::vector<double>(P, -7.5));
  std::vector<std::vector<double>> got_counts(static_cast<std::size_t>(W * C), std::vector<double>(P, -7.5));
  shard_ranks::grid ranks(W, C);
  const std::vector<std::string> errors = ranks.run([&](int rank, int t, int c, const dpo::cpu::collectives& comm) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    dpo::token_view<T, L> view = C > 1 ? slices[static_cast<std::size_t>(c)].view(v, P) : v;
    view.logits += sh.start;
    view.vocab = sh.width();
    T* grad = (C > 1 ? slices[static_cast<std::size_t>(c)].g.data() : g.data()) + sh.start;
    dpo::cpu::shard_state st;
    const std::size_t k = static_cast<std::size_t>(rank);
    dpo::cpu::sequence_logps_sharded(view, sh, comm, got_sums[k].data(), got_counts[k].data(), st, o);
    dpo::cpu::shard_sequence_backward(view, sh, st.chosen_max.data(), st.chosen_records.data(), seq_grad.data(),
                                      grad, fc.gstride, o);
  });
  for (const context_side<T, L>& sl : slices) {
    for (std::int64_t i = 0; i < sl.rows; ++i)
      std::copy_n(sl.g.data() + i * fc.gstride, fc.gstride, g.data() + sl.orig[static_cast<std::size_t>(i)] * fc.gstride);
    for (std::int64_t c = 0; c < fc.gstride; ++c)
      FUZZ_CHECK(same(sl.g[static_cast<std::size_t>(sl.rows * fc.gstride + c)], sentinel));
  }
  check_same_refusal(errors, accepted, "sequence_logps_sharded");
  if (!accepted) {
    for (std::size_t k = 0; k < got_sums.size(); ++k)
      for (std::int64_t i = 0; i < P; ++i) FUZZ_CHECK(got_sums[k][i] == -7.5 && got_counts[k][i] == -7.5);
    for (T x : g) FUZZ_CHECK(same(x, sentinel));
    return;
  }
  for (std::size_t k = 1; k < got_sums.size(); ++k)
    for (std::int64_t i = 0; i < P; ++i)
      FUZZ_CHECK(same(got_sums[k][i], got_sums[0][i]) && same(got_counts[k][i], got_counts[0][i]));

  const double eps = std::numeric_limits<A>::epsilon();
  const double deps = std::numeric_limits<double>::epsilon();
  const double tiny = std::numeric_limits<T>::denorm_min();
  const double rel = 64 * eps * (static_cast<double>(V) + 8);
  std::vector<char> owned(static_cast<std::size_t>(fc.rows[b0]), 0);
  for (std::int64_t i = 0; i < P; ++i) {
    FUZZ_CHECK(got_counts[0][i] == static_cast<double>(counts[static_cast<std::size_t>(i)]));
    const double want = sums[static_cast<std::size_t>(i)], got = got_sums[0][i];
    FUZZ_CHECK(std::isnan(want) == std::isnan(got));
    bool defined = true;
    double tol = 4 * deps * std::fabs(want);
    const double coef = static_cast<double>(static_cast<A>(seq_grad[static_cast<std::size_t>(i)]));
    for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
      owned[static_cast<std::size_t>(row)] = 1;
      const T* gr = g.data() + row * fc.gstride;
      const std::int64_t y = v.target(row);
      if (!check_row_frame(gr, V, fc.gstride, y, sentinel)) continue;
      const T* z = v.logits + row * v.row_stride;
      if (!row_defined(z, V)) {
        defined = false;
        continue;
      }
      const exact_row x = exact_of(z, V);
      const double lp = static_cast<double>((static_cast<long double>(z[y]) - x.m) - x.log_s);
      tol += 2 * (rel + 4 * deps * std::fabs(lp));
      check_grad_row(z, gr, V, y, coef, x, rel, eps, tiny);
    }
    if (!defined) continue;
    if (std::isfinite(want))
      FUZZ_CHECK(std::fabs(got - want) <= tol);
    else
      FUZZ_CHECK(same(got, want));
  }
  for (std::int64_t row = 0; row < fc.rows[b0]; ++row)
    if (!owned[static_cast<std::size_t>(row)])
      for (std::int64_t c = 0; c < fc.gstride; ++c) FUZZ_CHECK(same(g[static_cast<std::size_t>(row * fc.gstride + c)], sentinel));
}

template <class T, class L>
void run(reader& in, std::uint8_t flags) {
  using dpo::loss_type;
  fuzz_case<T, L> fc;
  build(fc, in, flags);
  const T sentinel = static_cast<T>(-12345.25);
  const T* l1 = fc.nbuf == 2 ? fc.logits[1].data() : fc.logits[0].data();
  const auto pv = fc.view(fc.logits[0].data(), l1);
  const auto rv = fc.view(fc.ref[0].data(), fc.nbuf == 2 ? fc.ref[1].data() : fc.ref[0].data());
  const std::int64_t P = fc.P;

  // What the library must reject.
  const dpo::loss_config& cfg = fc.cfg;
  const bool cfg_bad = !dpo::validate_config(cfg).empty();
  const bool needs_ref = dpo::detail::needs_reference(cfg);
  const bool null_ref = fc.bad == knob::null_reference && !fc.ref_logits;
  bool labels_bad = false;
  if (!fc.shape_bad()) {
    for (const auto* s : {&pv.chosen, &pv.rejected})
      for (std::int64_t q = 0; q < s->num_seqs; ++q)
        for (std::int64_t row = s->row_begin(q); row < s->row_end(q); ++row)
          labels_bad = labels_bad || label_bad(*s, row);
  }
  const bool fwd_bad = cfg_bad || fc.shape_bad() || labels_bad || (null_ref && needs_ref);

  // sequence_logps writes nothing when it throws.
  std::vector<double> sums(static_cast<std::size_t>(P), -7.5);
  std::vector<std::int64_t> counts(static_cast<std::size_t>(P), -7);
  bool seq_ok = true;
  try {
    dpo::cpu::sequence_logps(pv.chosen, sums.data(), counts.data());
  } catch (const dpo::error&) {
    seq_ok = false;
    for (std::int64_t i = 0; i < P; ++i) FUZZ_CHECK(sums[i] == -7.5 && counts[i] == -7);
  }
  if (fc.bad == knob::none) check_sequence_sharded<T, L>(fc, pv.chosen, seq_ok, sums, counts);

  dpo::cpu::options o1, o2;
  o1.num_threads = 1;
  o2.num_threads = 2;
  o1.metrics = o2.metrics = fc.metrics;
  const double* rc = null_ref ? nullptr : fc.ref_c.data();
  const double* rr = null_ref ? nullptr : fc.ref_r.data();
  // The sharded path takes reference log-probs and the arguments the knobs leave valid.
  const bool sharded = fc.bad == knob::none && !fc.ref_logits;
  auto forward = [&](const dpo::cpu::options& o) {
    return fc.ref_logits ? dpo::cpu::dpo_forward(pv, rv, cfg, o)
                         : dpo::cpu::dpo_forward(pv, rc, rr, cfg, o);
  };
  dpo::cpu::forward_result f1;
  try {
    f1 = forward(o1);
  } catch (const dpo::error&) {
    FUZZ_CHECK(fwd_bad);
    if (sharded) check_sharded<T, L>(fc, pv, nullptr, rc, rr);
    return;
  }
  FUZZ_CHECK(!fwd_bad);
  FUZZ_CHECK(f1.losses.size() == P && f1.grad_chosen.size() == P && f1.vocab == fc.V);
  FUZZ_CHECK(same(f1, forward(o2)));
  FUZZ_CHECK(seq_ok);
  for (std::int64_t i = 0; i < P; ++i)
    FUZZ_CHECK(static_cast<double>(counts[i]) == f1.chosen_tokens[i]);

  // Out of place, 1 and 2 threads, into sentinel-filled buffers.
  std::vector<T> g1[2], g2[2];
  for (int b = 0; b < fc.nbuf; ++b) {
    // Never empty: the API rejects a null gradient pointer even when there are no rows.
    g1[b].assign(static_cast<std::size_t>(std::max<std::int64_t>(1, fc.rows[b] * fc.gstride)),
                 sentinel);
    g2[b] = g1[b];
  }
  // The aliasing knob points grad.chosen at the logits with stride + 1, used only when that
  // overlaps logits rows (element ranges as check_grad computes them); otherwise it would
  // be a valid argument that writes past the buffer.
  bool aliased = false;
  if (fc.bad == knob::aliased_grad) {
    const std::int64_t s = fc.stride, c0 = pv.chosen.row_begin(0), c1 = pv.chosen.row_end(P - 1);
    if (c1 > c0) {
      const std::int64_t lo = c0 * (s + 1), hi = (c1 - 1) * (s + 1) + fc.V;
      auto hits = [&](const dpo::token_view<T, L>& v) {
        const std::int64_t r0 = v.row_begin(0), r1 = v.row_end(P - 1);
        return r1 > r0 && lo < (r1 - 1) * s + fc.V && r0 * s < hi;
      };
      aliased = hits(pv.chosen) || (fc.nbuf == 1 && hits(pv.rejected));
    }
  }
  auto grad_view = [&](std::vector<T>* g) {
    dpo::pair_grad_view<T> v{g[0].data(), fc.gstride, g[fc.buf_of(true)].data(), fc.gstride};
    if (aliased) {
      v.chosen = const_cast<T*>(pv.chosen.logits);
      v.chosen_stride = fc.stride + 1;
    }
    return v;
  };
  const bool bwd_bad = fc.bad == knob::nan_grad_output || aliased;
  try {
    dpo::cpu::dpo_backward(pv, f1, grad_view(g1), fc.grad_output, o1);
  } catch (const dpo::error&) {
    FUZZ_CHECK(bwd_bad);
    for (int b = 0; b < fc.nbuf; ++b)
      for (T x : g1[b]) FUZZ_CHECK(same(x, sentinel));
    return;
  }
  FUZZ_CHECK(!bwd_bad);
  dpo::cpu::dpo_backward(pv, f1, grad_view(g2), fc.grad_output, o2);
  for (int b = 0; b < fc.nbuf; ++b)
    for (std::size_t i = 0; i < g1[b].size(); ++i) FUZZ_CHECK(same(g1[b][i], g2[b][i]));

  // In place on a copy of the logits: equal to out of place on [0, V), the rest untouched.
  std::vector<T> w[2] = {fc.logits[0], fc.logits[1]};
  const auto wv = fc.view(w[0].data(), fc.nbuf == 2 ? w[1].data() : w[0].data());
  dpo::cpu::dpo_backward(wv, f1,
                         dpo::pair_grad_view<T>{w[0].data(), fc.stride,
                                                w[fc.buf_of(true)].data(), fc.stride},
                         fc.grad_output, o1);

  // Which pairs must be finite: moderate logits rows (|z| <= 16, so |pi| <= 8 * (32 + log 300)
  // ~ 302) and reference log-probs (|rho| <= 40, or rows as above), so |D| <= 342 and even
  // squares of exp(|D|) (ipo, sppo_hard with forward_kl) stay finite. Batch-coupled terms mix
  // every pair, so they need the whole batch moderate.
  const bool coupled = cfg.use_weighting || is_term(cfg, {loss_type::sft, loss_type::cpo,
                                                          loss_type::orpo, loss_type::aot,
                                                          loss_type::aot_unpaired});
  std::vector<char> pair_ok(static_cast<std::size_t>(P), 1);
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const auto& refv = side == 0 ? rv.chosen : rv.rejected;
    for (std::int64_t i = 0; i < P; ++i) {
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        if (v.target(row) < 0) continue;
        pair_ok[i] &= row_moderate(v.logits + row * v.row_stride, fc.V, 16.0);
        if (fc.ref_logits) pair_ok[i] &= row_moderate(refv.logits + row * refv.row_stride, fc.V, 16.0);
      }
      if (!fc.ref_logits && rc != nullptr) {
        const double x = side == 0 ? rc[i] : rr[i];
        pair_ok[i] &= std::fabs(x) <= 40.0;
      }
      // ORPO's log(1 - exp(a)) is -inf at an average log-prob of exactly 0, as in TRL.
      if (is_term(cfg, {loss_type::orpo})) {
        const double pi = side == 0 ? f1.chosen_logps[i] : f1.rejected_logps[i];
        if (pi == 0.0) pair_ok[i] = 0;
      }
    }
  }
  bool all_ok = true;
  for (char ok : pair_ok) all_ok = all_ok && ok;
  for (std::int64_t i = 0; i < P; ++i) {
    if (!(coupled ? all_ok : pair_ok[i])) continue;
    FUZZ_CHECK(std::isfinite(f1.losses[i]));
    FUZZ_CHECK(std::isfinite(f1.chosen_rewards[i]) && std::isfinite(f1.rejected_rewards[i]));
    FUZZ_CHECK(std::isfinite(f1.chosen_logps[i]) && std::isfinite(f1.rejected_logps[i]));
    FUZZ_CHECK(std::isfinite(f1.grad_chosen[i]) && std::isfinite(f1.grad_rejected[i]));
    FUZZ_CHECK(std::isfinite(f1.weights[i]));
  }
  if (all_ok) {
    FUZZ_CHECK(std::isfinite(f1.loss) && std::isfinite(f1.nll_token_grad));
    const dpo::cpu::metrics& m = f1.metrics;
    for (double x : {m.rewards_chosen, m.rewards_rejected, m.rewards_margins, m.rewards_accuracies,
                     m.logps_chosen, m.logps_rejected, m.logits_chosen, m.logits_rejected,
                     m.entropy, m.mean_token_accuracy, m.nll_loss})
      FUZZ_CHECK(std::isfinite(x));
  }

  // Row by row: ownership, masked zeros, finiteness and the zero-sum property.
  const double eps = std::numeric_limits<dpo::cpu::acc_t<T>>::epsilon();
  const double tiny = std::numeric_limits<T>::denorm_min();
  const double coef_limit = std::is_same_v<T, double> ? 1e300 : 1e30;
  std::vector<char> owned[2];
  for (int b = 0; b < fc.nbuf; ++b) owned[b].assign(static_cast<std::size_t>(fc.rows[b]), 0);
  for (int side = 0; side < 2; ++side) {
    const auto& v = side == 0 ? pv.chosen : pv.rejected;
    const dpo::cpu::side_rows& sr = side == 0 ? f1.chosen_rows : f1.rejected_rows;
    const int b = fc.buf_of(side == 1);
    for (std::int64_t i = 0; i < P; ++i) {
      const bool finite_pair = coupled ? all_ok : pair_ok[i] != 0;
      for (std::int64_t row = v.row_begin(i); row < v.row_end(i); ++row) {
        owned[b][row] = 1;
        const T* z = v.logits + row * fc.stride;
        const T* g = g1[b].data() + row * fc.gstride;
        for (std::int64_t c = 0; c < fc.V; ++c) FUZZ_CHECK(same(w[b][row * fc.stride + c], g[c]));
        for (std::int64_t c = fc.V; c < fc.gstride; ++c) FUZZ_CHECK(same(g[c], sentinel));
        for (std::int64_t c = fc.V; c < fc.stride; ++c)
          FUZZ_CHECK(same(w[b][row * fc.stride + c], z[c]));
        if (v.target(row) < 0) {
          for (std::int64_t c = 0; c < fc.V; ++c) FUZZ_CHECK(g[c] == T(0));
          continue;
        }
        // As the backward scales it: 0 * inf = 0 (a zero grad_output zeroes the row).
        const double coef = static_cast<double>(static_cast<dpo::cpu::acc_t<T>>(
            dpo::detail::times(sr.coef[row - sr.row0], fc.grad_output)));
        bool g_finite = true;
        long double sum = 0;
        for (std::int64_t c = 0; c < fc.V; ++c) {
          g_finite = g_finite && std::isfinite(static_cast<double>(g[c]));
          sum += static_cast<long double>(g[c]);
        }
        if (finite_pair && row_moderate(z, fc.V, 16.0) && std::fabs(coef) <= coef_limit)
          FUZZ_CHECK(g_finite);
        double zmax = 0;
        const bool z_small = row_moderate(z, fc.V, 1e3);
        for (std::int64_t c = 0; c < fc.V && z_small; ++c)
          zmax = std::fmax(zmax, std::fabs(static_cast<double>(z[c])));
        if (g_finite && z_small) {
          // Relative rounding of p_v and of the log-sum-exp, plus one subnormal step per
          // element where coef * p_v underflows.
          const double tol = 64 * eps * std::fabs(coef) * (static_cast<double>(fc.V) + zmax + 8) +
                             2 * static_cast<double>(fc.V + 1) * tiny;
          FUZZ_CHECK(std::fabs(static_cast<double>(sum)) <= tol);
        }
      }
    }
  }
  for (int b = 0; b < fc.nbuf; ++b) {
    for (std::int64_t row = 0; row < fc.rows[b]; ++row) {
      if (owned[b][row]) continue;
      for (std::int64_t c = 0; c < fc.gstride; ++c)
        FUZZ_CHECK(same(g1[b][row * fc.gstride + c], sentinel));
      for (std::int64_t c = 0; c < fc.stride; ++c)
        FUZZ_CHECK(same(w[b][row * fc.stride + c], fc.logits[b][row * fc.stride + c]));
    }
  }

  check_rows_exact(fc, pv, f1, g1);
  check_no_nan_at_limits(fc, pv, rv, f1, g1);
  check_combination(fc, pv, rv, f1, rc, rr);
  if (sharded) check_sharded<T, L>(fc, pv, &f1, rc, rr);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader in{data, size};
  const std::uint8_t flags = in.u8();
  switch (flags & 3) {
    case 0: run<float, std::int64_t>(in, flags); break;
    case 1: run<float, std::int32_t>(in, flags); break;
    case 2: run<double, std::int64_t>(in, flags); break;
    default: run<double, std::int32_t>(in, flags); break;
  }
  return 0;
}
