// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The batch loss L = sum_k w_k * mean_i(loss_k,i * W_i) and its gradient with respect to each
// pair's policy log-probs, written per pair so a CPU loop and a CUDA thread per pair run the
// same code. The batch-level pieces (NLL over the batch, mean WPO weight, the sorts of aot)
// are computed first and passed in.
#pragma once

#include <cmath>
#include <cstdint>

#include "dpo/core/loss.hpp"
#include "dpo/core/metrics.hpp"

namespace dpo {
namespace detail {

/// One batch term's keys a_i and b_i sorted ascending (stable, NaN last) and each pair's
/// rank in the sort.
struct batch_sort {
  const double* sorted_a = nullptr;
  const double* sorted_b = nullptr;
  const std::int64_t* rank_a = nullptr;
  const std::int64_t* rank_b = nullptr;
};

struct pair_batch_in {
  std::int64_t num_pairs = 0;
  const double* pi_c = nullptr;  // policy sequence log-probs (LD-DPO weighted when enabled)
  const double* pi_r = nullptr;
  const double* rho_c = nullptr;  // reference sequence log-probs; null means 0
  const double* rho_r = nullptr;
  const double* len_c = nullptr;  // completion-token counts, not clamped
  const double* len_r = nullptr;
  const double* weights = nullptr;  // WPO weight W_i of each pair; null means 1
  double nll = 0.0;                 // NLL(chosen): mean token cross-entropy, chosen tokens
  double mean_weight = 1.0;         // mean_i W_i
  // For aot (sorts[0]) and aot_unpaired (sorts[1]): each term's own keys sorted. Null
  // pointers where the configuration has no term of that type.
  batch_sort sorts[2];
};

DPO_HOST_DEVICE inline double clamp_len(double n) { return n < 1.0 ? 1.0 : n; }

/// WPO weight W_i of a pair from its sequences' sums of WPO token terms and token counts:
/// exp of the two sides' mean terms.
DPO_HOST_DEVICE inline double wpo_weight(double wpo_c, double tokens_c, double wpo_r,
                                         double tokens_r) {
  using std::exp;
  return exp(wpo_c / clamp_len(tokens_c) + wpo_r / clamp_len(tokens_r));
}

/// The pair stage's input of a batch of P pairs: per-pair arrays (rho null for no reference,
/// weights null for W = 1) and the batch scalars from the token totals (the NLL) and the sum
/// of the weights (P where weights is null). The sorts are the pair stage's to fill.
DPO_HOST_DEVICE inline pair_batch_in make_pair_batch(std::int64_t P, const double* pi_c,
                                                     const double* pi_r, const double* rho_c,
                                                     const double* rho_r, const double* len_c,
                                                     const double* len_r, const double* weights,
                                                     const token_totals& tokens,
                                                     double weight_sum) {
  return {P, pi_c, pi_r, rho_c, rho_r, len_c, len_r, weights, batch_nll(tokens),
          weight_sum / static_cast<double>(P), {}};
}

DPO_HOST_DEVICE inline pair_values pair_at(const pair_batch_in& in, std::int64_t i) {
  pair_values v;
  v.pi_c = in.pi_c[i];
  v.pi_r = in.pi_r[i];
  v.rho_c = in.rho_c ? in.rho_c[i] : 0.0;
  v.rho_r = in.rho_r ? in.rho_r[i] : 0.0;
  v.len_c = clamp_len(in.len_c[i]);
  v.len_r = clamp_len(in.len_r[i]);
  return v;
}

/// a_i and b_i that aot (paired log-ratio differences) or aot_unpaired (log-ratios) sort.
DPO_HOST_DEVICE inline void aot_keys(const loss_config& c, const pair_values& v, loss_type t,
                                     double* a, double* b) {
  const bool unpaired = t == loss_type::aot_unpaired;
  const double rc = c.reference_free ? 0.0 : v.rho_c;
  const double rr = c.reference_free ? 0.0 : v.rho_r;
  if (unpaired) {
    *a = v.pi_c - rc;
    *b = v.pi_r - rr;
  } else {
    *a = v.pi_c - v.pi_r;
    *b = rc - rr;
  }
}

/// Index into pair_batch_in::sorts of a batch type: 0 for aot, 1 for aot_unpaired.
DPO_HOST_DEVICE inline int batch_sort_index(loss_type t) {
  return t == loss_type::aot_unpaired ? 1 : 0;
}

/// Whether the configuration has a term of batch type t (each such type sorts its own keys,
/// whatever the order of the terms).
DPO_HOST_DEVICE inline bool has_term(const loss_config& c, loss_type t) {
  for (int k = 0; k < c.num_terms; ++k)
    if (c.terms[k].type == t) return true;
  return false;
}

/// Sum over terms of w_k * nll_multiplier_k: the weight of NLL(chosen) in every pair's loss.
DPO_HOST_DEVICE inline double nll_weight(const loss_config& c) {
  double w = 0.0;
  for (int k = 0; k < c.num_terms; ++k) w += c.terms[k].weight * nll_multiplier(c.terms[k].type, c);
  return w;
}

struct pair_contribution {
  double loss;  // sum_k w_k * loss_k,i * W_i (the batch loss is the mean of these)
  double g_c;   // dL/dpi_c,i of the batch loss L (1/P included)
  double g_r;   // dL/dpi_r,i
};

/// Pair i's share of the batch loss and gradient. For batch types the loss at sorted
/// position i is reported as pair i's, as TRL does.
DPO_HOST_DEVICE inline pair_contribution contribution(const loss_config& c,
                                                      const pair_batch_in& in, std::int64_t i) {
  const pair_values v = pair_at(in, i);
  const double inv_p = 1.0 / static_cast<double>(in.num_pairs);
  const double W = in.weights ? in.weights[i] : 1.0;
  pair_contribution out{0.0, 0.0, 0.0};
  for (int k = 0; k < c.num_terms; ++k) {
    const loss_type t = c.terms[k].type;
    const double w = c.terms[k].weight;
    // Only NLL terms read the batch NLL, so a NaN in another pair's chosen rows (which
    // makes in.nll NaN) stays out of the per-pair losses: 0 * NaN would be NaN.
    const double m = nll_multiplier(t, c);
    // A WPO weight of 0 (a -inf token log-prob) zeroes the pair's share even of an infinite
    // NLL: W falls exponentially where the NLL grows linearly.
    if (m != 0.0) out.loss += times(w * m, times(W, in.nll));
    if (is_batch_type(t)) {
      const batch_sort& so = in.sorts[batch_sort_index(t)];
      const scalar_grad here = batch_term(c, so.sorted_a[i] - so.sorted_b[i]);
      out.loss += times(w, times(W, here.value));
      // Pair i's a and b sit at their own ranks; the weight is that of the sorted position.
      const std::int64_t ka = so.rank_a[i];
      const double Wa = in.weights ? in.weights[ka] : 1.0;
      const double ga = w * Wa * batch_term(c, so.sorted_a[ka] - so.sorted_b[ka]).d * inv_p;
      if (t == loss_type::aot) {
        out.g_c += ga;
        out.g_r -= ga;
      } else {
        const std::int64_t kb = so.rank_b[i];
        const double Wb = in.weights ? in.weights[kb] : 1.0;
        const double gb = w * Wb * batch_term(c, so.sorted_a[kb] - so.sorted_b[kb]).d * inv_p;
        out.g_c += ga;
        out.g_r -= gb;
      }
      continue;
    }
    const pair_grad g = pair_loss(t, c, v);
    out.loss += times(w, times(W, g.loss));
    out.g_c += times(w, times(W, g.d_c)) * inv_p;
    out.g_r += times(w, times(W, g.d_r)) * inv_p;
  }
  return out;
}

/// dL/d(sum of plain chosen token log-probs) for every chosen sequence: the NLL terms'
/// share, -nll_weight * mean(W) / max(total chosen tokens, 1); exactly 0 without an NLL term,
/// so a NaN WPO weight (NaN logits in one pair) does not reach the other pairs' rows through
/// 0 * NaN.
DPO_HOST_DEVICE inline double nll_token_grad(const loss_config& c, double mean_weight,
                                             double total_chosen_tokens) {
  const double w = nll_weight(c);
  return w == 0.0 ? 0.0 : -w * mean_weight / clamp_len(total_chosen_tokens);
}

}  // namespace detail
}  // namespace dpo
