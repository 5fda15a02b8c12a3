// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host emulation of the block-level row primitives (see emulate.hpp). Host code only: it
// runs without a GPU.
#include <vector>

#include <dpo/cuda/block.cuh>
#include <dpo/cuda/kernels.cuh>

#include "emulate.hpp"

namespace dpo_cuda_emulate {
namespace {

using dpo::detail::row_stats;
constexpr int block = dpo::cuda::detail::rows_block;

/// warp_reduce_stats: lane l merges lane l + off (its own value past lane 31), in steps of
/// 16, 8, 4, 2, 1; ascending lanes read the step's old values, as the shuffles do.
template <bool M, class A>
row_stats<A> warp_tree(row_stats<A>* v) {
  for (int off = 16; off > 0; off >>= 1)
    for (int lane = 0; lane < 32; ++lane)
      v[lane] = dpo::cuda::detail::merge_unordered<M>(v[lane], v[lane + off < 32 ? lane + off : lane]);
  return v[0];
}

template <bool M, bool L2, class T>
row_result stats(const T* row, std::int64_t vocab) {
  using A = dpo::cuda::acc_t<T>;
  std::vector<row_stats<A>> t(block);
  for (int tid = 0; tid < block; ++tid)
    t[tid] = dpo::cuda::detail::to_row_stats(
        dpo::cuda::detail::thread_row_stats<block, M, T, L2>(row, vocab, tid));
  constexpr int warps = block / 32;
  row_stats<A> partial[32];
  for (int w = 0; w < warps; ++w) partial[w] = warp_tree<M>(t.data() + 32 * w);
  for (int l = warps; l < 32; ++l) partial[l] = row_stats<A>::empty();
  const row_stats<A> r = warp_tree<M>(partial);
  return {static_cast<double>(r.logsumexp()), static_cast<double>(r.entropy()),
          static_cast<double>(r.logsumexp2()), static_cast<double>(r.zsum), r.argmax,
          static_cast<double>(r.s)};
}

template <class T>
row_result stats_any(const void* row, std::int64_t vocab, bool metrics, bool lse2) {
  const T* p = static_cast<const T*>(row);
  if (!metrics) return stats<false, false>(p, vocab);
  return lse2 ? stats<true, true>(p, vocab) : stats<true, false>(p, vocab);
}

template <class T>
void grad(const void* z, void* g, std::int64_t vocab, double lse, double coef, std::int64_t y) {
  using A = dpo::cuda::acc_t<T>;
  for (int tid = 0; tid < block; ++tid)
    dpo::cuda::detail::thread_row_grad<block>(static_cast<const T*>(z), static_cast<T*>(g), vocab,
                                              static_cast<A>(lse), static_cast<A>(coef), y, tid);
}

}  // namespace

row_result block_row_stats(dtype type, const void* row, std::int64_t vocab, bool metrics, bool lse2) {
  switch (type) {
    case dtype::bf16: return stats_any<__nv_bfloat16>(row, vocab, metrics, lse2);
    case dtype::f16: return stats_any<__half>(row, vocab, metrics, lse2);
    case dtype::f32: return stats_any<float>(row, vocab, metrics, lse2);
    case dtype::f64: return stats_any<double>(row, vocab, metrics, lse2);
  }
  return {};
}

void block_row_grad(dtype type, const void* z, void* g, std::int64_t vocab, double lse,
                    double coef, std::int64_t y) {
  switch (type) {
    case dtype::bf16: return grad<__nv_bfloat16>(z, g, vocab, lse, coef, y);
    case dtype::f16: return grad<__half>(z, g, vocab, lse, coef, y);
    case dtype::f32: return grad<float>(z, g, vocab, lse, coef, y);
    case dtype::f64: return grad<double>(z, g, vocab, lse, coef, y);
  }
}

}  // namespace dpo_cuda_emulate
