// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA row kernels of the vocabulary-parallel path (formats: dpo/core/shard.hpp; guide:
// docs/distributed.md), the counterparts of dpo::cpu::shard_partials, shard_rebase and the
// shard's row backward:
//
//   shard_partials       phase 1, one read of the shard: row records + maxima (device arrays)
//   (caller)             MAX all-reduce of the maxima, e.g. ncclAllReduce(ncclMax)
//   shard_rebase         records shifted to the global maxima, in place
//   (caller)             SUM all-reduce of the records
//   shard_row_values     phase 2 per row: label log-prob, log-sum-exp and metric terms
//   shard_backward_rows  coef * grad_output * (onehot - softmax) on the shard's columns, with
//                        the exact lse of the combined record
//
// The sequence sums and the pair stage run where the caller likes (they are [seq_fields, S]
// and [P] sized): dpo::cpu::shard_pair_stage on the host, for one. Same conventions as
// dpo/cuda/dpo.cuh: device pointers, int64 sizes, a stream, a status; no allocation or sync.
// Labels are read on the device only: a completion label outside [0, vocab) makes its row's
// record NaN (sum_exp), so the loss is NaN; it is not reported as an error word (issue 14).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "dpo/core/shard.hpp"
#include "dpo/cuda/dpo.cuh"

namespace dpo {
namespace cuda {
namespace detail {

template <int BLOCK, bool Metrics, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_partials_kernel(token_view<T, L> v, vocab_shard sh, double* records,
                                                               double* row_max) {
  using A = acc_t<T>;
  const std::int64_t r0 = v.row_begin(0), n = v.row_end(v.num_seqs - 1) - r0;
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int64_t r = r0 + i;
    double* rec = records + r * shard_fields;
    const std::int64_t y = v.in_sequence(r) ? v.target(r) : -1;  // block-uniform
    if (y < 0 || y >= sh.vocab) {
      if (threadIdx.x == 0) {
        dpo::detail::empty_shard_record(rec);
        if (y >= 0) rec[dpo::detail::at(shard_field::sum_exp)] = NAN;  // a bad label poisons its row
        if (row_max != nullptr) row_max[r] = -INFINITY;
      }
      continue;
    }
    const T* row = v.logits + r * v.row_stride;
    T zy{};
    if (threadIdx.x == 0 && sh.holds(y)) zy = row[y - sh.start];
    const dpo::detail::row_stats<A> st = block_row_stats<BLOCK, Metrics, T, Metrics>(row, v.vocab);
    if (threadIdx.x == 0) {
      dpo::detail::shard_record(st, sh, y, to_acc(zy), Metrics, rec);
      if (row_max != nullptr) row_max[r] = rec[dpo::detail::at(shard_field::shard_max)];
    }
  }
}

__global__ void shard_rebase_kernel(std::int64_t begin, std::int64_t end, const double* row_max, double* records) {
  for (std::int64_t r = begin + blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < end;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    dpo::detail::shard_rebase(row_max[r], records + r * shard_fields);
}

/// Where shard_row_values writes, by buffer row (each may be null).
struct shard_row_outputs {
  double* logp = nullptr;
  double* lse = nullptr;
  double* entropy = nullptr;
  double* zmean = nullptr;
  double* wpo = nullptr;
  double* hit = nullptr;
};

/// Row r's phase-2 values from its combined record (the core's finish_row), zeros when the
/// row is not read; shared with the fused head's shard (dpo/cuda/linear_shard.cuh).
__device__ inline void write_row_values(const shard_row_outputs& o, std::int64_t r, bool read, const double* row_max,
                                        const double* records, std::int64_t vocab) {
  const dpo::detail::shard_row_values x =
      read ? dpo::detail::finish_row(row_max[r], records + r * shard_fields, vocab) : dpo::detail::shard_row_values{};
  if (o.logp) o.logp[r] = read ? x.logp : 0.0;
  if (o.lse) o.lse[r] = read ? x.lse : 0.0;
  if (o.entropy) o.entropy[r] = read ? x.entropy : 0.0;
  if (o.zmean) o.zmean[r] = read ? x.zmean : 0.0;
  if (o.wpo) o.wpo[r] = read ? x.wpo : 0.0;
  if (o.hit) o.hit[r] = read && x.hit ? 1.0 : 0.0;
}

template <class T, class L>
__global__ void shard_row_values_kernel(token_view<T, L> v, vocab_shard sh, const double* row_max,
                                        const double* records, shard_row_outputs o) {
  const std::int64_t r0 = v.row_begin(0), n = v.row_end(v.num_seqs - 1) - r0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = r0 + i;
    if (v.in_sequence(r)) write_row_values(o, r, v.target(r) >= 0, row_max, records, sh.vocab);
  }
}

/// One sequence's sums of DPO_SEQ_FIELDS, in field order.
struct shard_seq_acc {
  double f[seq_fields];
};

struct shard_seq_sum {
  __device__ shard_seq_acc operator()(const shard_seq_acc& a, const shard_seq_acc& b) const {
    shard_seq_acc c;
    for (int k = 0; k < seq_fields; ++k) c.f[k] = a.f[k] + b.f[k];
    return c;
  }
};

/// Block per sequence: the sums of its completion rows' values (no LD-DPO weights: logps =
/// logps_plain) into seq[f * S + s]. A fixed reduction tree: deterministic.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_sequence_kernel(token_view<T, L> v, vocab_shard sh,
                                                               const double* row_max, const double* records,
                                                               double* seq, bool metrics) {
  using dpo::detail::at;
  __shared__ typename cub::BlockReduce<shard_seq_acc, BLOCK>::TempStorage tmp;
  const std::int64_t S = v.num_seqs;
  for (std::int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    shard_seq_acc acc;
    for (int k = 0; k < seq_fields; ++k) acc.f[k] = 0.0;
    for (std::int64_t r = v.row_begin(s) + threadIdx.x; r < v.row_end(s); r += BLOCK) {
      if (v.target(r) < 0) continue;
      const dpo::detail::shard_row_values x = dpo::detail::finish_row(row_max[r], records + r * shard_fields, sh.vocab);
      acc.f[at(seq_field::tokens)] += 1.0;
      acc.f[at(seq_field::logps)] += x.logp;
      acc.f[at(seq_field::logps_plain)] += x.logp;
      if (metrics) {
        acc.f[at(seq_field::entropy)] += x.entropy;
        acc.f[at(seq_field::mean_logits)] += x.zmean;
        acc.f[at(seq_field::wpo)] += x.wpo;
        acc.f[at(seq_field::hits)] += x.hit ? 1.0 : 0.0;
      }
    }
    acc = cub::BlockReduce<shard_seq_acc, BLOCK>(tmp).Reduce(acc, shard_seq_sum());
    if (threadIdx.x == 0)
      for (int k = 0; k < seq_fields; ++k) seq[k * S + s] = acc.f[k];
    __syncthreads();  // tmp is reused by the next sequence
  }
}

/// The row coefficient of the backward from per-sequence gradients: seq_grad[s], plus nll
/// on the first nll_seqs sequences (the chosen side of TRL's concatenated batch).
struct seq_coefs {
  const double* seq_grad = nullptr;
  double nll = 0;
  std::int64_t nll_seqs = 0;
};

template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_backward_sequences_kernel(token_view<T, L> v, vocab_shard sh,
                                                                         const double* row_max,
                                                                         const double* records, seq_coefs c,
                                                                         double grad_output, T* grad,
                                                                         std::int64_t grad_stride) {
  using A = acc_t<T>;
  const std::int64_t r0 = v.row_begin(0), n = v.row_end(v.num_seqs - 1) - r0;
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int64_t r = r0 + i;
    if (!v.in_sequence(r)) continue;  // block-uniform
    const std::int64_t y = v.target(r);
    double coef = 0.0;
    if (y >= 0) {
      const std::int64_t s = v.seq_of_row(r);
      coef = dpo::detail::times(c.seq_grad[s] + (s < c.nll_seqs ? c.nll : 0.0), grad_output);
    }
    block_row_grad<BLOCK>(v.logits + r * v.row_stride, grad + r * grad_stride, v.vocab,
                          coef != 0.0 ? dpo::detail::shard_lse<A>(row_max[r], records + r * shard_fields)
                                      : dpo::detail::lse_parts<A>(A(0)),
                          static_cast<A>(coef), sh.holds(y) ? y - sh.start : -1);
  }
}

template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_backward_kernel(token_view<T, L> v, vocab_shard sh,
                                                               const double* row_max, const double* records,
                                                               const double* row_coef, double grad_output, T* grad,
                                                               std::int64_t grad_stride) {
  using A = acc_t<T>;
  const std::int64_t r0 = v.row_begin(0), n = v.row_end(v.num_seqs - 1) - r0;
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int64_t r = r0 + i;
    if (!v.in_sequence(r)) continue;  // gap rows are not written (block-uniform)
    const std::int64_t y = v.target(r);
    const double coef = y >= 0 ? dpo::detail::times(row_coef[r], grad_output) : 0.0;
    block_row_grad<BLOCK>(v.logits + r * v.row_stride, grad + r * grad_stride, v.vocab,
                          coef != 0.0 ? dpo::detail::shard_lse<A>(row_max[r], records + r * shard_fields)
                                      : dpo::detail::lse_parts<A>(A(0)),
                          static_cast<A>(coef), sh.holds(y) ? y - sh.start : -1);
  }
}

/// The shard's view and description: the core checks with global labels (not read here:
/// they live on the device).
template <class T, class L>
status check_shard(const token_view<T, L>& v, const vocab_shard& sh, const options& opt) {
  const status s = to_status(dpo::detail::check_vocab_shard(sh, v.vocab));
  if (!s) return s;
  return to_status(dpo::detail::check_view(v, "logits", policy(opt, true), sh.vocab));
}

template <class T, class L>
std::int64_t shard_rows(const token_view<T, L>& v) {
  return v.num_seqs > 0 ? v.row_end(v.num_seqs - 1) - v.row_begin(0) : 0;
}

}  // namespace detail

/// Phase 1 on the device: dpo::cpu::shard_partials (same records, same indexing by the
/// buffer's row: records [rows, shard_fields], row_max [rows] or null). Padded views only
/// (the host cannot read cu_seqlens to size the launch). opt.metrics false leaves the
/// metric fields 0. Deterministic.
template <class T, class L>
status shard_partials(const token_view<T, L>& shard, const vocab_shard& sh, double* records, double* row_max,
                      const options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  if (shard.cu_seqlens != nullptr) return detail::invalid("dpo: shard_partials takes padded views on CUDA");
  const std::int64_t n = detail::shard_rows(shard);
  if (n == 0) return {};
  if (records == nullptr) return detail::invalid("dpo: records is null");
  constexpr int B = detail::rows_block;
  const auto kernel = opt.metrics ? detail::shard_partials_kernel<B, true, T, L>
                                  : detail::shard_partials_kernel<B, false, T, L>;
  int grid = 1;
  s = detail::row_grid(kernel, B, n, &grid);
  if (!s) return s;
  return detail::launch("shard_partials_kernel", kernel, grid, B, stream, shard, sh, records, row_max);
}

/// Between the two all-reduces: dpo::cpu::shard_rebase on device arrays.
inline status shard_rebase(std::int64_t begin, std::int64_t end, const double* row_max, double* records,
                           cudaStream_t stream = 0) {
  if (end <= begin) return {};
  if (row_max == nullptr || records == nullptr) return detail::invalid("dpo: row_max or records is null");
  const std::int64_t n = end - begin;
  const unsigned grid = static_cast<unsigned>(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  return detail::launch("shard_rebase_kernel", detail::shard_rebase_kernel, grid, 256, stream, begin, end, row_max,
                        records);
}

/// Phase 2 per row on the device: from the combined records, each completion row's label
/// log-prob, log-sum-exp, entropy, mean logit, WPO term and argmax hit (0 on other rows of the
/// view's sequences; gap rows not written), as dpo::cpu's rows_from_records. Padded views.
template <class T, class L>
status shard_row_values(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                        const double* records, const detail::shard_row_outputs& out, const options& opt = {},
                        cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  if (shard.cu_seqlens != nullptr) return detail::invalid("dpo: shard_row_values takes padded views on CUDA");
  const std::int64_t n = detail::shard_rows(shard);
  if (n == 0) return {};
  if (row_max == nullptr || records == nullptr) return detail::invalid("dpo: row_max or records is null");
  const unsigned grid = static_cast<unsigned>(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  return detail::launch("shard_row_values_kernel", detail::shard_row_values_kernel<T, L>, grid, 256, stream, shard,
                        sh, row_max, records, out);
}

/// The shard-local backward on the device: row r of the view's sequences gets
/// row_coef[r] * grad_output * (onehot(y) - softmax(z)) on the shard's columns (zeros on
/// masked rows; gap rows not written), with the lse of the combined record. row_coef is
/// indexed by the buffer's row (e.g. built from dpo::cpu::shard_pair_stage's seq_grad).
/// In place when grad == shard.logits with the same stride. Padded views. Deterministic.
template <class T, class L>
status shard_backward_rows(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                           const double* records, const double* row_coef, double grad_output, T* grad,
                           std::int64_t grad_stride, const options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  if (shard.cu_seqlens != nullptr) return detail::invalid("dpo: shard_backward_rows takes padded views on CUDA");
  s = detail::to_status(dpo::detail::check_finite(grad_output, "grad_output"));
  if (!s) return s;
  s = detail::to_status(dpo::detail::check_seq_grad(shard, row_max, row_coef, grad, grad_stride,
                                                    detail::policy(opt, true)));
  if (!s) return s;
  const std::int64_t n = detail::shard_rows(shard);
  if (n == 0) return {};
  if (records == nullptr) return detail::invalid("dpo: records is null");
  constexpr int B = detail::rows_block;
  const auto kernel = detail::shard_backward_kernel<B, T, L>;
  int grid = 1;
  s = detail::row_grid(kernel, B, n, &grid);
  if (!s) return s;
  return detail::launch("shard_backward_kernel", kernel, grid, B, stream, shard, sh, row_max, records, row_coef,
                        grad_output, grad, grad_stride);
}

/// Phase 2 per sequence on the device: dpo::cpu::shard_sequence_partials (no LD-DPO: logps =
/// logps_plain) into seq [seq_fields, S] (device). With context parallelism the caller sums
/// seq over the context group; then dpo::cpu::shard_pair_stage (on a host copy: [seq_fields,
/// 2P] doubles) gives the loss, metrics and seq_grad. Padded views. Deterministic.
template <class T, class L>
status shard_sequence_partials(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                               const double* records, double* seq, const options& opt = {},
                               cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  if (shard.cu_seqlens != nullptr) return detail::invalid("dpo: shard_sequence_partials takes padded views on CUDA");
  if (shard.num_seqs == 0) return {};
  if (row_max == nullptr || records == nullptr || seq == nullptr)
    return detail::invalid("dpo: row_max, records or seq is null");
  const unsigned grid = static_cast<unsigned>(shard.num_seqs < 65535 ? shard.num_seqs : 65535);
  return detail::launch("shard_sequence_kernel", detail::shard_sequence_kernel<detail::seq_block, T, L>, grid,
                        detail::seq_block, stream, shard, sh, row_max, records, seq, opt.metrics);
}

/// The shard-local backward from per-sequence gradients (device arrays): row r of sequence s
/// gets (seq_grad[s] + (s < nll_seqs ? nll_token_grad : 0)) * grad_output * (onehot(y) -
/// softmax(z)) on the shard's columns. For TRL's concatenated batch pass shard_pair_stage's
/// seq_grad [2P] and nll_token_grad with nll_seqs = P (no LD-DPO). Same writes and aliasing
/// as shard_backward_rows.
template <class T, class L>
status shard_backward_sequences(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                                const double* records, const double* seq_grad, double nll_token_grad,
                                std::int64_t nll_seqs, double grad_output, T* grad, std::int64_t grad_stride,
                                const options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  if (shard.cu_seqlens != nullptr)
    return detail::invalid("dpo: shard_backward_sequences takes padded views on CUDA");
  for (const auto& [x, name] : {std::pair<double, const char*>{grad_output, "grad_output"},
                                std::pair<double, const char*>{nll_token_grad, "nll_token_grad"}}) {
    s = detail::to_status(dpo::detail::check_finite(x, name));
    if (!s) return s;
  }
  s = detail::to_status(dpo::detail::check_seq_grad(shard, row_max, seq_grad, grad, grad_stride,
                                                    detail::policy(opt, true)));
  if (!s) return s;
  if (detail::shard_rows(shard) == 0) return {};
  if (records == nullptr) return detail::invalid("dpo: records is null");
  constexpr int B = detail::rows_block;
  const auto kernel = detail::shard_backward_sequences_kernel<B, T, L>;
  int grid = 1;
  s = detail::row_grid(kernel, B, detail::shard_rows(shard), &grid);
  if (!s) return s;
  return detail::launch("shard_backward_sequences_kernel", kernel, grid, B, stream, shard, sh, row_max, records,
                        detail::seq_coefs{seq_grad, nll_token_grad, nll_seqs}, grad_output, grad, grad_stride);
}

}  // namespace cuda
}  // namespace dpo
