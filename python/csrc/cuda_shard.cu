// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of the sharded (vocabulary- / context-parallel) logits ops of shard.cpp: thin
// adapters from tensors to kernels/dpo/cuda/shard.cuh. Same contract as the CPU kernels
// (records and maxima indexed by the view's rows, field-major sequence sums), and as the
// other CUDA ops (cuda.cu): work on the current stream, workspaces from the caching
// allocator, argument errors raise ValueError before anything runs, and nothing reads
// device data on the host, so a sharded step is never a host synchronization. The pair
// stage runs on the device (dpo::cuda::shard_pair_stage: dpo_forward's pair kernel on the
// totals), whatever produced the totals (these ops or the fused head's).
//
// Device-data errors have no error word here: a completion label outside [0, V) makes its
// row's record NaN, and a bad packed cu_seqlens (negative, decreasing, past the rows) makes
// every record and sequence sum NaN (the kernels read a clamped copy, so nothing is read out
// of bounds); the loss and metrics are then NaN, as for the unsharded CUDA ops.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "common.h"
#include "cuda_common.cuh"
#include "forward_outputs.h"
#include "shard_args.h"
#include "dpo/cuda/shard.cuh"

namespace dpo_kernels {
namespace {

/// A CUDA layout: make_layout, and for packed sequences a copy of cu_seqlens clamped to
/// [0, rows] and made non-decreasing (what the kernels read) with `bad`, a 0-dim device bool
/// that says the given one was invalid (computed on the device: no host read).
struct cuda_layout {
  row_layout l;
  at::Tensor bad;

  cuda_layout(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
              std::int64_t ignore_index) {
    check_cuda(logits, "logits");
    l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
    if (!l.packed) return;
    const at::Tensor cu = l.cu_seqlens;
    bad = cu.narrow(0, 0, 1).lt(0).logical_or_(cu.narrow(0, l.num_seqs, 1).gt(l.rows)).squeeze(0);
    if (l.num_seqs > 0) bad.logical_or_(cu.narrow(0, 1, l.num_seqs).lt(cu.narrow(0, 0, l.num_seqs)).any());
    l.cu_seqlens = std::get<0>(cu.clamp(0, l.rows).cummax(0)).contiguous();
  }

  /// NaN in `t` when cu_seqlens was invalid (a device-side masked fill).
  void poison(at::Tensor& t) const {
    if (bad.defined()) t.masked_fill_(bad, std::numeric_limits<double>::quiet_NaN());
  }

  dpo::cuda::options options(bool metrics) const {
    dpo::cuda::options o;
    o.metrics = metrics;
    o.num_rows = l.packed ? l.rows : -1;
    return o;
  }
};

std::tuple<at::Tensor, at::Tensor> shard_partials_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                       const std::optional<at::Tensor>& cu_seqlens,
                                                       std::int64_t ignore_index, std::int64_t vocab_start,
                                                       std::int64_t vocab_size, bool metrics) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const cuda_layout c(logits, labels, cu_seqlens, ignore_index);
  const auto dopts = logits.options().dtype(at::kDouble);
  // Rows the kernels do not write (outside every packed sequence) keep the empty record.
  at::Tensor row_max = at::full({c.l.view_rows()}, -INFINITY, dopts);
  at::Tensor records = at::zeros({c.l.view_rows(), dpo::shard_fields}, dopts);
  records.select(1, static_cast<int>(dpo::shard_field::shard_max)).fill_(-INFINITY);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(c.l, ignore_index, [&](auto v) {
    check_status(dpo::cuda::shard_partials(v.tokens(), shard_of(c.l, vocab_start, vocab_size),
                                           records.data_ptr<double>(), row_max.data_ptr<double>(),
                                           c.options(metrics), stream));
  });
  c.poison(records);
  return {row_max, records};
}

at::Tensor shard_sequence_partials_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                        const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_max,
                                        const at::Tensor& records, std::int64_t ignore_index,
                                        std::int64_t vocab_start, std::int64_t vocab_size, double ld_alpha,
                                        bool paired, bool metrics) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const cuda_layout c(logits, labels, cu_seqlens, ignore_index);
  const record_args ra(row_max, records, c.l);
  if (paired) concatenated_pairs(c.l);
  at::Tensor seq = at::zeros({dpo::seq_fields, c.l.num_seqs}, logits.options().dtype(at::kDouble));
  if (c.l.num_seqs == 0) return seq;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(c.l, ignore_index, [&](auto v) {
    const dpo::vocab_shard sh = shard_of(c.l, vocab_start, vocab_size);
    double* out = seq.data_ptr<double>();
    const dpo::cuda::options opt = c.options(metrics);
    check_status(paired ? dpo::cuda::shard_pair_partials(v.pairs(), sh, ra.max(), ra.rec(), ra.max(), ra.rec(),
                                                         ld_alpha, out, opt, stream)
                        : dpo::cuda::shard_sequence_partials(v.tokens(), sh, ra.max(), ra.rec(), out, opt, stream));
  });
  c.poison(seq);
  return seq;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_pair_stage_cuda(
    const at::Tensor& seq_totals, const std::optional<at::Tensor>& reference_chosen_logps,
    const std::optional<at::Tensor>& reference_rejected_logps, DPO_CONFIG_PARAMS, bool metrics) {
  check_cuda(seq_totals, "seq_totals");
  const at::Device device = seq_totals.device();
  const c10::cuda::CUDAGuard guard(device);
  const dpo::loss_config cfg = make_config(DPO_CONFIG_ARGS);
  const std::int64_t P = check_stage_args(seq_totals, reference_chosen_logps, reference_rejected_logps, cfg);
  at::Tensor rc, rr;
  const double* prc = doubles_or_null(reference_chosen_logps, rc, device);
  const double* prr = doubles_or_null(reference_rejected_logps, rr, device);
  const at::Tensor totals = seq_totals.to(at::kDouble).contiguous();
  const auto dopts = seq_totals.options().dtype(at::kDouble);
  // The pair outputs of dpo_forward (no row state).
  pair_result_tensors t(P, dopts);
  at::Tensor seq_grad = at::empty({2 * P}, dopts);
  at::Tensor nll = at::zeros({}, dopts);
  t.out.nll_token_grad = nll.data_ptr<double>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  run_with_workspace(device, [&](void* ws, std::size_t& bytes) {
    return dpo::cuda::shard_pair_stage(ws, bytes, P, totals.data_ptr<double>(), prc, prr, cfg, metrics, t.out,
                                       seq_grad.data_ptr<double>(), stream);
  });
  return {t.loss, t.metrics, t.pairs, seq_grad, nll};
}

at::Tensor shard_backward_cuda(const at::Tensor& seq_grad, const at::Tensor& nll_token_grad, const at::Tensor& logits,
                               const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
                               const at::Tensor& row_max, const at::Tensor& records, std::int64_t ignore_index,
                               std::int64_t vocab_start, std::int64_t vocab_size, double ld_alpha, bool paired) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const cuda_layout c(logits, labels, cu_seqlens, ignore_index);
  const row_layout& l = c.l;
  const record_args ra(row_max, records, l);
  check_backward_args(seq_grad, nll_token_grad, l);
  const at::Tensor g = seq_grad.to(at::kDouble).contiguous();
  // Read on the device (no .item(): no host sync).
  const at::Tensor nll = nll_token_grad.to(at::kDouble).reshape({1}).contiguous();
  // Zeros: rows outside every sequence (packed) are not written by the kernels.
  at::Tensor grad = at::zeros({l.view_rows(), l.vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_seqs == 0) return grad_as_logits(grad, l, logits);
  if (paired) concatenated_pairs(l);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(l, ignore_index, [&](auto v) {
    using T = typename decltype(v)::value_type;
    const dpo::vocab_shard sh = shard_of(l, vocab_start, vocab_size);
    const double *pm = ra.max(), *pr = ra.rec();
    T* out = v.elements(grad.data_ptr());
    const dpo::cuda::options opt = c.options(true);
    if (paired) {
      run_with_workspace(logits.device(), [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::shard_backward(ws, bytes, v.pairs(), sh, pm, pr, pm, pr, g.data_ptr<double>(),
                                         nll.data_ptr<double>(), ld_alpha,
                                         dpo::pair_grad_view<T>{out, l.vocab, out, l.vocab}, nullptr, opt, stream);
      });
    } else {
      check_status(dpo::cuda::shard_backward_sequences(v.tokens(), sh, pm, pr, g.data_ptr<double>(), 0.0, 0, 1.0,
                                                       out, l.vocab, opt, stream));
    }
  });
  return grad_as_logits(grad, l, logits);
}

at::Tensor shard_rebase_cuda(const at::Tensor& row_max, const at::Tensor& records) {
  check_cuda(records, "records");
  const c10::cuda::CUDAGuard guard(records.device());
  check_rebase_args(row_max, records);
  const at::Tensor m = row_max.contiguous(), out = records.contiguous().clone();
  check_status(dpo::cuda::shard_rebase(0, out.size(0), m.data_ptr<double>(), out.data_ptr<double>(),
                                       at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace dpo_kernels

// The schemas are shard.cpp's (with the CPU kernels).
#define DPO_SHARD_CUDA_IMPL(op) m.impl(#op, &dpo_kernels::op##_cuda);
TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  DPO_SHARD_CUDA_IMPL(shard_partials) DPO_SHARD_CUDA_IMPL(shard_rebase) DPO_SHARD_CUDA_IMPL(shard_sequence_partials)
  DPO_SHARD_CUDA_IMPL(shard_pair_stage) DPO_SHARD_CUDA_IMPL(shard_backward)
}
#undef DPO_SHARD_CUDA_IMPL
