// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The per-logit transforms of current LM heads, shared by the CPU and CUDA fused heads:
// a logit scale, a final-logit soft cap and a temperature, applied in that order (TRL's):
//
//   o(u) = softcap(s * u) / t,       softcap(x) = c * tanh(x / c)   (identity when c = 0)
//   do/du = s * sech^2(s * u / c) / t                                (s / t without a cap)
//
// u is the raw logit (hidden . weight_v + bias_v). sech^2 is formed as 1 / cosh^2, not as
// 1 - tanh^2, which would lose every digit where the cap saturates (tanh -> 1); cosh
// overflowing to inf gives the limit 0. Nothing here allocates, throws or depends on Eigen.
#pragma once

#include <cmath>

#include "dpo/core/math.hpp"

namespace dpo {

/// The transforms of a head's logits. Every field must be finite and > 0, except
/// `softcap`, where 0 means no cap. The defaults are the identity.
struct logit_transforms {
  double scale = 1.0;        // s: multiplies the raw logit first (e.g. Cohere's logit_scale)
  double softcap = 0.0;      // c: c * tanh(x / c) (Gemma 2's final_logit_softcapping), 0 = none
  double temperature = 1.0;  // t: divides last (TRL's `temperature`)

  DPO_HOST_DEVICE bool identity() const {
    return scale == 1.0 && softcap == 0.0 && temperature == 1.0;
  }
};

namespace detail {

/// Whether a transform field holds a valid value: finite and > 0 (NaN fails).
DPO_HOST_DEVICE inline bool valid_transform_value(double v) { return v > 0.0 && v < INFINITY; }

/// The first invalid field of `t` ("scale", "softcap", "temperature") with its value, or
/// null when all are valid. A softcap of exactly 0 (no cap) is valid.
DPO_HOST_DEVICE inline const char* invalid_transform(const logit_transforms& t, double* value) {
  if (!valid_transform_value(t.scale)) {
    *value = t.scale;
    return "scale";
  }
  if (t.softcap != 0.0 && !valid_transform_value(t.softcap)) {
    *value = t.softcap;
    return "softcap";
  }
  if (!valid_transform_value(t.temperature)) {
    *value = t.temperature;
    return "temperature";
  }
  return nullptr;
}

/// logit_transforms in the accumulation type A of a kernel, with the cap flag hoisted.
template <class A>
struct transform_params {
  A scale;
  A cap;
  A temperature;
  bool has_cap;
  bool identity;

  DPO_HOST_DEVICE explicit transform_params(const logit_transforms& t)
      : scale(static_cast<A>(t.scale)),
        cap(static_cast<A>(t.softcap)),
        temperature(static_cast<A>(t.temperature)),
        has_cap(t.softcap != 0.0),
        identity(t.identity()) {}
};

/// o(u): scale, then soft cap, then temperature, each rounded in A in that order.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A transform_logit(const transform_params<A>& p, A u) {
  using std::tanh;
  A x = u * p.scale;
  if (p.has_cap) x = p.cap * tanh(x / p.cap);
  return x / p.temperature;
}

/// do/du at the raw logit u: s * sech^2(s u / c) / t, or s / t without a cap.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A transform_logit_grad(const transform_params<A>& p, A u) {
  using std::cosh;
  if (!p.has_cap) return p.scale / p.temperature;
  const A ch = cosh((u * p.scale) / p.cap);
  return p.scale / (ch * ch) / p.temperature;
}

}  // namespace detail
}  // namespace dpo
