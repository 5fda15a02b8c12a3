// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of the fused LM-head operators (schemas in linear.cpp and linear_dpo.cpp):
// linear_logprobs / linear_logprobs_backward on the library's CUDA linear head
// (kernels/dpo/cuda/linear.cuh) and linear_dpo on its fused DPO head
// (kernels/dpo/cuda/linear_dpo.cuh). Thin: the argument checks, the lowering to the core's
// views and the output tensors are the CPU kernels' (head.h); what is CUDA's here is the
// device guard, PyTorch's cuBLASLt handle and current stream, the two-phase workspace from the
// caching allocator (cuda_common.cuh) and the library call.
//
// * No host synchronization, no allocation outside the caching allocator: the ops can be
//   captured in CUDA graphs. Errors in device data (a target / label outside [0, V) that is
//   not ignore_index, a bad cu_seqlens) are the kernels' error word, as in cuda.cu: nothing is
//   written, so the forward outputs stay NaN and the gradients zero; set
//   DPO_KERNELS_CHECK_DEVICE_ERRORS=1 to raise them (a sync after every call).
// * workspace_bytes is the library's chunk budget (linear_options / linear_dpo_options::
//   workspace_bytes), cuBLASLt's own workspace included (budget_options); linear_dpo adds
//   O(rows + pairs) arrays to it.
// * linear_dpo, packed (cu_seqlens): the library needs each pair's rows on the host to cut
//   three-pass chunks (options.host_cu_seqlens). Reading cu_seqlens back would synchronize, so
//   packed batches run four passes (the logits recomputed in the backward half); padded
//   batches take three whenever the plan allows, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "common.h"
#include "cuda_common.cuh"
#include "forward_outputs.h"
#include "head.h"
#include "dpo/cuda/linear.cuh"
#include "dpo/cuda/linear_dpo.cuh"

namespace dpo_kernels {
namespace {

/// Calls fn(T*, L*) for the CUDA head's element type of `t` (float, double, __nv_bfloat16,
/// __half) and the label type.
template <class Fn>
void dispatch_cuda(at::ScalarType t, at::ScalarType label, Fn&& fn) {
  dispatch_head<cuda_types>(t, label, std::forward<Fn>(fn));
}

/// Where a call runs: hidden's device (guarded for the op's duration), PyTorch's cuBLASLt
/// handle of that device (owned by PyTorch's pool: never created or destroyed here) and the
/// current stream. Construct after the device check.
struct cuda_call {
  c10::cuda::CUDAGuard guard;
  cublasLtHandle_t handle;
  cudaStream_t stream;

  explicit cuda_call(const at::Tensor& hidden)
      : guard(hidden.device()),
        handle(at::cuda::getCurrentCUDABlasLtHandle()),
        stream(at::cuda::getCurrentCUDAStream()) {}
};

/// The library's options under the op's budget: cuBLASLt's own workspace is carved from it
/// (the library's 32 MiB, NVIDIA's recommendation for Hopper), at most a quarter of it, so
/// that a small budget still holds a logits chunk.
template <class Options>
Options budget_options(std::int64_t workspace_bytes) {
  Options o;
  o.workspace_bytes = workspace_bytes;
  o.gemm_workspace_bytes = std::min<std::int64_t>(o.gemm_workspace_bytes, workspace_bytes / 4 / 256 * 256);
  return o;
}

/// The linear head's failed status as linear_logprobs' ValueError (its `labels` are `targets`).
void check_head_status(const dpo::cuda::status& s) {
  if (!s.ok()) throw_head_error(s.message);
}

// ---- linear_logprobs --------------------------------------------------------------------------

// As linear_logprobs_cpu: the library's linear_logps writes the log-probs, TRL's optional
// outputs and the rows' log-sum-exp (saved[0]).
DPO_LINEAR_LOGPROBS_KERNEL(linear_logprobs_cuda) {
  const linear_args a =
      check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale, c10::DeviceType::CUDA);
  check_budget(workspace_bytes, 0);
  const cuda_call c(hidden);
  const logprobs_tensors t(hidden, entropy, log_sum_sq_probs, mean_logits, is_top1, /*nan=*/true);
  if (a.N == 0) return t.results(hidden);
  const dpo::cuda::linear_outputs x = t.outputs();
  const auto opt = budget_options<dpo::cuda::linear_options>(workspace_bytes);
  dispatch_cuda(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const dpo::linear_view<T, L> v = view_of<T, L>(a, ignore_index);
    run_with_workspace(
        hidden.device(),
        [&](void* ws, std::size_t& bytes) {
          return dpo::cuda::linear_logps(ws, bytes, c.handle, v, t.logps.data_ptr<double>(), x,
                                         t.saved.data_ptr<double>(), opt, c.stream);
        },
        &check_head_status);
  });
  return t.results(hidden);
}

// As linear_logprobs_backward_cpu: the logits recomputed chunk by chunk (dpo::cuda::
// linear_logps_backward); dHidden starts at zeros (rows the device skips after an error).
DPO_LINEAR_LOGPROBS_BACKWARD_KERNEL(linear_logprobs_backward_cuda) {
  const linear_args a =
      check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale, c10::DeviceType::CUDA);
  const at::Tensor sv = checked_saved(saved, a, grad_entropy.has_value());
  check_budget(workspace_bytes, 0);
  const cuda_call c(hidden);
  const head_backward_tensors t(a, weight, grad_logps, grad_entropy, need_hidden, need_weight, need_bias,
                                /*zero_hidden=*/true);
  if (a.N == 0) return t.results(weight);
  const auto opt = budget_options<dpo::cuda::linear_options>(workspace_bytes);
  dispatch_cuda(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const dpo::linear_grads<T, dpo::cuda::acc_t<T>> g = t.grads<T, dpo::cuda::acc_t<T>>();
    const dpo::linear_view<T, L> v = view_of<T, L>(a, ignore_index);
    const double* ge = t.grad_entropy();
    const double* ent = ge != nullptr ? sv.data_ptr<double>() + a.N : nullptr;  // saved[1]
    run_with_workspace(
        hidden.device(),
        [&](void* ws, std::size_t& bytes) {
          return dpo::cuda::linear_logps_backward(ws, bytes, c.handle, v, sv.data_ptr<double>(),
                                                  t.gl.data_ptr<double>(), ent, ge, g, opt, c.stream);
        },
        &check_head_status);
  });
  return t.results(weight);
}

// ---- linear_dpo -------------------------------------------------------------------------------

// As linear_dpo_cpu: one call of dpo::cuda::linear_dpo (three passes when its plan allows, four
// otherwise; packed batches four, see the top of this file), the gradients for grad_output = 1
// (the autograd formula scales them). Everything starts NaN (pair results) or zero (gradients).
DPO_LINEAR_DPO_KERNEL(linear_dpo_cuda) {
  const linear_dpo_inputs in(c10::DeviceType::CUDA, DPO_LINEAR_DPO_ARGS);
  const dpo::loss_config& cfg = in.cfg;
  const cuda_call c(hidden);
  const pair_result_tensors t(in.P, hidden.options().dtype(at::kDouble));
  const grad_tensors gt(in.l, hidden, in.w, in.b, need_hidden, need_weight, need_bias);
  auto opt = budget_options<dpo::cuda::linear_dpo_options>(workspace_bytes);
  opt.metrics = compute_metrics;
  // Packed: cu_seqlens stays on the device (bounded by the rows); no host copy, so four passes.
  if (in.l.packed) opt.num_rows = in.l.rows;
  dispatch_cuda(in.l.hidden.scalar_type(), in.l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const dpo::linear_dpo_grads<T, dpo::cuda::acc_t<T>> g = gt.grads<T, dpo::cuda::acc_t<T>>();
    const dpo::hidden_pairs<T, L> policy = pairs_of<T, L>(in.l, ignore_index);
    const dpo::linear_head<T> head = head_of<T>(in.w, in.b, in.tr);
    if (in.has_ref_hidden) {
      const dpo::hidden_pairs<T, L> ref = pairs_of<T, L>(in.rl, ignore_index);
      const dpo::linear_head<T> ref_head = head_of<T>(in.rw, in.rb, in.tr);
      run_with_workspace(hidden.device(), [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::linear_dpo(ws, bytes, c.handle, policy, head, ref, ref_head, cfg, t.out, g, opt, nullptr,
                                     c.stream);
      });
    } else {
      run_with_workspace(hidden.device(), [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::linear_dpo(ws, bytes, c.handle, policy, head, doubles(in.rc), doubles(in.rr), cfg, t.out,
                                     g, opt, nullptr, c.stream);
      });
    }
  });
  return gt.linear_dpo_results(t, hidden, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  m.impl("linear_logprobs", &linear_logprobs_cuda);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward_cuda);
  m.impl("linear_dpo", &linear_dpo_cuda);
}

}  // namespace dpo_kernels
