// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA side of the vocabulary-shard tests of the logits path: each call of
// dpo/cuda/shard.cuh on the caller's device pointers, its views read with CUDA's element
// type, and the device memory the Catch2 tests (g++, test_cuda_shard.cpp) move their data
// through. Built by nvcc for a GPU and by the host compiler against the emulator
// (emu/shard_harness.cpp): the same source.
#include <dpo/cuda/shard.cuh>

#include "device_buffer.hpp"
#include "shard_harness.hpp"

namespace dpo_cuda_test {
namespace {

/// CUDA's element type of a harness logits type (the same bits).
template <class T>
struct device_of {
  using type = T;
};
template <>
struct device_of<bf16_bits> {
  using type = __nv_bfloat16;
};
template <>
struct device_of<f16_bits> {
  using type = __half;
};
template <class T>
using device_t = typename device_of<T>::type;

shard_status to_host(const dpo::cuda::status& s) { return {static_cast<int>(s.code), s.ok() ? "" : s.message}; }

dpo::cuda::options to_device(const shard_options& o) {
  dpo::cuda::options d;
  d.metrics = o.metrics;
  d.num_rows = o.num_rows;
  d.error_word = static_cast<const dpo::cuda::device_error*>(o.error_word);
  return d;
}

}  // namespace

void* device_alloc(std::size_t bytes) {
  void* p = nullptr;
  DPO_CK(cudaMalloc(&p, bytes));
  return p;
}
void device_free(void* p) {
  if (p) cudaFree(p);  // from destructors: no throw
}
void copy_to_device(void* dst, const void* src, std::size_t bytes) {
  if (bytes > 0) DPO_CK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
void copy_to_host(void* dst, const void* src, std::size_t bytes) {
  if (bytes > 0) DPO_CK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

template <class T>
shard_status shard_check(void* workspace, std::size_t& workspace_bytes, const tokens<T>& v,
                         const dpo::vocab_shard& sh, const shard_options& opt) {
  return to_host(dpo::cuda::shard_check(workspace, workspace_bytes, retype<device_t<T>>(v), sh, to_device(opt)));
}

template <class T>
shard_status shard_check(void* workspace, std::size_t& workspace_bytes, const pairs<T>& p,
                         const dpo::vocab_shard& sh, const shard_options& opt) {
  return to_host(dpo::cuda::shard_check(workspace, workspace_bytes, retype<device_t<T>>(p), sh, to_device(opt)));
}

const void* shard_error_word(const void* workspace) { return dpo::cuda::shard_error_word(workspace); }

shard_status read_error(const void* workspace) { return to_host(dpo::cuda::read_device_error(workspace)); }

template <class T>
shard_status shard_partials(const tokens<T>& v, const dpo::vocab_shard& sh, double* records, double* row_max,
                            const shard_options& opt) {
  return to_host(dpo::cuda::shard_partials(retype<device_t<T>>(v), sh, records, row_max, to_device(opt)));
}

shard_status shard_rebase(std::int64_t begin, std::int64_t end, const double* row_max, double* records) {
  return to_host(dpo::cuda::shard_rebase(begin, end, row_max, records));
}

template <class T>
shard_status shard_row_values(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                              const double* records, const row_outputs& out, const shard_options& opt) {
  const dpo::cuda::detail::shard_row_outputs o{out[0], out[1], out[2], out[3], out[4], out[5]};
  return to_host(dpo::cuda::shard_row_values(retype<device_t<T>>(v), sh, row_max, records, o, to_device(opt)));
}

template <class T>
shard_status shard_backward_rows(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                 const double* records, const double* row_coef, double grad_output, T* grad,
                                 std::int64_t grad_stride, const shard_options& opt) {
  return to_host(dpo::cuda::shard_backward_rows(retype<device_t<T>>(v), sh, row_max, records, row_coef, grad_output,
                                                reinterpret_cast<device_t<T>*>(grad), grad_stride, to_device(opt)));
}

template <class T>
shard_status shard_sequence_partials(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                     const double* records, double* seq, const shard_options& opt) {
  return to_host(dpo::cuda::shard_sequence_partials(retype<device_t<T>>(v), sh, row_max, records, seq, to_device(opt)));
}

template <class T>
shard_status shard_backward_sequences(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                      const double* records, const double* seq_grad, double nll_token_grad,
                                      std::int64_t nll_seqs, double grad_output, T* grad, std::int64_t grad_stride,
                                      const shard_options& opt) {
  return to_host(dpo::cuda::shard_backward_sequences(retype<device_t<T>>(v), sh, row_max, records, seq_grad,
                                                     nll_token_grad, nll_seqs, grad_output,
                                                     reinterpret_cast<device_t<T>*>(grad), grad_stride,
                                                     to_device(opt)));
}

template <class T>
shard_status shard_pair_partials(const pairs<T>& p, const dpo::vocab_shard& sh, const double* chosen_max,
                                 const double* chosen_records, const double* rejected_max,
                                 const double* rejected_records, double ld_alpha, double* seq,
                                 const shard_options& opt) {
  return to_host(dpo::cuda::shard_pair_partials(retype<device_t<T>>(p), sh, chosen_max, chosen_records, rejected_max,
                                                rejected_records, ld_alpha, seq, to_device(opt)));
}

shard_status shard_pair_stage(void* workspace, std::size_t& workspace_bytes, std::int64_t P, const double* seq_totals,
                              const double* ref_chosen, const double* ref_rejected, const dpo::loss_config& cfg,
                              bool metrics, const dpo::forward_outputs& out, double* seq_grad) {
  return to_host(dpo::cuda::shard_pair_stage(workspace, workspace_bytes, P, seq_totals, ref_chosen, ref_rejected, cfg,
                                             metrics, out, seq_grad));
}

template <class T>
shard_status shard_backward(void* workspace, std::size_t& workspace_bytes, const pairs<T>& p,
                            const dpo::vocab_shard& sh, const double* chosen_max, const double* chosen_records,
                            const double* rejected_max, const double* rejected_records, const double* seq_grad,
                            const double* nll_token_grad, double ld_alpha, const dpo::pair_grad_view<T>& grad,
                            const double* grad_output, const shard_options& opt) {
  return to_host(dpo::cuda::shard_backward(workspace, workspace_bytes, retype<device_t<T>>(p), sh, chosen_max,
                                           chosen_records, rejected_max, rejected_records, seq_grad, nll_token_grad,
                                           ld_alpha, retype<device_t<T>>(grad), grad_output, to_device(opt)));
}

#define DPO_SHARD_HARNESS(T)                                                                                          \
  template shard_status shard_check<T>(void*, std::size_t&, const tokens<T>&, const dpo::vocab_shard&,              \
                                       const shard_options&);                                                        \
  template shard_status shard_check<T>(void*, std::size_t&, const pairs<T>&, const dpo::vocab_shard&,               \
                                       const shard_options&);                                                        \
  template shard_status shard_partials<T>(const tokens<T>&, const dpo::vocab_shard&, double*, double*,              \
                                          const shard_options&);                                                     \
  template shard_status shard_row_values<T>(const tokens<T>&, const dpo::vocab_shard&, const double*, const double*, \
                                            const row_outputs&, const shard_options&);                               \
  template shard_status shard_backward_rows<T>(const tokens<T>&, const dpo::vocab_shard&, const double*,            \
                                               const double*, const double*, double, T*, std::int64_t,              \
                                               const shard_options&);                                                \
  template shard_status shard_sequence_partials<T>(const tokens<T>&, const dpo::vocab_shard&, const double*,        \
                                                   const double*, double*, const shard_options&);                    \
  template shard_status shard_backward_sequences<T>(const tokens<T>&, const dpo::vocab_shard&, const double*,       \
                                                    const double*, const double*, double, std::int64_t, double, T*, \
                                                    std::int64_t, const shard_options&);                             \
  template shard_status shard_pair_partials<T>(const pairs<T>&, const dpo::vocab_shard&, const double*,             \
                                               const double*, const double*, const double*, double, double*,        \
                                               const shard_options&);                                                \
  template shard_status shard_backward<T>(void*, std::size_t&, const pairs<T>&, const dpo::vocab_shard&,           \
                                          const double*, const double*, const double*, const double*,               \
                                          const double*, const double*, double, const dpo::pair_grad_view<T>&,      \
                                          const double*, const shard_options&);
DPO_SHARD_HARNESS(float)
DPO_SHARD_HARNESS(double)
DPO_SHARD_HARNESS(bf16_bits)
DPO_SHARD_HARNESS(f16_bits)
#undef DPO_SHARD_HARNESS

}  // namespace dpo_cuda_test
