// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host-side interface of the test harness of the vocabulary-shard kernels of the logits path
// (shard_harness.cu: dpo/cuda/shard.cuh, compiled by nvcc, or by g++ against the emulator),
// so test_cuda_shard.cpp compiles with g++ and never includes CUDA headers. Each call is the
// library's entry point of the same name on device pointers (default stream), its status
// returned as a shard_status; device memory is allocated and copied through the functions
// below. The logits types are float, double and the bits of a bfloat16 / half.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "dpo/core/layout.hpp"
#include "dpo/core/loss.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/shard.hpp"

namespace dpo_cuda_test {

/// The bits of a bfloat16 / half: Eigen's type on the host, CUDA's on the device (one layout).
struct bf16_bits {
  std::uint16_t bits;
};
struct f16_bits {
  std::uint16_t bits;
};

/// The same view with the logits (and gradient) pointers read as D, an element type of the
/// same size and bits (the host-compiled tests' Eigen::bfloat16 as bf16_bits, say).
template <class D, class T, class L>
dpo::token_view<D, L> retype(const dpo::token_view<T, L>& v) {
  static_assert(sizeof(D) == sizeof(T), "retype keeps the element size");
  dpo::token_view<D, L> d;
  static_assert(sizeof d == sizeof v, "one layout");
  std::memcpy(static_cast<void*>(&d), static_cast<const void*>(&v), sizeof d);
  return d;
}
template <class D, class T, class L>
dpo::pair_view<D, L> retype(const dpo::pair_view<T, L>& p) {
  return {retype<D>(p.chosen), retype<D>(p.rejected), p.concatenated_seqs};
}
template <class D, class T>
dpo::pair_grad_view<D> retype(const dpo::pair_grad_view<T>& g) {
  static_assert(sizeof(D) == sizeof(T), "retype keeps the element size");
  return {reinterpret_cast<D*>(g.chosen), g.chosen_stride, reinterpret_cast<D*>(g.rejected), g.rejected_stride};
}

/// `bytes` of device memory (throws std::runtime_error on failure; null for 0), freed by
/// device_free (which never throws: it runs in destructors).
void* device_alloc(std::size_t bytes);
void device_free(void* p);
/// cudaMemcpy (synchronous: a kernel's asynchronous error surfaces here), throws on failure.
void copy_to_device(void* dst, const void* src, std::size_t bytes);
void copy_to_host(void* dst, const void* src, std::size_t bytes);

/// A dpo::cuda::status on the host: its cudaError_t and message.
struct shard_status {
  int code = 0;
  std::string message;
  bool ok() const { return code == 0; }
  explicit operator bool() const { return ok(); }
};

/// dpo::cuda::options (error_word: a shard_check workspace's word, device memory).
struct shard_options {
  bool metrics = true;
  std::int64_t num_rows = -1;
  const void* error_word = nullptr;
};

/// Where shard_row_values writes, by buffer row, in dpo::cuda::detail::shard_row_outputs'
/// order: logp, lse, entropy, zmean, wpo, hit (each may be null).
using row_outputs = std::array<double*, 6>;

// The entry points of dpo/cuda/shard.cuh, for T in {float, double, bf16_bits, f16_bits} and
// int64 labels; every pointer is a device pointer.
template <class T>
using tokens = dpo::token_view<T, std::int64_t>;
template <class T>
using pairs = dpo::pair_view<T, std::int64_t>;

template <class T>
shard_status shard_check(void* workspace, std::size_t& workspace_bytes, const tokens<T>& v,
                         const dpo::vocab_shard& sh, const shard_options& opt = {});
template <class T>
shard_status shard_check(void* workspace, std::size_t& workspace_bytes, const pairs<T>& p,
                         const dpo::vocab_shard& sh, const shard_options& opt = {});
/// dpo::cuda::shard_error_word(workspace), as shard_options::error_word takes it.
const void* shard_error_word(const void* workspace);
/// dpo::cuda::read_device_error of a workspace (synchronizes): ok, or the error it describes.
shard_status read_error(const void* workspace);
template <class T>
shard_status shard_partials(const tokens<T>& v, const dpo::vocab_shard& sh, double* records, double* row_max,
                            const shard_options& opt = {});
shard_status shard_rebase(std::int64_t begin, std::int64_t end, const double* row_max, double* records);
template <class T>
shard_status shard_row_values(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                              const double* records, const row_outputs& out, const shard_options& opt = {});
template <class T>
shard_status shard_backward_rows(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                 const double* records, const double* row_coef, double grad_output, T* grad,
                                 std::int64_t grad_stride, const shard_options& opt = {});
template <class T>
shard_status shard_sequence_partials(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                     const double* records, double* seq, const shard_options& opt = {});
template <class T>
shard_status shard_backward_sequences(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                      const double* records, const double* seq_grad, double nll_token_grad,
                                      std::int64_t nll_seqs, double grad_output, T* grad, std::int64_t grad_stride,
                                      const shard_options& opt = {});
template <class T>
shard_status shard_pair_partials(const pairs<T>& p, const dpo::vocab_shard& sh, const double* chosen_max,
                                 const double* chosen_records, const double* rejected_max,
                                 const double* rejected_records, double ld_alpha, double* seq,
                                 const shard_options& opt = {});
shard_status shard_pair_stage(void* workspace, std::size_t& workspace_bytes, std::int64_t P, const double* seq_totals,
                              const double* ref_chosen, const double* ref_rejected, const dpo::loss_config& cfg,
                              bool metrics, const dpo::forward_outputs& out, double* seq_grad);
template <class T>
shard_status shard_backward(void* workspace, std::size_t& workspace_bytes, const pairs<T>& p,
                            const dpo::vocab_shard& sh, const double* chosen_max, const double* chosen_records,
                            const double* rejected_max, const double* rejected_records, const double* seq_grad,
                            const double* nll_token_grad, double ld_alpha, const dpo::pair_grad_view<T>& grad,
                            const double* grad_output = nullptr, const shard_options& opt = {});

/// The aliasing cases of the entry points above (the audit's probes and a few more): each
/// call with an output on an input or on another output, on valid float64 data (2 pairs of
/// 3 rows, vocab 8, one device arena holding every buffer but the labels). Returns the
/// status message ("" when accepted) and sets *written when any byte of the arena or of the
/// labels changed. which: see shard_alias_cases.
std::string shard_alias_error(int which, bool* written);
/// How many cases shard_alias_error has, and the words each one's message must hold.
inline constexpr int shard_alias_cases = 15;
extern const char* const shard_alias_names[shard_alias_cases];

}  // namespace dpo_cuda_test
