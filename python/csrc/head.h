// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The checks shared by the fused LM-head operators (linear.cpp, linear_dpo.cpp): a head
// (weight [V, H], optional bias [V]) against its hidden states, and the logit transforms.
#pragma once

#include <ATen/ATen.h>
#include <Eigen/Core>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common.h"
#include "dpo/core/linear_view.hpp"

namespace dpo_kernels {

/// t must have hidden's dtype and device.
inline void check_same(const at::Tensor& t, const at::Tensor& hidden, const char* name, const char* of) {
  TORCH_CHECK_TYPE(t.scalar_type() == hidden.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", of,
                   " has ", hidden.scalar_type(), ": they must match");
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, " is on ", t.device(), " but ", of, " is on ",
                    hidden.device());
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

/// The head of a weight [V, H] (unit element stride) and optional bias [V] (undefined: none).
template <class T>
dpo::linear_head<T> head_of(const at::Tensor& weight, const at::Tensor& bias, const dpo::logit_transforms& tr) {
  return dpo::make_linear_head(reinterpret_cast<const T*>(weight.data_ptr()), weight.size(0), weight.size(1),
                               weight.size(0) > 1 ? weight.stride(0) : weight.size(1),
                               bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr, tr);
}

/// The head's parameter gradients: dWeight [V, H] and dBias [V], zero-filled in the
/// accumulation type (float64 for float64 heads, else float32; undefined when not needed),
/// returned in the weight's dtype.
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

/// Calls fn(T*, L*) with null pointers of the head's element type (hidden's dtype) and the
/// label type.
template <class Fn>
void dispatch_head(at::ScalarType t, at::ScalarType label, Fn&& fn) {
  const auto with_label = [&](auto* tp) { dispatch_label(label, [&](auto* lp) { fn(tp, lp); }); };
  switch (t) {
    case at::kFloat: return with_label(static_cast<float*>(nullptr));
    case at::kDouble: return with_label(static_cast<double*>(nullptr));
    case at::kBFloat16: return with_label(static_cast<Eigen::bfloat16*>(nullptr));
    case at::kHalf: return with_label(static_cast<Eigen::half*>(nullptr));
    default: TORCH_CHECK_TYPE(false, "unsupported hidden dtype ", t);
  }
}

}  // namespace dpo_kernels
