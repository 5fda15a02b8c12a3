// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// nvcc compiles every entry point of kernels/dpo/cuda/shard.cuh for every logits and label
// type (test_cuda_shard.cpp runs them, through shard_harness.cu, with int64 labels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dpo/cuda/shard.cuh"

namespace dpo_cuda_test {

template <class T, class L>
dpo::cuda::status shard_all(const dpo::token_view<T, L>& v, const dpo::vocab_shard& sh, double* rec, double* mx,
                            const double* coef, T* grad, cudaStream_t stream) {
  std::size_t check_bytes = 0;
  dpo::cuda::status s = dpo::cuda::shard_check(rec, check_bytes, v, sh, {}, stream);
  dpo::cuda::options gated;
  gated.error_word = dpo::cuda::shard_error_word(rec);
  if (s) s = dpo::cuda::shard_partials(v, sh, rec, mx, gated, stream);
  if (s) s = dpo::cuda::shard_rebase(0, 1, mx, rec, stream);
  if (s) s = dpo::cuda::shard_row_values(v, sh, mx, rec, dpo::cuda::detail::shard_row_outputs{}, {}, stream);
  if (s) s = dpo::cuda::shard_backward_rows(v, sh, mx, rec, coef, 1.0, grad, v.vocab, {}, stream);
  if (s) s = dpo::cuda::shard_sequence_partials(v, sh, mx, rec, rec, {}, stream);
  if (s) s = dpo::cuda::shard_backward_sequences(v, sh, mx, rec, coef, 0.0, 1, 1.0, grad, v.vocab, {}, stream);
  dpo::pair_view<T, L> p{v, v, 0};
  p.rejected.first_seq = v.num_seqs;
  if (s) s = dpo::cuda::shard_check(rec, check_bytes, p, sh, {}, stream);
  if (s) s = dpo::cuda::shard_pair_partials(p, sh, mx, rec, mx, rec, 0.5, rec, {}, stream);
  std::size_t bytes = 0;
  if (s) s = dpo::cuda::shard_pair_stage(rec, bytes, 1, coef, coef, coef, dpo::loss_config{}, true, {}, rec, stream);
  const dpo::pair_grad_view<T> g{grad, v.vocab, grad, v.vocab};
  if (s) s = dpo::cuda::shard_backward(rec, bytes, p, sh, mx, rec, mx, rec, coef, coef, 0.5, g, coef, {}, stream);
  return s;
}

#define DPO_SHARD_INSTANCE(T, L)                                                                            \
  template dpo::cuda::status shard_all<T, L>(const dpo::token_view<T, L>&, const dpo::vocab_shard&, double*, \
                                             double*, const double*, T*, cudaStream_t);
DPO_SHARD_INSTANCE(float, std::int64_t)
DPO_SHARD_INSTANCE(double, std::int64_t)
DPO_SHARD_INSTANCE(__nv_bfloat16, std::int64_t)
DPO_SHARD_INSTANCE(__half, std::int32_t)
#undef DPO_SHARD_INSTANCE

}  // namespace dpo_cuda_test
