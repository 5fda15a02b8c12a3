// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA harnesses' device memory: a runtime-call check that throws, and a buffer freed on
// scope exit with its uploads and downloads; the device types of a dtype. Built by nvcc (the device suites) and by the
// host compiler against the emulator (the emulated suites).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtype.hpp"

namespace dpo_cuda_test {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
#define DPO_CK(x) ::dpo_cuda_test::check_cuda((x), #x)

/// `bytes` of device memory (none for 0), freed on scope exit.
struct dev_buf {
  void* p = nullptr;
  std::size_t n = 0;
  explicit dev_buf(std::size_t bytes) : n(bytes) {
    if (bytes > 0) DPO_CK(cudaMalloc(&p, bytes));
  }
  ~dev_buf() {
    if (p) cudaFree(p);
  }
  dev_buf(const dev_buf&) = delete;
  dev_buf& operator=(const dev_buf&) = delete;
  template <class U>
  U* as() const {
    return static_cast<U*>(p);
  }
  /// Copies `bytes` from the host to the buffer's start.
  void put(const void* src, std::size_t bytes) {
    if (bytes > 0) DPO_CK(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice));
  }
  /// Sets every byte.
  void fill(int byte) {
    if (n > 0) DPO_CK(cudaMemset(p, byte, n));
  }
  /// The first `count` values of U, on the host.
  template <class U>
  std::vector<U> get(std::size_t count) const {
    std::vector<U> out(count);
    if (count > 0) DPO_CK(cudaMemcpy(out.data(), p, count * sizeof(U), cudaMemcpyDeviceToHost));
    return out;
  }
};

/// f(T(), G(), L()) with the device element type T of `t`, the gradient accumulation type G
/// (float for bf16 / half with fp32_grads, else T) and the label type L (int64_t or int32_t):
/// the harnesses' type dispatch.
template <class F>
auto with_device_types(dtype t, bool fp32_grads, bool labels64, F&& f) {
  const auto labels = [&](auto tv, auto gv) {
    return labels64 ? f(tv, gv, std::int64_t()) : f(tv, gv, std::int32_t());
  };
  switch (t) {
    case dtype::bf16: return fp32_grads ? labels(__nv_bfloat16(), float()) : labels(__nv_bfloat16(), __nv_bfloat16());
    case dtype::f16: return fp32_grads ? labels(__half(), float()) : labels(__half(), __half());
    case dtype::f32: return labels(float(), float());
    case dtype::f64: break;
  }
  return labels(double(), double());
}

}  // namespace dpo_cuda_test
