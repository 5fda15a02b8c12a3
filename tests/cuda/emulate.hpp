// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The block-level row primitives of dpo/cuda/block.cuh run on the HOST: every thread of a
// block emulated in turn (their per-thread parts are __host__ __device__), the warp-shuffle
// and block trees replayed in the kernels' order. Lets a machine without a GPU check the
// column mapping (scalar head, 16-byte vectors, tail), the online statistics, the argmax
// tie rule, -inf / NaN handling and the gradient writer against the CPU path. Only the
// exponential differs from the device (std::exp2 here, ex2.approx there).
#pragma once

#include <cstdint>

#include "dtype.hpp"

namespace dpo_cuda_emulate {

using dpo_cuda_test::dtype;

struct row_result {
  double lse, entropy, lse2, zsum;
  std::int64_t argmax;
  double s;
};

/// block_row_stats<256, metrics, T, lse2> over vocab values at `row` (host memory of `type`);
/// lse2 = false skips lse(2z), as rows_kernel does for losses without WPO weights.
row_result block_row_stats(dtype type, const void* row, std::int64_t vocab, bool metrics,
                           bool lse2 = true);

/// block_row_grad<256> of one row, z and g host memory of `type` (g == z: in place).
void block_row_grad(dtype type, const void* z, void* g, std::int64_t vocab, double lse,
                    double coef, std::int64_t y);

}  // namespace dpo_cuda_emulate
