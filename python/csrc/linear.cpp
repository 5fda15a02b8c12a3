// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM-head operators (issue 13): per-token log-probs and TRL's extra per-token
// outputs straight from hidden states and the head's weight, and their gradient, through the
// CPU linear head (include/dpo/cpu/linear.hpp). Schemas, CPU kernels and the CUDA stub live
// here; autograd and fake kernels in dpo_kernels/_linear.py.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <Eigen/Core>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>

#include "common.h"
#include "head.h"
#include "dpo/cpu/linear.hpp"

namespace dpo_kernels {
namespace {

/// The validated inputs of a linear-head call, lowered to contiguous-row tensors.
struct linear_args {
  at::Tensor hidden, weight, bias, targets;
  std::int64_t N = 0, H = 0, V = 0;
  dpo::logit_transforms tr;
};

at::Tensor unit_stride_rows(const at::Tensor& t) {
  // The head reads rows with a stride, elements with unit stride.
  return t.stride(-1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

linear_args check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& targets, double temperature, std::optional<double> softcap,
                         double logit_scale) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be 2-D [N, H], got shape ", hidden.sizes());
  TORCH_CHECK_TYPE(is_floating(hidden.scalar_type()), "hidden must be float32, float64, bfloat16 or float16, got ",
                   hidden.scalar_type());
  check_head_tensors(weight, bias, hidden, "weight", "bias", "hidden");
  TORCH_CHECK_VALUE(hidden.size(1) >= 1, "hidden has hidden size 0: shape ", hidden.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
                   "targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must have shape [",
                    hidden.size(0), "] to match hidden ", hidden.sizes(), ", got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == hidden.device(), "targets is on ", targets.device(), " but hidden is on ",
                    hidden.device());
  const dpo::logit_transforms tr = checked_transforms(temperature, softcap, logit_scale);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "hidden is on ", hidden.device(), ": this kernel is the CPU one");
  linear_args a;
  a.hidden = unit_stride_rows(hidden);
  a.weight = unit_stride_rows(weight);
  if (bias.has_value()) a.bias = bias->contiguous();
  a.targets = targets.contiguous();
  a.N = hidden.size(0);
  a.H = hidden.size(1);
  a.V = weight.size(0);
  a.tr = tr;
  return a;
}

template <class T, class L>
dpo::linear_view<T, L> view_of(const linear_args& a, std::int64_t ignore_index) {
  return dpo::linear_view_of(reinterpret_cast<const T*>(a.hidden.data_ptr()), a.N,
                             a.N > 1 ? a.hidden.stride(0) : a.H, head_of<T>(a.weight, a.bias, a.tr),
                             a.targets.data_ptr<L>(), nullptr, ignore_index);
}

/// rethrow_as_value_error with the library's names for the op's: its `labels` are `targets`.
template <class Fn>
void run_head(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    std::string msg = e.what();
    for (std::size_t at = msg.find("labels"); at != std::string::npos; at = msg.find("labels", at))
      msg.replace(at, 6, "targets");
    TORCH_CHECK_VALUE(false, msg);
  }
}

dpo::cpu::linear_options head_options(std::int64_t workspace_bytes) {
  dpo::cpu::linear_options o;
  o.num_threads = at::get_num_threads();
  TORCH_CHECK_VALUE(workspace_bytes >= 0, "workspace_bytes = ", workspace_bytes, " is invalid: must be >= 0");
  o.workspace_bytes = workspace_bytes;
  return o;
}

// Outputs: log_probs, entropy, log_sum_sq_probs, mean_logits ([N], float32, float64 for float64
// inputs; [0] when not requested), is_top1 ([N] bool or [0]), and saved ([1 or 2, N] float64:
// the rows' log-sum-exp, then the entropy in double when requested), what the backward reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> softcap, double logit_scale,
    bool entropy, bool log_sum_sq_probs, bool mean_logits, bool is_top1, std::int64_t ignore_index,
    std::int64_t workspace_bytes) {
  const linear_args a = check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale);
  const std::int64_t N = a.N;
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  at::Tensor saved = at::empty({entropy ? 2 : 1, N}, dbl);
  at::Tensor logps = at::empty({N}, dbl);
  at::Tensor lssp = at::empty({log_sum_sq_probs ? N : 0}, dbl);
  at::Tensor mean = at::empty({mean_logits ? N : 0}, dbl);
  at::Tensor top1 = at::empty({is_top1 ? N : 0}, at::TensorOptions().dtype(at::kBool));
  dpo::cpu::linear_outputs x;
  if (entropy) x.entropy = saved.data_ptr<double>() + N;
  if (log_sum_sq_probs) x.log_sum_sq_probs = lssp.data_ptr<double>();
  if (mean_logits) x.mean_logits = mean.data_ptr<double>();
  static_assert(sizeof(bool) == sizeof(std::uint8_t), "bool tensors are bytes");
  if (is_top1) x.is_top1 = reinterpret_cast<std::uint8_t*>(top1.data_ptr<bool>());
  const auto opt = head_options(workspace_bytes);
  dispatch_head(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    run_head(
        [&] { dpo::cpu::linear_logps(view_of<T, L>(a, ignore_index), logps.data_ptr<double>(), x,
                                     saved.data_ptr<double>(), opt); });
  });
  const auto out = result_dtype(hidden.scalar_type());
  const auto empty = at::empty({0}, dbl.dtype(out));
  return {logps.to(out), entropy ? saved[1].to(out, /*non_blocking=*/false, /*copy=*/true) : empty, lssp.to(out), mean.to(out), top1, saved};
}

// The gradients of sum(grad_logps * log_probs) + sum(grad_entropy * entropy) with respect to
// hidden, weight and bias; each [0] when its flag is off (or no bias). dWeight and dBias are
// summed in float (double for float64) and rounded to the weight's dtype once, as TRL does.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward_cpu(
    const std::optional<at::Tensor>& grad_logps, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& saved, double temperature, std::optional<double> softcap,
    double logit_scale, std::int64_t ignore_index, bool need_hidden, bool need_weight, bool need_bias,
    std::int64_t workspace_bytes) {
  const linear_args a = check_linear(hidden, weight, bias, targets, temperature, softcap, logit_scale);
  const std::int64_t N = a.N, H = a.H, V = a.V;
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  TORCH_CHECK_VALUE(saved.scalar_type() == at::kDouble && saved.dim() == 2 && saved.size(1) == N &&
                        saved.size(0) >= 1,
                    "saved must be the float64 [1 or 2, ", N, "] output of linear_logprobs, got ", saved.sizes());
  const auto vec = [&](const std::optional<at::Tensor>& g, const char* name) {
    if (!g.has_value()) return at::Tensor();
    TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == N, name, " must have shape [", N, "], got ", g->sizes());
    return g->to(dbl).contiguous();
  };
  at::Tensor gl = vec(grad_logps, "grad_logps");
  at::Tensor ge = vec(grad_entropy, "grad_entropy");
  if (ge.defined())
    TORCH_CHECK_VALUE(saved.size(0) == 2, "grad_entropy is given but the forward did not compute the entropy");
  if (!gl.defined()) gl = at::zeros({N}, dbl);
  const at::Tensor sv = saved.contiguous();
  need_bias = need_bias && a.bias.defined();
  at::Tensor dh = need_hidden ? at::empty({N, H}, hidden.options().memory_format(at::MemoryFormat::Contiguous))
                              : at::empty({0}, hidden.options());
  const head_grad_tensors hg(weight, V, need_weight, need_bias);
  const auto opt = head_options(workspace_bytes);
  dispatch_head(a.hidden.scalar_type(), a.targets.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    using G = dpo::cpu::acc_t<T>;
    dpo::cpu::linear_grads<T, G> g;
    if (need_hidden) {
      g.hidden = reinterpret_cast<T*>(dh.data_ptr());
      g.hidden_stride = H;
    }
    g.weight = hg.weight_ptr<G>();
    g.weight_stride = H;
    g.bias = hg.bias_ptr<G>();
    const double* ent = ge.defined() ? sv.data_ptr<double>() + N : nullptr;
    run_head([&] {
      dpo::cpu::linear_logps_backward(view_of<T, L>(a, ignore_index), sv.data_ptr<double>(), gl.data_ptr<double>(),
                                      ent, ge.defined() ? ge.data_ptr<double>() : nullptr, g, opt);
    });
  });
  return {dh, hg.weight_result(weight.options()), hg.bias_result(weight.options())};
}

// No CUDA fused head in this binding yet: CUDA tensors get NotImplementedError naming the
// device instead of a silent fallback (or the dispatcher's "could not run" message).
void no_cuda_head(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op.schema().name(), ": the fused LM head has no CUDA kernel in this ",
                              "dpo_kernels build (CPU only for now): move hidden, weight, bias and targets to ",
                              "the CPU, or use TRL's own head on the GPU");
}

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
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("linear_logprobs", &dpo_kernels::linear_logprobs_cpu);
  m.impl("linear_logprobs_backward", &dpo_kernels::linear_logprobs_backward_cpu);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  for (const char* name : {"linear_logprobs", "linear_logprobs_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&dpo_kernels::no_cuda_head>());
}
