// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM-head operators (issue 13): per-token log-probs and TRL's extra per-token
// outputs straight from hidden states and the head's weight, and their gradient, through the
// CPU linear head (include/dpo/cpu/linear.hpp). Schemas and CPU kernels live here (the checks
// and output tensors they share with the CUDA kernels in head.h), the CUDA kernels of
// linear_logprobs / linear_logprobs_backward in cuda_linear.cu and of the shard ops in
// cuda_linear_shard.cu; autograd and fake kernels in dpo_kernels/_linear.py.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cpu_head.h"
#include "gemm_isa.h"
#include "dpo/cpu/linear.hpp"
#include "dpo/cpu/linear_shard.hpp"

namespace dpo_kernels {
namespace {

linear_args check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& targets, double temperature, std::optional<double> softcap,
                         double logit_scale) {
  return dpo_kernels::check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale, c10::kCPU);
}

/// rethrow_as_value_error with the library's names for the op's: its `labels` are `targets`.
template <class Fn>
void run_head(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    throw_head_error(e.what());
  }
}

dpo::cpu::linear_options head_options(std::int64_t workspace_bytes) {
  dpo::cpu::linear_options o;
  o.num_threads = at::get_num_threads();
  o.gemm = cpu_gemm();
  check_budget(workspace_bytes, 0);
  o.workspace_bytes = workspace_bytes;
  return o;
}

// Outputs: log_probs, entropy, log_sum_sq_probs, mean_logits ([N], float32, float64 for float64
// inputs; [0] when not requested), is_top1 ([N] bool or [0]), and saved ([1 or 2, N] float64:
// the rows' log-sum-exp, then the entropy in double when requested), what the backward reads.
DPO_LINEAR_LOGPROBS_KERNEL(linear_logprobs_cpu) {
  const linear_args a = check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale);
  const logprobs_tensors t(hidden, entropy, log_sum_sq_probs, mean_logits, is_top1, /*nan=*/false);
  const dpo::cpu::linear_outputs x = t.outputs();
  const auto opt = head_options(workspace_bytes);
  dispatch_cpu(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    run_head([&] {
      dpo::cpu::linear_logps(view_of<T, L>(a, ignore_index), t.logps.data_ptr<double>(), x,
                             t.saved.data_ptr<double>(), opt);
    });
  });
  return t.results(hidden);
}

/// The shape of a per-row float64 argument: [N] (`width` 0) or [N, width].
at::Tensor row_doubles(const at::Tensor& t, std::int64_t N, std::int64_t width, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(width == 0 ? (t.dim() == 1 && t.size(0) == N) : (t.dim() == 2 && t.size(0) == N &&
                                                                      t.size(1) == width),
                    name, " must have shape [", N, width == 0 ? "" : ", ", width == 0 ? "" : std::to_string(width),
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  return t.contiguous();
}

/// The backward's shared part: the upstream gradients as float64 [N] (grad_logps zeros when
/// absent), the gradient buffers, and `run(view, grads, options, grad_logps, grad_entropy)`
/// for the head's element and label types. Returns (dHidden, dWeight, dBias), each [0] when
/// not needed; dWeight / dBias summed in float (double for float64) and rounded once.
template <class Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_backward(const linear_args& a, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& grad_logps,
                                                             const std::optional<at::Tensor>& grad_entropy,
                                                             std::int64_t ignore_index, bool need_hidden,
                                                             bool need_weight, bool need_bias,
                                                             std::int64_t workspace_bytes, Run&& run) {
  const head_backward_tensors t(a, weight, grad_logps, grad_entropy, need_hidden, need_weight, need_bias,
                                /*zero_hidden=*/false);
  const auto opt = head_options(workspace_bytes);
  dispatch_cpu(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const auto g = t.grads<T, dpo::cpu::acc_t<T>>();
    run_head([&] { run(view_of<T, L>(a, ignore_index), g, opt, t.gl.data_ptr<double>(), t.grad_entropy()); });
  });
  return t.results(weight);
}

// The gradients of sum(grad_logps * log_probs) + sum(grad_entropy * entropy) with respect to
// hidden, weight and bias; each [0] when its flag is off (or no bias). dWeight and dBias are
// summed in float (double for float64) and rounded to the weight's dtype once, as TRL does.
DPO_LINEAR_LOGPROBS_BACKWARD_KERNEL(linear_logprobs_backward_cpu) {
  const linear_args a = check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale);
  const std::int64_t N = a.N;
  const at::Tensor sv = checked_saved(saved, a, grad_entropy.has_value());
  return head_backward(a, weight, grad_logps, grad_entropy, ignore_index, need_hidden, need_weight, need_bias,
                       workspace_bytes, [&](const auto& v, const auto& g, const auto& opt, const double* gl,
                                            const double* ge) {
                         const double* ent = ge != nullptr ? sv.data_ptr<double>() + N : nullptr;
                         dpo::cpu::linear_logps_backward(v, sv.data_ptr<double>(), gl, ent, ge, g, opt);
                       });
}

// ---- the head on a vocabulary shard (dpo/cpu/linear_shard.hpp; docs/distributed.md) ------------
// weight / bias hold rows [vocab_start, vocab_start + V_local) of a head of vocab_size rows;
// targets are global ids. The collectives between these ops are torch.distributed all-reduces
// issued from Python (dpo_kernels/distributed.py).

dpo::vocab_shard head_shard(const linear_args& a, std::int64_t vocab_start, std::int64_t vocab_size) {
  return {vocab_size, vocab_start, vocab_start + a.V};
}

// Phase 1: (row_max [N], records [N, shard_fields]) of the shard, float64.
DPO_LINEAR_SHARD_PARTIALS_KERNEL(linear_shard_partials_cpu) {
  const linear_args a = check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale);
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  at::Tensor row_max = at::empty({a.N}, dbl);
  at::Tensor records = at::empty({a.N, dpo::shard_fields}, dbl);
  const auto opt = head_options(workspace_bytes);
  dispatch_cpu(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    run_head([&] {
      dpo::cpu::linear_shard_partials(view_of<T, L>(a, ignore_index), head_shard(a, vocab_start, vocab_size),
                                      records.data_ptr<double>(), row_max.data_ptr<double>(), metrics, opt);
    });
  });
  return {row_max, records};
}

// Phase 2: log_probs and the requested extra outputs ([N] float64 each, [0] when not
// requested; is_top1 bool) from the combined records.
DPO_LINEAR_SHARD_VALUES_KERNEL(linear_shard_values_cpu) {
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                   "targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1, "targets must be 1-D [N], got shape ", targets.sizes());
  const std::int64_t N = targets.size(0);
  const at::Tensor m = row_doubles(row_max, N, 0, "row_max");
  const at::Tensor r = row_doubles(records, N, dpo::shard_fields, "records");
  const at::Tensor y = targets.contiguous();
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  at::Tensor logps = at::empty({N}, dbl);
  at::Tensor ent = at::empty({entropy ? N : 0}, dbl);
  at::Tensor lssp = at::empty({log_sum_sq_probs ? N : 0}, dbl);
  at::Tensor mean = at::empty({mean_logits ? N : 0}, dbl);
  at::Tensor top1 = at::empty({is_top1 ? N : 0}, at::TensorOptions().dtype(at::kBool));
  dpo::cpu::linear_outputs x;
  if (entropy) x.entropy = ent.data_ptr<double>();
  if (log_sum_sq_probs) x.log_sum_sq_probs = lssp.data_ptr<double>();
  if (mean_logits) x.mean_logits = mean.data_ptr<double>();
  if (is_top1) x.is_top1 = reinterpret_cast<std::uint8_t*>(top1.data_ptr<bool>());
  dispatch_label(y.scalar_type(), [&](auto* lp) {
    using L = std::remove_pointer_t<decltype(lp)>;
    dpo::cpu::linear_view<float, L> v;  // only the labels and ignore_index are read
    v.rows = N;
    v.labels = y.data_ptr<L>();
    v.ignore_index = ignore_index;
    run_head([&] {
      dpo::cpu::linear_shard_logps(v, vocab_size, m.data_ptr<double>(), r.data_ptr<double>(),
                                   logps.data_ptr<double>(), x, nullptr);
    });
  });
  return {logps, ent, lssp, mean, top1};
}

// The shard-local backward: (dHidden PARTIAL, dWeight rows, dBias rows) as
// linear_logprobs_backward; `entropy` is the global per-row entropy (float64 [N]) when
// grad_entropy is given. The caller sums dHidden over the tensor-parallel group.
DPO_LINEAR_SHARD_BACKWARD_KERNEL(linear_shard_backward_cpu) {
  const linear_args a = check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale);
  const at::Tensor m = row_doubles(row_max, a.N, 0, "row_max");
  const at::Tensor r = row_doubles(records, a.N, dpo::shard_fields, "records");
  TORCH_CHECK_VALUE(!grad_entropy.has_value() || entropy.has_value(), "grad_entropy is given without entropy");
  const at::Tensor ent = grad_entropy.has_value() ? row_doubles(*entropy, a.N, 0, "entropy") : at::Tensor();
  const dpo::vocab_shard sh = head_shard(a, vocab_start, vocab_size);
  return head_backward(a, weight, grad_logps, grad_entropy, ignore_index, need_hidden, need_weight, need_bias,
                       workspace_bytes, [&](const auto& v, const auto& g, const auto& opt, const double* gl,
                                            const double* ge) {
                         dpo::cpu::linear_shard_backward(v, sh, m.data_ptr<double>(), r.data_ptr<double>(), gl,
                                                         ge != nullptr ? ent.data_ptr<double>() : nullptr, ge, g,
                                                         opt);
                       });
}

#ifndef DPO_KERNELS_WITH_CUDA
// Without a CUDA build the head has no CUDA kernel (with one: cuda_linear.cu, and
// cuda_linear_shard.cu for the shard ops): CUDA tensors get NotImplementedError naming the
// device instead of a silent fallback (or the dispatcher's "could not run" message).
void no_cuda_head(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op.schema().name(), ": this dpo_kernels build has no CUDA kernel of this ",
                              "op (", cuda_note(), "): move hidden, weight, bias and targets to the CPU");
}
#endif

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_FRAGMENT(dpo_kernels, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "linear_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "float? softcap, float logit_scale, bool entropy, bool log_sum_sq_probs, bool mean_logits, bool is_top1, "
      "int ignore_index, int workspace_bytes) -> (Tensor log_probs, Tensor entropy, Tensor log_sum_sq_probs, "
      "Tensor mean_logits, Tensor is_top1, Tensor saved)",
      tags);
  m.def(
      "linear_logprobs_backward(Tensor? grad_logps, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor saved, float temperature, float? softcap, float logit_scale, "
      "int ignore_index, bool need_hidden, bool need_weight, bool need_bias, int workspace_bytes) -> "
      "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
      tags);
  m.def(
      "linear_shard_partials(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "float? softcap, float logit_scale, int ignore_index, int vocab_start, int vocab_size, bool metrics, "
      "int workspace_bytes) -> (Tensor row_max, Tensor records)",
      tags);
  m.def(
      "linear_shard_values(Tensor row_max, Tensor records, Tensor targets, int ignore_index, int vocab_size, "
      "bool entropy, bool log_sum_sq_probs, bool mean_logits, bool is_top1) -> (Tensor log_probs, Tensor entropy, "
      "Tensor log_sum_sq_probs, Tensor mean_logits, Tensor is_top1)",
      tags);
  m.def(
      "linear_shard_backward(Tensor? grad_logps, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor row_max, Tensor records, Tensor? entropy, float temperature, float? softcap, "
      "float logit_scale, int ignore_index, int vocab_start, int vocab_size, bool need_hidden, bool need_weight, "
      "bool need_bias, int workspace_bytes) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
      tags);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("linear_logprobs", &dpo_kernels::linear_logprobs_cpu);
  m.impl("linear_logprobs_backward", &dpo_kernels::linear_logprobs_backward_cpu);
  m.impl("linear_shard_partials", &dpo_kernels::linear_shard_partials_cpu);
  m.impl("linear_shard_values", &dpo_kernels::linear_shard_values_cpu);
  m.impl("linear_shard_backward", &dpo_kernels::linear_shard_backward_cpu);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
#ifndef DPO_KERNELS_WITH_CUDA
  for (const char* name : {"linear_logprobs", "linear_logprobs_backward", "linear_shard_partials",
                           "linear_shard_values", "linear_shard_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&dpo_kernels::no_cuda_head>());
#endif
}
