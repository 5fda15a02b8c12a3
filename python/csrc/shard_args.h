// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The argument checks the CPU and CUDA kernels of the sharded logits ops share (shard.cpp,
// cuda_shard.cu): each raises ValueError / TypeError naming the argument, on either device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common.h"
#include "dpo/core/shard.hpp"
#include "dpo/core/validate.hpp"

namespace dpo_kernels {

/// The shard of a layout: columns [start, start + V_local) of a global vocabulary.
inline dpo::vocab_shard shard_of(const row_layout& l, std::int64_t vocab_start, std::int64_t vocab_size) {
  return {vocab_size, vocab_start, vocab_start + l.vocab};
}

/// A per-view-row double tensor argument ([view_rows] or [view_rows, shard_fields]) on the
/// logits' device, contiguous.
inline at::Tensor rows_arg(const at::Tensor& t, const row_layout& l, std::int64_t width, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == l.view_rows() * width, name, " has ", t.numel(), " entries, expected ",
                    l.view_rows() * width, ": pass the tensor shard_partials returned for these logits");
  TORCH_CHECK_VALUE(t.device() == l.logits.device(), name, " is on ", t.device(), " but logits is on ",
                    l.logits.device());
  return t.contiguous();
}

/// The combined (row_max, records) arguments of phase 2 and the backward, checked.
struct record_args {
  at::Tensor row_max, records;
  record_args(const at::Tensor& m, const at::Tensor& r, const row_layout& l)
      : row_max(rows_arg(m, l, 1, "row_max")), records(rows_arg(r, l, dpo::shard_fields, "records")) {}
  const double* max() const { return row_max.data_ptr<double>(); }
  const double* rec() const { return records.data_ptr<double>(); }
};

/// shard_rebase's arguments: float64 row_max [R] and records [R, shard_fields] on one device.
inline void check_rebase_args(const at::Tensor& row_max, const at::Tensor& records) {
  TORCH_CHECK_VALUE(records.dim() == 2 && records.size(1) == dpo::shard_fields && row_max.dim() == 1 &&
                        row_max.size(0) == records.size(0) && row_max.scalar_type() == at::kDouble &&
                        records.scalar_type() == at::kDouble,
                    "shard_rebase takes float64 row_max [R] and records [R, ", dpo::shard_fields, "], got ",
                    row_max.sizes(), " and ", records.sizes());
  TORCH_CHECK_VALUE(row_max.device() == records.device(), "row_max is on ", row_max.device(), " but records is on ",
                    records.device());
}

/// shard_pair_stage's arguments: seq_totals [seq_fields, 2P] and the reference log-probs cfg
/// needs ([P] each, on seq_totals' device). Returns P.
inline std::int64_t check_stage_args(const at::Tensor& seq_totals, const std::optional<at::Tensor>& ref_chosen,
                                     const std::optional<at::Tensor>& ref_rejected, const dpo::loss_config& cfg) {
  TORCH_CHECK_VALUE(seq_totals.dim() == 2 && seq_totals.size(0) == dpo::seq_fields && seq_totals.size(1) % 2 == 0 &&
                        seq_totals.size(1) >= 2,
                    "seq_totals must have shape [", dpo::seq_fields, ", 2P], got ", seq_totals.sizes());
  check_references(cfg, ref_chosen.has_value(), ref_rejected.has_value());
  const std::int64_t P = seq_totals.size(1) / 2;
  if (ref_chosen.has_value()) check_pair_vector(*ref_chosen, P, seq_totals.device(), "reference_chosen_logps");
  if (ref_rejected.has_value()) check_pair_vector(*ref_rejected, P, seq_totals.device(), "reference_rejected_logps");
  return P;
}

/// shard_backward's per-sequence inputs: seq_grad [num_seqs] and nll_token_grad (one value),
/// on the logits' device.
inline void check_backward_args(const at::Tensor& seq_grad, const at::Tensor& nll_token_grad, const row_layout& l) {
  check_seq_grad_shapes(seq_grad, nll_token_grad, l.num_seqs);
  for (const at::Tensor* t : {&seq_grad, &nll_token_grad})
    TORCH_CHECK_VALUE(t->device() == l.logits.device(), t == &seq_grad ? "seq_grad" : "nll_token_grad", " is on ",
                      t->device(), " but logits is on ", l.logits.device());
}

}  // namespace dpo_kernels
