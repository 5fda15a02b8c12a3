// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's cub::BlockScan (see cuda_runtime.h): CUB's contract, not its
// algorithm. Every thread writes its value to TempStorage, meets the others at a barrier,
// then folds the values of the threads before it in thread order. The block aggregate is
// returned to every thread, as in CUB. No barrier at the end: reusing TempStorage needs a
// __syncthreads first, which DPO_EMU_ORDER=reverse checks.
#pragma once

#include <cstring>
#include <type_traits>

#include "../../cuda_runtime.h"
#include "block_reduce.cuh"

namespace cub {

template <class T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1,
          int LEGACY_PTX_ARCH = 0>
class BlockScan {
  static_assert(std::is_trivially_copyable<T>::value, "emulated BlockScan: trivially copyable T");
  static constexpr int threads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    alignas(T) unsigned char bytes[sizeof(T) * threads];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output) {
    T aggregate;
    ExclusiveSum(input, output, aggregate);
  }
  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    scan(input, output, block_aggregate, false);
  }
  void InclusiveSum(T input, T& output) {
    T aggregate;
    InclusiveSum(input, output, aggregate);
  }
  void InclusiveSum(T input, T& output, T& block_aggregate) {
    scan(input, output, block_aggregate, true);
  }

 private:
  void scan(T input, T& output, T& aggregate, bool inclusive) {
    const int tid = dpo_emu::current().linear;
    if (static_cast<int>(dpo_emu::current().block_dim.x * dpo_emu::current().block_dim.y *
                         dpo_emu::current().block_dim.z) != threads)
      dpo_emu::fail("cub::BlockScan used with a block size other than its template's");
    std::memcpy(storage_.bytes + sizeof(T) * tid, &input, sizeof(T));
    __syncthreads();
    T run = T(0);
    for (int i = 0; i < threads; ++i) {
      if (i == tid) output = inclusive ? run + input : run;
      T x;
      std::memcpy(&x, storage_.bytes + sizeof(T) * i, sizeof(T));
      run = run + x;
    }
    aggregate = run;
  }

  TempStorage& storage_;
};

}  // namespace cub
