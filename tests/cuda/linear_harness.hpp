// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host-side interface of the CUDA linear head's test harness (linear_harness.cu, compiled by
// nvcc, or by g++ against the emulator), so test_cuda_linear.cpp compiles with g++ and never
// includes CUDA headers. Matrices travel as raw bytes of the element type.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dpo/core/transforms.hpp"
#include "dtype.hpp"

namespace dpo_cuda_test {

/// One dpo::cuda::linear_logps call (and, with backward, linear_logps_backward after it, fed
/// the forward's row_lse and entropy) on host data.
struct linear_case {
  dtype type = dtype::f32;
  bool labels64 = true;
  std::int64_t rows = 0, hidden_cols = 0, vocab = 0;
  std::int64_t hidden_stride = 0, weight_stride = 0;  // 0: hidden_cols
  std::vector<unsigned char> hidden;   // rows * hidden_stride elements of `type`
  std::vector<unsigned char> weight;   // vocab * weight_stride elements
  std::vector<unsigned char> bias;     // vocab elements, or empty (no bias)
  std::vector<std::int64_t> labels;    // rows
  std::vector<std::uint8_t> mask;      // empty: none
  std::int64_t ignore_index = -100;
  dpo::logit_transforms transforms;
  bool entropy = false;
  bool outputs = false;  // linear_outputs' log_sum_sq_probs, mean_logits and is_top1 too
  // linear_options
  std::int64_t workspace_budget = 0;   // 0: the default
  std::int64_t chunk_rows = 0, chunk_vocab = 0;
  std::int64_t gemm_workspace = 1 << 20;
  // The backward.
  bool backward = false;
  std::vector<double> grad_logps, grad_entropy;  // rows each (grad_entropy with entropy only)
  bool want_hidden = true, want_weight = true, want_bias = true;
  bool accumulate_hidden = false;
  bool fp32_grads = false;                       // G = float (bf16 / half heads)
  std::int64_t grad_hidden_stride = 0;           // 0: hidden_cols
  // Initial gradient buffers (bytes of `type`, or of float with fp32_grads); empty: 0x7f bytes.
  std::vector<unsigned char> dhidden0, dweight0, dbias0;
  // Argument-error injection.
  bool null_handle = false;
  bool short_workspace = false;                  // one byte less than the size query said
  bool logps_on_labels = false;                  // logps aliases the labels buffer
  bool dweight_on_weight = false;                // grads.weight = the weight itself
  std::int64_t bias_size = -1;                   // -1: vocab with a bias, 0 without
  std::int64_t weight_cols = -1;                 // -1: hidden_cols
};

struct linear_out {
  int code = 0;              // cudaError_t of the first failing call (0: all succeeded)
  std::string message;
  int device_error = 0;      // device_error_code read back after the calls
  std::string device_message;
  std::int64_t chunk_rows = 0, chunk_vocab = 0, workspace_bytes = 0;
  std::vector<double> logps, entropy, row_lse;  // start as 12345.0 (poison)
  std::vector<double> log_sum_sq_probs, mean_logits;  // with outputs; poisoned likewise
  std::vector<std::uint8_t> is_top1;                 // with outputs; starts as 0x5a bytes
  std::vector<unsigned char> dhidden, dweight, dbias;
};

linear_out run_linear(const linear_case& in);

/// Captures linear_logps + linear_logps_backward (f32, bias, entropy, several chunks) on a
/// stream into a CUDA graph, replays it twice and compares with direct calls, bitwise.
/// Returns "" on success, else what failed.
std::string linear_graph_check();

/// cuBLASLt GEMMs run so far by the emulator (-1 on a real device: not counted).
long long emulated_gemms();

}  // namespace dpo_cuda_test
