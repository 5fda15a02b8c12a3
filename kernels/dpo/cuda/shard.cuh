// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA building blocks of the vocabulary- and context-parallel path (formats:
// dpo/core/shard.hpp; guide: docs/distributed.md), the counterparts of dpo/cpu/shard.hpp:
//
//   shard_check              optional: labels (global ids) and cu_seqlens checked into an
//                            error word that the calls below then honour (options::error_word)
//   shard_partials           phase 1, one read of the shard: row records + maxima
//   (caller)                 MAX all-reduce of the maxima, e.g. ncclAllReduce(ncclMax)
//   shard_rebase             records shifted to the global maxima, in place
//   (caller)                 SUM all-reduce of the records
//   shard_row_values         phase 2 per row: label log-prob, log-sum-exp and metric terms
//   shard_sequence_partials  phase 2 per sequence: [seq_fields, S] sums (no LD-DPO)
//   shard_pair_partials      phase 2 per pair: [seq_fields, 2P] sums, LD-DPO weighted
//   (caller)                 SUM all-reduce of the sequence sums over the context group
//   shard_pair_stage         the pair stage on the device: loss, metrics, dL/dpi per sequence
//   shard_backward           the pairs' shard-local backward (LD-DPO, device scalars)
//   shard_backward_rows / shard_backward_sequences: the same from row / sequence coefficients
//
// Nothing here reads device data on the host, so a whole step (forward and backward) between
// the caller's collectives is enqueued without a host synchronization. Same conventions as
// dpo/cuda/dpo.cuh: device pointers, int64 sizes, a stream, a status naming the argument
// (nothing enqueued on bad arguments); no allocation or sync; the entry points that need
// scratch (shard_pair_stage, shard_backward) take dpo.cuh's two-phase workspace.
// Aliasing: no output of a call (the arrays it writes, its workspace included) may overlap an
// input it reads or another of its outputs (each function says which); the status names both
// and nothing is enqueued. Per-row arrays are taken over the rows the view may occupy (gaps of
// a padded view included; a packed view's whole options::num_rows buffer). The one exception
// is documented: a backward's gradient written in place over its logits (same pointer and
// stride); inputs may share buffers (one row state for both sides of a concatenated layout).
// Labels and cu_seqlens are read on the device only. shard_check reports the first bad one
// in a workspace's error word (read_device_error names it); given that word as
// options::error_word, every later call writes nothing but NaN sums, so the loss is NaN on
// every rank that sums them and no kernel reads past a bad cu_seqlens. Without a check, a
// completion label outside [0, vocab) makes its row's record NaN (so the loss is NaN) and a
// valid cu_seqlens is the caller's contract.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "dpo/core/check.hpp"
#include "dpo/core/shard.hpp"
#include "dpo/cuda/dpo.cuh"

namespace dpo {
namespace cuda {
namespace detail {

/// True when a shard_check's error word (options::error_word; null: none) holds an error: the
/// kernels then read nothing of the view (its cu_seqlens may be out of bounds).
__device__ __forceinline__ bool gated(const device_error* gate) { return gate != nullptr && gate->code != 0; }

template <int BLOCK, bool Metrics, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_partials_kernel(token_view<T, L> v, vocab_shard sh, double* records,
                                                               double* row_max, const device_error* gate) {
  using A = acc_t<T>;
  if (gated(gate)) return;
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

/// (Every kernel of these headers is a template, so that its host stub is a weak symbol and
/// several translation units may include the header; BLOCK is the launch's block size.)
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) shard_rebase_kernel(std::int64_t begin, std::int64_t end,
                                                             const double* row_max, double* records) {
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
                                        const double* records, shard_row_outputs o, const device_error* gate) {
  if (gated(gate)) return;
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

/// Each side's combined records and maxima (indexed by its buffer's rows); side 1 unused
/// for one view.
struct shard_sides {
  const double* row_max[2];
  const double* records[2];
};

/// A sequence's LD-DPO shared length (min of its and its partner's completion counts), +inf
/// without LD-DPO or with one side. Block-uniform.
template <int BLOCK, class T, class L, class Storage>
__device__ double shard_shared_length(const views<T, L>& vs, int side, std::int64_t s, bool ld, Storage& tmp) {
  if (!ld || vs.num_sides < 2) return INFINITY;
  const double own = static_cast<double>(count_tokens<BLOCK>(vs.v[side], s, tmp));
  const double other = static_cast<double>(count_tokens<BLOCK>(vs.v[1 - side], s, tmp));
  return own < other ? own : other;
}

/// Visits the completion rows of sequence s of a view in tiles of BLOCK rows: fn(r, j) with
/// j the row's position among the sequence's completion rows (a block scan, only when
/// `positions`; else j = 0). Thread t gets rows t, t + BLOCK, ... in order, so the sums a
/// caller folds are in a fixed order. Block-uniform.
template <int BLOCK, class T, class L, class Storage, class Fn>
__device__ void for_completion_rows(const token_view<T, L>& v, std::int64_t s, bool positions, Storage& tmp,
                                    Fn&& fn) {
  const std::int64_t rb = v.row_begin(s), re = v.row_end(s);
  std::int64_t running = 0;
  for (std::int64_t t0 = rb; t0 < re; t0 += BLOCK) {
    const std::int64_t r = t0 + threadIdx.x;
    const int flag = r < re && v.target(r) >= 0 ? 1 : 0;
    int j = 0, tile = 0;
    if (positions) {
      cub::BlockScan<int, BLOCK>(tmp).ExclusiveSum(flag, j, tile);
      __syncthreads();  // tmp is reused by the next tile
    }
    if (flag) fn(r, running + j);
    running += tile;
  }
}

/// Block per sequence of every side: the sums of its completion rows' values into
/// seq[f * C + side * S + s] (C = num_sides * S), the logps LD-DPO weighted when ld (two
/// sides: a pair's shared length is the min of its two counts). The core's finish_row per row
/// and the CPU's weights; a fixed reduction tree: deterministic.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_sequence_kernel(views<T, L> vs, vocab_shard sh, shard_sides st,
                                                               double* seq, bool metrics, bool ld, double ld_alpha,
                                                               const device_error* gate) {
  using dpo::detail::at;
  __shared__ union {
    typename cub::BlockReduce<shard_seq_acc, BLOCK>::TempStorage reduce;
    typename cub::BlockReduce<std::int64_t, BLOCK>::TempStorage count;
    typename cub::BlockScan<int, BLOCK>::TempStorage scan;
  } tmp;
  const std::int64_t S = vs.v[0].num_seqs, C = vs.num_sides * S;
  if (gated(gate)) {
    // NaN sums: the error reaches every rank that sums them (the loss is NaN there).
    if (threadIdx.x == 0)
      for (std::int64_t b = blockIdx.x; b < C; b += gridDim.x)
        for (int k = 0; k < seq_fields; ++k) seq[k * C + b] = NAN;
    return;
  }
  for (std::int64_t b = blockIdx.x; b < C; b += gridDim.x) {
    const int side = static_cast<int>(b / S);
    const std::int64_t s = b % S;
    const token_view<T, L>& v = vs.v[side];
    const double* row_max = st.row_max[side];
    const double* records = st.records[side];
    const double shared_len = shard_shared_length<BLOCK>(vs, side, s, ld, tmp.count);
    shard_seq_acc acc;
    for (int k = 0; k < seq_fields; ++k) acc.f[k] = 0.0;
    for_completion_rows<BLOCK>(v, s, ld, tmp.scan, [&](std::int64_t r, std::int64_t j) {
      const dpo::detail::shard_row_values x = dpo::detail::finish_row(row_max[r], records + r * shard_fields, sh.vocab);
      const double wt = static_cast<double>(j) < shared_len ? 1.0 : ld_alpha;
      acc.f[at(seq_field::tokens)] += 1.0;
      acc.f[at(seq_field::logps)] += ld ? dpo::detail::times(wt, x.logp) : x.logp;
      acc.f[at(seq_field::logps_plain)] += x.logp;
      if (metrics) {
        acc.f[at(seq_field::entropy)] += x.entropy;
        acc.f[at(seq_field::mean_logits)] += x.zmean;
        acc.f[at(seq_field::wpo)] += x.wpo;
        acc.f[at(seq_field::hits)] += x.hit ? 1.0 : 0.0;
      }
    });
    acc = cub::BlockReduce<shard_seq_acc, BLOCK>(tmp.reduce).Reduce(acc, shard_seq_sum());
    if (threadIdx.x == 0)
      for (int k = 0; k < seq_fields; ++k) seq[k * C + b] = acc.f[k];
    __syncthreads();  // tmp is reused by the next sequence
  }
}

/// The paired backward's row coefficients, block per sequence of each side: row r of
/// sequence s gets times(times(ldw(j), seq_grad[side * P + s]) + nll, grad_output) (nll on
/// the chosen side only; ldw the LD-DPO weight of its position j), dpo::cpu::shard_backward's
/// coefficient times grad_output, into coef[side][r]; the sequences' masked rows get 0.
/// nll and grad_output are device scalars (null: 0 and 1).
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_pair_coef_kernel(views<T, L> vs, const double* seq_grad,
                                                                const double* nll, const double* grad_output,
                                                                bool ld, double ld_alpha, double* coef0,
                                                                double* coef1, const device_error* gate) {
  __shared__ union {
    typename cub::BlockReduce<std::int64_t, BLOCK>::TempStorage count;
    typename cub::BlockScan<int, BLOCK>::TempStorage scan;
  } tmp;
  if (gated(gate)) return;
  const std::int64_t P = vs.v[0].num_seqs;
  const double go = grad_output != nullptr ? *grad_output : 1.0;
  const double n = nll != nullptr ? *nll : 0.0;
  for (std::int64_t b = blockIdx.x; b < 2 * P; b += gridDim.x) {
    const int side = static_cast<int>(b / P);
    const std::int64_t s = b % P;
    const token_view<T, L>& v = vs.v[side];
    double* coef = side ? coef1 : coef0;
    for (std::int64_t r = v.row_begin(s) + threadIdx.x; r < v.row_end(s); r += BLOCK) coef[r] = 0.0;
    const double shared_len = shard_shared_length<BLOCK>(vs, side, s, ld, tmp.count);
    const double g = seq_grad[b];
    for_completion_rows<BLOCK>(v, s, ld, tmp.scan, [&](std::int64_t r, std::int64_t j) {
      // An LD-DPO weight of 0 drops the token even where g is infinite (as the CPU).
      const double wt = static_cast<double>(j) < shared_len ? 1.0 : ld_alpha;
      coef[r] = dpo::detail::times(dpo::detail::times(wt, g) + (side == 0 ? n : 0.0), go);
    });
  }
}

/// The device pair stage's first kernel: a clean header for pair_kernel (no error, no label
/// error), as dpo_loss's loss_inputs_kernel. One thread (BLOCK = 1).
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) pair_stage_reset_kernel(ws_header* h) {
  h->err = device_error{0, 0, 0, 0, 0};
  h->label_key = no_label_error;
  h->magic = 0;
}

/// shard_check's last kernel (one thread): the recorded label error, if any, into the error
/// word, with the global vocabulary as its bound.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) shard_label_report_kernel(views<T, L> vs, std::int64_t vocab, ws_header* h) {
  if (h->label_key != no_label_error) report_label_error(vs, h, vocab);
}

/// The sequence arrays pair_kernel reads, pointed into field-major totals [seq_fields, 2P]:
/// side 0 the columns [0, P), side 1 [P, 2P). pair_kernel only reads them.
inline seq_arrays seq_columns(const double* totals, std::int64_t P, int side) {
  using dpo::detail::at;
  double* base = const_cast<double*>(totals) + side * P;
  const auto col = [&](seq_field f) { return base + at(f) * 2 * P; };
  seq_arrays q;
  q.logp = col(seq_field::logps);
  q.plain = col(seq_field::logps_plain);
  q.ent = col(seq_field::entropy);
  q.zmean = col(seq_field::mean_logits);
  q.wpo = col(seq_field::wpo);
  q.hit = col(seq_field::hits);
  q.count = col(seq_field::tokens);
  return q;
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
                                                                         std::int64_t grad_stride,
                                                                         const device_error* gate) {
  using A = acc_t<T>;
  if (gated(gate)) return;
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
                                                               std::int64_t grad_stride, const device_error* gate) {
  using A = acc_t<T>;
  if (gated(gate)) return;
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
status check_shard(const token_view<T, L>& v, const vocab_shard& sh, const options& opt, bool pointers = true) {
  const status s = to_status(dpo::detail::check_vocab_shard(sh, v.vocab));
  if (!s) return s;
  return to_status(dpo::detail::check_view(v, "logits", policy(opt, pointers), sh.vocab));
}

template <class T, class L>
status check_shard_pairs(const pair_view<T, L>& p, const vocab_shard& sh, const options& opt, bool pointers) {
  const status s = to_status(dpo::detail::check_vocab_shard(sh, p.chosen.vocab));
  if (!s) return s;
  return to_status(dpo::detail::check_pairs(p, "logits", policy(opt, pointers), sh.vocab));
}

/// The rows a kernel over the view may visit, an upper bound known on the host: exact for a
/// padded view, the buffer's options::num_rows for a packed one (its bounds live on the
/// device; the kernels read them there).
template <class T, class L>
std::int64_t shard_rows(const token_view<T, L>& v, const options& opt) {
  return dpo::detail::rows_of(v, policy(opt, false)).size();
}

/// The rows of the buffer a per-row array of the view is indexed by: row_end of its last
/// sequence (padded), num_rows (packed).
template <class T, class L>
std::int64_t buffer_rows(const token_view<T, L>& v, const options& opt) {
  return dpo::detail::rows_of(v, policy(opt, false)).end;
}

/// Launches a block-per-row kernel over the view's rows, after the records check; nothing
/// when the view has no rows.
template <class Kernel, class T, class L, class... Args>
status launch_rows(const char* what, Kernel kernel, const token_view<T, L>& v, const options& opt,
                   const double* records, cudaStream_t stream, Args&&... args) {
  const std::int64_t n = shard_rows(v, opt);
  if (n == 0) return {};
  if (records == nullptr) return invalid("dpo: records is null");
  int grid = 1;
  const status s = row_grid(kernel, rows_block, n, &grid);
  if (!s) return s;
  return launch(what, kernel, grid, rows_block, stream, std::forward<Args>(args)...);
}

/// The checks of a single view's backward: the shard, the finite scalars, and the core's
/// check of row_max, the coefficients and the gradient buffer.
template <class T, class L>
status check_view_backward(const token_view<T, L>& v, const vocab_shard& sh, const options& opt,
                           std::initializer_list<std::pair<double, const char*>> scalars, const double* row_max,
                           const double* coef, const T* grad, std::int64_t grad_stride) {
  status s = check_shard(v, sh, opt);
  for (const auto& [x, name] : scalars)
    if (s) s = to_status(dpo::detail::check_finite(x, name));
  if (!s) return s;
  return to_status(dpo::detail::check_seq_grad(v, row_max, coef, grad, grad_stride, policy(opt, true)));
}

/// A status naming the first null one of the pair entry points' `last` argument (always
/// needed) and per-side state (needed only by a side with rows: one without may pass null,
/// an empty tensor's pointer), or success. `what`: the entry point.
template <class T, class L>
status first_null(const char* what, const pair_view<T, L>& shard, const options& opt, const double* chosen_max,
                  const double* chosen_records, const double* rejected_max, const double* rejected_records,
                  const double* last, const char* last_name) {
  if (last == nullptr) return invalid("dpo: %s: %s is null", what, last_name);
  const bool rows[2] = {shard_rows(shard.chosen, opt) > 0, shard_rows(shard.rejected, opt) > 0};
  const std::pair<const double*, const char*> args[] = {{chosen_max, "chosen_max"},
                                                        {chosen_records, "chosen_records"},
                                                        {rejected_max, "rejected_max"},
                                                        {rejected_records, "rejected_records"}};
  for (int k = 0; k < 4; ++k)
    if (rows[k / 2] && args[k].first == nullptr) return invalid("dpo: %s: %s is null", what, args[k].second);
  return {};
}

// ---- the aliasing checks: byte ranges for the core's check_no_overlap ------------------

/// The core's check_no_overlap as a status: no output may overlap an input or another output.
inline status check_shard_overlap(const dpo::detail::named_range* outs, int n_out,
                                  const dpo::detail::named_range* ins, int n_in) {
  return to_status(dpo::detail::check_no_overlap(outs, n_out, ins, n_in));
}

/// The bytes of an array of `width` elements per buffer row (records, row_max, row_coef,
/// labels, mask, out.*) over the rows the view may occupy (rows_of: gaps of a padded view
/// included, the whole options::num_rows buffer for a packed one), for check_shard_overlap.
template <class U, class T, class L>
dpo::detail::named_range row_array_range(const U* p, std::int64_t width, const token_view<T, L>& v,
                                         const options& opt, const char* name) {
  const dpo::detail::row_span r = dpo::detail::rows_of(v, policy(opt, false));
  if (p == nullptr || r.size() == 0) return {{}, name};
  return dpo::detail::range_of(p + r.begin * width, r.size(), width, width, name);
}

/// The bytes of the logits-shaped rows of the view in the buffer (base, stride): the logits
/// read, or a gradient written.
template <class T, class L>
dpo::detail::named_range logits_rows_range(const T* base, std::int64_t stride, const token_view<T, L>& v,
                                           const options& opt, const char* name) {
  return {dpo::detail::row_bytes(base, stride, v, policy(opt, false)), name};
}

/// The argument names of one view's arrays (logits, labels, mask, cu_seqlens, as the core's
/// view_ranges takes them): a single view's, or a pair view's sides.
inline constexpr const char* shard_names[4] = {"shard.logits", "shard.labels", "shard.mask", "shard.cu_seqlens"};
inline constexpr const char* side_names[2][4] = {
    {"shard.chosen.logits", "shard.chosen.labels", "shard.chosen.mask", "shard.chosen.cu_seqlens"},
    {"shard.rejected.logits", "shard.rejected.labels", "shard.rejected.mask", "shard.rejected.cu_seqlens"}};

/// The view's device data every kernel reads (labels, mask, cu_seqlens: the core's
/// view_index_ranges, 3 entries) into `out`; returns the end.
template <class T, class L>
dpo::detail::named_range* view_data_ranges(const token_view<T, L>& v, const options& opt,
                                           const char* const names[4], dpo::detail::named_range* out) {
  dpo::detail::view_index_ranges(v, policy(opt, false), names + 1, out);
  return out + 3;
}

/// options::error_word (read by every gated kernel) as an input range.
inline dpo::detail::named_range error_word_range(const options& opt) {
  return dpo::detail::range_of(opt.error_word, 1, 1, 1, "options::error_word");
}

/// The per-side state a pair call reads (row maxima and records, each side's indexed by its
/// own buffer's rows) and both sides' labels, mask and cu_seqlens: 10 entries into `out`.
template <class T, class L>
void pair_state_ranges(const pair_view<T, L>& p, const options& opt, const double* chosen_max,
                       const double* chosen_records, const double* rejected_max, const double* rejected_records,
                       dpo::detail::named_range* out) {
  out[0] = row_array_range(chosen_max, 1, p.chosen, opt, "chosen_max");
  out[1] = row_array_range(chosen_records, shard_fields, p.chosen, opt, "chosen_records");
  out[2] = row_array_range(rejected_max, 1, p.rejected, opt, "rejected_max");
  out[3] = row_array_range(rejected_records, shard_fields, p.rejected, opt, "rejected_records");
  view_data_ranges(p.rejected, opt, side_names[1], view_data_ranges(p.chosen, opt, side_names[0], out + 4));
}

/// A single view's backward: the gradient rows written against the state read (row_max,
/// records, the coefficients `coef`), the view's labels, mask, cu_seqlens and the error word.
/// The logits are check_seq_grad's (in place allowed).
template <class T, class L>
status check_grad_overlap(const token_view<T, L>& v, const options& opt, const T* grad, std::int64_t grad_stride,
                          const double* row_max, const double* records, const dpo::detail::named_range& coef) {
  dpo::detail::named_range ins[7];
  ins[0] = row_array_range(row_max, 1, v, opt, "row_max");
  ins[1] = row_array_range(records, shard_fields, v, opt, "records");
  ins[2] = coef;
  view_data_ranges(v, opt, shard_names, ins + 3);
  ins[6] = error_word_range(opt);
  const dpo::detail::named_range out = logits_rows_range(grad, grad_stride, v, opt, "grad");
  return check_shard_overlap(&out, 1, ins, 7);
}

/// The workspace of shard_check: the header (error word first), 256-byte granular.
inline constexpr std::size_t shard_check_bytes = (sizeof(ws_header) + 255) / 256 * 256;

template <class T, class L>
status enqueue_shard_check(void* workspace, std::size_t& workspace_bytes, const views<T, L>& vs,
                           const vocab_shard& sh, const options& opt, cudaStream_t stream) {
  if (workspace == nullptr) {
    workspace_bytes = shard_check_bytes;
    return {};
  }
  status s = check_workspace(workspace, workspace_bytes, shard_check_bytes);
  if (!s) return s;
  // The header it writes may not overlap the labels, mask or cu_seqlens it reads.
  dpo::detail::named_range ins[6];
  dpo::detail::named_range* e = view_data_ranges(vs.v[0], opt, vs.num_sides > 1 ? side_names[0] : shard_names, ins);
  if (vs.num_sides > 1) e = view_data_ranges(vs.v[1], opt, side_names[1], e);
  const dpo::detail::named_range out = workspace_range(workspace, shard_check_bytes);
  s = check_shard_overlap(&out, 1, ins, static_cast<int>(e - ins));
  if (!s) return s;
  ws_header* h = static_cast<ws_header*>(workspace);
  const std::int64_t n = shard_rows(vs.v[0], opt) + (vs.num_sides > 1 ? shard_rows(vs.v[1], opt) : 0);
  const unsigned grid = static_cast<unsigned>(n / 256 + 1 < 1024 ? n / 256 + 1 : 1024);
  s = launch("check_kernel", check_kernel<T, L>, 1, 256, stream, vs, h, false);
  if (!s) return s;
  // Labels against the GLOBAL vocabulary (check_kernel above checked cu_seqlens; a bad one
  // stops this kernel before it reads past it).
  s = launch("label_check_kernel", label_check_kernel<256, T, L>, grid, 256, stream, vs, h, sh.vocab);
  if (!s) return s;
  return launch("shard_label_report_kernel", shard_label_report_kernel<1, T, L>, 1, 1, stream, vs, sh.vocab, h);
}

/// Blocks of a kernel with a block per sequence of `n`.
inline unsigned sequence_blocks(std::int64_t n) { return static_cast<unsigned>(n < 65535 ? n : 65535); }

template <class T, class L>
status launch_sequences(const views<T, L>& vs, const vocab_shard& sh, const shard_sides& st, double* seq,
                        bool metrics, double ld_alpha, const device_error* gate, cudaStream_t stream) {
  return launch("shard_sequence_kernel", shard_sequence_kernel<seq_block, T, L>,
                sequence_blocks(vs.num_sides * vs.v[0].num_seqs), seq_block, stream, vs, sh, st, seq, metrics,
                ld_alpha != 1.0, ld_alpha, gate);
}

}  // namespace detail

// Packed views (cu_seqlens != null) take options::num_rows, the rows of the logits buffer
// (the host cannot read cu_seqlens); cu_seqlens must then be valid (non-decreasing, within
// [0, num_rows]), which shard_check checks on the device (see the top; the PyTorch ops run
// it before each call).

/// The device-data check of a shard's view, on the device, into the error word at byte 0 of
/// `workspace` (two-phase: workspace == nullptr sets workspace_bytes, a few hundred bytes):
/// cu_seqlens (packed: non-negative, non-decreasing, within options::num_rows) and every
/// completion label against the GLOBAL vocabulary sh.vocab (a label of another rank's shard
/// is valid), the lowest bad index reported (deterministic), as dpo_forward's (the side is 0
/// here; 0 chosen / 1 rejected for the pair overload). Pass shard_error_word(workspace) as
/// options::error_word to the calls of the step that follow on the same stream: with an
/// error they write NaN sums and nothing else. The workspace is the check's own: the
/// workspaces of shard_pair_stage and shard_backward overwrite byte 0. Read the word with
/// read_device_error (a synchronization) when convenient, e.g. after the step. The logits
/// are not read. The workspace's header may not overlap the labels, mask or cu_seqlens.
template <class T, class L>
status shard_check(void* workspace, std::size_t& workspace_bytes, const token_view<T, L>& shard,
                   const vocab_shard& sh, const options& opt = {}, cudaStream_t stream = 0) {
  const status s = detail::check_shard(shard, sh, opt, workspace != nullptr);
  if (!s) return s;
  return detail::enqueue_shard_check(workspace, workspace_bytes, detail::make_views<T, L>(shard, nullptr, opt), sh,
                                     opt, stream);
}

/// shard_check of both sides of a pair view (error side 0 chosen, 1 rejected).
template <class T, class L>
status shard_check(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& shard,
                   const vocab_shard& sh, const options& opt = {}, cudaStream_t stream = 0) {
  const status s = detail::check_shard_pairs(shard, sh, opt, workspace != nullptr);
  if (!s) return s;
  return detail::enqueue_shard_check(workspace, workspace_bytes, detail::make_views(shard.chosen, &shard.rejected, opt),
                                     sh, opt, stream);
}

/// The error word of a shard_check workspace (device memory), for options::error_word.
inline const device_error* shard_error_word(const void* workspace) {
  return reinterpret_cast<const device_error*>(static_cast<const char*>(workspace) + device_error_offset);
}

/// Phase 1 on the device: dpo::cpu::shard_partials (same records, same indexing by the
/// buffer's row: records [rows, shard_fields], row_max [rows] or null; rows outside every
/// sequence are not written). opt.metrics false leaves the metric fields 0. records and
/// row_max may overlap neither each other nor the logits rows, labels, mask, cu_seqlens or
/// options::error_word. Deterministic.
template <class T, class L>
status shard_partials(const token_view<T, L>& shard, const vocab_shard& sh, double* records, double* row_max,
                      const options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  dpo::detail::named_range ins[5];
  dpo::detail::view_ranges(shard, detail::policy(opt, false), detail::shard_names, ins);  // logits, labels, mask, cu
  ins[4] = detail::error_word_range(opt);
  const dpo::detail::named_range outs[2] = {detail::row_array_range(records, shard_fields, shard, opt, "records"),
                                            detail::row_array_range(row_max, 1, shard, opt, "row_max")};
  s = detail::check_shard_overlap(outs, 2, ins, 5);
  if (!s) return s;
  constexpr int B = detail::rows_block;
  const auto kernel = opt.metrics ? detail::shard_partials_kernel<B, true, T, L>
                                  : detail::shard_partials_kernel<B, false, T, L>;
  return detail::launch_rows("shard_partials_kernel", kernel, shard, opt, records, stream, shard, sh, records,
                             row_max, opt.error_word);
}

/// Between the two all-reduces: dpo::cpu::shard_rebase on device arrays, rows [begin, end)
/// (begin >= 0; nothing for end <= begin). records (written in place) may not overlap
/// row_max.
inline status shard_rebase(std::int64_t begin, std::int64_t end, const double* row_max, double* records,
                           cudaStream_t stream = 0) {
  if (begin < 0) return detail::invalid("dpo: begin = %lld is invalid: must be >= 0", (long long)begin);
  if (end <= begin) return {};
  if (row_max == nullptr || records == nullptr) return detail::invalid("dpo: row_max or records is null");
  // Row r's record starts at byte r * shard_fields * 8: it must be addressable.
  constexpr std::int64_t max_end = INT64_MAX / static_cast<std::int64_t>(shard_fields * sizeof(double));
  if (end > max_end)
    return detail::invalid("dpo: end = %lld is invalid: must be <= %lld", (long long)end, (long long)max_end);
  const std::int64_t n = end - begin;
  const dpo::detail::named_range out =
      dpo::detail::range_of(records + begin * shard_fields, n, shard_fields, shard_fields, "records");
  const dpo::detail::named_range in = dpo::detail::range_of(row_max + begin, 1, n, n, "row_max");
  const status s = detail::check_shard_overlap(&out, 1, &in, 1);
  if (!s) return s;
  const unsigned grid = static_cast<unsigned>(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  return detail::launch("shard_rebase_kernel", detail::shard_rebase_kernel<256>, grid, 256, stream, begin, end, row_max,
                        records);
}

/// Phase 2 per row on the device: from the combined records, each completion row's label
/// log-prob, log-sum-exp, entropy, mean logit, WPO term and argmax hit (0 on other rows of the
/// view's sequences; gap rows not written), as dpo::cpu's rows_from_records. The members of
/// `out` (each may be null) may overlap neither each other nor row_max, records, labels,
/// mask, cu_seqlens or options::error_word. The logits are not read.
template <class T, class L>
status shard_row_values(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                        const double* records, const detail::shard_row_outputs& out, const options& opt = {},
                        cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  const std::int64_t n = detail::shard_rows(shard, opt);
  if (n == 0) return {};
  if (row_max == nullptr || records == nullptr) return detail::invalid("dpo: row_max or records is null");
  dpo::detail::named_range ins[6];
  ins[0] = detail::row_array_range(row_max, 1, shard, opt, "row_max");
  ins[1] = detail::row_array_range(records, shard_fields, shard, opt, "records");
  detail::view_data_ranges(shard, opt, detail::shard_names, ins + 2);
  ins[5] = detail::error_word_range(opt);
  const dpo::detail::named_range outs[6] = {detail::row_array_range(out.logp, 1, shard, opt, "out.logp"),
                                            detail::row_array_range(out.lse, 1, shard, opt, "out.lse"),
                                            detail::row_array_range(out.entropy, 1, shard, opt, "out.entropy"),
                                            detail::row_array_range(out.zmean, 1, shard, opt, "out.zmean"),
                                            detail::row_array_range(out.wpo, 1, shard, opt, "out.wpo"),
                                            detail::row_array_range(out.hit, 1, shard, opt, "out.hit")};
  s = detail::check_shard_overlap(outs, 6, ins, 6);
  if (!s) return s;
  const unsigned grid = static_cast<unsigned>(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  return detail::launch("shard_row_values_kernel", detail::shard_row_values_kernel<T, L>, grid, 256, stream, shard,
                        sh, row_max, records, out, opt.error_word);
}

/// The shard-local backward on the device: row r of the view's sequences gets
/// row_coef[r] * grad_output * (onehot(y) - softmax(z)) on the shard's columns (zeros on
/// masked rows; gap rows not written), with the lse of the combined record. row_coef is
/// indexed by the buffer's row. In place when grad == shard.logits with the same stride; any
/// other overlap of grad with the logits rows is rejected, and grad may not overlap row_max,
/// records, row_coef, labels, mask, cu_seqlens or options::error_word. Deterministic.
template <class T, class L>
status shard_backward_rows(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                           const double* records, const double* row_coef, double grad_output, T* grad,
                           std::int64_t grad_stride, const options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::check_view_backward(shard, sh, opt, {{grad_output, "grad_output"}}, row_max, row_coef, grad,
                                         grad_stride);
  if (!s) return s;
  s = detail::check_grad_overlap(shard, opt, grad, grad_stride, row_max, records,
                                 detail::row_array_range(row_coef, 1, shard, opt, "row_coef"));
  if (!s) return s;
  return detail::launch_rows("shard_backward_kernel", detail::shard_backward_kernel<detail::rows_block, T, L>, shard,
                             opt, records, stream, shard, sh, row_max, records, row_coef, grad_output, grad,
                             grad_stride, opt.error_word);
}

/// Phase 2 per sequence on the device: dpo::cpu::shard_sequence_partials (no LD-DPO: logps =
/// logps_plain) into seq [seq_fields, S] (device). With context parallelism the caller sums
/// seq over the context group. seq may overlap none of row_max, records, labels, mask,
/// cu_seqlens or options::error_word (the logits are not read). Deterministic; equal to the
/// CPU's to rounding (a tree sum).
template <class T, class L>
status shard_sequence_partials(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                               const double* records, double* seq, const options& opt = {},
                               cudaStream_t stream = 0) {
  status s = detail::check_shard(shard, sh, opt);
  if (!s) return s;
  if (shard.num_seqs == 0) return {};
  if (seq == nullptr) return detail::invalid("dpo: seq is null");
  // Row state is read only for the view's rows: without any it may be null.
  if (detail::shard_rows(shard, opt) > 0 && (row_max == nullptr || records == nullptr))
    return detail::invalid("dpo: %s is null", row_max == nullptr ? "row_max" : "records");
  dpo::detail::named_range ins[6];
  ins[0] = detail::row_array_range(row_max, 1, shard, opt, "row_max");
  ins[1] = detail::row_array_range(records, shard_fields, shard, opt, "records");
  detail::view_data_ranges(shard, opt, detail::shard_names, ins + 2);
  ins[5] = detail::error_word_range(opt);
  const std::int64_t n_seq = seq_fields * shard.num_seqs;
  const dpo::detail::named_range out = dpo::detail::range_of(seq, 1, n_seq, n_seq, "seq");
  s = detail::check_shard_overlap(&out, 1, ins, 6);
  if (!s) return s;
  const detail::views<T, L> vs = detail::make_views<T, L>(shard, nullptr, opt);
  return detail::launch_sequences(vs, sh, detail::shard_sides{{row_max, nullptr}, {records, nullptr}}, seq,
                                  opt.metrics, 1.0, opt.error_word, stream);
}

/// Phase 2, pairs, on the device: dpo::cpu::shard_pair_partials. Both sides' sums into seq
/// ([seq_fields, 2P], device; chosen in columns [0, P), rejected in [P, 2P)), LD-DPO weighted
/// by ld_alpha (whole sequences on this rank: 1 under context parallelism). Each side's
/// records and maxima are indexed by its own buffer's rows (one array for both sides of a
/// concatenated layout). opt.metrics (pass it on for WPO) computes the metric sums. seq may
/// overlap none of the maxima, records, either side's labels, mask or cu_seqlens, or
/// options::error_word (the logits are not read; the maxima and records may be shared by the
/// sides). Deterministic; equal to the CPU's to rounding (a tree sum per sequence).
template <class T, class L>
status shard_pair_partials(const pair_view<T, L>& shard, const vocab_shard& sh, const double* chosen_max,
                           const double* chosen_records, const double* rejected_max,
                           const double* rejected_records, double ld_alpha, double* seq, const options& opt = {},
                           cudaStream_t stream = 0) {
  status s = detail::check_shard_pairs(shard, sh, opt, true);
  if (!s) return s;
  s = detail::to_status(dpo::detail::check_unit(ld_alpha, "ld_alpha"));
  if (!s) return s;
  s = detail::first_null("shard_pair_partials", shard, opt, chosen_max, chosen_records, rejected_max,
                         rejected_records, seq, "seq");
  if (!s) return s;
  dpo::detail::named_range ins[11];
  detail::pair_state_ranges(shard, opt, chosen_max, chosen_records, rejected_max, rejected_records, ins);
  ins[10] = detail::error_word_range(opt);
  const std::int64_t n_seq = seq_fields * 2 * shard.num_pairs();
  const dpo::detail::named_range out = dpo::detail::range_of(seq, 1, n_seq, n_seq, "seq");
  s = detail::check_shard_overlap(&out, 1, ins, 11);
  if (!s) return s;
  const detail::views<T, L> vs = detail::make_views(shard.chosen, &shard.rejected, opt);
  return detail::launch_sequences(vs, sh,
                                  detail::shard_sides{{chosen_max, rejected_max}, {chosen_records, rejected_records}},
                                  seq, opt.metrics, ld_alpha, opt.error_word, stream);
}

/// The device pair stage: dpo::cpu::shard_pair_stage on device arrays, the two-phase
/// workspace of dpo.cuh (workspace == nullptr: checks the host arguments and sets
/// workspace_bytes only). From the batch's per-sequence totals seq_totals ([seq_fields, 2P],
/// device, whatever produced them: shard_pair_partials, the fused head's, after the context
/// all-reduce) and the reference log-probs (device [P] each; null for reference-free
/// losses): the outputs of `out` (device pointers; row_lse / row_coef are ignored),
/// nll_token_grad included, and seq_grad[2P] = dL/dpi of each sequence (chosen then
/// rejected). `metrics`: the totals hold the metric sums. It is dpo_forward's pair kernel,
/// one block, on the totals in place: the core's pair math (dpo/core/loss.hpp, metrics.hpp),
/// equal to the CPU's to rounding (batch sums in a tree instead of in order), bitwise
/// reproducible. No host synchronization; the workspace holds the WPO weights and aot sorts.
/// The outputs (seq_grad, the workspace's bytes used, every non-null member of `out`) may
/// overlap neither each other nor seq_totals or the reference log-probs (when read).
inline status shard_pair_stage(void* workspace, std::size_t& workspace_bytes, std::int64_t P,
                               const double* seq_totals, const double* ref_chosen, const double* ref_rejected,
                               const loss_config& cfg, bool metrics, const forward_outputs& out, double* seq_grad,
                               cudaStream_t stream = 0) {
  status s = detail::to_status(validate_config(cfg));
  if (!s) return s;
  const bool pointers = workspace != nullptr;
  const dpo::detail::check_policy pol = dpo::detail::cuda_policy(-1, pointers);
  if (P < 1 || P >= pol.max_pairs)
    return detail::invalid("dpo: num_pairs = %lld is invalid: must be in [1, %lld]", (long long)P,
                           (long long)pol.max_pairs - 1);
  s = detail::to_status(dpo::detail::check_reference(cfg, ref_chosen, ref_rejected, pol));
  if (!s) return s;
  const std::int64_t none[2] = {0, 0};
  detail::ws_ptrs w;
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, none, 0, P, &w, &size_only);
  if (!s || size_only) return s;
  if (seq_totals == nullptr || seq_grad == nullptr)
    return detail::invalid("dpo: %s is null", seq_totals == nullptr ? "seq_totals" : "seq_grad");
  {
    using dpo::detail::range_of;
    const bool ref = dpo::detail::needs_reference(cfg);
    const std::int64_t T2 = seq_fields * 2 * P;
    const dpo::detail::named_range ins[3] = {range_of(seq_totals, 1, T2, T2, "seq_totals"),
                                             range_of(ref ? ref_chosen : nullptr, 1, P, P, "ref_chosen"),
                                             range_of(ref ? ref_rejected : nullptr, 1, P, P, "ref_rejected")};
    detail::ws_ptrs scratch;
    const std::size_t used = detail::carve(0, none, 0, P, &scratch);
    // The forward outputs are the core's list (dpo::detail::forward_ranges, shared with the
    // CPU's shard_pair_stage and every forward call); row_lse / row_coef are ignored (not
    // written: rows 0). seq_grad and the workspace are outputs too.
    forward_outputs o = out;
    o.row_lse = o.row_coef = nullptr;
    dpo::detail::named_range outs[2 + dpo::detail::num_forward_ranges];
    outs[0] = range_of(seq_grad, 1, 2 * P, 2 * P, "seq_grad");
    outs[1] = detail::workspace_range(workspace, used);
    dpo::detail::forward_ranges(o, P, 0, outs + 2);
    s = detail::check_shard_overlap(outs, 2 + dpo::detail::num_forward_ranges, ins, 3);
    if (!s) return s;
  }
  w.seqs[0] = detail::seq_columns(seq_totals, P, 0);
  w.seqs[1] = detail::seq_columns(seq_totals, P, 1);
  w.pairs.gc = seq_grad;
  w.pairs.gr = seq_grad + P;
  s = detail::launch("pair_stage_reset_kernel", detail::pair_stage_reset_kernel<1>, 1, 1, stream, w.h);
  if (!s) return s;
  detail::pair_params pp;
  pp.cfg = cfg;
  pp.pairs = P;
  pp.vocab = 0;
  pp.metrics = metrics || cfg.use_weighting;
  pp.weights = detail::weights_from::wpo_sums;
  const bool ref = dpo::detail::needs_reference(cfg);
  pp.ref_chosen = ref ? ref_chosen : nullptr;
  pp.ref_rejected = ref ? ref_rejected : nullptr;
  pp.out = out;
  pp.out.row_lse = pp.out.row_coef = nullptr;
  return detail::launch("pair_kernel", detail::pair_kernel<detail::pair_block>, 1, detail::pair_block, stream, w,
                        pp);
}

/// The shard-local backward from per-sequence gradients (device arrays): row r of sequence s
/// gets (seq_grad[s] + (s < nll_seqs ? nll_token_grad : 0)) * grad_output * (onehot(y) -
/// softmax(z)) on the shard's columns (no LD-DPO; for pairs with LD-DPO or device scalars see
/// shard_backward). Same writes and aliasing as shard_backward_rows, seq_grad ([num_seqs])
/// in place of row_coef.
template <class T, class L>
status shard_backward_sequences(const token_view<T, L>& shard, const vocab_shard& sh, const double* row_max,
                                const double* records, const double* seq_grad, double nll_token_grad,
                                std::int64_t nll_seqs, double grad_output, T* grad, std::int64_t grad_stride,
                                const options& opt = {}, cudaStream_t stream = 0) {
  status s = detail::check_view_backward(
      shard, sh, opt, {{grad_output, "grad_output"}}, row_max, seq_grad, grad,
      grad_stride);
  if (!s) return s;
  const std::int64_t S = shard.num_seqs;
  s = detail::check_grad_overlap(shard, opt, grad, grad_stride, row_max, records,
                                 dpo::detail::range_of(seq_grad, 1, S, S, "seq_grad"));
  if (!s) return s;
  return detail::launch_rows("shard_backward_sequences_kernel",
                             detail::shard_backward_sequences_kernel<detail::rows_block, T, L>, shard, opt, records,
                             stream, shard, sh, row_max, records,
                             detail::seq_coefs{seq_grad, nll_token_grad, nll_seqs}, grad_output, grad, grad_stride,
                             opt.error_word);
}

/// The backward of the pair loss on a shard, on the device: dpo::cpu::shard_backward.
/// grad_output * dL/dz on the shard's columns of every row of both sides, from the combined
/// records (each side's, indexed by its buffer's rows), seq_grad ([2P]: shard_pair_stage's),
/// the NLL token gradient and the forward's ld_alpha. nll_token_grad and grad_output are
/// DEVICE scalars (null: 0 and 1), so autograd needs no host sync. grad: one buffer per side,
/// rows as the side's logits; in place when it is the logits with the same stride. Masked
/// rows get zeros, gap rows are not written. The workspace (two-phase, as dpo.cuh) holds each
/// row's coefficient: a kernel per sequence (LD-DPO positions by a block scan), then the row
/// kernel of shard_backward_rows per side. The workspace's bytes used may not overlap any
/// input (both sides' logits rows, the maxima, records, labels, mask, cu_seqlens, seq_grad,
/// nll_token_grad, grad_output, options::error_word) nor a gradient buffer; a gradient buffer
/// may not overlap those inputs but its side's logits (in place) and may overlap neither the
/// other side's logits rows nor the other side's gradient rows. Deterministic.
template <class T, class L>
status shard_backward(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& shard,
                      const vocab_shard& sh, const double* chosen_max, const double* chosen_records,
                      const double* rejected_max, const double* rejected_records, const double* seq_grad,
                      const double* nll_token_grad, double ld_alpha, const pair_grad_view<T>& grad,
                      const double* grad_output = nullptr, const options& opt = {}, cudaStream_t stream = 0) {
  const bool pointers = workspace != nullptr;
  status s = detail::check_shard_pairs(shard, sh, opt, pointers);
  if (!s) return s;
  s = detail::to_status(dpo::detail::check_unit(ld_alpha, "ld_alpha"));
  if (!s) return s;
  const std::int64_t cap[2] = {detail::buffer_rows(shard.chosen, opt), detail::buffer_rows(shard.rejected, opt)};
  const std::size_t needed = ((cap[0] * sizeof(double) + 255) / 256 + (cap[1] * sizeof(double) + 255) / 256) * 256;
  if (!pointers) {
    workspace_bytes = needed;
    return {};
  }
  s = detail::check_workspace(workspace, workspace_bytes, needed);
  if (!s) return s;
  s = detail::check_grad(shard, grad, opt);
  if (!s) return s;
  s = detail::first_null("shard_backward", shard, opt, chosen_max, chosen_records, rejected_max, rejected_records,
                         seq_grad, "seq_grad");
  if (!s) return s;
  {
    using dpo::detail::range_of;
    const std::int64_t P2 = 2 * shard.num_pairs();
    // The state read (10), the scalars and seq_grad, the error word, then both sides' logits.
    dpo::detail::named_range ins[16];
    detail::pair_state_ranges(shard, opt, chosen_max, chosen_records, rejected_max, rejected_records, ins);
    ins[10] = range_of(seq_grad, 1, P2, P2, "seq_grad");
    ins[11] = range_of(nll_token_grad, 1, 1, 1, "nll_token_grad");
    ins[12] = range_of(grad_output, 1, 1, 1, "grad_output");
    ins[13] = detail::error_word_range(opt);
    ins[14] = detail::logits_rows_range(shard.chosen.logits, shard.chosen.row_stride, shard.chosen, opt,
                                        detail::side_names[0][0]);
    ins[15] = detail::logits_rows_range(shard.rejected.logits, shard.rejected.row_stride, shard.rejected, opt,
                                        detail::side_names[1][0]);
    const dpo::detail::named_range ws = detail::workspace_range(workspace, needed);
    // The coefficients' scratch against everything read; each gradient buffer against the
    // state read and the scratch (check_grad above: against the logits, in place allowed,
    // and the other side's rows).
    const dpo::detail::named_range gc[2] = {
        ws, detail::logits_rows_range(grad.chosen, grad.chosen_stride, shard.chosen, opt, "grad.chosen")};
    const dpo::detail::named_range gr[2] = {
        ws, detail::logits_rows_range(grad.rejected, grad.rejected_stride, shard.rejected, opt, "grad.rejected")};
    s = detail::check_shard_overlap(&ws, 1, ins, 16);
    if (s) s = detail::check_shard_overlap(gc, 2, ins, 14);
    if (s) s = detail::check_shard_overlap(gr, 2, ins, 14);
    if (!s) return s;
  }
  if (cap[0] + cap[1] == 0) return {};
  double* coef0 = static_cast<double*>(workspace);
  double* coef1 = coef0 + (cap[0] * sizeof(double) + 255) / 256 * 256 / sizeof(double);
  constexpr int B = detail::rows_block;
  const auto kernel = detail::shard_backward_kernel<B, T, L>;
  int grid = 1;
  s = detail::row_grid(kernel, B, cap[0] + cap[1], &grid);  // the device query before any launch
  if (!s) return s;
  const detail::views<T, L> vs = detail::make_views(shard.chosen, &shard.rejected, opt);
  s = detail::launch("shard_pair_coef_kernel", detail::shard_pair_coef_kernel<detail::seq_block, T, L>,
                     detail::sequence_blocks(2 * shard.num_pairs()), detail::seq_block, stream, vs, seq_grad,
                     nll_token_grad, grad_output, ld_alpha != 1.0, ld_alpha, coef0, coef1, opt.error_word);
  if (!s) return s;
  s = detail::launch("shard_backward_kernel", kernel, grid, B, stream, shard.chosen, sh, chosen_max, chosen_records,
                     static_cast<const double*>(coef0), 1.0, grad.chosen, grad.chosen_stride, opt.error_word);
  if (!s) return s;
  return detail::launch("shard_backward_kernel", kernel, grid, B, stream, shard.rejected, sh, rejected_max,
                        rejected_records, static_cast<const double*>(coef1), 1.0, grad.rejected,
                        grad.rejected_stride, opt.error_word);
}

}  // namespace cuda
}  // namespace dpo
