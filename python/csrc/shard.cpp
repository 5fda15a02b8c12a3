// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The sharded (vocabulary- / context-parallel) building blocks as dpo_kernels operators: thin
// adapters from tensors to dpo/cpu/shard.hpp. The collectives between them are
// torch.distributed all-reduces issued from Python (dpo_kernels/distributed.py), so no
// communication happens here. Records and maxima are indexed by the view's rows
// (row_layout::view_rows()), as the library's row_lse; they are opaque to Python except as
// the buffers of the all-reduces. These are the CPU kernels; the CUDA ones are in
// cuda_shard.cu.
#include <torch/extension.h>
#include <torch/library.h>

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "forward_outputs.h"
#include "shard_args.h"
#include "dpo/cpu/shard.hpp"

namespace dpo_kernels {
namespace {

/// The dpo::cpu element types of bfloat16 and float16 tensors (dispatch_views).
struct shard_types {
  using bf16 = Eigen::bfloat16;
  using f16 = Eigen::half;
};

dpo::cpu::options cpu_options(bool metrics) {
  dpo::cpu::options o;
  o.num_threads = at::get_num_threads();
  o.metrics = metrics;
  return o;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " is on ", t.device(),
                    ": the CPU kernel of a sharded op takes CPU tensors");
}

/// make_layout plus the bounds of packed rows: cu_seqlens[0] >= 0 and cu_seqlens[S] <= N (the
/// library checks the rest, but cannot know the buffer's row count).
row_layout lower(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
                 std::int64_t ignore_index) {
  check_cpu(logits, "logits");
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  if (l.packed) {
    const std::int64_t* cu = l.cu_seqlens.data_ptr<std::int64_t>();
    TORCH_CHECK_VALUE(cu[0] >= 0, "cu_seqlens[0] = ", cu[0], " is invalid: must be >= 0");
    TORCH_CHECK_VALUE(cu[l.num_seqs] <= l.rows, "cu_seqlens[", l.num_seqs, "] = ", cu[l.num_seqs], " is past the ",
                      l.rows, " rows of logits");
  }
  return l;
}

/// Calls fn(layout_views<T, L>) for the logits' and labels' dtypes, turning dpo::error into
/// ValueError.
template <class Fn>
void with_views(const row_layout& l, std::int64_t ignore_index, Fn&& fn) {
  dispatch_views<shard_types>(l, ignore_index, [&](auto v) { rethrow_as_value_error([&] { fn(v); }); });
}

std::tuple<at::Tensor, at::Tensor> shard_partials_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                      const std::optional<at::Tensor>& cu_seqlens,
                                                      std::int64_t ignore_index, std::int64_t vocab_start,
                                                      std::int64_t vocab_size, bool metrics) {
  const row_layout l = lower(logits, labels, cu_seqlens, ignore_index);
  const auto dopts = at::TensorOptions().dtype(at::kDouble);
  // Rows the library does not write (outside every packed sequence) keep the empty record.
  at::Tensor row_max = at::full({l.view_rows()}, -INFINITY, dopts);
  at::Tensor records = at::zeros({l.view_rows(), dpo::shard_fields}, dopts);
  records.select(1, static_cast<int>(dpo::shard_field::shard_max)).fill_(-INFINITY);
  with_views(l, ignore_index, [&](auto v) {
    dpo::cpu::shard_partials(v.tokens(), shard_of(l, vocab_start, vocab_size),
                             records.data_ptr<double>(), row_max.data_ptr<double>(), cpu_options(metrics));
  });
  return {row_max, records};
}

at::Tensor shard_rebase_cpu(const at::Tensor& row_max, const at::Tensor& records) {
  check_cpu(records, "records");
  check_rebase_args(row_max, records);
  at::Tensor out = records.contiguous().clone();
  const at::Tensor m = row_max.contiguous();
  dpo::cpu::shard_rebase(0, out.size(0), m.data_ptr<double>(), out.data_ptr<double>());
  return out;
}

at::Tensor shard_sequence_partials_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                       const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_max,
                                       const at::Tensor& records, std::int64_t ignore_index,
                                       std::int64_t vocab_start, std::int64_t vocab_size, double ld_alpha,
                                       bool paired, bool metrics) {
  const row_layout l = lower(logits, labels, cu_seqlens, ignore_index);
  const record_args ra(row_max, records, l);
  if (paired) concatenated_pairs(l);
  at::Tensor seq = at::zeros({dpo::seq_fields, l.num_seqs}, at::kDouble);
  if (l.num_seqs == 0) return seq;
  with_views(l, ignore_index, [&](auto v) {
    const dpo::vocab_shard sh = shard_of(l, vocab_start, vocab_size);
    const double *pm = ra.max(), *pr = ra.rec();
    if (paired) {
      dpo::cpu::shard_pair_partials(v.pairs(), sh, pm, pr, pm, pr, ld_alpha,
                                    seq.data_ptr<double>(), cpu_options(metrics));
    } else {
      dpo::cpu::shard_sequence_partials(v.tokens(), sh, pm, pr, seq.data_ptr<double>(),
                                        cpu_options(metrics));
    }
  });
  return seq;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_pair_stage_cpu(
    const at::Tensor& seq_totals, const std::optional<at::Tensor>& reference_chosen_logps,
    const std::optional<at::Tensor>& reference_rejected_logps, DPO_CONFIG_PARAMS, bool metrics) {
  check_cpu(seq_totals, "seq_totals");
  const dpo::loss_config cfg = make_config(DPO_CONFIG_ARGS);
  const std::int64_t P = check_stage_args(seq_totals, reference_chosen_logps, reference_rejected_logps, cfg);
  const auto dbl = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(at::kDouble).contiguous() : at::Tensor();
  };
  const at::Tensor rc = dbl(reference_chosen_logps), rr = dbl(reference_rejected_logps);
  const at::Tensor totals = seq_totals.to(at::kDouble).contiguous();
  // The pair outputs of dpo_forward (no row state: view_rows() = 0).
  row_layout none;
  forward_tensors t(none, P, at::TensorOptions().dtype(at::kDouble));
  t.out.row_lse = t.out.row_coef = nullptr;
  at::Tensor seq_grad = at::empty({2 * P}, at::kDouble);
  at::Tensor nll = at::zeros({}, at::kDouble);
  t.out.nll_token_grad = nll.data_ptr<double>();
  rethrow_as_value_error([&] {
    dpo::cpu::shard_pair_stage(P, totals.data_ptr<double>(), rc.defined() ? rc.data_ptr<double>() : nullptr,
                               rr.defined() ? rr.data_ptr<double>() : nullptr, cfg, metrics, t.out,
                               seq_grad.data_ptr<double>());
  });
  return {t.loss, t.metrics, t.pairs, seq_grad, nll};
}

at::Tensor shard_backward_cpu(const at::Tensor& seq_grad, const at::Tensor& nll_token_grad, const at::Tensor& logits,
                              const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
                              const at::Tensor& row_max, const at::Tensor& records, std::int64_t ignore_index,
                              std::int64_t vocab_start, std::int64_t vocab_size, double ld_alpha, bool paired) {
  const row_layout l = lower(logits, labels, cu_seqlens, ignore_index);
  const record_args ra(row_max, records, l);
  check_backward_args(seq_grad, nll_token_grad, l);
  const at::Tensor g = seq_grad.to(at::kDouble).contiguous();
  const double nll = nll_token_grad.to(at::kDouble).item<double>();
  // Zeros: rows outside every sequence (packed) are not written by the library.
  at::Tensor grad = at::zeros({l.view_rows(), l.vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_seqs == 0) return grad_as_logits(grad, l, logits);
  if (paired) concatenated_pairs(l);
  with_views(l, ignore_index, [&](auto v) {
    using T = typename decltype(v)::value_type;
    const dpo::vocab_shard sh = shard_of(l, vocab_start, vocab_size);
    const double *pm = ra.max(), *pr = ra.rec();
    T* out = v.elements(grad.data_ptr());
    if (paired) {
      dpo::cpu::shard_backward(v.pairs(), sh, pm, pr, pm, pr, g.data_ptr<double>(), nll,
                               ld_alpha, dpo::pair_grad_view<T>{out, l.vocab, out, l.vocab}, 1.0,
                               cpu_options(true));
    } else {
      dpo::cpu::shard_sequence_backward(v.tokens(), sh, pm, pr, g.data_ptr<double>(), out,
                                        l.vocab, cpu_options(true));
    }
  });
  return grad_as_logits(grad, l, logits);
}

}  // namespace

/// The record and sequence field names (DPO_SHARD_FIELDS, DPO_SEQ_FIELDS) on dpo_kernels._C.
void add_shard_names(pybind11::module& m) {
  std::vector<std::string> rec, seq;
#define DPO_NAME_(field, doc) rec.push_back(#field);
  DPO_SHARD_FIELDS(DPO_NAME_)
#undef DPO_NAME_
#define DPO_NAME_(field, doc) seq.push_back(#field);
  DPO_SEQ_FIELDS(DPO_NAME_)
#undef DPO_NAME_
  m.attr("shard_fields") = pybind11::tuple(pybind11::cast(rec));
  m.attr("seq_fields") = pybind11::tuple(pybind11::cast(seq));
}

}  // namespace dpo_kernels

TORCH_LIBRARY_FRAGMENT(dpo_kernels, m) {
  // PT2-compliant: fake kernels in _shard_ops.py, checked by torch.library.opcheck.
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "shard_partials(Tensor logits, Tensor labels, Tensor? cu_seqlens, int ignore_index, int vocab_start, "
      "int vocab_size, bool metrics) -> (Tensor row_max, Tensor records)",
      tags);
  m.def("shard_rebase(Tensor row_max, Tensor records) -> Tensor", tags);
  m.def(
      "shard_sequence_partials(Tensor logits, Tensor labels, Tensor? cu_seqlens, Tensor row_max, Tensor records, "
      "int ignore_index, int vocab_start, int vocab_size, float ld_alpha, bool paired, bool metrics) -> Tensor",
      tags);
  m.def("shard_pair_stage(Tensor seq_totals, Tensor? reference_chosen_logps, "
        "Tensor? reference_rejected_logps" DPO_CONFIG_SCHEMA
        ", bool metrics) -> (Tensor loss, Tensor metrics, Tensor pair_values, Tensor seq_grad, "
        "Tensor nll_token_grad)",
        tags);
  m.def(
      "shard_backward(Tensor seq_grad, Tensor nll_token_grad, Tensor logits, Tensor labels, Tensor? cu_seqlens, "
      "Tensor row_max, Tensor records, int ignore_index, int vocab_start, int vocab_size, float ld_alpha, "
      "bool paired) -> Tensor",
      tags);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("shard_partials", &dpo_kernels::shard_partials_cpu);
  m.impl("shard_rebase", &dpo_kernels::shard_rebase_cpu);
  m.impl("shard_sequence_partials", &dpo_kernels::shard_sequence_partials_cpu);
  m.impl("shard_pair_stage", &dpo_kernels::shard_pair_stage_cpu);
  m.impl("shard_backward", &dpo_kernels::shard_backward_cpu);
}

// The CUDA kernels are in cuda_shard.cu (built with the extension's CUDA sources).
