// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The smallest use of the installed CUDA API: the workspace-size queries of the fused DPO
// forward and of the fused LM head (they launch nothing and need no device; the head's
// header needs cuBLASLt: the project links CUDA::cublasLt). The package test only compiles
// and links this; run by hand it prints the sizes.
#include <dpo/cuda/dpo.cuh>
#include <dpo/cuda/linear.cuh>

#include <cstdint>
#include <cstdio>

int main() {
  constexpr std::int64_t pairs = 8, seq_len = 1024, vocab = 128256;
  const auto batch = dpo::padded_pairs<__nv_bfloat16, std::int64_t>(nullptr, nullptr, 2 * pairs,
                                                                   seq_len, vocab, vocab);
  std::size_t bytes = 0;
  const dpo::cuda::status s = dpo::cuda::dpo_forward(nullptr, bytes, batch, nullptr, nullptr,
                                                     dpo::loss_config::of(dpo::loss_type::simpo),
                                                     dpo::cuda::forward_outputs{});
  if (!s) {
    std::printf("%s\n", s.message);
    return 1;
  }
  std::printf("dpo_forward workspace for %lld pairs x %lld tokens, vocab %lld: %zu bytes\n",
              static_cast<long long>(pairs), static_cast<long long>(seq_len),
              static_cast<long long>(vocab), bytes);
  dpo::cuda::linear_view<__nv_bfloat16, std::int64_t> head;
  head.rows = 2 * pairs * seq_len;
  head.hidden_cols = head.hidden_stride = head.weight_cols = head.weight_stride = 4096;
  head.vocab = vocab;
  std::size_t head_bytes = 0;
  const dpo::cuda::status h = dpo::cuda::linear_logps(nullptr, head_bytes, nullptr, head, nullptr,
                                                      nullptr, nullptr);
  if (!h) {
    std::printf("%s\n", h.message);
    return 1;
  }
  std::printf("linear_logps workspace for %lld rows, H 4096: %zu bytes\n",
              static_cast<long long>(head.rows), head_bytes);
  return 0;
}
