// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's fp16 type (see cuda_runtime.h): IEEE binary16 bits with round-to-
// nearest-even conversions, the subset of <cuda_fp16.h> the library and its tests use.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

namespace dpo_emu {
/// float -> binary16, round to nearest even (NaN stays NaN, overflow gives inf).
inline unsigned short float_to_half_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const auto sign = static_cast<std::uint32_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<unsigned short>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520
  if (x < 0x38800000u) {
    // Below 2^-14: a multiple of 2^-24 (subnormal), found exactly by scaling (a power of
    // two) and rounding with the default round-to-nearest-even mode. 1024 is 2^-14.
    float a;
    std::memcpy(&a, &x, 4);
    return static_cast<unsigned short>(sign | static_cast<std::uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  const std::uint32_t m = x & 0x7fffffu;
  std::uint32_t h = ((((x >> 23) - 127u + 15u) << 10) | (m >> 13));
  const std::uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return static_cast<unsigned short>(sign | h);
}
inline float half_bits_to_float(unsigned short h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  std::uint32_t x;
  if (e == 0) {
    const float a = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    std::memcpy(&x, &a, 4);
    x |= sign;
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e - 15u + 127u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
}  // namespace dpo_emu

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(dpo_emu::float_to_half_bits(f)) {}  // NOLINT: implicit, as CUDA's host conversion
  operator float() const { return dpo_emu::half_bits_to_float(__x); }
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float2 __half22float2(__half2 h) { return {static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
