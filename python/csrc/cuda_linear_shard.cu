// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of the fused LM head's vocabulary-shard ops (schemas and CPU kernels in
// linear.cpp and linear_dpo.cpp; the torch.distributed collectives between them in
// dpo_kernels/distributed.py): linear_shard_partials / linear_shard_values /
// linear_shard_backward on dpo/cuda/linear_shard.cuh's token-level calls, and
// linear_dpo_shard_partials / linear_dpo_shard_sequences / linear_dpo_shard_backward on its
// pair calls. The pair stage between the sequences and the backward is the logits path's
// shard_pair_stage op (its CUDA kernel: cuda_shard.cu).
//
// As cuda_linear.cu: the checks and lowering are the CPU kernels' (head.h), then hidden's
// device guarded, PyTorch's cuBLASLt handle and current stream, the two-phase workspace from
// the caching allocator (cuda_common.cuh). No host synchronization: the backward's
// nll_token_grad stays on the device (the library reads it there). Errors in device data (a
// label outside [0, vocab_size) that is not ignore_index, a bad cu_seqlens) are the kernels'
// error word: nothing is written, so the float64 outputs stay NaN and the gradients zero; set
// DPO_KERNELS_CHECK_DEVICE_ERRORS=1 to raise them (a sync after every call).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "head.h"
#include "dpo/cuda/linear_shard.cuh"

namespace dpo_kernels {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// A call's device (guarded), PyTorch's cuBLASLt handle of it and the current stream.
struct shard_call_env {
  c10::cuda::CUDAGuard guard;
  cublasLtHandle_t handle;
  cudaStream_t stream;
  explicit shard_call_env(const at::Tensor& on)
      : guard(on.device()), handle(at::cuda::getCurrentCUDABlasLtHandle()), stream(at::cuda::getCurrentCUDAStream()) {}
};

/// The library's options under the op's budget, cuBLASLt's workspace carved from it (at most
/// a quarter), as cuda_linear.cu's.
template <class Options>
Options shard_budget(std::int64_t workspace_bytes, bool metrics = false) {
  Options o;
  o.workspace_bytes = workspace_bytes;
  o.gemm_workspace_bytes = std::min<std::int64_t>(o.gemm_workspace_bytes, workspace_bytes / 4 / 256 * 256);
  if constexpr (std::is_same<Options, dpo::cuda::linear_dpo_options>::value) o.metrics = metrics;
  return o;
}

/// A failed status of the per-token calls as ValueError (the library's `labels` are `targets`).
void check_head_status(const dpo::cuda::status& s) {
  if (!s.ok()) throw_head_error(s.message);
}

/// The library call `call(T*, L*, workspace, bytes)` for the CUDA element type of `t` and the
/// label type `label` (null pointers: the types only), with its two-phase workspace from the
/// caching allocator on `device`; `raise` turns a failed status into the Python exception.
template <class Call>
void run_call(at::ScalarType t, at::ScalarType label, const at::Device& device, Call&& call,
              void (*raise)(const dpo::cuda::status&) = &check_status) {
  dispatch_head<cuda_types>(t, label, [&](auto* tp, auto* lp) {
    run_with_workspace(device, [&](void* ws, std::size_t& bytes) { return call(tp, lp, ws, bytes); }, raise);
  });
}

/// A per-row float64 state tensor of the phase-1 op (row_max [rows], records [rows, width]),
/// on `on`'s device.
at::Tensor row_state(const at::Tensor& t, std::int64_t rows, std::int64_t width, const at::Tensor& on,
                     const char* name, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == rows * width, name, " must be the float64 [", rows,
                    width > 1 ? ", " + std::to_string(width) : std::string(), "] tensor of ", op, ", got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == on.device(), name, " is on ", t.device(), " but the op's other inputs are on ",
                    on.device());
  return t.contiguous();
}

/// (row_max, records): NaN until phase 1 writes them (it writes nothing after a device error).
std::tuple<at::Tensor, at::Tensor> nan_records(const at::Tensor& on, std::int64_t rows) {
  const auto dbl = on.options().dtype(at::kDouble);
  return {at::full({rows}, kNaN, dbl), at::full({rows, dpo::shard_fields}, kNaN, dbl)};
}

// ---- per token: linear_logprobs on a weight shard ----------------------------------------------

DPO_LINEAR_SHARD_PARTIALS_KERNEL(linear_shard_partials_cuda) {
  check_budget(workspace_bytes, 0);
  const linear_args a =
      check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale, c10::DeviceType::CUDA);
  const shard_call_env c(hidden);
  at::Tensor row_max, records;
  std::tie(row_max, records) = nan_records(hidden, a.N);
  const dpo::vocab_shard sh{vocab_size, vocab_start, vocab_start + a.V};
  const auto opt = shard_budget<dpo::cuda::linear_options>(workspace_bytes);
  run_call(
      a.hidden.scalar_type(), a.targets.scalar_type(), hidden.device(),
      [&](auto* tp, auto* lp, void* ws, std::size_t& bytes) {
        const auto v = view_of<std::remove_pointer_t<decltype(tp)>, std::remove_pointer_t<decltype(lp)>>(a, ignore_index);
        return dpo::cuda::linear_shard_partials(ws, bytes, c.handle, v, sh, records.data_ptr<double>(),
                                                row_max.data_ptr<double>(), metrics, opt, c.stream);
      },
      &check_head_status);
  return {row_max, records};
}

// As linear_shard_values_cpu: the row values from the combined records (no workspace, no GEMM);
// the targets were checked by phase 1 (a bad one left its records NaN).
DPO_LINEAR_SHARD_VALUES_KERNEL(linear_shard_values_cuda) {
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                   "targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1, "targets must be 1-D [N], got shape ", targets.sizes());
  check_backend(targets, "targets", c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size = ", vocab_size, " is invalid: must be >= 1");
  const std::int64_t N = targets.size(0);
  const at::Tensor m = row_state(row_max, N, 1, targets, "row_max", "linear_shard_partials");
  const at::Tensor r = row_state(records, N, dpo::shard_fields, targets, "records", "linear_shard_partials");
  const at::Tensor y = targets.contiguous();
  const c10::cuda::CUDAGuard guard(targets.device());
  const auto dbl = targets.options().dtype(at::kDouble);
  const auto vec = [&](bool on) { return at::full({on ? N : 0}, kNaN, dbl); };
  at::Tensor logps = vec(true), ent = vec(entropy), mean = vec(mean_logits);
  const at::Tensor wpo = vec(log_sum_sq_probs), hit = at::zeros({is_top1 ? N : 0}, dbl);
  dpo::cuda::detail::shard_row_outputs o;
  o.logp = logps.data_ptr<double>();
  const auto ptr = [](const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr<double>() : nullptr; };
  o.entropy = ptr(ent);
  o.zmean = ptr(mean);
  o.wpo = ptr(wpo);
  o.hit = ptr(hit);
  dispatch_label(y.scalar_type(), [&](auto* lp) {
    using L = std::remove_pointer_t<decltype(lp)>;
    dpo::linear_view<float, L> v;  // only the labels and ignore_index are read
    v.rows = N;
    v.labels = y.data_ptr<L>();
    v.ignore_index = ignore_index;
    check_head_status(dpo::cuda::linear_shard_logps(v, vocab_size, m.data_ptr<double>(), r.data_ptr<double>(), o,
                                                    at::cuda::getCurrentCUDAStream()));
  });
  // WPO's term is logp - log sum_v p_v^2: log_sum_sq_probs is logp minus it.
  at::Tensor lssp = log_sum_sq_probs ? logps - wpo : wpo;
  return {logps, ent, lssp, mean, hit.ne(0.0)};
}

// As linear_shard_backward_cpu: the logits of the shard recomputed chunk by chunk; dHidden (the
// shard's PARTIAL) starts at zeros, as do dWeight / dBias (nothing is written after a device
// error).
DPO_LINEAR_SHARD_BACKWARD_KERNEL(linear_shard_backward_cuda) {
  check_budget(workspace_bytes, 0);
  const linear_args a =
      check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale, c10::DeviceType::CUDA);
  const at::Tensor m = row_state(row_max, a.N, 1, hidden, "row_max", "linear_shard_partials");
  const at::Tensor r = row_state(records, a.N, dpo::shard_fields, hidden, "records", "linear_shard_partials");
  TORCH_CHECK_VALUE(!grad_entropy.has_value() || entropy.has_value(), "grad_entropy is given without entropy");
  const at::Tensor ent = grad_entropy.has_value() ? row_state(*entropy, a.N, 1, hidden, "entropy", "linear_shard_values")
                                                  : at::Tensor();
  const shard_call_env c(hidden);
  const head_backward_tensors t(a, weight, grad_logps, grad_entropy, need_hidden, need_weight, need_bias,
                                /*zero_hidden=*/true);
  if (a.N == 0) return t.results(weight);
  const dpo::vocab_shard sh{vocab_size, vocab_start, vocab_start + a.V};
  const auto opt = shard_budget<dpo::cuda::linear_options>(workspace_bytes);
  // The entropy only with its upstream gradient (both or neither).
  const double* ge = t.grad_entropy();
  const double* ent_p = ge != nullptr ? ent.data_ptr<double>() : nullptr;
  const double *pm = m.data_ptr<double>(), *pr = r.data_ptr<double>(), *gl = t.gl.data_ptr<double>();
  run_call(
      a.hidden.scalar_type(), a.targets.scalar_type(), hidden.device(),
      [&](auto* tp, auto* lp, void* ws, std::size_t& bytes) {
        using T = std::remove_pointer_t<decltype(tp)>;
        return dpo::cuda::linear_shard_backward(ws, bytes, c.handle,
                                                view_of<T, std::remove_pointer_t<decltype(lp)>>(a, ignore_index), sh,
                                                pm, pr, gl, ent_p, ge, t.grads<T, dpo::cuda::acc_t<T>>(), opt,
                                                c.stream);
      },
      &check_head_status);
  return t.results(weight);
}

// ---- DPO from hidden states on a weight shard --------------------------------------------------
// Records and maxima are indexed by hidden's rows (R = 2P * T, or N packed), one array for
// both sides (TRL's concatenated batch), as on the CPU.

/// The library's pair options: the budget, the metrics, and for packed layouts the rows that
/// bound cu_seqlens (device data, checked by the kernels).
dpo::cuda::linear_dpo_options pair_options(const hidden_layout& l, bool metrics, std::int64_t workspace_bytes) {
  auto o = shard_budget<dpo::cuda::linear_dpo_options>(workspace_bytes, metrics);
  if (l.packed) o.num_rows = l.rows;
  return o;
}

DPO_LINEAR_DPO_SHARD_PARTIALS_KERNEL(linear_dpo_shard_partials_cuda) {
  const shard_call c = shard_inputs(c10::DeviceType::CUDA, hidden, weight, bias, labels, cu_seqlens, temperature,
                                    softcap, logit_scale, vocab_start, vocab_size, workspace_bytes);
  const shard_call_env e(hidden);
  // Every row of hidden is written (rows outside the sequences: the empty record).
  at::Tensor row_max, records;
  std::tie(row_max, records) = nan_records(hidden, c.l.rows);
  const auto opt = pair_options(c.l, metrics, workspace_bytes);
  double* m = row_max.data_ptr<double>();
  double* r = records.data_ptr<double>();
  run_call(c.l.hidden.scalar_type(), c.l.labels.scalar_type(), hidden.device(),
           [&](auto* tp, auto* lp, void* ws, std::size_t& bytes) {
             using T = std::remove_pointer_t<decltype(tp)>;
             const auto policy = pairs_of<T, std::remove_pointer_t<decltype(lp)>>(c.l, ignore_index);
             return dpo::cuda::linear_pair_shard_partials(ws, bytes, e.handle, policy, head_of<T>(c.w, c.b, c.tr),
                                                          c.sh, m, r, m, r, opt, e.stream);
           });
  return {row_max, records};
}

// The [seq_fields, 2P] sequence sums from the combined records (what the context group sums);
// NaN after a device error.
DPO_LINEAR_DPO_SHARD_SEQUENCES_KERNEL(linear_dpo_shard_sequences_cuda) {
  check_backend(hidden, "hidden", c10::DeviceType::CUDA);
  const hidden_layout l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
  const at::Tensor m = row_state(row_max, l.rows, 1, hidden, "row_max", "linear_dpo_shard_partials");
  const at::Tensor r = row_state(records, l.rows, dpo::shard_fields, hidden, "records", "linear_dpo_shard_partials");
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor seq = at::full({dpo::seq_fields, l.num_seqs}, kNaN, hidden.options().dtype(at::kDouble));
  const dpo::vocab_shard sh{vocab_size, vocab_start, vocab_end};
  const auto opt = pair_options(l, metrics, dpo::cuda::default_linear_workspace_bytes);
  const double* pm = m.data_ptr<double>();
  const double* pr = r.data_ptr<double>();
  run_call(l.hidden.scalar_type(), l.labels.scalar_type(), hidden.device(),
           [&](auto* tp, auto* lp, void* ws, std::size_t& bytes) {
             const auto policy =
                 pairs_of<std::remove_pointer_t<decltype(tp)>, std::remove_pointer_t<decltype(lp)>>(l, ignore_index);
             return dpo::cuda::linear_pair_shard_sequences(ws, bytes, policy, sh, pm, pr, pm, pr, ld_alpha,
                                                           seq.data_ptr<double>(), metrics, opt,
                                                           at::cuda::getCurrentCUDAStream());
           });
  return seq;
}

// The shard-local backward: (dHidden PARTIAL in hidden's shape, dWeight rows, dBias rows), zeros
// until written; seq_grad and nll_token_grad stay on the device.
DPO_LINEAR_DPO_SHARD_BACKWARD_KERNEL(linear_dpo_shard_backward_cuda) {
  const shard_call c = shard_inputs(c10::DeviceType::CUDA, hidden, weight, bias, labels, cu_seqlens, temperature,
                                    softcap, logit_scale, vocab_start, vocab_size, workspace_bytes);
  const hidden_layout& l = c.l;
  const at::Tensor m = row_state(row_max, l.rows, 1, hidden, "row_max", "linear_dpo_shard_partials");
  const at::Tensor r = row_state(records, l.rows, dpo::shard_fields, hidden, "records", "linear_dpo_shard_partials");
  check_seq_grads(seq_grad, nll_token_grad, l);
  const shard_call_env e(hidden);
  const at::Tensor g = seq_grad.to(hidden.device(), at::kDouble).contiguous();
  const at::Tensor nll = nll_token_grad.to(hidden.device(), at::kDouble).reshape({1}).contiguous();
  const grad_tensors gt(l, hidden, c.w, c.b, need_hidden, need_weight, need_bias);
  const auto opt = pair_options(l, false, workspace_bytes);
  const double* pm = m.data_ptr<double>();
  const double* pr = r.data_ptr<double>();
  run_call(l.hidden.scalar_type(), l.labels.scalar_type(), hidden.device(),
           [&](auto* tp, auto* lp, void* ws, std::size_t& bytes) {
             using T = std::remove_pointer_t<decltype(tp)>;
             const auto policy = pairs_of<T, std::remove_pointer_t<decltype(lp)>>(l, ignore_index);
             return dpo::cuda::linear_pair_shard_backward(
                 ws, bytes, e.handle, policy, head_of<T>(c.w, c.b, c.tr), c.sh, pm, pr, pm, pr, g.data_ptr<double>(),
                 nll.data_ptr<double>(), ld_alpha, gt.grads<T, dpo::cuda::acc_t<T>>(),
                 static_cast<const double*>(nullptr), opt, e.stream);
           });
  return gt.result(hidden, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("linear_shard_partials", &linear_shard_partials_cuda);
  m.impl("linear_shard_values", &linear_shard_values_cuda);
  m.impl("linear_shard_backward", &linear_shard_backward_cuda);
  m.impl("linear_dpo_shard_partials", &linear_dpo_shard_partials_cuda);
  m.impl("linear_dpo_shard_sequences", &linear_dpo_shard_sequences_cuda);
  m.impl("linear_dpo_shard_backward", &linear_dpo_shard_backward_cuda);
}

}  // namespace dpo_kernels
