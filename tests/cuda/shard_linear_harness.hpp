// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host-side interface of the test harness of the fused head's vocabulary shard on CUDA
// (shard_linear_harness.cu: dpo/cuda/linear_shard.cuh, compiled by nvcc, or by g++ against
// the emulator), so test_cuda_shard_linear.cpp compiles with g++ and never includes CUDA
// headers. Matrices travel as raw bytes of the element type.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dpo/core/shard.hpp"
#include "dpo/core/transforms.hpp"
#include "dtype.hpp"

namespace dpo_cuda_test {

/// One rank's calls on host data: phase 1 (linear_shard_partials) when `records` is empty,
/// else phase 2 (linear_shard_logps) and the backward (linear_shard_backward, fed phase 2's
/// entropy when grad_entropy is given) from the combined row_max / records.
struct shard_linear_case {
  dtype type = dtype::f32;
  bool labels64 = true;
  std::int64_t rows = 0, hidden_cols = 0;  // strides: hidden_cols
  dpo::vocab_shard sh;
  std::int64_t width = -1;                 // the view's vocab (weight rows); -1: sh.width()
  std::vector<unsigned char> hidden;       // rows x hidden_cols elements of `type`
  std::vector<unsigned char> weight;       // width x hidden_cols: the shard's rows
  std::vector<unsigned char> bias;         // width, or empty
  std::vector<std::int64_t> labels;        // global ids
  std::vector<std::uint8_t> mask;          // empty: none
  dpo::logit_transforms transforms;
  bool metrics = true;
  std::int64_t chunk_rows = 0, chunk_vocab = 0;
  std::vector<double> row_max, records;    // combined (phase 2 and backward); empty: phase 1
  std::vector<double> grad_logps, grad_entropy;  // rows each; grad_entropy empty: none
  bool null_records = false;               // pass a null records pointer
};

/// Results; every output starts poisoned (12345.0, the gradients 0x7f bytes except dweight /
/// dbias, which start at zero), so a rejected call can be checked for writes.
struct shard_linear_out {
  int code = 0;  // cudaError_t of the first failing call
  std::string message;
  int device_error = 0;  // device_error_code read back from the workspace
  std::string device_message;
  std::vector<double> row_max, records;                    // phase 1
  std::vector<double> logp, lse, entropy, zmean, wpo, hit;  // phase 2
  std::vector<unsigned char> dhidden, dweight, dbias;      // the backward
};

shard_linear_out run_shard_linear(const shard_linear_case& c);

/// One rank's pair calls (linear_pair_shard_partials when `records` is empty, else
/// linear_pair_shard_sequences and linear_pair_shard_backward from the combined records) on
/// TRL's concatenated batch: num_seqs = 2P sequences, padded [2P, seq_len] rows, or packed
/// (seq_len 0) by cu_seqlens over `rows` rows.
struct pair_shard_case {
  dtype type = dtype::f32;
  bool labels64 = true;
  std::int64_t num_seqs = 0, seq_len = 0, rows = 0, hidden_cols = 0;
  std::vector<std::int64_t> cu_seqlens;  // packed
  dpo::vocab_shard sh;
  std::int64_t width = -1;                          // the head's vocab (weight rows); -1: sh.width()
  std::vector<unsigned char> hidden, weight, bias;  // weight: the shard's rows
  std::vector<std::int64_t> labels;                 // global ids
  dpo::logit_transforms transforms;
  bool metrics = true;
  double ld_alpha = 1.0;
  std::int64_t chunk_rows = 0;
  std::vector<double> row_max, records;  // combined (phase 2 and backward); empty: phase 1
  std::vector<double> seq_grad;          // [2P]
  double nll_token_grad = 0, grad_output = 1;
  bool accumulate_hidden = false;
  bool two_arrays = false;  // pass another records / row_max array for the rejected side
};

/// Results, every output poisoned first (records / seq 12345.0, dHidden 0x7f bytes,
/// dWeight / dBias zeros), so that a rejected call can be checked for writes.
struct pair_shard_out {
  int code = 0;
  std::string message;
  int device_error = 0;
  std::string device_message;
  std::vector<double> row_max, records, seq;
  std::vector<unsigned char> dhidden, dweight, dbias;
};

pair_shard_out run_pair_shard(const pair_shard_case& c);

/// read_device_error's message after a valid call of the head without rows (which = 0:
/// linear_logps, 1: linear_logps_backward, 2: linear_shard_partials, 3: linear_shard_backward)
/// on a workspace that held 0xa5 bytes (previous_error false) or a previous call's label
/// error: empty when the call made the error word its own.
std::string linear_empty_call_error(int which, bool previous_error);

/// linear_shard_logps with an output aliasing an input or another output (which: 0 out.logp
/// on row_max, 1 out.lse inside the records, 2 out.entropy on out.logp, 3 out.hit on the
/// labels): the status message (empty when accepted); *written: whether any byte changed.
std::string linear_shard_logps_alias_error(int which, bool* written);

/// The fused head shard's aliasing cases and linear_pair_logps' (an output on an input the
/// call reads, or on another output), each "call: A on B" with its status message ("" if
/// accepted) and whether any byte of the arena holding every array changed. Inputs: a padded or separate batch of 2 pairs x 3 rows
/// over a 7-token head, masked, with a valid combined state.
struct shard_linear_alias_out {
  struct named {
    std::string what, message;
    bool written = false;
  };
  std::vector<named> cases;
};
shard_linear_alias_out shard_linear_alias_errors();
}  // namespace dpo_cuda_test
