// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU side of head.h: Eigen's 16-bit element types for the fused-head kernels of
// linear.cpp and linear_dpo.cpp (head.h itself stays free of Eigen, for nvcc).
#pragma once

#include <Eigen/Core>
#include <utility>

#include "head.h"

namespace dpo_kernels {

/// The 16-bit element types of the CPU head (dispatch_head).
struct cpu_head_types {
  using bf16 = Eigen::bfloat16;
  using f16 = Eigen::half;
};

/// Calls fn(T*, L*) for the CPU head's element type of `t` and the label type.
template <class Fn>
void dispatch_cpu(at::ScalarType t, at::ScalarType label, Fn&& fn) {
  dispatch_head<cpu_head_types>(t, label, std::forward<Fn>(fn));
}

}  // namespace dpo_kernels
