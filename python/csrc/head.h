// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the CPU and CUDA kernels of the fused LM-head operators share (linear.cpp,
// linear_dpo.cpp, cuda_linear.cu): the checks of a head (weight [V, H], optional bias [V])
// against its hidden states, the logit transforms, the inputs lowered to the core's views
// (dpo/core/linear_view.hpp, the same structs on both backends) and the output tensors.
// Nothing here reads tensor data on the host: a backend that can (the CPU) adds its own checks
// of device data (cu_seqlens), the CUDA backend leaves them to the kernels' error word.
// No Eigen and no CUDA here: each backend names its 16-bit element types (dispatch_head).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "forward_outputs.h"
#include "dpo/core/linear_view.hpp"
#include "dpo/core/shard.hpp"

namespace dpo_kernels {

/// t must have hidden's dtype and device.
inline void check_same(const at::Tensor& t, const at::Tensor& hidden, const char* name, const char* of) {
  TORCH_CHECK_TYPE(t.scalar_type() == hidden.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", of,
                   " has ", hidden.scalar_type(), ": they must match");
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, " is on ", t.device(), " but ", of, " is on ",
                    hidden.device());
}

/// The kernel of backend `type` (CPU, CUDA) runs only on tensors of that device type.
inline void check_backend(const at::Tensor& hidden, const char* name, c10::DeviceType type) {
  TORCH_CHECK_VALUE(hidden.device().type() == type, name, " is on ", hidden.device(), ": this kernel is the ",
                    c10::DeviceTypeName(type), " one");
}

/// What the NotImplementedError of an op without a CUDA kernel says about this build (every
/// fused-head op has one in a CUDA build).
inline const char* cuda_note() {
  return "built without CUDA: rebuild with DPO_KERNELS_CUDA=1 where nvcc and a CUDA build of torch are present";
}

/// A head (weight [V, H], optional bias [V]) checked against hidden's dtype, device and size.
inline void check_head_tensors(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& hidden, const char* wname, const char* bname, const char* hname) {
  TORCH_CHECK_VALUE(weight.dim() == 2, wname, " must be 2-D [V, H], got shape ", weight.sizes());
  check_same(weight, hidden, wname, hname);
  TORCH_CHECK_VALUE(weight.size(0) >= 1, wname, " has an empty vocabulary: shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(-1), wname, " has hidden size ", weight.size(1), " (shape ",
                    weight.sizes(), ") but ", hname, " has ", hidden.size(-1), " (shape ", hidden.sizes(), ")");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), bname, " must have shape [",
                      weight.size(0), "] to match ", wname, " ", weight.sizes(), ", got ", bias->sizes());
    check_same(*bias, hidden, bname, hname);
  }
}

/// TRL's per-row logit transforms (scale, then soft cap, then temperature), checked.
inline dpo::logit_transforms checked_transforms(double temperature, std::optional<double> softcap,
                                                double logit_scale) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature = ", temperature,
                    " is invalid: must be finite and > 0");
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0, "logit_scale = ", logit_scale,
                    " is invalid: must be finite and > 0");
  TORCH_CHECK_VALUE(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0), "softcap = ",
                    softcap.value_or(0.0), " is invalid: must be finite and > 0, or None for no cap");
  dpo::logit_transforms tr;
  tr.scale = logit_scale;
  tr.softcap = softcap.value_or(0.0);
  tr.temperature = temperature;
  return tr;
}

/// The head of a weight [V, H] (unit element stride) and optional bias [V] (undefined: none);
/// T is the backend's element type of their dtype.
template <class T>
dpo::linear_head<T> head_of(const at::Tensor& weight, const at::Tensor& bias, const dpo::logit_transforms& tr) {
  return dpo::make_linear_head(reinterpret_cast<const T*>(weight.data_ptr()), weight.size(0), weight.size(1),
                               weight.size(0) > 1 ? weight.stride(0) : weight.size(1),
                               bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr, tr);
}

/// The head's parameter gradients: dWeight [V, H] and dBias [V], zero-filled in the
/// accumulation type (float64 for float64 heads, else float32; undefined when not needed) on
/// the weight's device, returned in the weight's dtype.
struct head_grad_tensors {
  at::Tensor weight, bias;
  at::ScalarType dtype;

  head_grad_tensors(const at::Tensor& w, std::int64_t V, bool need_weight, bool need_bias) : dtype(w.scalar_type()) {
    const auto opts = w.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
    if (need_weight) weight = at::zeros({V, w.size(1)}, opts);
    if (need_bias) bias = at::zeros({V}, opts);
  }
  /// Where the library adds them (null: not needed).
  template <class G>
  G* weight_ptr() const {
    return weight.defined() ? reinterpret_cast<G*>(weight.data_ptr()) : nullptr;
  }
  template <class G>
  G* bias_ptr() const {
    return bias.defined() ? reinterpret_cast<G*>(bias.data_ptr()) : nullptr;
  }
  /// The op's outputs: in the weight's dtype, or empty when not needed.
  at::Tensor weight_result(const at::TensorOptions& empty) const {
    return weight.defined() ? weight.to(dtype) : at::empty({0}, empty);
  }
  at::Tensor bias_result(const at::TensorOptions& empty) const {
    return bias.defined() ? bias.to(dtype) : at::empty({0}, empty);
  }
};

/// Calls fn(T*, L*) with null pointers of the head's element type (hidden's dtype: float,
/// double, Types::bf16 or Types::f16, the backend's 16-bit types) and the label type.
template <class Types, class Fn>
void dispatch_head(at::ScalarType t, at::ScalarType label, Fn&& fn) {
  const auto with_label = [&](auto* tp) { dispatch_label(label, [&](auto* lp) { fn(tp, lp); }); };
  switch (t) {
    case at::kFloat: return with_label(static_cast<float*>(nullptr));
    case at::kDouble: return with_label(static_cast<double*>(nullptr));
    case at::kBFloat16: return with_label(static_cast<typename Types::bf16*>(nullptr));
    case at::kHalf: return with_label(static_cast<typename Types::f16*>(nullptr));
    default: TORCH_CHECK_TYPE(false, "unsupported hidden dtype ", t);
  }
}

// ---- linear_logprobs / linear_logprobs_backward -------------------------------------------------

/// A backend's kernel of linear_logprobs (schema in linear.cpp): (log_probs, entropy,
/// log_sum_sq_probs, mean_logits, is_top1, saved), see logprobs_tensors.
#define DPO_LINEAR_LOGPROBS_KERNEL(NAME)                                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> NAME(                     \
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,              \
      const at::Tensor& targets, double temperature, std::optional<double> softcap, double logit_scale,       \
      bool entropy, bool log_sum_sq_probs, bool mean_logits, bool is_top1, std::int64_t ignore_index,         \
      std::int64_t workspace_bytes)

/// A backend's kernel of linear_logprobs_backward (schema in linear.cpp): (dHidden, dWeight,
/// dBias), see head_backward_tensors.
#define DPO_LINEAR_LOGPROBS_BACKWARD_KERNEL(NAME)                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME(                                                         \
      const std::optional<at::Tensor>& grad_logps, const std::optional<at::Tensor>& grad_entropy,             \
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,              \
      const at::Tensor& targets, const at::Tensor& saved, double temperature, std::optional<double> softcap,  \
      double logit_scale, std::int64_t ignore_index, bool need_hidden, bool need_weight, bool need_bias,       \
      std::int64_t workspace_bytes)

/// The validated inputs of a linear-head call, lowered to unit-stride rows.
struct linear_args {
  at::Tensor hidden, weight, bias, targets;
  std::int64_t N = 0, H = 0, V = 0;
  dpo::logit_transforms tr;
};

/// t itself when its rows are usable in place (the head reads rows with a stride, elements
/// with unit stride), else a contiguous copy.
inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return t.stride(-1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

/// The checks of linear_logprobs' arguments (TypeError / ValueError naming the argument), for
/// the kernel of backend `type`.
inline linear_args check_linear(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& targets, double temperature,
                                std::optional<double> softcap, double logit_scale, c10::DeviceType type) {
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
  check_backend(hidden, "hidden", type);
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

/// The core's linear_view of checked arguments (T, L: the backend's element and label types).
template <class T, class L>
dpo::linear_view<T, L> view_of(const linear_args& a, std::int64_t ignore_index) {
  return dpo::linear_view_of(reinterpret_cast<const T*>(a.hidden.data_ptr()), a.N,
                             a.N > 1 ? a.hidden.stride(0) : a.H, head_of<T>(a.weight, a.bias, a.tr),
                             a.targets.data_ptr<L>(), nullptr, ignore_index);
}

/// A ValueError with the library's message in the op's names: its `labels` are `targets`.
[[noreturn]] inline void throw_head_error(std::string msg) {
  for (std::size_t at = msg.find("labels"); at != std::string::npos; at = msg.find("labels", at))
    msg.replace(at, 6, "targets");
  TORCH_CHECK_VALUE(false, msg);
  throw std::logic_error("unreachable");
}

/// The workspace budget's check (linear_logprobs' ops accept 0: the library's minimum).
inline void check_budget(std::int64_t workspace_bytes, std::int64_t least) {
  TORCH_CHECK_VALUE(workspace_bytes >= least, "workspace_bytes = ", workspace_bytes, " is invalid: must be >= ",
                    least);
}

/// linear_logprobs' outputs on hidden's device, float64 until returned: saved ([1 or 2, N]:
/// the rows' log-sum-exp, then the entropy when requested; what the backward reads), the
/// log-probs, and the requested extras ([0] when not requested; is_top1 bool). `nan`: start
/// the float64 ones at NaN (the CUDA kernels write nothing when the device finds a bad label).
struct logprobs_tensors {
  at::Tensor saved, logps, lssp, mean, top1;
  std::int64_t N;
  bool entropy;

  logprobs_tensors(const at::Tensor& hidden, bool entropy, bool log_sum_sq_probs, bool mean_logits, bool is_top1,
                   bool nan)
      : N(hidden.size(0)), entropy(entropy) {
    const auto dbl = hidden.options().dtype(at::kDouble);
    const auto make = [&](std::int64_t rows, std::int64_t n) {
      return nan ? at::full({rows, n}, std::numeric_limits<double>::quiet_NaN(), dbl) : at::empty({rows, n}, dbl);
    };
    saved = make(entropy ? 2 : 1, N);
    logps = make(1, N).view({N});
    lssp = make(1, log_sum_sq_probs ? N : 0).view({-1});
    mean = make(1, mean_logits ? N : 0).view({-1});
    top1 = at::zeros({is_top1 ? N : 0}, hidden.options().dtype(at::kBool));
  }
  double* entropy_ptr() const { return entropy ? saved.data_ptr<double>() + N : nullptr; }
  static double* ptr(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr<double>() : nullptr; }

  /// The library's optional outputs (both backends' linear_logps) in these tensors.
  dpo::linear_outputs outputs() const {
    static_assert(sizeof(bool) == sizeof(std::uint8_t), "bool tensors are bytes");
    dpo::linear_outputs x;
    x.entropy = entropy_ptr();
    x.log_sum_sq_probs = ptr(lssp);
    x.mean_logits = ptr(mean);
    if (top1.numel() > 0) x.is_top1 = reinterpret_cast<std::uint8_t*>(top1.data_ptr<bool>());
    return x;
  }

  /// (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, saved) as the op returns
  /// them: float32 (float64 for float64 hidden), [0] when not requested.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> results(
      const at::Tensor& hidden) const {
    const auto out = result_dtype(hidden.scalar_type());
    const auto empty = at::empty({0}, hidden.options().dtype(out));
    return {logps.to(out), entropy ? saved[1].to(out, /*non_blocking=*/false, /*copy=*/true) : empty, lssp.to(out),
            mean.to(out), top1, saved};
  }
};

/// linear_logprobs_backward's `saved`, checked against the forward's shape and device.
inline at::Tensor checked_saved(const at::Tensor& saved, const linear_args& a, bool grad_entropy) {
  TORCH_CHECK_VALUE(saved.scalar_type() == at::kDouble && saved.dim() == 2 && saved.size(1) == a.N &&
                        saved.size(0) >= 1,
                    "saved must be the float64 [1 or 2, ", a.N, "] output of linear_logprobs, got ", saved.sizes());
  TORCH_CHECK_VALUE(saved.device() == a.hidden.device(), "saved is on ", saved.device(), " but hidden is on ",
                    a.hidden.device());
  if (grad_entropy)
    TORCH_CHECK_VALUE(saved.size(0) == 2, "grad_entropy is given but the forward did not compute the entropy");
  return saved.contiguous();
}

/// The backward's shared part: the upstream gradients as float64 [N] on hidden's device
/// (grad_logps zeros when absent, grad_entropy undefined when absent) and the gradient
/// buffers: dHidden [N, H] in hidden's dtype (`zero_hidden`: zero-filled, for a backend that
/// may leave rows unwritten) and the head's (head_grad_tensors).
struct head_backward_tensors {
  at::Tensor gl, ge, dh;
  head_grad_tensors head;
  std::int64_t H;
  bool need_hidden;

  head_backward_tensors(const linear_args& a, const at::Tensor& weight, const std::optional<at::Tensor>& grad_logps,
                        const std::optional<at::Tensor>& grad_entropy, bool need_hidden, bool need_weight,
                        bool need_bias, bool zero_hidden)
      : head(weight, a.V, need_weight, need_bias && a.bias.defined()), H(a.H), need_hidden(need_hidden) {
    const auto dbl = a.hidden.options().dtype(at::kDouble);
    const auto vec = [&](const std::optional<at::Tensor>& g, const char* name) {
      if (!g.has_value()) return at::Tensor();
      TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == a.N, name, " must have shape [", a.N, "], got ", g->sizes());
      TORCH_CHECK_VALUE(g->device() == a.hidden.device(), name, " is on ", g->device(), " but hidden is on ",
                        a.hidden.device());
      return g->to(at::kDouble).contiguous();
    };
    gl = vec(grad_logps, "grad_logps");
    ge = vec(grad_entropy, "grad_entropy");
    if (!gl.defined()) gl = at::zeros({a.N}, dbl);
    const auto hopts = a.hidden.options().memory_format(at::MemoryFormat::Contiguous);
    if (!need_hidden)
      dh = at::empty({0}, a.hidden.options());
    else
      dh = zero_hidden ? at::zeros({a.N, a.H}, hopts) : at::empty({a.N, a.H}, hopts);
  }
  const double* grad_entropy() const { return ge.defined() ? ge.data_ptr<double>() : nullptr; }

  /// The core's gradient targets (T, G: the backend's element and accumulation types).
  template <class T, class G>
  dpo::linear_grads<T, G> grads() const {
    dpo::linear_grads<T, G> g;
    if (need_hidden) {
      g.hidden = reinterpret_cast<T*>(dh.data_ptr());
      g.hidden_stride = H;
    }
    g.weight = head.weight_ptr<G>();
    g.weight_stride = H;
    g.bias = head.bias_ptr<G>();
    return g;
  }
  /// (dHidden, dWeight, dBias), each [0] when not needed; dWeight / dBias rounded once.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> results(const at::Tensor& weight) const {
    return {dh, head.weight_result(weight.options()), head.bias_result(weight.options())};
  }
};

// ---- linear_dpo ---------------------------------------------------------------------------------

/// hidden ([2P, T, H] with labels [2P, T], or [N, H] with labels [N] and cu_seqlens [2P + 1])
/// lowered to contiguous rows; num_seqs = 2P.
struct hidden_layout {
  at::Tensor hidden, labels, cu;
  std::int64_t rows = 0, H = 0, num_seqs = 0, seq_len = 0;
  bool packed = false;
};

/// Checks and lowers hidden / labels / cu_seqlens (shapes, dtypes, devices). cu_seqlens'
/// values are checked here only when it is on the CPU (a CUDA kernel never reads device data
/// on the host: the library's kernels check it, options.num_rows = rows bounding it).
inline hidden_layout lower_hidden(const at::Tensor& hidden, const at::Tensor& labels,
                                  const std::optional<at::Tensor>& cu_seqlens, const char* name) {
  TORCH_CHECK_TYPE(is_floating(hidden.scalar_type()), name, " must be float32, float64, bfloat16 or float16, got ",
                   hidden.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == hidden.device(), "labels is on ", labels.device(), " but ", name, " is on ",
                    hidden.device());
  hidden_layout l;
  l.packed = cu_seqlens.has_value();
  if (l.packed) {
    TORCH_CHECK_VALUE(hidden.dim() == 2, name, " must be 2-D [N, H] with cu_seqlens, got shape ", hidden.sizes());
    TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must have shape [",
                      hidden.size(0), "] to match ", name, " ", hidden.sizes(), ", got ", labels.sizes());
    const at::Tensor& c = *cu_seqlens;
    TORCH_CHECK_TYPE(c.scalar_type() == at::kLong || c.scalar_type() == at::kInt,
                     "cu_seqlens must be int64 or int32, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) >= 1, "cu_seqlens must be 1-D [S + 1], got shape ", c.sizes());
    TORCH_CHECK_VALUE(c.device() == hidden.device(), "cu_seqlens is on ", c.device(), " but ", name, " is on ",
                      hidden.device());
    l.cu = c.to(at::kLong).contiguous();
    l.num_seqs = c.size(0) - 1;
    l.rows = hidden.size(0);
    if (l.cu.device().is_cpu()) {
      const std::int64_t* cu = l.cu.data_ptr<std::int64_t>();
      TORCH_CHECK_VALUE(cu[0] >= 0, "cu_seqlens[0] = ", cu[0], " is invalid: must be >= 0");
      for (std::int64_t s = 0; s < l.num_seqs; ++s)
        TORCH_CHECK_VALUE(cu[s + 1] >= cu[s], "cu_seqlens must be non-decreasing: cu_seqlens[", s + 1, "] = ",
                          cu[s + 1], " < cu_seqlens[", s, "] = ", cu[s]);
      TORCH_CHECK_VALUE(cu[l.num_seqs] <= l.rows, "cu_seqlens[", l.num_seqs, "] = ", cu[l.num_seqs],
                        " is past the ", l.rows, " rows of ", name);
    }
  } else {
    TORCH_CHECK_VALUE(hidden.dim() == 3, name, " must be 3-D [2P, T, H] (or 2-D [N, H] with cu_seqlens), got shape ",
                      hidden.sizes());
    TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == hidden.size(0) && labels.size(1) == hidden.size(1),
                      "labels must have shape [", hidden.size(0), ", ", hidden.size(1), "] to match ", name, " ",
                      hidden.sizes(), ", got ", labels.sizes());
    l.num_seqs = hidden.size(0);
    l.seq_len = hidden.size(1);
    l.rows = l.num_seqs * l.seq_len;
  }
  l.H = hidden.size(-1);
  TORCH_CHECK_VALUE(l.H >= 1, name, " has hidden size 0: shape ", hidden.sizes());
  TORCH_CHECK_VALUE(l.num_seqs >= 2 && l.num_seqs % 2 == 0, name, " must hold an even number 2P >= 2 of sequences ",
                    "(chosen then rejected), got ", l.num_seqs);
  l.hidden = hidden.reshape({l.rows, l.H}).contiguous();
  l.labels = labels.reshape({l.rows}).contiguous();
  return l;
}

/// The core's pairs of a layout (TRL's concatenated order; T, L: the backend's types).
template <class T, class L>
dpo::hidden_pairs<T, L> pairs_of(const hidden_layout& l, std::int64_t ignore_index) {
  const auto* h = reinterpret_cast<const T*>(l.hidden.data_ptr());
  if (!l.packed)
    return dpo::linear_padded_pairs<T, L>(h, l.H, l.H, l.labels.data_ptr<L>(), l.num_seqs, l.seq_len, nullptr,
                                          ignore_index);
  return dpo::linear_packed_pairs<T, L>(h, l.H, l.H, l.labels.data_ptr<L>(), l.cu.data_ptr<std::int64_t>(),
                                        l.num_seqs, nullptr, ignore_index);
}

/// A per-pair float64 vector argument ([P], hidden's device), undefined when absent.
inline at::Tensor pair_vector(const std::optional<at::Tensor>& t, std::int64_t P, const at::Tensor& hidden,
                              const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK_TYPE(is_floating(t->scalar_type()), name, " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == P, name, " must have shape [", P, "] (one per pair), got ",
                    t->sizes());
  TORCH_CHECK_VALUE(t->device() == hidden.device(), name, " is on ", t->device(), " but hidden is on ",
                    hidden.device());
  return t->to(at::kDouble).contiguous();
}

inline const double* doubles(const at::Tensor& t) { return t.defined() ? t.data_ptr<double>() : nullptr; }

/// The gradient outputs of the DPO-from-hidden ops: dHidden [rows, H] in hidden's dtype (one
/// zero-filled buffer for both sides; [0] when not needed) and the head's (head_grad_tensors).
struct grad_tensors {
  at::Tensor dh;
  head_grad_tensors head;
  std::int64_t H = 0;
  bool need_hidden = false;

  grad_tensors(const hidden_layout& l, const at::Tensor& hidden, const at::Tensor& w, const at::Tensor& b,
               bool need_hidden, bool need_weight, bool need_bias)
      : dh(need_hidden ? at::zeros({l.rows, l.H}, hidden.options()) : at::empty({0}, hidden.options())),
        head(w, w.size(0), need_weight, need_bias && b.defined()),
        H(l.H),
        need_hidden(need_hidden) {}

  template <class T, class G>
  dpo::linear_dpo_grads<T, G> grads() const {
    dpo::linear_dpo_grads<T, G> g;
    if (need_hidden) {
      g.chosen_hidden = g.rejected_hidden = reinterpret_cast<T*>(dh.data_ptr());
      g.chosen_hidden_stride = g.rejected_hidden_stride = H;
    }
    g.weight = head.weight_ptr<G>();
    g.weight_stride = H;
    g.bias = head.bias_ptr<G>();
    return g;
  }

  /// dHidden in hidden's shape (when needed), dWeight / dBias rounded once to weight's dtype.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(const at::Tensor& hidden, const at::Tensor& w) const {
    return {need_hidden ? dh.reshape(hidden.sizes()) : dh, head.weight_result(w.options()),
            head.bias_result(w.options())};
  }

  /// linear_dpo's outputs: (loss, metrics, pair values) of `t` in the result dtype (float32;
  /// float64 for float64 hidden), then result().
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_dpo_results(
      const pair_result_tensors& t, const at::Tensor& hidden, const at::Tensor& w) const {
    const auto res = result_dtype(hidden.scalar_type());
    const auto [dh, dw, db] = result(hidden, w);
    return {t.loss.to(res), t.metrics.to(res), t.pairs.to(res), dh, dw, db};
  }
};

/// The transforms (checked_transforms) and the workspace budget's check.
inline dpo::logit_transforms transforms_of(double temperature, std::optional<double> softcap, double logit_scale,
                                           std::int64_t workspace_bytes) {
  check_budget(workspace_bytes, 1);
  return checked_transforms(temperature, softcap, logit_scale);
}

/// linear_dpo's parameters (schema in linear_dpo.cpp), the same names as arguments, and a
/// backend's kernel: (loss, metrics, pair values, dHidden, dWeight, dBias).
#define DPO_LINEAR_DPO_PARAMS                                                                                 \
  const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,                  \
      const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens,                                  \
      const std::optional<at::Tensor>& reference_chosen_logps,                                                \
      const std::optional<at::Tensor>& reference_rejected_logps, const std::optional<at::Tensor>& ref_hidden, \
      const std::optional<at::Tensor>& ref_weight, const std::optional<at::Tensor>& ref_bias,                 \
      double temperature, std::optional<double> softcap, double logit_scale, std::int64_t ignore_index,       \
      DPO_CONFIG_PARAMS, bool compute_metrics, bool need_hidden, bool need_weight, bool need_bias,            \
      std::int64_t workspace_bytes
#define DPO_LINEAR_DPO_ARGS                                                                                   \
  hidden, weight, bias, labels, cu_seqlens, reference_chosen_logps, reference_rejected_logps, ref_hidden,    \
      ref_weight, ref_bias, temperature, softcap, logit_scale, ignore_index, DPO_CONFIG_ARGS, compute_metrics, \
      need_hidden, need_weight, need_bias, workspace_bytes
#define DPO_LINEAR_DPO_KERNEL(NAME) \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> NAME(DPO_LINEAR_DPO_PARAMS)

/// linear_dpo's inputs, checked and lowered for the kernel of backend `type`: the loss
/// configuration, the policy's layout and head, the reference (log-probs as float64 [P], or
/// hidden states through a head: ref_weight / ref_bias, else the policy's), the transforms.
struct linear_dpo_inputs {
  dpo::loss_config cfg;
  hidden_layout l, rl;
  at::Tensor w, b, rw, rb, rc, rr;
  dpo::logit_transforms tr;
  std::int64_t P = 0;
  bool has_ref_hidden = false;

  linear_dpo_inputs(c10::DeviceType type, DPO_LINEAR_DPO_PARAMS) {
    check_backend(hidden, "hidden", type);
    cfg = make_config(DPO_CONFIG_ARGS);
    has_ref_hidden = ref_hidden.has_value();
    check_references(cfg, reference_chosen_logps.has_value() || has_ref_hidden,
                     reference_rejected_logps.has_value() || has_ref_hidden);
    TORCH_CHECK_VALUE(
        !(has_ref_hidden && (reference_chosen_logps.has_value() || reference_rejected_logps.has_value())),
        "give either ref_hidden or reference_chosen_logps / reference_rejected_logps, not both");
    TORCH_CHECK_VALUE(has_ref_hidden || (!ref_weight.has_value() && !ref_bias.has_value()),
                      "ref_weight / ref_bias are given without ref_hidden");
    // Without ref_weight the reference head is the policy's, weight and bias; a ref_bias alone
    // would be ignored (with ref_weight, a missing ref_bias means none, as in Liger).
    TORCH_CHECK_VALUE(ref_weight.has_value() || !ref_bias.has_value(),
                      "ref_bias is given without ref_weight: the reference head is the policy's (weight and bias) "
                      "when ref_weight is None; pass the reference head's ref_weight too");
    l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
    check_head_tensors(weight, bias, hidden, "weight", "bias", "hidden");
    tr = transforms_of(temperature, softcap, logit_scale, workspace_bytes);
    P = l.num_seqs / 2;
    rc = pair_vector(reference_chosen_logps, P, hidden, "reference_chosen_logps");
    rr = pair_vector(reference_rejected_logps, P, hidden, "reference_rejected_logps");
    if (has_ref_hidden) {
      check_same(*ref_hidden, hidden, "ref_hidden", "hidden");
      TORCH_CHECK_VALUE(ref_hidden->sizes() == hidden.sizes(), "ref_hidden must have hidden's shape ",
                        hidden.sizes(), ", got ", ref_hidden->sizes());
      rl = lower_hidden(*ref_hidden, labels, cu_seqlens, "ref_hidden");
      rw = ref_weight.has_value() ? *ref_weight : weight;
      const std::optional<at::Tensor> rbias = ref_weight.has_value() ? ref_bias : bias;
      check_head_tensors(rw, rbias, hidden, ref_weight.has_value() ? "ref_weight" : "weight",
                         ref_weight.has_value() ? "ref_bias" : "bias", "hidden");
      TORCH_CHECK_VALUE(rw.size(0) == weight.size(0), "ref_weight has vocabulary ", rw.size(0), " but weight has ",
                        weight.size(0), ": they must match");
      rw = rw.contiguous();
      if (rbias.has_value()) rb = rbias->contiguous();
    }
    w = weight.contiguous();
    if (bias.has_value()) b = bias->contiguous();
  }
};

// ---- the head on a vocabulary shard (schemas and CPU kernels: linear.cpp, linear_dpo.cpp; CUDA
// kernels: cuda_linear_shard.cu; docs/distributed.md) --------------------------------------------
// weight / bias hold rows [vocab_start, vocab_start + V_local) of a head of vocab_size rows;
// targets / labels are global ids.

/// A backend's kernel of linear_shard_partials: (row_max [N], records [N, shard_fields]).
#define DPO_LINEAR_SHARD_PARTIALS_KERNEL(NAME)                                                                 \
  std::tuple<at::Tensor, at::Tensor> NAME(                                                                     \
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,              \
      const at::Tensor& targets, double temperature, std::optional<double> softcap, double logit_scale,       \
      std::int64_t ignore_index, std::int64_t vocab_start, std::int64_t vocab_size, bool metrics,              \
      std::int64_t workspace_bytes)

/// A backend's kernel of linear_shard_values: (log_probs, entropy, log_sum_sq_probs,
/// mean_logits, is_top1), float64 ([0] when not requested; is_top1 bool).
#define DPO_LINEAR_SHARD_VALUES_KERNEL(NAME)                                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> NAME(                                 \
      const at::Tensor& row_max, const at::Tensor& records, const at::Tensor& targets, std::int64_t ignore_index, \
      std::int64_t vocab_size, bool entropy, bool log_sum_sq_probs, bool mean_logits, bool is_top1)

/// A backend's kernel of linear_shard_backward: (dHidden PARTIAL, dWeight rows, dBias rows).
#define DPO_LINEAR_SHARD_BACKWARD_KERNEL(NAME)                                                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME(                                                         \
      const std::optional<at::Tensor>& grad_logps, const std::optional<at::Tensor>& grad_entropy,             \
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,              \
      const at::Tensor& targets, const at::Tensor& row_max, const at::Tensor& records,                        \
      const std::optional<at::Tensor>& entropy, double temperature, std::optional<double> softcap,            \
      double logit_scale, std::int64_t ignore_index, std::int64_t vocab_start, std::int64_t vocab_size,        \
      bool need_hidden, bool need_weight, bool need_bias, std::int64_t workspace_bytes)

/// A backend's kernel of linear_dpo_shard_partials: (row_max [R], records [R, shard_fields]),
/// indexed by hidden's rows, one array for both sides.
#define DPO_LINEAR_DPO_SHARD_PARTIALS_KERNEL(NAME)                                                             \
  std::tuple<at::Tensor, at::Tensor> NAME(                                                                     \
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,              \
      const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens, double temperature,              \
      std::optional<double> softcap, double logit_scale, std::int64_t ignore_index, std::int64_t vocab_start, \
      std::int64_t vocab_size, bool metrics, std::int64_t workspace_bytes)

/// A backend's kernel of linear_dpo_shard_sequences: the [seq_fields, 2P] sequence sums.
#define DPO_LINEAR_DPO_SHARD_SEQUENCES_KERNEL(NAME)                                                            \
  at::Tensor NAME(const at::Tensor& hidden, const at::Tensor& labels, const std::optional<at::Tensor>& cu_seqlens, \
                  const at::Tensor& row_max, const at::Tensor& records, std::int64_t ignore_index,            \
                  std::int64_t vocab_start, std::int64_t vocab_end, std::int64_t vocab_size, double ld_alpha, \
                  bool metrics)

/// A backend's kernel of linear_dpo_shard_backward: (dHidden PARTIAL, dWeight rows, dBias rows).
#define DPO_LINEAR_DPO_SHARD_BACKWARD_KERNEL(NAME)                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> NAME(                                                         \
      const at::Tensor& seq_grad, const at::Tensor& nll_token_grad, const at::Tensor& hidden,                 \
      const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& labels,              \
      const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_max, const at::Tensor& records,      \
      double temperature, std::optional<double> softcap, double logit_scale, std::int64_t ignore_index,       \
      std::int64_t vocab_start, std::int64_t vocab_size, double ld_alpha, bool need_hidden, bool need_weight,  \
      bool need_bias, std::int64_t workspace_bytes)

/// The checked inputs of a sharded pair call: layout, head tensors, transforms, the shard.
struct shard_call {
  hidden_layout l;
  at::Tensor w, b;
  dpo::logit_transforms tr;
  dpo::vocab_shard sh;
};

/// linear_dpo_shard_partials' / _backward's inputs, checked and lowered for the kernel of
/// backend `type`.
inline shard_call shard_inputs(c10::DeviceType type, const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                               const std::optional<at::Tensor>& cu_seqlens, double temperature,
                               std::optional<double> softcap, double logit_scale, std::int64_t vocab_start,
                               std::int64_t vocab_size, std::int64_t workspace_bytes) {
  check_backend(hidden, "hidden", type);
  shard_call c;
  c.l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
  check_head_tensors(weight, bias, hidden, "weight", "bias", "hidden");
  c.tr = transforms_of(temperature, softcap, logit_scale, workspace_bytes);
  c.w = weight.contiguous();
  if (bias.has_value()) c.b = bias->contiguous();
  c.sh = {vocab_size, vocab_start, vocab_start + weight.size(0)};
  return c;
}

/// linear_dpo_shard_backward's seq_grad [2P] and nll_token_grad (one value), checked.
inline void check_seq_grads(const at::Tensor& seq_grad, const at::Tensor& nll_token_grad, const hidden_layout& l) {
  check_seq_grad_shapes(seq_grad, nll_token_grad, l.num_seqs);
}

}  // namespace dpo_kernels
