// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host-side interface of the test harness of DPO from hidden states on CUDA
// (linear_dpo_harness.cu, compiled by nvcc, or by g++ against the emulator), so
// test_cuda_linear_dpo.cpp compiles with g++ and never includes CUDA headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dpo/core/linear_plan.hpp"
#include "dpo/core/loss.hpp"
#include "dpo/core/transforms.hpp"
#include "dtype.hpp"

namespace dpo_cuda_test {

enum class ldpo_layout { padded, packed, separate };

/// One dpo::cuda::linear_dpo call (or linear_dpo_forward + linear_dpo_backward) on host data.
/// Hidden rows [rows, H] (stride H): padded and separate hold 2P * T rows (separate: chosen
/// rows [0, P T), rejected [P T, 2 P T), uploaded as two buffers); packed holds `rows` rows
/// and cu_seqlens [2P + 1].
struct ldpo_case {
  dtype type = dtype::f32;
  bool fp32_grads = false;  // G = float for bf16 heads
  bool labels32 = false;    // int32 labels (int64 otherwise)
  ldpo_layout layout = ldpo_layout::padded;
  std::int64_t P = 0, T = 0, H = 0, V = 0, rows = 0;
  std::vector<unsigned char> hidden, weight, bias;  // bytes of `type`; bias empty: none
  std::vector<std::int64_t> labels;                 // rows
  std::vector<std::uint8_t> mask;                   // empty: none
  std::vector<std::int64_t> cu_seqlens;             // packed
  dpo::logit_transforms transforms;
  dpo::loss_config cfg;
  // The reference: log-probs [2P] (chosen then rejected), or hidden states through a head.
  bool ref_from_hidden = false;
  std::vector<double> ref_logps;
  std::vector<unsigned char> ref_hidden, ref_weight, ref_bias;
  // Options.
  std::int64_t chunk_rows = 0;
  dpo::linear_mode mode = dpo::linear_mode::automatic;
  bool host_cu = true;           // packed: options.host_cu_seqlens (a host copy of cu_seqlens)
  std::int64_t host_cu_shift = 0;  // added to the host copy's entries past the first (a mismatch)
  bool share_rows = false;       // separate: the rejected side reads the chosen side's hidden rows
  std::int64_t workspace_bytes = 8 << 20;
  bool metrics = true;
  bool split = false;            // linear_dpo_forward, then linear_dpo_backward
  bool pair_logps = false;       // linear_pair_logps alone: out.pairs = chosen [P], rejected [P]
  bool accumulate_hidden = false;
  bool want_hidden = true, want_bias = true;
  double grad_output = 1.0;
  int fill = 0;                  // initial byte of every gradient buffer
  // Argument-error injection.
  bool null_handle = false, short_workspace = false, dweight_on_weight = false;
};

struct ldpo_out {
  int code = 0;  // cudaError_t of the first failing call (0: all succeeded)
  std::string message;
  int device_error = 0;
  std::string device_message;
  std::int64_t workspace_bytes = 0;
  dpo::linear_mode mode = dpo::linear_mode::automatic;  // the fused call's plan
  double loss = 12345.0;
  std::vector<double> metrics;  // dpo::metrics' fields
  std::vector<double> pairs;    // DPO_PAIR_OUTPUTS order, P each
  std::vector<double> row_lse, row_coef;  // split: rows each
  std::vector<unsigned char> dhidden, dweight, dbias;  // dhidden: rows * H of `type` (both sides)
};

ldpo_out run_linear_dpo(const ldpo_case& c);

/// Packed views of one hidden buffer whose sides read the same rows (the rejected view is the
/// chosen one: same cu_seqlens, same sequences), fp32, P = 2, H = 4, V = 6, rows 10: the status
/// message of linear_dpo_forward with row state (refused: the sides share rows), and the loss
/// and dWeight of linear_dpo (weight gradient only, sigmoid, zero reference log-probs).
struct packed_shared_out {
  std::string row_state_message;
  int code = 0;
  double loss = 0;
  std::vector<float> dweight;
};
packed_shared_out run_packed_shared_rows(const std::vector<float>& hidden, const std::vector<float>& weight,
                                         const std::vector<std::int64_t>& labels,
                                         const std::vector<std::int64_t>& cu_seqlens);

/// The plan of dpo::cuda::linear_dpo under its default options (workspace budget, GEMM
/// workspace) for padded pairs of `type`: P pairs of two T-row sequences, H, V, no bias, the
/// sigmoid loss, the reference as log-probs or hidden states. A size query only (null
/// pointers): nothing is allocated, so it runs at any shape.
struct ldpo_plan_out {
  int code = 0;
  std::string message;
  dpo::linear_mode mode = dpo::linear_mode::automatic;
  std::int64_t chunk_rows = 0, workspace_bytes = 0, gemm_workspace_bytes = 0;
};

ldpo_plan_out plan_linear_dpo(dtype type, std::int64_t P, std::int64_t T, std::int64_t H, std::int64_t V,
                              bool ref_from_hidden);

/// Forward outputs that overlap each other or the call's inputs (hidden rows, head, labels,
/// reference log-probs or hidden rows and head, the gradients, the workspace) on linear_dpo and
/// linear_dpo_forward (both reference forms), padded fp32 pairs: each case's description
/// ("call: A on B") and status message ("" if it passed), and whether every byte of every
/// buffer kept its value.
struct linear_alias_out {
  struct named { std::string what, message; };
  std::vector<named> cases;
  bool untouched = false;
};
linear_alias_out linear_output_alias_errors();

}  // namespace dpo_cuda_test
