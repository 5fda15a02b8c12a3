// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM head on a vocabulary shard on CUDA (Megatron's column-parallel head), the
// counterpart of dpo/cpu/linear_shard.hpp: this rank holds rows [sh.start, sh.end) of the
// weight, `weight [end - start, H]` (and of the bias), every hidden row, and labels as GLOBAL
// token ids. The shard's logits chunks are formed by the CUDA head's own loop (dpo/cuda/
// linear.cuh: chunk shape, workspace, cuBLASLt GEMMs, row kernels) and folded into the row
// records of the logits path (dpo/core/shard.hpp); from there on everything is the logits
// path's:
//
//   phase 1      linear_shard_partials: hidden x weight shard -> per-row records + maxima
//                (one GEMM pass over the shard)
//   (caller)     MAX all-reduce of the [rows] maxima, e.g. ncclAllReduce(ncclMax)
//   between      shard_rebase (dpo/cuda/shard.cuh)
//   (caller)     SUM all-reduce of the [rows, shard_fields] records
//   phase 2      linear_shard_logps: per-token log-prob, lse and metric terms
//   backward     linear_shard_backward: shard-local; dWeight / dBias rows of the shard
//                (complete), dHidden a PARTIAL that the caller sums over the vocabulary
//                group (one SUM all-reduce of [rows, H], as Megatron's column-parallel head)
//
// The contract of dpo/cuda/linear.cuh: the caller's two-phase workspace (workspace ==
// nullptr: check the shapes and set workspace_bytes; linear_workspace_size on the shard's
// view gives the same size, and one buffer serves phase 1 and the backward), the caller's
// cuBLASLt handle and stream, no allocation, no synchronization, argument errors as a status
// naming the argument before anything is enqueued, labels (device data) checked against the
// GLOBAL vocabulary by the first kernel into the workspace's error word (read_device_error),
// after which nothing outside the workspace is written. Deterministic for a fixed chunk shape
// and device. Guide: docs/distributed.md.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dpo/core/shard.hpp"
#include "dpo/cuda/linear.cuh"
#include "dpo/cuda/shard.cuh"

namespace dpo {
namespace cuda {
namespace detail {

/// After the last vocab chunk of rows [r0, r0 + nb): each counted row's record from its
/// statistics over the shard (the core's shard_record, as dpo::cpu::linear_shard_partials),
/// the empty record for the others. Writes nothing once the labels were rejected.
template <bool Metrics, class T, class L>
__global__ void linear_shard_records_kernel(linear_view<T, L> in, vocab_shard sh, std::int64_t r0, std::int64_t nb,
                                            linear_ws<T> w, double* records, double* row_max) {
  if (w.h->err.code != 0) return;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < nb;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = r0 + i;
    const linear_row<acc_t<T>>& q = w.rows[i];
    double* rec = records + r * shard_fields;
    if (q.y < 0) {
      dpo::detail::empty_shard_record(rec);
    } else {
      // q.y is the shard's column (or sh.width()); shard_record wants the global label, and
      // the statistics' argmax is a shard column, as it expects.
      const std::int64_t y = linear_target(in.labels, in.mask, in.ignore_index, r);
      dpo::detail::shard_record(q.acc, sh, y, q.zy, Metrics, rec);
    }
    if (row_max != nullptr) row_max[r] = rec[dpo::detail::at(shard_field::shard_max)];
  }
}

/// Phase 2, one thread per row: the core's finish_row for the counted rows, zeros elsewhere.
template <class L>
__global__ void linear_shard_values_kernel(const L* labels, const std::uint8_t* mask, std::int64_t ignore_index,
                                           std::int64_t rows, std::int64_t vocab, const double* row_max,
                                           const double* records, shard_row_outputs o) {
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    write_row_values(o, r, linear_target(labels, mask, ignore_index, r) >= 0, row_max, records, vocab);
}

}  // namespace detail

/// Phase 1 on a weight shard: `shard` is the head over this rank's weight rows [sh.start,
/// sh.end) (shard.vocab = sh.width(), the bias likewise) and every hidden row, its labels
/// GLOBAL ids in [0, sh.vocab) (or ignore_index / masked). Writes, for every row r,
/// records[r * shard_fields + f] (rows that do not count: the empty record) and, when not
/// null, row_max[r] (the buffer of the max all-reduce): what dpo::cpu::linear_shard_partials
/// writes. metrics false leaves the metric fields 0. One GEMM per chunk of the shard, the
/// head's chunk shape (workspace: linear_workspace_size(shard, opt)). records and row_max may
/// not overlap any input or each other. A label outside [0, sh.vocab) is reported in the
/// error word and nothing is written. Deterministic.
template <class T, class L>
status linear_shard_partials(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                             const linear_view<T, L>& shard, const vocab_shard& sh, double* records, double* row_max,
                             bool metrics, const linear_options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::to_status(dpo::detail::check_vocab_shard(sh, shard.vocab));
  if (!s) return s;
  linear_chunking ch;
  detail::linear_ws<T> w(0, 0, 1, 1, 0, false);
  bool size_only = false;
  s = detail::linear_prologue(workspace, workspace_bytes, handle, shard, opt, &ch, &w, &size_only);
  if (!s || size_only) return s;
  const std::int64_t N = shard.rows;
  if (N > 0 && records == nullptr) return detail::invalid("dpo: records is null");
  dpo::detail::named_range ins[6];
  dpo::detail::linear_input_ranges(shard, ins);
  ins[5] = detail::workspace_range(workspace, ch.workspace_bytes);
  const dpo::detail::named_range outs[2] = {dpo::detail::range_of(records, N, shard_fields, shard_fields, "records"),
                                            dpo::detail::range_of(row_max, 1, N, N, "row_max")};
  s = detail::check_linear_overlap(outs, 2, ins, 6);
  if (!s || N == 0) return s;
  constexpr int B = detail::linear_block;
  const detail::linear_bwd_in labels_of{nullptr, nullptr, nullptr, nullptr, false, {sh, nullptr, nullptr}};
  const auto stats = metrics ? detail::linear_stats_kernel<B, true, T, L> : detail::linear_stats_kernel<B, false, T, L>;
  const auto finish = metrics ? detail::linear_shard_records_kernel<true, T, L>
                              : detail::linear_shard_records_kernel<false, T, L>;
  double* const none = nullptr;
  // Twice over the same loop: first only choosing every GEMM's algorithm (dry), then enqueuing.
  const auto pass = [&](bool dry) {
    const detail::linear_gemm gm{handle, stream, w.gemm, static_cast<std::size_t>(w.gemm_bytes), dry};
    status s;
    if (!dry)
      s = detail::launch("linear_check_kernel", detail::linear_check_kernel<L>, 1, 256, stream, shard.labels,
                         shard.mask, N, sh.vocab, shard.ignore_index, w.h);
    for (std::int64_t r0 = 0; s && r0 < N; r0 += ch.rows) {
      const std::int64_t nb = ch.rows < N - r0 ? ch.rows : N - r0;
      if (!dry)
        s = detail::launch("linear_gather_kernel", detail::linear_gather_kernel<B, false, T, L>,
                           detail::row_blocks(nb), B, stream, shard, r0, nb, labels_of, w);
      for (std::int64_t v0 = 0; s && v0 < shard.vocab; v0 += ch.vocab) {
        const std::int64_t nv = ch.vocab < shard.vocab - v0 ? ch.vocab : shard.vocab - v0;
        s = detail::logits_gemm(gm, shard, w, nb, v0, nv);
        // last = false: the statistics stay in the row state for the records kernel.
        if (s && !dry)
          s = detail::launch("linear_stats_kernel", stats, detail::row_blocks(nb), B, stream, shard, r0, nb, v0, nv,
                             false, w, none, none, none, detail::linear_row_terms{});
      }
      if (s && !dry)
        s = detail::launch("linear_shard_records_kernel", finish, detail::seq_grid(nb), 256, stream, shard, sh, r0,
                           nb, w, records, row_max);
    }
    return s;
  };
  s = pass(true);
  return s ? pass(false) : s;
}

/// Phase 2 per token on the device, as dpo::cpu::linear_shard_logps: from the combined
/// records (row_max and records after the two vocabulary all-reduces and shard_rebase
/// between them), each counted row r of `view` gets its label log-prob out.logp[r], lse
/// out.lse[r], entropy, mean logit over the global vocabulary (`vocab`), WPO term logp -
/// log sum_v p_v^2 and argmax hit (1 when the label is the row's first global maximum);
/// other rows get 0. Any member of `out` may be null. Only the view's labels, mask and
/// ignore_index are read (the labels were checked by phase 1). No collective and no
/// workspace; every rank of the group computes the same values. Deterministic.
template <class T, class L>
status linear_shard_logps(const linear_view<T, L>& view, std::int64_t vocab, const double* row_max,
                          const double* records, const detail::shard_row_outputs& out, cudaStream_t stream = 0) {
  if (vocab < 1) return detail::invalid("dpo: vocab = %lld is invalid: must be >= 1", (long long)vocab);
  if (view.rows < 0) return detail::invalid("dpo: rows = %lld is invalid: must be >= 0", (long long)view.rows);
  if (view.rows == 0) return {};
  if (view.labels == nullptr) return detail::invalid("dpo: labels is null");
  if (row_max == nullptr || records == nullptr)
    return detail::invalid(row_max == nullptr ? "dpo: row_max is null" : "dpo: records is null");
  return detail::launch("linear_shard_values_kernel", detail::linear_shard_values_kernel<L>,
                        detail::seq_grid(view.rows), 256, stream, view.labels, view.mask, view.ignore_index,
                        view.rows, vocab, row_max, records, out);
}

/// The shard-local backward of sum_r grad_logps[r] * logps[r] (+ grad_entropy * entropy), as
/// dpo::cpu::linear_shard_backward: linear_logps_backward on the shard with each row's exact
/// log-sum-exp M + log S from its combined record (never recomputed: the shard's own logits
/// do not hold the row's mass) and the one-hot term on the shard's column of the label only.
/// entropy: the global per-row entropy of linear_shard_logps. Writes (or adds,
/// g.accumulate_hidden) the dHidden PARTIAL of the shard's columns, which the caller sums
/// over the vocabulary group; adds dWeight and dBias of the shard's rows (complete). Same
/// workspace as phase 1; three GEMMs per chunk (recompute, dHidden, dWeight). Outputs may not
/// overlap each other or any input. A label outside [0, sh.vocab) is reported in the error
/// word and nothing is written (the dWeight GEMMs add exact zeros). Deterministic.
template <class T, class L, class G>
status linear_shard_backward(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                             const linear_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                             const double* records, const double* grad_logps, const double* entropy,
                             const double* grad_entropy, const linear_grads<T, G>& g, const linear_options& opt = {},
                             cudaStream_t stream = 0) {
  const status s = detail::to_status(dpo::detail::check_vocab_shard(sh, shard.vocab));
  if (!s) return s;
  return detail::linear_backward_run(workspace, workspace_bytes, handle, shard, nullptr,
                                     detail::linear_shard_rows{sh, row_max, records}, grad_logps, entropy,
                                     grad_entropy, g, opt, stream);
}

}  // namespace cuda
}  // namespace dpo
