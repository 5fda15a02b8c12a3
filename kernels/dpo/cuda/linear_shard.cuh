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
// DPO from hidden states (TRL's pairs, hidden_pairs): linear_pair_shard_partials,
// linear_pair_shard_sequences ([seq_fields, 2P] sums, LD-DPO weighted: what the context group
// sums and the pair stage reads) and linear_pair_shard_backward (from the pair stage's seq_grad
// and nll_token_grad, device data), on dpo/cuda/linear_dpo.cuh's pair layout, labels kernel,
// sequence stage and coefficients around the per-token calls, as dpo::cpu's linear_pair_shard_*.
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
#include "dpo/cuda/linear_dpo.cuh"
#include "dpo/cuda/shard.cuh"

namespace dpo {
namespace cuda {
namespace detail {

/// After the last vocab chunk of rows [r0, r0 + nb): each counted row's record from its
/// statistics over the shard (the core's shard_record, as dpo::cpu::linear_shard_partials),
/// the empty record for the others. Writes nothing once the labels were rejected, here or in
/// `gate` (a pair call's own error word; null: none).
template <bool Metrics, class T, class L>
__global__ void linear_shard_records_kernel(linear_view<T, L> in, vocab_shard sh, std::int64_t r0, std::int64_t nb,
                                            linear_ws<T> w, double* records, double* row_max,
                                            const device_error* gate) {
  if (w.h->err.code != 0 || (gate != nullptr && gate->code != 0)) return;
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

/// linear_shard_partials; `gate`: an error word that also stops the records' writes (null:
/// none; linear_pair_shard_partials passes its own).
template <class T, class L>
status linear_shard_partials_run(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                                 const linear_view<T, L>& shard, const vocab_shard& sh, double* records,
                                 double* row_max, bool metrics, const linear_options& opt, cudaStream_t stream,
                                 const device_error* gate) {
  status s = to_status(dpo::detail::check_vocab_shard(sh, shard.vocab));
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
  if (!s) return s;
  if (N == 0)  // nothing to compute; the error word still becomes this call's (clear)
    return detail::launch("linear_check_kernel", detail::linear_check_kernel<L>, 1, 256, stream, shard.labels,
                          shard.mask, N, sh.vocab, shard.ignore_index, w.h);
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
                           nb, w, records, row_max, gate);
    }
    return s;
  };
  s = pass(true);
  return s ? pass(false) : s;
}

/// Phase 2, one thread per row: the core's finish_row for the counted rows, zeros elsewhere.
/// The hit: with top1, linear_logps' is_top1 (the core's shard_label_is_top1, as the CPU's
/// linear_shard_logps); without, finish_row's (the token-accuracy metric's first maximum).
template <class L>
__global__ void linear_shard_values_kernel(const L* labels, const std::uint8_t* mask, std::int64_t ignore_index,
                                           std::int64_t rows, std::int64_t vocab, const double* row_max,
                                           const double* records, shard_row_outputs o, bool top1) {
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const bool counts = linear_target(labels, mask, ignore_index, r) >= 0;
    write_row_values(o, r, counts, row_max, records, vocab);
    if (top1 && o.hit)
      o.hit[r] = counts && dpo::detail::shard_label_is_top1(row_max[r], records + r * shard_fields) ? 1.0 : 0.0;
  }
}

/// linear_shard_logps (top1) or the pair path's per-row values (the metric's hit).
template <class T, class L>
status linear_shard_values(const linear_view<T, L>& view, std::int64_t vocab, const double* row_max,
                           const double* records, const shard_row_outputs& out, bool top1, cudaStream_t stream) {
  if (vocab < 1) return invalid("dpo: vocab = %lld is invalid: must be >= 1", (long long)vocab);
  if (view.rows < 0) return invalid("dpo: rows = %lld is invalid: must be >= 0", (long long)view.rows);
  if (view.rows == 0) return {};
  if (view.labels == nullptr) return invalid("dpo: labels is null");
  if (row_max == nullptr || records == nullptr)
    return invalid(row_max == nullptr ? "dpo: row_max is null" : "dpo: records is null");
  return launch("linear_shard_values_kernel", linear_shard_values_kernel<L>, seq_grid(view.rows), 256, stream,
                view.labels, view.mask, view.ignore_index, view.rows, vocab, row_max, records, out, top1);
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
  return detail::linear_shard_partials_run(workspace, workspace_bytes, handle, shard, sh, records, row_max, metrics,
                                           opt, stream, nullptr);
}

/// Phase 2 per token on the device, as dpo::cpu::linear_shard_logps: from the combined
/// records (row_max and records after the two vocabulary all-reduces and shard_rebase
/// between them), each counted row r of `view` gets its label log-prob out.logp[r], lse
/// out.lse[r], entropy, mean logit over the global vocabulary (`vocab`), WPO term logp -
/// log sum_v p_v^2 and top-1 hit (is_top1: 1 when the label is the row's first global
/// maximum and its logit is above -inf, dpo::detail::shard_label_is_top1);
/// other rows get 0. Any member of `out` may be null; they may overlap neither each other nor
/// row_max, records, labels or mask. Only the view's labels, mask and ignore_index are read
/// (the labels were checked by phase 1). No collective and no workspace; every rank of the
/// group computes the same values. Deterministic.
template <class T, class L>
status linear_shard_logps(const linear_view<T, L>& view, std::int64_t vocab, const double* row_max,
                          const double* records, const detail::shard_row_outputs& out, cudaStream_t stream = 0) {
  using dpo::detail::range_of;
  const std::int64_t N = view.rows < 0 ? 0 : view.rows;
  const dpo::detail::named_range ins[4] = {range_of(row_max, 1, N, N, "row_max"),
                                           range_of(records, N, shard_fields, shard_fields, "records"),
                                           range_of(view.labels, 1, N, N, "labels"),
                                           range_of(view.mask, 1, N, N, "mask")};
  const dpo::detail::named_range outs[6] = {range_of(out.logp, 1, N, N, "out.logp"),
                                            range_of(out.lse, 1, N, N, "out.lse"),
                                            range_of(out.entropy, 1, N, N, "out.entropy"),
                                            range_of(out.zmean, 1, N, N, "out.zmean"),
                                            range_of(out.wpo, 1, N, N, "out.wpo"),
                                            range_of(out.hit, 1, N, N, "out.hit")};
  const status s = detail::check_linear_overlap(outs, 6, ins, 4);
  if (!s) return s;
  return detail::linear_shard_values(view, vocab, row_max, records, out, true, stream);
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

// ---- DPO from hidden states on a head shard: TRL's pairs -----------------------------------

namespace detail {

/// A pair call's arrays per hidden buffer (one for the concatenated layouts, two for
/// separate pairs): its maxima and records.
struct pair_shard_rows {
  const double* row_max[2];
  const double* records[2];
};

/// The checks and the workspace of a pair call: the shard against the head (or, `head`
/// null, the sequences call, against itself: no linear head pass, no linear workspace), the
/// pairs' layout (dpo/cuda/linear_dpo.cuh's, labels bounded by the GLOBAL vocabulary in its
/// labels kernel), the row arrays and the linear head's workspace: ldpo_prologue's. Then,
/// unless only the size was asked for, each buffer's maxima and records: non-null, and one
/// array for both sides of a one-buffer layout.
template <class T, class L>
status pair_shard_prologue(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                           const hidden_pairs<T, L>& policy, const linear_head<T>* head, const vocab_shard& sh,
                           const double* chosen_max, const double* chosen_records, const double* rejected_max,
                           const double* rejected_records, const linear_dpo_options& opt, ldpo_call<T, L>* c,
                           pair_shard_rows* rows) {
  status s = to_status(dpo::detail::check_vocab_shard(sh, head != nullptr ? head->vocab : sh.width()));
  if (!s) return s;
  if (head != nullptr) {
    s = ldpo_prologue(workspace, workspace_bytes, handle, policy, *head, static_cast<const hidden_pairs<T, L>*>(nullptr),
                      static_cast<const linear_head<T>*>(nullptr), static_cast<const loss_config*>(nullptr), opt, c);
  } else {
    // The sequences read labels and records only: the layout's rows, no linear workspace.
    const linear_head<T> labels_only = make_linear_head<T>(nullptr, sh.width(), policy.hidden_size, 0);
    const bool pointers = workspace != nullptr;
    s = ldpo_layout_of(policy, labels_only, "hidden", opt, pointers, &c->pol);
    const std::int64_t no_rows[2] = {0, 0};
    if (s) c->w = carve_ldpo(0, c->pol.rows, no_rows, policy.num_pairs(), 0);
    c->size_only = !pointers;
    if (s && !pointers) workspace_bytes = c->w.bytes;
    if (s && pointers) s = check_workspace(workspace, workspace_bytes, c->w.bytes);
    if (s && pointers) c->w = carve_ldpo(reinterpret_cast<std::uintptr_t>(workspace), c->pol.rows, no_rows,
                                         policy.num_pairs(), 0);
  }
  if (!s || c->size_only) return s;
  // Each buffer's rows get a record; a buffer without rows (T = 0, or packed with
  // num_rows = 0) may pass null arrays, an empty tensor's pointers.
  const double* const arrays[2][2] = {{chosen_max, chosen_records}, {rejected_max, rejected_records}};
  const char* const names[2][2] = {{"chosen_max", "chosen_records"}, {"rejected_max", "rejected_records"}};
  for (int side = 0; side < 2; ++side)
    for (int k = 0; k < 2; ++k)
      if (c->pol.rows[c->pol.buffer_of[side]] > 0 && arrays[side][k] == nullptr)
        return invalid("dpo: %s is null", names[side][k]);
  if (c->pol.num_buffers == 1 && (chosen_max != rejected_max || chosen_records != rejected_records))
    return invalid("dpo: a concatenated layout (one hidden buffer) takes one row_max and one records array for "
                   "both sides: chosen_max == rejected_max and chosen_records == rejected_records");
  *rows = pair_shard_rows{{chosen_max, rejected_max}, {chosen_records, rejected_records}};
  return {};
}

/// The maxima and records of each buffer against the call's other arrays: inputs of every
/// pair call (`out`: phase 1 writes them, so they may not overlap the hidden rows, labels,
/// masks, the head, the workspace or each other). Named by argument: buffer 0 holds the
/// chosen side's (both sides' for one buffer), buffer 1 the rejected side's.
template <class T, class L>
dpo::detail::named_range* pair_record_ranges(const ldpo_layout<T, L>& l, const pair_shard_rows& r,
                                             dpo::detail::named_range* out) {
  static constexpr const char* names[2][2] = {{"chosen_records", "chosen_max"}, {"rejected_records", "rejected_max"}};
  for (int k = 0; k < l.num_buffers; ++k) {
    *out++ = dpo::detail::range_of(r.records[k], l.rows[k], shard_fields, shard_fields, names[k][0]);
    *out++ = dpo::detail::range_of(r.row_max[k], 1, l.rows[k], l.rows[k], names[k][1]);
  }
  return out;
}

/// The arrays phase 2 of a pair call reads from its layout: the labels and masks
/// (ldpo_input_ranges without the hidden rows, which the sequences never read, and without a
/// head). Returns the count.
template <class T, class L>
int pair_label_ranges(const ldpo_layout<T, L>& l, std::int64_t hidden, dpo::detail::named_range* out) {
  const linear_head<T> labels_only = make_linear_head<T>(nullptr, 1, hidden, hidden);
  const int n = ldpo_input_ranges(l, labels_only, false, out);
  for (int k = 0; k < l.num_buffers; ++k) out[3 * k] = {};  // the hidden rows: not read here
  return n;
}

}  // namespace detail

/// Phase 1 of DPO from hidden states on a head shard, as dpo::cpu::linear_pair_shard_partials:
/// `head` holds this rank's weight rows [sh.start, sh.end) (head.vocab = sh.width(), the
/// bias likewise), `policy` every hidden row of TRL's pairs (padded, packed or separate; the
/// labels GLOBAL ids in [0, sh.vocab), or ignore_index / masked). Writes each hidden
/// buffer's records [rows, shard_fields] and maxima [rows], indexed by the buffer's row
/// (rows: row_end(last sequence), or options.num_rows for packed pairs), every row of the
/// buffer written: completion rows their record, the others the empty record. A
/// concatenated layout (one buffer) takes one array for both sides (chosen_* ==
/// rejected_*). opt.metrics computes the metric fields (a WPO loss needs them). One GEMM
/// pass over the shard, the head's chunks. Two-phase workspace (workspace == nullptr: the
/// checks and workspace_bytes only); one size serves the three pair calls on the same pairs
/// and head. A label outside [0, sh.vocab) or a bad cu_seqlens is reported in the
/// workspace's error word (offset 0, read_device_error: side 0 chosen, 1 rejected) and
/// nothing is written. Deterministic.
template <class T, class L>
status linear_pair_shard_partials(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                                  const hidden_pairs<T, L>& policy, const linear_head<T>& head, const vocab_shard& sh,
                                  double* chosen_max, double* chosen_records, double* rejected_max,
                                  double* rejected_records, const linear_dpo_options& opt = {},
                                  cudaStream_t stream = 0) {
  detail::ldpo_call<T, L> c;
  detail::pair_shard_rows r;
  status s = detail::pair_shard_prologue(workspace, workspace_bytes, handle, policy, &head, sh, chosen_max,
                                         chosen_records, rejected_max, rejected_records, opt, &c, &r);
  if (!s || c.size_only) return s;
  const detail::ldpo_ws& w = c.w;
  // Every buffer's maxima and records against every buffer's hidden rows (not only their
  // own: buffer 0's records are written before buffer 1's rows are read), the head, labels,
  // masks and the workspace, and against each other, before the first launch.
  dpo::detail::named_range outs[4], ins[11];
  const int n_out = static_cast<int>(detail::pair_record_ranges(c.pol, r, outs) - outs);
  int n_in = detail::ldpo_input_ranges(c.pol, head, false, ins);
  ins[n_in++] = detail::workspace_range(workspace, w.bytes);
  s = detail::check_linear_overlap(outs, n_out, ins, n_in);
  if (!s) return s;
  s = detail::launch("ldpo_labels_kernel", detail::ldpo_labels_kernel<T, L>, 1, detail::ldpo_block, stream,
                     detail::dev_of(c.pol), sh.vocab, 0, true, w.h, w.rows[0], w.rows[1]);
  for (int k = 0; s && k < c.pol.num_buffers; ++k) {
    std::size_t bytes = w.lin_bytes;
    s = detail::linear_shard_partials_run(w.lin_ws, bytes, handle, detail::ldpo_view(c.pol, k, head, w.rows[k].label),
                                          sh, const_cast<double*>(r.records[k]), const_cast<double*>(r.row_max[k]),
                                          opt.metrics, detail::ldpo_linear_options(opt), stream, &w.h->err);
  }
  return s;
}

/// Phase 2 of DPO from hidden states, as dpo::cpu::linear_pair_shard_sequences: from the
/// combined maxima and records (after the two vocabulary all-reduces and shard_rebase), the
/// [seq_fields, 2P] sums of the pairs' sequences into seq (device; chosen in columns
/// [0, P), rejected in [P, 2P); LD-DPO weighted by ld_alpha, which needs whole sequences on
/// this rank; metric sums with `metrics`, else 0), what the context group sums and the
/// pair stage (shard_pair_stage) reads. No head and no GEMM: the labels and layout of
/// `policy` only (its hidden rows are not read). Two-phase workspace (phase 1's serves);
/// labels and cu_seqlens are checked again into its error word, and seq is not written
/// after an error. Deterministic.
template <class T, class L>
status linear_pair_shard_sequences(void* workspace, std::size_t& workspace_bytes, const hidden_pairs<T, L>& policy,
                                   const vocab_shard& sh, const double* chosen_max, const double* chosen_records,
                                   const double* rejected_max, const double* rejected_records, double ld_alpha,
                                   double* seq, bool metrics, const linear_dpo_options& opt = {},
                                   cudaStream_t stream = 0) {
  status s = detail::to_status(dpo::detail::check_unit(ld_alpha, "ld_alpha"));
  if (!s) return s;
  detail::ldpo_call<T, L> c;
  detail::pair_shard_rows r;
  s = detail::pair_shard_prologue(workspace, workspace_bytes, nullptr, policy, static_cast<const linear_head<T>*>(nullptr),
                                  sh, chosen_max, chosen_records, rejected_max, rejected_records, opt, &c, &r);
  if (!s || c.size_only) return s;
  if (seq == nullptr) return detail::invalid("dpo: seq is null");
  const std::int64_t P = policy.num_pairs(), S = 2 * P;
  const detail::ldpo_ws& w = c.w;
  dpo::detail::named_range ins[15];
  ins[0] = detail::workspace_range(workspace, w.bytes);
  int n_in = static_cast<int>(detail::pair_record_ranges(c.pol, r, ins + 1) - ins);
  n_in += detail::pair_label_ranges(c.pol, policy.hidden_size, ins + n_in);
  const dpo::detail::named_range out = dpo::detail::range_of(seq, seq_fields, S, S, "seq");
  s = detail::check_linear_overlap(&out, 1, ins, n_in);
  if (!s) return s;
  s = detail::launch("ldpo_labels_kernel", detail::ldpo_labels_kernel<T, L>, 1, detail::ldpo_block, stream,
                     detail::dev_of(c.pol), sh.vocab, 0, true, w.h, w.rows[0], w.rows[1]);
  // Each completion row's values from its combined record (linear_shard_logps on the
  // workspace's row labels, with the token-accuracy metric's hit), then the unsharded head's
  // sequence stage (ldpo_sums_kernel).
  for (int k = 0; s && k < c.pol.num_buffers; ++k) {
    const detail::ldpo_rows& rb = w.rows[k];
    linear_view<T, std::int64_t> labels;
    labels.rows = c.pol.rows[k];
    labels.labels = rb.label;
    labels.ignore_index = -1;
    detail::shard_row_outputs o;
    o.logp = rb.logp;
    if (metrics) {
      o.entropy = rb.ent;
      o.zmean = rb.zmean;
      o.wpo = rb.wpo;
      o.hit = rb.hit;
    }
    s = detail::linear_shard_values(labels, sh.vocab, r.row_max[k], r.records[k], o, false, stream);
  }
  using dpo::detail::at;
  detail::seq_arrays side[2];
  for (int k = 0; k < 2; ++k) {
    double* base = seq + k * P;
    side[k] = detail::seq_arrays{base + at(seq_field::logps) * S,       base + at(seq_field::logps_plain) * S,
                                 base + at(seq_field::entropy) * S,     base + at(seq_field::mean_logits) * S,
                                 base + at(seq_field::wpo) * S,         base + at(seq_field::hits) * S,
                                 base + at(seq_field::tokens) * S};
  }
  return s ? detail::ldpo_sums(c.pol, w, w.rows, 0, P, ld_alpha, side[0], side[1], metrics, stream) : s;
}

/// The shard-local backward of the pair loss from hidden states, as
/// dpo::cpu::linear_pair_shard_backward: each completion row's dL/dlogp from seq_grad [2P]
/// (the pair stage's dL/dpi, chosen then rejected) and nll_token_grad (one double added on
/// the chosen side), LD-DPO weighted by the forward's ld_alpha, times grad_output, through
/// linear_shard_backward with each row's lse from its combined record. seq_grad,
/// nll_token_grad and grad_output (null: 1) are DEVICE data, so the pair stage's outputs
/// feed the backward without a host copy. Adds dWeight / dBias of the shard's rows
/// (complete); dHidden is the shard's PARTIAL, written (every row of the sequences; rows that
/// are not completion rows get zeros) or added (g.accumulate_hidden): the caller sums it over
/// the vocabulary group. Same workspace as phase 1; three GEMMs per chunk. Gradients may not
/// overlap each other or any input. A bad label or cu_seqlens is reported in the error word
/// and nothing is written (the dWeight / dBias GEMMs add exact zeros). Deterministic.
template <class T, class L, class G>
status linear_pair_shard_backward(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                                  const hidden_pairs<T, L>& policy, const linear_head<T>& head, const vocab_shard& sh,
                                  const double* chosen_max, const double* chosen_records, const double* rejected_max,
                                  const double* rejected_records, const double* seq_grad,
                                  const double* nll_token_grad, double ld_alpha, const linear_dpo_grads<T, G>& g,
                                  const double* grad_output = nullptr, const linear_dpo_options& opt = {},
                                  cudaStream_t stream = 0) {
  status s = detail::to_status(dpo::detail::check_unit(ld_alpha, "ld_alpha"));
  if (!s) return s;
  detail::ldpo_call<T, L> c;
  detail::pair_shard_rows r;
  s = detail::pair_shard_prologue(workspace, workspace_bytes, handle, policy, &head, sh, chosen_max, chosen_records,
                                  rejected_max, rejected_records, opt, &c, &r);
  if (!s || c.size_only) return s;
  if (seq_grad == nullptr || nll_token_grad == nullptr)
    return detail::invalid(seq_grad == nullptr ? "dpo: seq_grad is null" : "dpo: nll_token_grad is null");
  const std::int64_t P = policy.num_pairs();
  // The gradients against the layout, the head and the workspace (ldpo_check_grads), and
  // against every other input this call reads: the row state, seq_grad, nll_token_grad and
  // grad_output.
  dpo::detail::named_range ins[7];
  int n_in = static_cast<int>(detail::pair_record_ranges(c.pol, r, ins) - ins);
  ins[n_in++] = dpo::detail::range_of(seq_grad, 1, 2 * P, 2 * P, "seq_grad");
  ins[n_in++] = dpo::detail::range_of(nll_token_grad, 1, 1, 1, "nll_token_grad");
  ins[n_in++] = dpo::detail::range_of(grad_output, 1, 1, 1, "grad_output");
  s = detail::ldpo_check_grads(c.pol, head, g, workspace, static_cast<std::int64_t>(c.w.bytes), ins, n_in);
  if (!s) return s;
  const detail::ldpo_ws& w = c.w;
  s = detail::launch("ldpo_labels_kernel", detail::ldpo_labels_kernel<T, L>, 1, detail::ldpo_block, stream,
                     detail::dev_of(c.pol), sh.vocab, 0, true, w.h, w.rows[0], w.rows[1]);
  if (s)
    s = detail::launch("ldpo_coef_kernel", detail::ldpo_coef_kernel<T, L>, detail::seq_blocks(P), detail::ldpo_block,
                       stream, detail::dev_of(c.pol), w.rows[0], w.rows[1], std::int64_t{0}, P, ld_alpha,
                       static_cast<const detail::ldpo_header*>(w.h), seq_grad, seq_grad + P, nll_token_grad,
                       grad_output, static_cast<double*>(nullptr), static_cast<double*>(nullptr));
  const detail::linear_shard_rows rows[2] = {{sh, r.row_max[0], r.records[0]}, {sh, r.row_max[1], r.records[1]}};
  const double* const no_lse[2] = {nullptr, nullptr};
  return s ? detail::ldpo_backward(handle, c.pol, head, no_lse, w, g, opt, stream, rows) : s;
}

}  // namespace cuda
}  // namespace dpo
