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
// Device data (labels against the GLOBAL vocabulary, a packed cu_seqlens) is checked on the
// device before each call's kernels by dpo::cuda::shard_check, whose error word then gates
// them (options::error_word): a completion label outside [0, V) or a bad cu_seqlens makes the
// records and sequence sums NaN and the gradient zeros, and nothing reads past a bad
// cu_seqlens; the loss and metrics are then NaN, as for the unsharded CUDA ops.
// DPO_KERNELS_CHECK_DEVICE_ERRORS=1 reads the word after the check (a synchronization) and
// raises the ValueError that names the value instead.
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

/// A CUDA layout (make_layout) and the device-data check of a call's view.
struct cuda_layout {
  row_layout l;
  at::Tensor ws;  // the check's workspace, byte 0 the error word (undefined before checked())

  cuda_layout(const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,
              std::int64_t ignore_index) {
    check_cuda(logits, "logits");
    l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  }

  /// The options of a call on `view` (the view its kernels read): dpo::cuda::shard_check of
  /// the view on the current stream, its error word as the gate. With
  /// DPO_KERNELS_CHECK_DEVICE_ERRORS set the word is read back here and an error raised.
  template <class View>
  dpo::cuda::options checked(const View& view, const dpo::vocab_shard& sh, bool metrics, cudaStream_t stream) {
    dpo::cuda::options o;
    o.metrics = metrics;
    o.num_rows = l.packed ? l.rows : -1;
    ws = run_with_workspace(l.logits.device(), [&](void* p, std::size_t& bytes) {
      return dpo::cuda::shard_check(p, bytes, view, sh, o, stream);
    });
    o.error_word = dpo::cuda::shard_error_word(ws.data_ptr());
    return o;
  }

  /// NaN in `t` when the check found an error (a device-side masked fill: no host read).
  void poison(at::Tensor& t) const {
    if (!ws.defined()) return;
    const at::Tensor code = ws.narrow(0, 0, sizeof(std::int32_t)).view(at::kInt).squeeze(0);
    t.masked_fill_(code.ne(0), std::numeric_limits<double>::quiet_NaN());
  }
};

std::tuple<at::Tensor, at::Tensor> shard_partials_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                       const std::optional<at::Tensor>& cu_seqlens,
                                                       std::int64_t ignore_index, std::int64_t vocab_start,
                                                       std::int64_t vocab_size, bool metrics) {
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda_layout c(logits, labels, cu_seqlens, ignore_index);
  const auto dopts = logits.options().dtype(at::kDouble);
  // Rows the kernels do not write (outside every packed sequence) keep the empty record.
  at::Tensor row_max = at::full({c.l.view_rows()}, -INFINITY, dopts);
  at::Tensor records = at::zeros({c.l.view_rows(), dpo::shard_fields}, dopts);
  records.select(1, static_cast<int>(dpo::shard_field::shard_max)).fill_(-INFINITY);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(c.l, ignore_index, [&](auto v) {
    const dpo::vocab_shard sh = shard_of(c.l, vocab_start, vocab_size);
    check_status(dpo::cuda::shard_partials(v.tokens(), sh, records.data_ptr<double>(), row_max.data_ptr<double>(),
                                           c.checked(v.tokens(), sh, metrics, stream), stream));
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
  cuda_layout c(logits, labels, cu_seqlens, ignore_index);
  const record_args ra(row_max, records, c.l);
  if (paired) concatenated_pairs(c.l);
  at::Tensor seq = at::zeros({dpo::seq_fields, c.l.num_seqs}, logits.options().dtype(at::kDouble));
  if (c.l.num_seqs == 0) return seq;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(c.l, ignore_index, [&](auto v) {
    const dpo::vocab_shard sh = shard_of(c.l, vocab_start, vocab_size);
    double* out = seq.data_ptr<double>();
    // The gated kernel writes NaN sums when the check found an error.
    check_status(paired ? dpo::cuda::shard_pair_partials(v.pairs(), sh, ra.max(), ra.rec(), ra.max(), ra.rec(),
                                                         ld_alpha, out, c.checked(v.pairs(), sh, metrics, stream),
                                                         stream)
                        : dpo::cuda::shard_sequence_partials(v.tokens(), sh, ra.max(), ra.rec(), out,
                                                             c.checked(v.tokens(), sh, metrics, stream), stream));
  });
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
  cuda_layout c(logits, labels, cu_seqlens, ignore_index);
  const row_layout& l = c.l;
  const record_args ra(row_max, records, l);
  check_backward_args(seq_grad, nll_token_grad, l);
  const at::Tensor g = seq_grad.to(at::kDouble).contiguous();
  // Read on the device (no .item(): no host sync).
  const at::Tensor nll = nll_token_grad.to(at::kDouble).reshape({1}).contiguous();
  // Zeros: rows outside every sequence (packed) are not written by the kernels, nor any row
  // when the check finds an error.
  at::Tensor grad = at::zeros({l.view_rows(), l.vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_seqs == 0) return grad_as_logits(grad, l, logits);
  if (paired) concatenated_pairs(l);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(l, ignore_index, [&](auto v) {
    using T = typename decltype(v)::value_type;
    const dpo::vocab_shard sh = shard_of(l, vocab_start, vocab_size);
    const double *pm = ra.max(), *pr = ra.rec();
    T* out = v.elements(grad.data_ptr());
    if (paired) {
      const dpo::cuda::options opt = c.checked(v.pairs(), sh, true, stream);
      run_with_workspace(logits.device(), [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::shard_backward(ws, bytes, v.pairs(), sh, pm, pr, pm, pr, g.data_ptr<double>(),
                                         nll.data_ptr<double>(), ld_alpha,
                                         dpo::pair_grad_view<T>{out, l.vocab, out, l.vocab}, nullptr, opt, stream);
      });
    } else {
      const dpo::cuda::options opt = c.checked(v.tokens(), sh, true, stream);
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
