// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Argument checks of the CPU API: the core checks (dpo/core/check.hpp) thrown as dpo::error.
// The host reads cu_seqlens and labels itself, so the checks are exact (cpu_policy). Every
// check runs before anything is written.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "dpo/core/check.hpp"
#include "dpo/core/layout.hpp"
#include "dpo/core/validate.hpp"
#include "dpo/error.hpp"

namespace dpo {
namespace cpu {
namespace detail {

using dpo::detail::fail;

/// Throws dpo::error("dpo: " + msg) unless msg is empty (the core checks' "valid").
inline void throw_if(const std::string& msg) {
  if (!msg.empty()) fail(msg);
}

inline void check_config(const loss_config& c) { throw_if(validate_config(c)); }

/// Outputs may overlap neither an input nor each other (dpo::detail::check_no_overlap), thrown.
inline void require_no_overlap(const dpo::detail::named_range* outs, int n_out, const dpo::detail::named_range* ins,
                               int n_in) {
  throw_if(dpo::detail::check_no_overlap(outs, n_out, ins, n_in));
}
inline void require_no_overlap(std::initializer_list<dpo::detail::named_range> outs,
                               std::initializer_list<dpo::detail::named_range> ins) {
  require_no_overlap(outs.begin(), static_cast<int>(outs.size()), ins.begin(), static_cast<int>(ins.size()));
}

/// Whether any sequence of a (shape-checked) view owns a row.
template <class T, class L>
bool has_rows(const token_view<T, L>& v) {
  return dpo::detail::has_rows(v, dpo::detail::cpu_policy());
}

/// Shapes, offsets, cu_seqlens and labels of one view. `name` prefixes the argument names.
template <class T, class L>
void check_view(const token_view<T, L>& v, const char* name) {
  throw_if(dpo::detail::check_view(v, name, dpo::detail::cpu_policy()));
}

template <class T, class L>
void check_pairs(const pair_view<T, L>& p, const char* name) {
  throw_if(dpo::detail::check_pairs(p, name, dpo::detail::cpu_policy()));
}

/// The gradient buffers: non-null, stride >= vocab, and either exactly the logits (in place,
/// same pointer and stride) or disjoint from every logits row that is read.
template <class T, class L>
void check_grad(const pair_view<T, L>& p, const pair_grad_view<T>& g) {
  throw_if(dpo::detail::check_grad(p, g, dpo::detail::cpu_policy()));
}

/// A pair gradient may overlap neither side's labels, mask or cu_seqlens nor `extra` (the
/// row state a call reads); its rule against the logits is check_grad's.
template <class T, class L>
void check_grad_inputs(const pair_view<T, L>& p, const pair_grad_view<T>& g,
                       std::initializer_list<dpo::detail::named_range> extra = {}) {
  throw_if(dpo::detail::check_pair_grad_inputs(p, g, extra.begin(), static_cast<int>(extra.size()),
                                               dpo::detail::cpu_policy()));
}

/// The row_lse, seq_grad and gradient arguments of sequence_logps_backward.
template <class T, class L>
void check_seq_grad(const token_view<T, L>& v, const double* row_lse, const double* seq_grad,
                    const T* grad, std::int64_t grad_stride) {
  const dpo::detail::check_policy p = dpo::detail::cpu_policy();
  throw_if(dpo::detail::check_seq_grad(v, row_lse, seq_grad, grad, grad_stride, p));
  // Nor may the gradient overlap the other inputs: labels, mask, cu_seqlens, row_lse, seq_grad.
  dpo::detail::named_range ins[5];
  dpo::detail::view_index_ranges(v, p, dpo::detail::seq_view_names + 1, ins);
  const std::int64_t rows = dpo::detail::rows_of(v, p).end, n = v.num_seqs;
  ins[3] = dpo::detail::range_of(row_lse, 1, rows, rows, "row_lse");
  ins[4] = dpo::detail::range_of(seq_grad, 1, n, n, "seq_grad");
  throw_if(dpo::detail::check_grad_against(grad, grad_stride, v, "grad", ins, 5, p));
}

/// The reference log-probs, needed unless the loss is reference-free.
inline void check_reference(const loss_config& cfg, const double* ref_chosen,
                            const double* ref_rejected) {
  throw_if(dpo::detail::check_reference(cfg, ref_chosen, ref_rejected, dpo::detail::cpu_policy()));
}

/// The reference pair view of the reference-logits overloads: as many pairs as the policy.
template <class T, class R, class L>
void check_reference_pairs(const pair_view<T, L>& policy, const pair_view<R, L>& reference) {
  throw_if(dpo::detail::check_reference_pairs(policy, reference));
}

/// dpo_loss's sequence-level inputs.
inline void check_logps_in(const pair_logps_in& in, const loss_config& cfg) {
  throw_if(dpo::detail::check_logps_in(in, cfg, dpo::detail::cpu_policy()));
}

inline void check_finite(double v, const char* name) { throw_if(dpo::detail::check_finite(v, name)); }

inline void check_unit(double v, const char* name) { throw_if(dpo::detail::check_unit(v, name)); }

}  // namespace detail
}  // namespace cpu
}  // namespace dpo
