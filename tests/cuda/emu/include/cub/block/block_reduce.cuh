// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's cub::BlockReduce (see cuda_runtime.h): CUB's contract, not its
// algorithm. Every thread writes its value to TempStorage and meets the others at a barrier;
// thread 0 folds the values in thread order. As in CUB, the result is defined in thread 0
// only (the others get 0xff bytes, NaN for floating point) and there is no barrier at the
// end: reusing TempStorage needs a __syncthreads first, which DPO_EMU_ORDER=reverse checks.
#pragma once

#include <cstring>
#include <type_traits>

#include "../../cuda_runtime.h"

namespace cub {

struct Sum {
  template <class T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

template <class T, int BLOCK_DIM_X, int ALGORITHM = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1,
          int LEGACY_PTX_ARCH = 0>
class BlockReduce {
  static_assert(std::is_trivially_copyable<T>::value, "emulated BlockReduce: trivially copyable T");
  static constexpr int threads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    alignas(T) unsigned char bytes[sizeof(T) * threads];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  T Reduce(T input, Op op, int num_valid = threads) {
    const int tid = dpo_emu::current().linear;
    if (static_cast<int>(dpo_emu::current().block_dim.x * dpo_emu::current().block_dim.y *
                         dpo_emu::current().block_dim.z) != threads)
      dpo_emu::fail("cub::BlockReduce used with a block size other than its template's");
    std::memcpy(storage_.bytes + sizeof(T) * tid, &input, sizeof(T));
    __syncthreads();
    T out;
    if (tid == 0) {
      std::memcpy(&out, storage_.bytes, sizeof(T));
      for (int i = 1; i < num_valid; ++i) {
        T x;
        std::memcpy(&x, storage_.bytes + sizeof(T) * i, sizeof(T));
        out = op(out, x);
      }
    } else {
      std::memset(static_cast<void*>(&out), 0xff, sizeof(T));
    }
    return out;
  }
  T Sum(T input, int num_valid = threads) { return Reduce(input, cub::Sum(), num_valid); }

 private:
  TempStorage& storage_;
};

}  // namespace cub
