// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's fp16 type (see cuda_runtime.h): IEEE binary16 bits with round-to-
// nearest-even conversions (the host's _Float16), the subset of <cuda_fp16.h> the library
// and its tests use.
#pragma once

#include <cstring>

#include "cuda_runtime.h"

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) {  // NOLINT: implicit, as CUDA's host conversion
    const _Float16 h = static_cast<_Float16>(f);
    std::memcpy(&__x, &h, 2);
  }
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &__x, 2);
    return static_cast<float>(h);
  }
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float2 __half22float2(__half2 h) { return {static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
