// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of the dpo_kernels operators on logits: thin adapters from tensors to the
// dpo::cuda API (kernels/dpo/cuda/dpo.cuh); the fused LM head's are in cuda_linear.cu. Each
// op enqueues work on the current stream with a workspace from the caching allocator and
// never synchronizes, so the ops can be captured in CUDA graphs. Argument errors (shapes,
// dtypes, config) raise ValueError before anything runs. Errors in device data (a label
// outside [0, vocab) that is not ignore_index, a bad cu_seqlens) are found by the kernels and
// recorded in the workspace's error word; the kernels then write nothing, so the forward ops
// return NaN loss / metrics / pair values / log-probs and zero row state (gradients are then
// meaningless). They are NOT raised synchronously: set DPO_KERNELS_CHECK_DEVICE_ERRORS=1 to
// copy the error word back after every call (a host sync) and raise ValueError.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstddef>
#include <limits>
#include <vector>

#include "common.h"
#include "cuda_common.cuh"
#include "forward_outputs.h"
#include "dpo/cuda/dpo.cuh"

namespace dpo_kernels {
namespace {

dpo::cuda::options cuda_options(const row_layout& l, bool metrics = true) {
  dpo::cuda::options o;
  o.metrics = metrics;
  o.num_rows = l.packed ? l.rows : -1;
  return o;
}

at::Tensor to_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

/// Packed layouts: whether each of the N rows lies in a sequence ([cu[0], cu[S])), on the
/// device (no host read of cu_seqlens).
at::Tensor rows_inside(const row_layout& l) {
  const at::Tensor r = at::arange(l.rows, l.cu_seqlens.options());
  return r.ge(l.cu_seqlens.narrow(0, 0, 1)).logical_and_(r.lt(l.cu_seqlens.narrow(0, l.num_seqs, 1)));
}

// ---- sequence_logps ----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sequence_logps_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                       const std::optional<at::Tensor>& cu_seqlens,
                                                       std::int64_t ignore_index, bool average) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  const auto out_dtype = result_dtype(logits.scalar_type());
  const auto dopts = logits.options().dtype(at::kDouble);
  std::vector<std::int64_t> row_shape(logits.sizes().begin(), logits.sizes().end() - 1);
  if (l.num_seqs == 0)
    return {at::empty({0}, logits.options().dtype(out_dtype)), at::zeros(row_shape, logits.options().dtype(at::kDouble))};
  // NaN until written (invalid labels / cu_seqlens: the kernels write nothing).
  at::Tensor sums = at::full({l.num_seqs}, std::numeric_limits<double>::quiet_NaN(), dopts);
  at::Tensor counts = at::ones({l.num_seqs}, dopts.dtype(at::kLong));
  // The library's row log-sum-exp by view row (what the backward reads), 0 off completion rows.
  at::Tensor lse = at::zeros({l.view_rows()}, dopts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(l, ignore_index, [&](auto v) {
    run_with_workspace(logits.device(), [&](void* ws, std::size_t& bytes) {
      return dpo::cuda::sequence_logps(ws, bytes, v.tokens(), sums.data_ptr<double>(),
                                       counts.data_ptr<std::int64_t>(), nullptr, lse.data_ptr<double>(),
                                       cuda_options(l, false), stream);
    });
  });
  const at::Tensor logps = average ? sums / counts.clamp_min(1).to(at::kDouble) : sums;
  // row_lse stays double: the backward splits it into a high and a low part (issue 16), which a
  // float32 copy would lose.
  return {logps.to(out_dtype), view_rows_to_input(lse, l, logits)};
}

at::Tensor sequence_logps_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                        const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_lse,
                                        std::int64_t ignore_index, bool average) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  const at::Tensor lse = input_rows_to_view(row_lse, l, "row_lse");
  if (l.num_seqs == 0) return at::zeros(logits.sizes(), logits.options());
  const at::Tensor g = sequence_grad(grad, l, ignore_index, average);
  // Packed rows outside every sequence are not written by the library: start from zeros.
  const auto opts = logits.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = l.packed ? at::zeros({l.view_rows(), l.vocab}, opts) : at::empty({l.view_rows(), l.vocab}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(l, ignore_index, [&](auto v) {
    run_with_workspace(logits.device(), [&](void* ws, std::size_t& bytes) {
      return dpo::cuda::sequence_logps_backward(ws, bytes, v.tokens(), lse.data_ptr<double>(), g.data_ptr<double>(),
                                                v.elements(out.data_ptr()), l.vocab, cuda_options(l), stream);
    });
  });
  return grad_as_logits(out, l, logits);
}

// ---- pair-level loss ---------------------------------------------------------------------

/// The CUDA backend of the pair-level ops (pair_loss_op, pair_loss_backward_op): the device
/// guard lives as long as the op.
struct cuda_pairs {
  at::Device device;
  c10::cuda::CUDAGuard guard;
  explicit cuda_pairs(const at::Tensor& policy_chosen_logps)
      : device(policy_chosen_logps.device()), guard(device) {
    check_cuda(policy_chosen_logps, "policy_chosen_logps");
  }
  void dpo_loss(const dpo::pair_logps_in& in, const dpo::loss_config& cfg, const dpo::forward_outputs& o) const {
    const auto stream = at::cuda::getCurrentCUDAStream();
    run_with_workspace(device, [&](void* ws, std::size_t& bytes) {
      return dpo::cuda::dpo_loss(ws, bytes, in, cfg, o, stream);
    });
  }
};

// ---- fused forward / backward --------------------------------------------------------------

DPO_FORWARD_KERNEL(dpo_forward_cuda) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const dpo::loss_config cfg = make_config(DPO_CONFIG_ARGS);
  const forward_inputs f = lower_forward(cfg, logits, labels, cu_seqlens, reference_chosen_logps,
                                         reference_rejected_logps, ref_logits, ignore_index, [](const row_layout&) {});
  const row_layout& l = f.l;
  forward_tensors t(l, f.P, logits.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(l, ignore_index, [&](auto v) {
    // With reference logits, one call: the reference pass, then the policy's.
    run_with_workspace(logits.device(), [&](void* ws, std::size_t& bytes) {
      const dpo::cuda::options opt = cuda_options(l, compute_metrics);
      if (!f.rl.has_value())
        return dpo::cuda::dpo_forward(ws, bytes, v.pairs(), f.ref_c, f.ref_r, cfg, t.out, opt, stream);
      dpo::cuda::status s;
      dispatch_reference<cuda_types>(v, *f.rl, [&](auto ref) {
        s = dpo::cuda::dpo_forward(ws, bytes, v.pairs(), ref, cfg, t.out, opt, stream);
      });
      return s;
    });
  });
  return t.results(l, logits);
}

void run_backward(const at::Tensor& grad_loss, const row_layout& l, const at::Tensor& row_lse,
                  const at::Tensor& row_coef, std::int64_t ignore_index, void* grad_ptr,
                  std::int64_t grad_stride, const at::Device& device) {
  check_backward(grad_loss, l, device);
  const at::Tensor go = to_double(grad_loss).reshape({1});  // read on the device: no sync
  const at::Tensor lse = input_rows_to_view(row_lse, l, "row_lse");
  const at::Tensor coef = input_rows_to_view(row_coef, l, "row_coef");
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_views<cuda_types>(l, ignore_index, [&](auto v) {
    const auto g = v.elements(grad_ptr);
    const dpo::pair_grad_view<typename decltype(v)::value_type> gv{g, grad_stride, g, grad_stride};
    run_with_workspace(device, [&](void* ws, std::size_t& bytes) {
      return dpo::cuda::dpo_backward_rows(ws, bytes, v.pairs(), lse.data_ptr<double>(), coef.data_ptr<double>(), gv,
                                          go.data_ptr<double>(), cuda_options(l), stream);
    });
  });
}

at::Tensor dpo_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                             const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_lse,
                             const at::Tensor& row_coef, std::int64_t ignore_index) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  // The gradient buffer has the view's row indexing: [B, seq_len, V] (seq_len >= T) or [N, V].
  // Packed rows outside every sequence are not written by the library: start from zeros.
  const auto opts = logits.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad = l.packed ? at::zeros({l.view_rows(), l.vocab}, opts) : at::empty({l.view_rows(), l.vocab}, opts);
  run_backward(grad_loss, l, row_lse, row_coef, ignore_index, grad.data_ptr(), l.vocab, logits.device());
  return grad_as_logits(grad, l, logits);
}

void dpo_backward_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                               const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_lse,
                               const at::Tensor& row_coef, std::int64_t ignore_index) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  check_inplace(l, logits);
  run_backward(grad_loss, l, row_lse, row_coef, ignore_index, logits.data_ptr(), l.row_stride, logits.device());
  // Packed rows outside every sequence keep their logits in the library; the gradient there
  // is 0 (a masked fill on the device, since cu_seqlens is not read on the host).
  if (l.packed) logits.masked_fill_(rows_inside(l).logical_not().unsqueeze(1), 0);
}

}  // namespace

DPO_KERNELS_IMPL(CUDA, cuda)

}  // namespace dpo_kernels
