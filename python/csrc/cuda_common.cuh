// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the CUDA kernels of the dpo_kernels operators share (cuda.cu: the logits path;
// cuda_linear.cu: the fused LM head): the 16-bit element types, the two-phase workspace from
// PyTorch's caching allocator on the current stream, and the library's status as a Python
// ValueError. Nothing here synchronizes unless DPO_KERNELS_CHECK_DEVICE_ERRORS asks for it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dpo/cuda/status.cuh"

namespace dpo_kernels {

/// The dpo::cuda element types of bfloat16 and float16 tensors (dispatch_views, dispatch_head).
struct cuda_types {
  using bf16 = __nv_bfloat16;
  using f16 = __half;
};

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cuda(), name, " must be a CUDA tensor here, got ", t.device());
}

/// Opt-in synchronous check of the device error word (DPO_KERNELS_CHECK_DEVICE_ERRORS=1).
inline bool check_device_errors() {
  static const bool on = [] {
    const char* e = std::getenv("DPO_KERNELS_CHECK_DEVICE_ERRORS");
    return e != nullptr && std::strcmp(e, "0") != 0 && e[0] != '\0';
  }();
  return on;
}

inline void check_status(const dpo::cuda::status& s) { TORCH_CHECK_VALUE(s.ok(), s.message); }

/// Runs a two-phase API call: the size query, a workspace from the caching allocator on
/// `device`, then the call on the current stream. Returns the workspace (its byte 0 holds
/// the error word); with DPO_KERNELS_CHECK_DEVICE_ERRORS set, reads the word back (syncs).
/// `raise` turns a failed status into the Python exception (check_status: ValueError with the
/// library's message). The workspace may be dropped as soon as the call has returned: the
/// caching allocator is stream-ordered, so its memory is reused only by work enqueued later on
/// the same stream.
template <class Call>
at::Tensor run_with_workspace(const at::Device& device, Call&& call,
                              void (*raise)(const dpo::cuda::status&) = &check_status) {
  std::size_t bytes = 0;
  raise(call(nullptr, bytes));
  at::Tensor ws = at::empty({static_cast<std::int64_t>(std::max<std::size_t>(bytes, 16))},
                            at::TensorOptions().dtype(at::kByte).device(device));
  raise(call(ws.data_ptr(), bytes));
  if (check_device_errors()) raise(dpo::cuda::read_device_error(ws.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return ws;
}

}  // namespace dpo_kernels
