// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// How the CUDA API reports errors: a status returned by every host entry point (argument
// errors, launch errors), and an error word in the workspace for errors that only the
// device can see (labels outside [0, vocab), bad cu_seqlens) without a host sync.
#pragma once

#include "dpo/cuda/compiler.cuh"

#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>

namespace dpo {
namespace cuda {

/// The result of a host entry point. code == cudaSuccess means every kernel was enqueued;
/// otherwise nothing was enqueued (argument errors: cudaErrorInvalidValue) or a launch
/// failed (the CUDA error of the launch). message names the argument and its value.
struct status {
  cudaError_t code = cudaSuccess;
  char message[256] = {0};

  bool ok() const { return code == cudaSuccess; }
  explicit operator bool() const { return ok(); }
};

/// Errors found by the kernels themselves (the host cannot read device data without a
/// synchronization). The first kernel of a call records the error in the workspace and
/// every later kernel of the call, and of a dpo_backward that reuses the workspace, returns
/// without writing anything: no output is written when the data is invalid.
enum class device_error_code : std::int32_t {
  none = 0,
  /// labels[index] = value is outside [0, bound = vocab) and is not ignore_index.
  label_out_of_range = 1,
  /// cu_seqlens[index] = value < 0.
  cu_seqlens_negative = 2,
  /// cu_seqlens[index] = value < cu_seqlens[index - 1] = bound.
  cu_seqlens_decreasing = 3,
  /// cu_seqlens[index] = value > bound = options::num_rows.
  cu_seqlens_past_rows = 4,
  /// dpo_backward found no matching dpo_forward state in the workspace (value: pairs,
  /// bound: vocab it was called with).
  no_forward_state = 5,
  /// cu_seqlens[index] = value != bound = the host copy given for planning
  /// (dpo::cuda::linear_dpo_options::host_cu_seqlens).
  cu_seqlens_host_mismatch = 6,
};

/// The error word, at byte offset 0 of every workspace. Copy it back (cudaMemcpyAsync of
/// sizeof(device_error) bytes from the workspace, after the call's kernels) to read it, or
/// call read_device_error(), which does that and synchronizes the stream.
struct device_error {
  std::int32_t code;  // a device_error_code
  std::int32_t side;  // 0 chosen (or the only view), 1 rejected; 2 / 3 the reference's
                      // chosen / rejected (the reference-logits overloads); 4 the labels of
                      // a linear head call (dpo/cuda/linear.cuh); 5 / 6 the reference
                      // hidden states' chosen / rejected (dpo/cuda/linear_dpo.cuh)
  std::int64_t index;
  std::int64_t value;
  std::int64_t bound;
};

/// Byte offset of the device_error in a workspace.
inline constexpr std::size_t device_error_offset = 0;

namespace detail {

inline status make_status(cudaError_t code, const char* fmt, ...) {
  status s;
  s.code = code;
  std::va_list args;
  va_start(args, fmt);
  std::vsnprintf(s.message, sizeof(s.message), fmt, args);
  va_end(args);
  return s;
}

}  // namespace detail

/// Describes a device_error as a status (cudaSuccess when e.code == none).
inline status describe(const device_error& e) {
  static const char* const sides[7] = {"chosen",   "rejected",          "ref_logits.chosen", "ref_logits.rejected",
                                       "labels",   "ref_hidden.chosen", "ref_hidden.rejected"};
  const char* side = e.side >= 0 && e.side < 7 ? sides[e.side] : "?";
  const long long i = static_cast<long long>(e.index), v = static_cast<long long>(e.value),
                  b = static_cast<long long>(e.bound);
  switch (static_cast<device_error_code>(e.code)) {
    case device_error_code::none:
      return {};
    case device_error_code::label_out_of_range:
      if (e.side == 4)  // the linear head's labels (dpo/cuda/linear.cuh)
        return detail::make_status(cudaErrorInvalidValue,
                                   "dpo: labels[%lld] = %lld is outside [0, vocab = %lld) and is "
                                   "not ignore_index",
                                   i, v, b);
      return detail::make_status(cudaErrorInvalidValue,
                                 "dpo: %s.labels[%lld] = %lld is outside [0, vocab = %lld) and is "
                                 "not ignore_index",
                                 side, i, v, b);
    case device_error_code::cu_seqlens_negative:
      return detail::make_status(cudaErrorInvalidValue,
                                 "dpo: %s.cu_seqlens[%lld] = %lld is invalid: must be >= 0", side,
                                 i, v);
    case device_error_code::cu_seqlens_decreasing:
      return detail::make_status(cudaErrorInvalidValue,
                                 "dpo: %s.cu_seqlens is not non-decreasing: cu_seqlens[%lld] = "
                                 "%lld < cu_seqlens[%lld] = %lld",
                                 side, i, v, i - 1, b);
    case device_error_code::cu_seqlens_past_rows:
      return detail::make_status(cudaErrorInvalidValue,
                                 "dpo: %s.cu_seqlens[%lld] = %lld is past options.num_rows = %lld",
                                 side, i, v, b);
    case device_error_code::cu_seqlens_host_mismatch:
      return detail::make_status(cudaErrorInvalidValue,
                                 "dpo: %s.cu_seqlens[%lld] = %lld differs from options.host_cu_seqlens[%lld] = %lld",
                                 side, i, v, i, b);
    case device_error_code::no_forward_state:
      return detail::make_status(cudaErrorInvalidValue,
                                 "dpo: dpo_backward: the workspace holds no dpo_forward state for "
                                 "%lld pairs and vocab %lld (run dpo_forward with the same views "
                                 "and workspace first)",
                                 v, b);
  }
  return detail::make_status(cudaErrorInvalidValue, "dpo: unknown device error code %d", e.code);
}

/// Reads the error word of a workspace after the kernels enqueued on `stream`: copies it
/// back and SYNCHRONIZES the stream (so not for use inside graph capture). Returns
/// cudaSuccess when the data was valid, else a status describing the first invalid value
/// (the lowest row or cu_seqlens index, so the report is deterministic).
inline status read_device_error(const void* workspace, cudaStream_t stream = 0) {
  if (workspace == nullptr)
    return detail::make_status(cudaErrorInvalidValue, "dpo: read_device_error: workspace is null");
  device_error e{};
  cudaError_t err = cudaMemcpyAsync(&e, static_cast<const char*>(workspace) + device_error_offset,
                                    sizeof(e), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess)
    return detail::make_status(err, "dpo: read_device_error: %s", cudaGetErrorString(err));
  return describe(e);
}

}  // namespace cuda
}  // namespace dpo
