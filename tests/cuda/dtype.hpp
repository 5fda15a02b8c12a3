// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The logits types the CUDA tests run (the harness and the block-primitive emulation share
// them). Values stored as them in raw bytes: dtype_bytes.hpp (host-compiled tests only).
#pragma once

#include <cstddef>

namespace dpo_cuda_test {

enum class dtype { bf16, f16, f32, f64 };
inline std::size_t dtype_size(dtype t) { return t == dtype::f64 ? 8 : t == dtype::f32 ? 4 : 2; }

/// One value per dtype (a tolerance, say), chosen by t.
inline double per_dtype(dtype t, double bf16, double f16, double f32, double f64) {
  switch (t) {
    case dtype::bf16: return bf16;
    case dtype::f16: return f16;
    case dtype::f32: return f32;
    case dtype::f64: return f64;
  }
  return 0;
}

}  // namespace dpo_cuda_test
