// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Values stored as a dtype in raw bytes and read back, on the host through Eigen's half and
// bfloat16 (the Catch2 tests compile with g++ and never include CUDA headers).
#pragma once

#include <Eigen/Core>
#include <cstring>
#include <type_traits>

#include "dtype.hpp"

namespace dpo_cuda_test {

/// x stored as E at p, rounded to E (through float unless E is double).
template <class E>
void put(unsigned char* p, double x) {
  if constexpr (std::is_same<E, double>::value) {
    std::memcpy(p, &x, 8);
  } else {
    const E v = static_cast<E>(static_cast<float>(x));
    std::memcpy(static_cast<void*>(p), static_cast<const void*>(&v), sizeof(E));
  }
}

template <class E>
double get(const unsigned char* p) {
  E v;
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(E));
  return static_cast<double>(v);
}

/// x stored as `t` at p (rounded to the type).
inline void put(dtype t, unsigned char* p, double x) {
  switch (t) {
    case dtype::bf16: return put<Eigen::bfloat16>(p, x);
    case dtype::f16: return put<Eigen::half>(p, x);
    case dtype::f32: return put<float>(p, x);
    case dtype::f64: return put<double>(p, x);
  }
}

/// The `t` value at p, as a double (exact).
inline double get(dtype t, const unsigned char* p) {
  switch (t) {
    case dtype::bf16: return get<Eigen::bfloat16>(p);
    case dtype::f16: return get<Eigen::half>(p);
    case dtype::f32: return get<float>(p);
    case dtype::f64: return get<double>(p);
  }
  return 0;
}

/// f(E(), G()) with E the host (Eigen) type of `t` and G its gradient type: float for the
/// 16-bit types when fp32_grads, else E: a CPU reference run for a CUDA case's dtype.
template <class F>
auto with_host_types(dtype t, bool fp32_grads, F&& f) {
  switch (t) {
    case dtype::bf16: return fp32_grads ? f(Eigen::bfloat16(), float()) : f(Eigen::bfloat16(), Eigen::bfloat16());
    case dtype::f16: return fp32_grads ? f(Eigen::half(), float()) : f(Eigen::half(), Eigen::half());
    case dtype::f32: return f(float(), float());
    case dtype::f64: break;
  }
  return f(double(), double());
}

}  // namespace dpo_cuda_test
