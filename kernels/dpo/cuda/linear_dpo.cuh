// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// DPO straight from hidden states on CUDA (issue 12, item 2): the same API shape as
// dpo::cpu::linear_dpo (include/dpo/cpu/linear_dpo.hpp), over device memory, with the
// contract of dpo/cuda/dpo.cuh and dpo/cuda/linear.cuh:
//
//   status f(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
//            <arguments>, const linear_dpo_options& opt, ..., cudaStream_t stream)
//
// * Two-phase workspace (workspace == nullptr: checks the arguments, sets workspace_bytes,
//   enqueues nothing); the caller's cuBLASLt handle and stream; no allocation, no copy, no
//   synchronization.
// * Three or four GEMM passes, chosen by the CPU's plan (dpo/core/linear_plan.hpp). Three
//   (logits, dHidden, dWeight; no recompute) when the loss is separable and every pair's rows
//   fit one full-vocab chunk: per chunk of whole pairs, one logits GEMM into the linear head's
//   workspace, the row statistics, the pairs' sums, dL/dpi (the core's contribution) and each
//   row's dL/dlogp, dZ in place, then the dHidden and dWeight GEMMs. Four otherwise (and in the
//   split calls): linear_logps over the policy's rows, the sums, the pair stage, each row's
//   dL/dlogp, then linear_logps_backward (the logits recomputed). Both end with the logits
//   path's pair stage (pair_kernel of dpo/cuda/kernels.cuh, run on this workspace: WPO weights,
//   every loss type, the NLL from the plain sums, every metric). The reference comes as
//   precomputed device log-probs or as reference hidden states through a reference head
//   (linear_logps, forward only). Every loss type and option of the CPU call is supported.
// * Device-data errors (a label outside [0, vocab) that is not ignore_index, a bad
//   cu_seqlens, a cu_seqlens that differs from options.host_cu_seqlens) are recorded in the
//   workspace's error word (offset 0, read_device_error; sides 0 / 1 the policy's chosen /
//   rejected, 5 / 6 the reference hidden states') and nothing outside the workspace is
//   written: the pair stage writes into the workspace and a last kernel copies its results out
//   only when the error word is clear; the backward then runs with zero upstream gradients
//   into accumulating outputs (dWeight and dBias get exact zeros added, dHidden rows are left
//   alone).
// * cuBLASLt: every GEMM of a three-pass call is asked for before anything is enqueued; in
//   four passes the backward's GEMMs are asked for after the forward was enqueued (a refusal
//   there leaves the forward's outputs written and the gradients not: docs/cuda.md).
// * Deterministic for a fixed chunk shape: fixed-order sums, no atomics in any floating-point
//   sum (the three-pass NLL kernel counts integer tokens with atomics: exact in any order).
//
// Docs: docs/cuda.md ("DPO from hidden states").
#pragma once

#include "dpo/cuda/compiler.cuh"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dpo/core/layout.hpp"
#include "dpo/core/linear_plan.hpp"
#include "dpo/core/linear_view.hpp"
#include "dpo/core/metrics.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/pair_batch.hpp"
#include "dpo/cuda/dpo.cuh"
#include "dpo/cuda/linear.cuh"
#include "dpo/cuda/status.cuh"

namespace dpo {
namespace cuda {

/// The LM head, the pair layouts over hidden rows and the gradient targets are the core's
/// (dpo/core/linear_view.hpp), as on the CPU, here with device pointers. Packed layouts:
/// cu_seqlens is device data, so linear_dpo_options::num_rows bounds the rows (as
/// options::num_rows does for logits). The concatenated layouts (one hidden buffer) need
/// chosen_hidden == rejected_hidden and equal strides in linear_dpo_grads.
using namespace dpo::linear_dpo_types;

/// Run-time options, as dpo::cpu::linear_dpo_options (no threads; num_rows and the GEMM
/// workspace as in dpo::cuda::options and linear_options).
struct linear_dpo_options {
  /// The token metrics (entropy, logits means, token accuracy: a little more arithmetic per
  /// logit); without them all four are 0, as the CPU's (WPO computes their row terms anyway).
  bool metrics = true;
  /// The budget of the linear head's chunks (linear_options::workspace_bytes, the GEMM
  /// workspace included); the call's workspace is this plus O(rows + pairs) arrays.
  std::int64_t workspace_bytes = default_linear_workspace_bytes;
  /// Rows per logits chunk instead of as many as the budget allows (0); three-pass chunks
  /// hold whole pairs of at most this many rows.
  std::int64_t chunk_rows = 0;
  /// The fused call (linear_dpo): automatic runs three passes when the plan allows (every
  /// pair's rows fit one full-vocab chunk under the budget and the loss is separable; packed
  /// pairs also need host_cu_seqlens), else four; three_pass fails with a status where the
  /// plan does not allow it; four_pass always recomputes. The split calls always run four.
  linear_mode mode = linear_mode::automatic;
  /// Packed layouts: the rows of each hidden buffer (cu_seqlens must stay within).
  std::int64_t num_rows = -1;
  /// Packed layouts: a host copy of cu_seqlens (the same entries as the device array), so
  /// that the plan can cut three-pass chunks of whole pairs; null: packed calls run four
  /// passes. The device array is checked against it (the error word) before anything is
  /// written outside the workspace.
  const std::int64_t* host_cu_seqlens = nullptr;
  /// cuBLASLt's own workspace, carved from workspace_bytes (linear_options).
  std::int64_t gemm_workspace_bytes = std::int64_t{32} << 20;
};

/// What a call will do: its mode, the rows of its largest logits chunk (three passes: whole
/// pairs over the full vocab; four: the linear head's chunk) and the workspace bytes it needs.
struct linear_dpo_plan {
  linear_mode mode = linear_mode::four_pass;
  std::int64_t chunk_rows = 0;
  std::int64_t workspace_bytes = 0;
  /// cuBLASLt's workspace in the three-pass chunks: options.gemm_workspace_bytes, or less
  /// where that let the largest pair fit the budget (ldpo_plan); four passes: the option.
  std::int64_t gemm_workspace_bytes = 0;
};

namespace detail {

inline constexpr int ldpo_block = 256;

/// The workspace header: the logits path's (dpo/cuda/kernels.cuh), so that its pair stage
/// (pair_kernel) runs on this workspace unchanged; the error word at offset 0.
using ldpo_header = ws_header;

/// Per-buffer row arrays (indexed by the hidden buffer's row).
struct ldpo_rows {
  std::int64_t* label;  // the completion label, or -1
  double* logp;
  double* lse;
  double* coef;  // dL/dlogp times grad_output (0 after an error)
  double* ent;   // the policy's forward with metrics: the row terms of the token metrics
  double* zmean;
  double* wpo;
  double* hit;
};

/// One pass's layout: up to two hidden buffers, the side -> buffer map and their rows.
template <class T, class L>
struct ldpo_layout {
  token_view<T, L> v[2];        // chosen, rejected (vocab replaced by the head's)
  int num_buffers = 1;
  int buffer_of[2] = {0, 0};
  std::int64_t rows[2] = {0, 0};  // rows of each buffer the views span (from row 0)
  const T* base[2] = {nullptr, nullptr};
  std::int64_t stride[2] = {0, 0};
  std::int64_t num_rows = -1;   // packed: cu_seqlens bound
};

template <class T, class L>
struct ldpo_dev {
  token_view<T, L> v[2];
  int buffer_of[2];
  std::int64_t rows[2];
  std::int64_t num_rows;
};

template <class T, class L>
ldpo_dev<T, L> dev_of(const ldpo_layout<T, L>& l) {
  ldpo_dev<T, L> d;
  for (int s = 0; s < 2; ++s) {
    d.v[s] = l.v[s];
    d.buffer_of[s] = l.buffer_of[s];
    d.rows[s] = l.rows[s];
  }
  d.num_rows = l.num_rows;
  return d;
}

/// Resets (reset) or honours the error word, checks cu_seqlens and the labels of both sides
/// (sides side0, side0 + 1 in the error word) and writes each buffer row's completion label
/// (-1 for every other row). One block; the lowest bad row of the lowest side is reported.
template <class T, class L>
__global__ void ldpo_labels_kernel(ldpo_dev<T, L> d, std::int64_t V, int side0, bool reset,
                                   ldpo_header* h, ldpo_rows b0, ldpo_rows b1) {
  __shared__ unsigned long long key;
  __shared__ int stop;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    if (reset) {
      h->err = device_error{0, 0, 0, 0, 0};
      h->label_key = ~0ull;
    }
    stop = h->err.code != 0;
    key = ~0ull;
  }
  // Every buffer row starts as "not a completion row", also when the call stops here, so
  // that the linear head's passes that follow read defined labels.
  ldpo_rows b[2] = {b0, b1};
  for (int k = 0; k < 2; ++k)
    for (std::int64_t r = tid; r < d.rows[k]; r += blockDim.x) b[k].label[r] = -1;
  __syncthreads();
  if (stop) return;
  for (int s = 0; s < 2; ++s) {
    const token_view<T, L>& v = d.v[s];
    if (v.cu_seqlens == nullptr || v.num_seqs == 0) continue;
    const std::int64_t* cu = v.cu_seqlens + v.first_seq;
    for (std::int64_t q = tid; q <= v.num_seqs; q += blockDim.x) {
      const bool bad = cu[q] < 0 || (q > 0 && cu[q] < cu[q - 1]) || cu[q] > d.num_rows;
      if (bad) atomicMin(&key, static_cast<unsigned long long>(s) << 62 | static_cast<unsigned long long>(q));
    }
    __syncthreads();
    if (key != ~0ull) {
      if (tid == 0) {
        const std::int64_t q = static_cast<std::int64_t>(key & ((1ull << 62) - 1));
        h->err = cu_seqlens_error(cu, q, d.num_rows, side0 + s, v.first_seq);
      }
      return;
    }
  }
  for (int s = 0; s < 2; ++s) {
    const token_view<T, L>& v = d.v[s];
    if (v.num_seqs == 0) continue;
    const std::int64_t r0 = v.row_begin(0), r1 = v.row_end(v.num_seqs - 1);
    std::int64_t* lab = b[d.buffer_of[s]].label;
    for (std::int64_t r = r0 + tid; r < r1; r += blockDim.x) {
      if (!v.in_sequence(r)) continue;
      const std::int64_t y = v.target(r);
      if (y == token_view<T, L>::masked) continue;
      if (y < 0 || y >= V) {
        atomicMin(&key, static_cast<unsigned long long>(s) << 62 | static_cast<unsigned long long>(r));
      } else {
        lab[r] = y;
      }
    }
  }
  __syncthreads();
  if (tid == 0 && key != ~0ull) {
    const int s = static_cast<int>(key >> 62);
    const std::int64_t r = static_cast<std::int64_t>(key & ((1ull << 62) - 1));
    h->err = device_error{static_cast<std::int32_t>(device_error_code::label_out_of_range), side0 + s, r,
                          static_cast<std::int64_t>(d.v[s].labels[r]), V};
  }
}

/// The completion rows of sequence q of a side.
template <class T, class L>
__device__ double ldpo_count(const token_view<T, L>& v, const ldpo_rows& rb, std::int64_t q) {
  double n = 0.0;
  for (std::int64_t r = v.row_begin(q); r < v.row_end(q); ++r) n += rb.label[r] >= 0 ? 1.0 : 0.0;
  return n;
}

/// LD-DPO's shared length of pair q (min of the two counts), +inf without LD-DPO, as the
/// CPU's sequence stage.
template <class T, class L>
__device__ double ldpo_shared(const ldpo_dev<T, L>& d, const ldpo_rows* b, std::int64_t q, double ld_alpha) {
  if (ld_alpha == 1.0) return INFINITY;
  const double nc = ldpo_count(d.v[0], b[d.buffer_of[0]], q);
  const double nr = ldpo_count(d.v[1], b[d.buffer_of[1]], q);
  return nc < nr ? nc : nr;
}

/// Per-sequence sums of the completion rows' values in row order (fp64): the log-probs
/// (LD-DPO weighted: the j-th completion row of a pair sharing `shared` rows counts 1 below
/// it, ld_alpha past it), the plain log-probs (the NLL's), counts and, with `metrics`, the
/// token metrics' row terms: the sequence stage of the logits path, into its seq_arrays
/// (out[0] chosen, out[1] rejected; null members are skipped), for the pairs [p0, p1). One
/// thread per pair.
template <class T, class L>
__global__ void ldpo_sums_kernel(ldpo_dev<T, L> d, const ldpo_header* h, ldpo_rows b0, ldpo_rows b1,
                                 std::int64_t p0, std::int64_t p1, double ld_alpha, seq_arrays c0, seq_arrays c1,
                                 bool metrics) {
  if (h->err.code != 0) return;  // cu_seqlens may be invalid
  const ldpo_rows b[2] = {b0, b1};
  const seq_arrays out[2] = {c0, c1};
  for (std::int64_t q = p0 + blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; q < p1;
       q += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const double shared = ldpo_shared(d, b, q, ld_alpha);
    for (int s = 0; s < 2; ++s) {
      const token_view<T, L>& v = d.v[s];
      const ldpo_rows& rb = b[d.buffer_of[s]];
      double sum = 0.0, sum_plain = 0.0, n = 0.0, ent = 0.0, zmean = 0.0, wpo = 0.0, hit = 0.0;
      for (std::int64_t r = v.row_begin(q); r < v.row_end(q); ++r) {
        if (rb.label[r] < 0) continue;
        sum += dpo::detail::times(n < shared ? 1.0 : ld_alpha, rb.logp[r]);
        sum_plain += rb.logp[r];
        n += 1.0;
        if (metrics) {
          ent += rb.ent[r];
          zmean += rb.zmean[r];
          wpo += rb.wpo[r];
          hit += rb.hit[r];
        }
      }
      const seq_arrays& o = out[s];
      o.logp[q] = sum;
      if (o.count != nullptr) o.count[q] = n;
      if (o.plain != nullptr) o.plain[q] = sum_plain;
      if (o.ent != nullptr) {
        o.ent[q] = ent;
        o.zmean[q] = zmean;
        o.wpo[q] = wpo;
        o.hit[q] = hit;
      }
    }
  }
}

/// Each completion row's dL/dlogp: grad_<side>[seq] (+ the NLL term's per-token gradient on
/// the chosen side), into the workspace times grad_output (null: 1; zeros after an error)
/// and, unscaled, into the caller's row_lse / row_coef (when given and no error; 0 on the
/// sequences' other rows). LD-DPO weighted as the sums. The pairs [p0, p1); one thread per pair.
template <class T, class L>
__global__ void ldpo_coef_kernel(ldpo_dev<T, L> d, ldpo_rows b0, ldpo_rows b1, std::int64_t p0, std::int64_t p1,
                                 double ld_alpha, const ldpo_header* h, const double* grad_c,
                                 const double* grad_r, const double* nll, const double* grad_output,
                                 double* row_lse, double* row_coef) {
  const ldpo_rows b[2] = {b0, b1};
  const bool bad = h->err.code != 0;
  const std::int64_t t0 = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t nt = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  if (bad) {  // zeros on every buffer row (cu_seqlens may be invalid: no sequence walk)
    for (int k = 0; k < 2; ++k)
      for (std::int64_t r = t0; r < d.rows[k]; r += nt) b[k].coef[r] = 0.0;
    return;
  }
  const double go = grad_output != nullptr ? *grad_output : 1.0;
  for (std::int64_t q = p0 + t0; q < p1; q += nt) {
    const double shared = ldpo_shared(d, b, q, ld_alpha);
    for (int s = 0; s < 2; ++s) {
      const token_view<T, L>& v = d.v[s];
      const ldpo_rows& rb = b[d.buffer_of[s]];
      const double g = s == 0 ? grad_c[q] : grad_r[q];
      const double add = s == 0 ? *nll : 0.0;
      double j = 0.0;
      for (std::int64_t r = v.row_begin(q); r < v.row_end(q); ++r) {
        const bool on = rb.label[r] >= 0;
        double c = 0.0;
        if (on) {
          // An LD-DPO weight of 0 drops the token even where g is infinite (as the CPU).
          c = dpo::detail::times(j < shared ? 1.0 : ld_alpha, g) + add;
          j += 1.0;
        }
        rb.coef[r] = on ? dpo::detail::times(c, go) : 0.0;
        if (row_lse != nullptr) row_lse[r] = on ? rb.lse[r] : 0.0;
        if (row_coef != nullptr) row_coef[r] = c;
      }
    }
  }
}

/// Three passes: dL/dpi of the pairs [p0, p1) from their sums (the core's contribution(); a
/// separable loss reads only the pair's own values, its WPO weight and P), into the pair
/// stage's gc / gr (which the pair stage rewrites with the same values at the end). Nothing
/// after an error. One thread per pair. (A template, as every kernel of these headers: its
/// host stub is then weak, so several translation units may include it; nvcc warns on
/// `inline` __global__ functions.)
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) ldpo_pair_grad_kernel(loss_config cfg, const ldpo_header* h, std::int64_t P,
                                                               std::int64_t p0, std::int64_t p1, ws_ptrs w,
                                                               const double* ref_c, const double* ref_r) {
  if (h->err.code != 0) return;
  const seq_arrays& sc = w.seqs[0];
  const seq_arrays& sr = w.seqs[1];
  const dpo::detail::pair_batch_in b = dpo::detail::make_pair_batch(
      P, sc.logp, sr.logp, ref_c, ref_r, sc.count, sr.count, cfg.use_weighting ? w.pairs.weights : nullptr,
      token_totals{}, static_cast<double>(P));
  for (std::int64_t q = p0 + blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; q < p1;
       q += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    if (cfg.use_weighting) w.pairs.weights[q] = dpo::detail::wpo_weight(sc.wpo[q], sc.count[q], sr.wpo[q], sr.count[q]);
    const dpo::detail::pair_contribution pc = dpo::detail::contribution(cfg, b, q);
    w.pairs.gc[q] = pc.g_c;
    w.pairs.gr[q] = pc.g_r;
  }
}

/// Three passes: the NLL terms' per-token gradient (nll_token_grad: the batch's chosen
/// completion tokens counted up front; separable losses have no NLL term under WPO, so the
/// mean weight is 1). One block; integer counts, so the sum is exact in any order.
template <class T, class L>
__global__ void ldpo_nll_kernel(ldpo_dev<T, L> d, ldpo_rows b0, ldpo_rows b1, std::int64_t P, loss_config cfg,
                                const ldpo_header* h, double* nll) {
  __shared__ unsigned long long n;
  if (threadIdx.x == 0) n = 0;
  __syncthreads();
  const ldpo_rows b[2] = {b0, b1};
  if (h->err.code == 0)
    for (std::int64_t q = threadIdx.x; q < P; q += blockDim.x)
      atomicAdd(&n, static_cast<unsigned long long>(ldpo_count(d.v[0], b[d.buffer_of[0]], q)));
  __syncthreads();
  if (threadIdx.x == 0) *nll = dpo::detail::nll_token_grad(cfg, 1.0, static_cast<double>(n));
}

/// Up to 32 entries of a packed layout's host cu_seqlens (linear_dpo_options::host_cu_seqlens)
/// that the three-pass plan relies on: the chunks' first and last rows.
struct ldpo_cu_entries {
  int n;
  std::int64_t index[32];
  std::int64_t value[32];
};

/// Records the lowest entry whose device cu_seqlens differs from the host copy (unless an
/// error is recorded already). One thread (BLOCK = 1).
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) ldpo_host_cu_kernel(const std::int64_t* cu, ldpo_cu_entries e,
                                                             ldpo_header* h) {
  if (h->err.code != 0) return;
  for (int k = 0; k < e.n; ++k) {
    const std::int64_t i = e.index[k];
    if (cu[i] == e.value[k]) continue;
    h->err = device_error{static_cast<std::int32_t>(device_error_code::cu_seqlens_host_mismatch), 0, i, cu[i],
                          e.value[k]};
    return;
  }
}

/// linear_dpo_backward: the caller's row_coef times grad_output on completion rows, into the
/// workspace (zeros after an error).
template <class T, class L>
__global__ void ldpo_scale_kernel(ldpo_dev<T, L> d, ldpo_rows b0, const ldpo_header* h,
                                  const double* row_coef, const double* grad_output) {
  const bool bad = h->err.code != 0;
  const double go = grad_output != nullptr ? *grad_output : 1.0;
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; r < d.rows[0];
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    b0.coef[r] = bad || b0.label[r] < 0 ? 0.0 : dpo::detail::times(row_coef[r], go);
}

/// Zeros of dHidden on every row of each side's sequences (the written mode; the backward
/// then accumulates). Nothing after an error.
template <class T, class L>
__global__ void ldpo_zero_kernel(ldpo_dev<T, L> d, const ldpo_header* h, std::int64_t H, T* g0,
                                 std::int64_t s0, T* g1, std::int64_t s1) {
  if (h->err.code != 0) return;
  T* g[2] = {g0, g1};
  const std::int64_t gs[2] = {s0, s1};
  for (int s = 0; s < 2; ++s) {
    const token_view<T, L>& v = d.v[s];
    if (g[s] == nullptr || v.num_seqs == 0) continue;
    const std::int64_t r0 = v.row_begin(0), r1 = v.row_end(v.num_seqs - 1);
    for (std::int64_t r = r0 + blockIdx.x; r < r1; r += gridDim.x) {
      if (!v.in_sequence(r)) continue;
      for (std::int64_t c = threadIdx.x; c < H; c += blockDim.x) g[s][r * gs[s] + c] = from_acc<T>(acc_t<T>(0));
    }
  }
}

/// Copies the pair stage's results (in the workspace) to the caller's outputs when the
/// error word is clear.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) ldpo_publish_kernel(const ldpo_header* h, forward_outputs src,
                                                             forward_outputs dst, std::int64_t P) {
  if (h->err.code != 0) return;
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t n = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
#define DPO_LDPO_COPY(name) \
  if (dst.name != nullptr)  \
    for (std::int64_t i = t; i < P; i += n) dst.name[i] = src.name[i];
  DPO_PAIR_OUTPUTS(DPO_LDPO_COPY)
#undef DPO_LDPO_COPY
  if (t == 0) {
    if (dst.loss != nullptr) *dst.loss = *src.loss;
    if (dst.nll_token_grad != nullptr) *dst.nll_token_grad = *src.nll_token_grad;
    if (dst.metrics != nullptr) *dst.metrics = *src.metrics;
  }
}

/// A 256-byte-aligned carve of the workspace (from 0 to measure).
struct ldpo_carver {
  std::uintptr_t base;
  std::size_t off = 0;
  template <class U>
  U* take(std::int64_t n) {
    const std::uintptr_t p = base + off;
    off += (static_cast<std::size_t>(n > 0 ? n : 0) * sizeof(U) + 255) / 256 * 256;
    return reinterpret_cast<U*>(p);
  }
};

/// The layout of a pass, checked (core rules; labels bounded by the head's vocab).
template <class T, class L>
status ldpo_layout_of(const hidden_pairs<T, L>& in, const linear_head<T>& head, const char* name,
                      const linear_dpo_options& opt, bool pointers, ldpo_layout<T, L>* out) {
  options o;
  o.num_rows = opt.num_rows;
  std::int64_t cap[2];
  status s = check_pairs(in.pairs, name, o, cap, pointers);
  if (!s) return s;
  if (in.hidden_size != head.hidden)
    return invalid("dpo: %s.hidden_size = %lld is invalid: must equal the head's hidden = %lld", name,
                   (long long)in.hidden_size, (long long)head.hidden);
  if (in.pairs.chosen.seq_stride != 0 || in.pairs.rejected.seq_stride != 0)
    return invalid("dpo: %s: padded views with gaps (seq_stride) are not supported by the CUDA linear path",
                   name);
  ldpo_layout<T, L> l;
  l.v[0] = in.pairs.chosen;
  l.v[1] = in.pairs.rejected;
  l.v[0].vocab = l.v[1].vocab = head.vocab;
  l.num_rows = opt.num_rows;
  // One buffer when both sides read the same rows array and their rows are disjoint (the
  // concatenated layouts); sides that may share rows (separate pairs over one buffer, or
  // packed views whose sequence ranges or cu_seqlens differ) keep a row array each, so that
  // neither side's labels overwrite the other's (and row state is refused for them).
  const token_view<T, L>& vc = in.pairs.chosen;
  const token_view<T, L>& vr = in.pairs.rejected;
  const bool disjoint = !dpo::detail::rows_may_coincide(vc, vr, policy(o, pointers));
  const bool one = vc.logits == vr.logits && vc.row_stride == vr.row_stride && disjoint;
  l.num_buffers = one ? 1 : 2;
  for (int side = 0; side < 2; ++side) {
    const token_view<T, L>& v = side == 0 ? in.pairs.chosen : in.pairs.rejected;
    const int k = one ? 0 : side;
    l.buffer_of[side] = k;
    l.base[k] = v.logits;
    l.stride[k] = v.row_stride;
    const std::int64_t end = v.cu_seqlens != nullptr ? opt.num_rows : v.row_end(v.num_seqs - 1);
    if (end > l.rows[k]) l.rows[k] = end;
  }
  *out = l;
  return {};
}

/// The linear head's view of buffer k of a layout (labels: the workspace's row labels).
template <class T, class L>
linear_view<T, std::int64_t> ldpo_view(const ldpo_layout<T, L>& l, int k, const linear_head<T>& head,
                                       const std::int64_t* labels) {
  return dpo::linear_view_of(l.base[k], l.rows[k], l.stride[k], head, labels, nullptr, -1);
}

inline linear_options ldpo_linear_options(const linear_dpo_options& opt) {
  linear_options o;
  o.workspace_bytes = opt.workspace_bytes;
  o.chunk_rows = opt.chunk_rows;
  o.gemm_workspace_bytes = opt.gemm_workspace_bytes;
  return o;
}

/// The whole call's workspace: header, row arrays of the policy (and reference) buffers,
/// the reference's sequence log-probs, the logits path's sequence and pair arrays (its pair
/// stage runs here), the pair stage's outputs, the linear head's workspace.
struct ldpo_ws {
  ldpo_header* h = nullptr;
  ldpo_rows rows[2] = {};
  ldpo_rows ref_rows[2] = {};
  double* ref = nullptr;     // [2P] reference log-probs from hidden states
  ws_ptrs pw = {};           // seqs[side] (P each) and pairs (P): the pair stage's arrays; h
  double* pair_out = nullptr;  // num_pair_outputs * P
  double* loss = nullptr;
  dpo::metrics* metrics = nullptr;
  double* nll = nullptr;
  void* lin_ws = nullptr;
  std::size_t lin_bytes = 0;
  std::size_t bytes = 0;
};

inline ldpo_rows carve_rows(ldpo_carver& c, std::int64_t n) {
  ldpo_rows r;
  r.label = c.take<std::int64_t>(n);
  double** d[7] = {&r.logp, &r.lse, &r.coef, &r.ent, &r.zmean, &r.wpo, &r.hit};
  for (double** x : d) *x = c.take<double>(n);
  return r;
}

inline ldpo_ws carve_ldpo(std::uintptr_t base, const std::int64_t* rows, const std::int64_t* ref_rows,
                          std::int64_t P, std::size_t lin_bytes) {
  ldpo_carver c{base};
  ldpo_ws w;
  w.h = c.take<ldpo_header>(1);
  for (int k = 0; k < 2; ++k) w.rows[k] = carve_rows(c, rows[k]);
  for (int k = 0; k < 2; ++k) w.ref_rows[k] = carve_rows(c, ref_rows[k]);
  w.ref = c.take<double>(2 * P);
  const std::int64_t no_rows[2] = {0, 0};
  const std::size_t pw_bytes = carve(0, no_rows, P, P, &w.pw);
  carve(reinterpret_cast<std::uintptr_t>(c.take<unsigned char>(static_cast<std::int64_t>(pw_bytes))), no_rows, P,
        P, &w.pw);
  w.pw.h = w.h;  // one error word for the call
  w.pair_out = c.take<double>(num_pair_outputs * P);
  w.loss = c.take<double>(1);
  w.metrics = c.take<dpo::metrics>(1);
  w.nll = c.take<double>(1);
  w.lin_ws = c.take<unsigned char>(static_cast<std::int64_t>(lin_bytes));
  w.lin_bytes = lin_bytes;
  w.bytes = c.off;
  return w;
}

/// Blocks of a kernel with one thread per pair or row (ldpo_block threads a block).
inline unsigned seq_blocks(std::int64_t n) { return seq_grid(n); }

/// Everything a call needs to know before it enqueues anything.
template <class T, class L>
struct ldpo_call {
  ldpo_layout<T, L> pol, ref;
  bool has_ref = false;
  linear_chunking ch;
  ldpo_ws w;
  bool size_only = false;
  // The fused call's plan (dpo/core/linear_plan.hpp): its mode and, for three passes, each
  // pair's rows (every row of its two sequences) and the most rows a chunk may hold.
  linear_mode mode = linear_mode::four_pass;
  std::vector<std::int64_t> pair_rows;
  std::int64_t max_rows = 0;
  std::int64_t gemm_bytes = 0;  // three passes: cuBLASLt's workspace (ldpo_plan)
};

/// The fused call's mode from the core's plan. Three passes need each pair's rows on the
/// host: padded and separate pairs have them; packed pairs only with
/// options.host_cu_seqlens. A three-pass chunk is the linear head's chunk over the full
/// vocab (linear_chunks with chunk_vocab = vocab), its rows as many as the budget allows;
/// *bytes: the workspace of the largest chunk the plan cuts (0 for four passes).
template <class T, class L>
status ldpo_plan(const ldpo_layout<T, L>& l, const linear_head<T>& head, const loss_config& cfg,
                 const linear_dpo_options& opt, ldpo_call<T, L>* c, std::int64_t* bytes) {
  *bytes = 0;
  c->mode = linear_mode::four_pass;
  token_view<T, L> v[2] = {l.v[0], l.v[1]};
  if (v[0].cu_seqlens != nullptr || v[1].cu_seqlens != nullptr) {
    if (opt.host_cu_seqlens == nullptr) {
      if (opt.mode == linear_mode::three_pass)
        return invalid("dpo: options.mode = three_pass needs options.host_cu_seqlens for packed pairs "
                       "(cu_seqlens is device data; the plan needs each pair's rows on the host)");
      return {};
    }
    // The chunks' rows are read where the host copy says: it must be a valid cu_seqlens
    // within options.num_rows (the device's is checked against it before anything is written).
    const std::int64_t* hc = opt.host_cu_seqlens;
    for (const token_view<T, L>& u : v)
      for (std::int64_t i = u.first_seq; i <= u.first_seq + u.num_seqs; ++i)
        if (hc[i] < 0 || hc[i] > l.num_rows || (i > 0 && hc[i] < hc[i - 1]))
          return invalid("dpo: options.host_cu_seqlens[%lld] = %lld is invalid: must be non-decreasing, in "
                         "[0, options.num_rows = %lld]",
                         (long long)i, (long long)hc[i], (long long)l.num_rows);
    v[0].cu_seqlens = v[1].cu_seqlens = opt.host_cu_seqlens;
  }
  const std::int64_t P = v[0].num_seqs;
  c->pair_rows.assign(static_cast<std::size_t>(P), 0);
  for (std::int64_t p = 0; p < P; ++p)
    for (const token_view<T, L>& u : v) c->pair_rows[p] += u.row_end(p) - u.row_begin(p);
  linear_options lo = ldpo_linear_options(opt);
  lo.chunk_vocab = head.vocab;
  linear_chunking ch;
  const std::int64_t N = l.rows[0] + l.rows[1];
  c->max_rows = linear_chunks<T>(N, head.hidden, head.vocab, lo, &ch) ? ch.rows : 0;
  c->gemm_bytes = opt.gemm_workspace_bytes;
  // cuBLASLt's workspace gives way when the largest pair does not fit a chunk beside it: it
  // gets what the chunk leaves of the budget (cuBLASLt then picks among the algorithms that
  // need no more; 0 leaves it those that need none).
  std::int64_t pair_max = 1;
  for (std::int64_t p = 0; p < P; ++p) pair_max = c->pair_rows[p] > pair_max ? c->pair_rows[p] : pair_max;
  if (c->max_rows < pair_max && (opt.chunk_rows == 0 || opt.chunk_rows >= pair_max)) {
    const std::int64_t bare = linear_ws<T>(0, pair_max, head.vocab, head.hidden, 0, true).bytes;
    if (bare <= opt.workspace_bytes && opt.gemm_workspace_bytes >= 0) {
      const std::int64_t left = (opt.workspace_bytes - bare) / 256 * 256;
      lo.gemm_workspace_bytes = c->gemm_bytes = left < opt.gemm_workspace_bytes ? left : opt.gemm_workspace_bytes;
      c->max_rows = linear_chunks<T>(N, head.hidden, head.vocab, lo, &ch) ? ch.rows : 0;
    }
  }
  if (opt.mode == linear_mode::three_pass) {
    const status s = to_status(dpo::detail::linear_three_pass_refusal(cfg, c->pair_rows.data(), P, c->max_rows,
                                                                      "rows (every row of its sequences)"));
    if (!s) return s;
  }
  c->mode = dpo::detail::linear_choose_mode(opt.mode, cfg, c->pair_rows.data(), P, c->max_rows);
  if (c->mode == linear_mode::three_pass) {
    const std::int64_t largest = dpo::detail::linear_largest_chunk(c->pair_rows.data(), P, c->max_rows);
    *bytes = linear_ws<T>(0, largest > 1 ? largest : 1, head.vocab, head.hidden, c->gemm_bytes, true).bytes;
  }
  return {};
}

/// The checks and the workspace of a call: policy layout and head, the reference's (when
/// given), the loss configuration (loss: the pair stage runs), the mode, the linear head's
/// chunking for every view, the two-phase workspace.
template <class T, class L>
status ldpo_prologue(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                     const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                     const hidden_pairs<T, L>* ref, const linear_head<T>* ref_head, const loss_config* cfg,
                     const linear_dpo_options& opt, ldpo_call<T, L>* c, bool fused = false) {
  const bool pointers = workspace != nullptr;
  if (cfg != nullptr) {
    status s = to_status(validate_config(*cfg));
    if (!s) return s;
  }
  status s = ldpo_layout_of(policy, head, "hidden", opt, pointers, &c->pol);
  if (!s) return s;
  const linear_options lo = ldpo_linear_options(opt);
  std::int64_t lin = 0, lin_pol = 0;
  linear_chunking ch_pol;
  const auto size_of = [&](const linear_view<T, std::int64_t>& v, std::int64_t* bytes, linear_chunking* most) {
    linear_chunking ch;
    const status r = linear_workspace_size(v, lo, &ch);
    if (r) {
      if (ch.workspace_bytes > *bytes) *bytes = ch.workspace_bytes;
      if (ch.rows > most->rows) *most = ch;
    }
    return r;
  };
  for (int k = 0; k < c->pol.num_buffers; ++k) {
    s = size_of(ldpo_view(c->pol, k, head, nullptr), &lin_pol, &ch_pol);
    if (!s) return s;
  }
  std::int64_t ref_rows[2] = {0, 0};
  c->has_ref = ref != nullptr;
  if (ref != nullptr) {
    s = ldpo_layout_of(*ref, *ref_head, "ref_hidden", opt, pointers, &c->ref);
    if (!s) return s;
    if (ref->num_pairs() != policy.num_pairs())
      return invalid("dpo: ref_hidden.num_pairs = %lld != hidden.num_pairs = %lld", (long long)ref->num_pairs(),
                     (long long)policy.num_pairs());
    if (ref_head->vocab != head.vocab)
      return invalid("dpo: ref_head.vocab = %lld != head.vocab = %lld", (long long)ref_head->vocab,
                     (long long)head.vocab);
    for (int k = 0; k < c->ref.num_buffers; ++k) {
      s = size_of(ldpo_view(c->ref, k, *ref_head, nullptr), &lin, &c->ch);
      if (!s) return s;
      ref_rows[k] = c->ref.rows[k];
    }
  }
  // The fused call's plan: three passes need the full-vocab chunk, four the policy's
  // linear_logps / linear_logps_backward chunks.
  std::int64_t lin3 = 0;
  c->mode = linear_mode::four_pass;
  if (fused) {
    s = ldpo_plan(c->pol, head, *cfg, opt, c, &lin3);
    if (!s) return s;
  }
  if (c->mode == linear_mode::three_pass) {
    c->ch.rows = dpo::detail::linear_largest_chunk(c->pair_rows.data(), policy.num_pairs(), c->max_rows);
    c->ch.vocab = head.vocab;
    if (lin3 > lin) lin = lin3;
  } else {
    if (lin_pol > lin) lin = lin_pol;
    if (ch_pol.rows >= c->ch.rows) c->ch = ch_pol;
  }
  const std::int64_t P = policy.num_pairs();
  c->w = carve_ldpo(0, c->pol.rows, ref_rows, P, static_cast<std::size_t>(lin));
  c->ch.workspace_bytes = static_cast<std::int64_t>(c->w.bytes);
  c->size_only = !pointers;
  if (!pointers) {
    workspace_bytes = c->w.bytes;
    return {};
  }
  if (handle == nullptr) return invalid("dpo: handle is null (create one with cublasLtCreate)");
  s = check_workspace(workspace, workspace_bytes, c->w.bytes);
  if (!s) return s;
  c->w = carve_ldpo(reinterpret_cast<std::uintptr_t>(workspace), c->pol.rows, ref_rows, P,
                    static_cast<std::size_t>(lin));
  return {};
}

/// Labels check, then linear_logps over each buffer of a layout into `rows`.
template <class T, class L>
status ldpo_logps(cublasLtHandle_t handle, const ldpo_layout<T, L>& l, const linear_head<T>& head,
                  int side0, bool reset, ldpo_header* h, ldpo_rows* rows, const ldpo_ws& w,
                  const linear_dpo_options& opt, cudaStream_t stream) {
  status s = launch("ldpo_labels_kernel", ldpo_labels_kernel<T, L>, 1, ldpo_block, stream, dev_of(l),
                    head.vocab, side0, reset, h, rows[0], rows[1]);
  for (int k = 0; s && k < l.num_buffers; ++k) {
    std::size_t bytes = w.lin_bytes;
    s = linear_logps(w.lin_ws, bytes, handle, ldpo_view(l, k, head, rows[k].label), rows[k].logp,
                     static_cast<double*>(nullptr), rows[k].lse, ldpo_linear_options(opt), stream);
  }
  return s;
}

/// The backward over each policy buffer: zeros of dHidden (written mode), then
/// linear_logps_backward with the workspace's coefficients, accumulating. `shard`: a head
/// shard's rows of each buffer (dpo/cuda/linear_shard.cuh; lse is not read), or null.
template <class T, class L, class G>
status ldpo_backward(cublasLtHandle_t handle, const ldpo_layout<T, L>& l, const linear_head<T>& head,
                     const double* const* lse, const ldpo_ws& w, const linear_dpo_grads<T, G>& g,
                     const linear_dpo_options& opt, cudaStream_t stream,
                     const linear_shard_rows* shard = nullptr) {
  status s;
  if (!g.accumulate_hidden && (g.chosen_hidden != nullptr || g.rejected_hidden != nullptr)) {
    s = launch("ldpo_zero_kernel", ldpo_zero_kernel<T, L>, row_blocks(l.rows[0] + l.rows[1]), ldpo_block,
               stream, dev_of(l), static_cast<const ldpo_header*>(w.h), head.hidden,
               g.chosen_hidden, g.chosen_hidden_stride, g.rejected_hidden, g.rejected_hidden_stride);
    if (!s) return s;
  }
  T* gh[2] = {g.chosen_hidden, g.rejected_hidden};
  const std::int64_t gs[2] = {g.chosen_hidden_stride, g.rejected_hidden_stride};
  for (int k = 0; s && k < l.num_buffers; ++k) {
    linear_grads<T, G> lg;
    lg.hidden = gh[k];
    lg.hidden_stride = gs[k];
    lg.accumulate_hidden = true;
    lg.weight = g.weight;
    lg.weight_stride = g.weight_stride;
    lg.bias = g.bias;
    std::size_t bytes = w.lin_bytes;
    s = linear_backward_run(w.lin_ws, bytes, handle, ldpo_view(l, k, head, w.rows[k].label),
                            shard != nullptr ? nullptr : lse[k], shard != nullptr ? shard[k] : linear_shard_rows{},
                            w.rows[k].coef, static_cast<const double*>(nullptr),
                            static_cast<const double*>(nullptr), lg, ldpo_linear_options(opt), stream);
  }
  return s;
}

/// The device arrays a pass reads from a layout, as byte ranges (compared, never read): each
/// buffer's hidden rows, the head's weight and bias (linear_input_ranges), and each side's
/// labels and mask over its buffer's rows. Names: `hidden` / `weight` / `bias` / `labels` /
/// `mask` after `prefix` ("" or "ref_"). Returns the count (at most 14).
template <class T, class L>
int ldpo_input_ranges(const ldpo_layout<T, L>& l, const linear_head<T>& head, bool ref,
                      dpo::detail::named_range* out) {
  static constexpr const char* names[2][9] = {
      {"hidden", "weight", "bias", "hidden.chosen", "hidden.rejected", "labels.chosen", "labels.rejected",
       "mask.chosen", "mask.rejected"},
      {"ref_hidden", "ref_head.weight", "ref_head.bias", "ref_hidden.chosen", "ref_hidden.rejected",
       "ref_labels.chosen", "ref_labels.rejected", "ref_mask.chosen", "ref_mask.rejected"}};
  const char* const* n = names[ref ? 1 : 0];
  int m = 0;
  for (int k = 0; k < l.num_buffers; ++k) {
    dpo::detail::linear_input_ranges(ldpo_view(l, k, head, nullptr), out + m);  // labels, mask: null here
    out[m].name = l.num_buffers == 1 ? n[0] : n[3 + k];
    out[m + 1].name = n[1];
    out[m + 2].name = n[2];
    m += 3;
  }
  for (int side = 0; side < 2; ++side) {
    const std::int64_t rows = l.rows[l.buffer_of[side]];
    out[m++] = dpo::detail::range_of(l.v[side].labels, 1, rows, rows, n[5 + side]);
    out[m++] = dpo::detail::range_of(l.v[side].mask, 1, rows, rows, n[7 + side]);
  }
  return m;
}

/// The gradient arguments against the layout: strides, one dHidden buffer for the
/// concatenated layouts, a bias gradient only with a bias, and no output overlapping an
/// input (the layout's hidden rows, head, labels and masks: ldpo_input_ranges; the
/// workspace; `extra`, n_extra more inputs of the call, e.g. the row state it reads) or
/// another output.
template <class T, class L, class G>
status ldpo_check_grads(const ldpo_layout<T, L>& l, const linear_head<T>& head, const linear_dpo_grads<T, G>& g,
                        const void* workspace, std::int64_t ws_bytes,
                        const dpo::detail::named_range* extra = nullptr, int n_extra = 0) {
  const std::int64_t H = head.hidden;
  if (g.chosen_hidden != nullptr && g.chosen_hidden_stride < H)
    return invalid("dpo: grads.chosen_hidden_stride = %lld is invalid: must be >= hidden = %lld",
                   (long long)g.chosen_hidden_stride, (long long)H);
  if (g.rejected_hidden != nullptr && g.rejected_hidden_stride < H)
    return invalid("dpo: grads.rejected_hidden_stride = %lld is invalid: must be >= hidden = %lld",
                   (long long)g.rejected_hidden_stride, (long long)H);
  if (l.num_buffers == 1 &&
      (g.chosen_hidden != g.rejected_hidden ||
       (g.chosen_hidden != nullptr && g.chosen_hidden_stride != g.rejected_hidden_stride)))
    return invalid("dpo: grads.chosen_hidden and grads.rejected_hidden must be the same buffer and stride "
                   "for a concatenated layout");
  if (g.weight != nullptr && g.weight_stride < H)
    return invalid("dpo: grads.weight_stride = %lld is invalid: must be >= hidden = %lld",
                   (long long)g.weight_stride, (long long)H);
  if (g.bias != nullptr && head.bias == nullptr) return invalid("dpo: grads.bias is given but the head has no bias");
  constexpr int max_extra = 8;
  if (n_extra > max_extra) return invalid("dpo: internal: ldpo_check_grads takes at most 8 more inputs");
  dpo::detail::named_range ins[11 + max_extra];
  int n = ldpo_input_ranges(l, head, false, ins);
  ins[n++] = workspace_range(workspace, ws_bytes);
  for (int i = 0; i < n_extra; ++i) ins[n++] = extra[i];
  dpo::detail::named_range outs[4];
  int m = 0;
  outs[m++] = dpo::detail::range_of(g.chosen_hidden, l.rows[l.buffer_of[0]], H, g.chosen_hidden_stride,
                                    "grads.chosen_hidden");
  if (l.num_buffers == 2)
    outs[m++] = dpo::detail::range_of(g.rejected_hidden, l.rows[1], H, g.rejected_hidden_stride,
                                      "grads.rejected_hidden");
  outs[m++] = dpo::detail::range_of(g.weight, head.vocab, H, g.weight_stride, "grads.weight");
  outs[m++] = dpo::detail::range_of(g.bias, 1, head.vocab, head.vocab, "grads.bias");
  return check_linear_overlap(outs, m, ins, n);
}

/// The forward's outputs that are indexed by hidden row need one buffer.
template <class T, class L>
status ldpo_check_row_outputs(const ldpo_layout<T, L>& l, const forward_outputs& out) {
  if ((out.row_lse != nullptr || out.row_coef != nullptr) && l.num_buffers != 1)
    return invalid("dpo: out.row_lse / out.row_coef need one hidden buffer for both sides "
                   "(padded or packed pairs)");
  return {};
}

/// Sequence arrays holding only the sums of log-probs (the reference's, linear_pair_logps').
inline seq_arrays logp_only(double* logp) {
  seq_arrays q{};
  q.logp = logp;
  return q;
}

/// ldpo_sums_kernel over the pairs [p0, p1) of a layout whose rows are in `rows`.
template <class T, class L>
status ldpo_sums(const ldpo_layout<T, L>& l, const ldpo_ws& w, const ldpo_rows* rows, std::int64_t p0,
                 std::int64_t p1, double ld_alpha, const seq_arrays& c0, const seq_arrays& c1, bool metrics,
                 cudaStream_t stream) {
  return launch("ldpo_sums_kernel", ldpo_sums_kernel<T, L>, seq_blocks(p1 - p0), ldpo_block, stream, dev_of(l),
                static_cast<const ldpo_header*>(w.h), rows[0], rows[1], p0, p1, ld_alpha, c0, c1, metrics);
}

/// Whether a forward computes the token metrics' row terms: options::metrics, or WPO
/// (whose weights are made of them), as the CPU's.
inline bool ldpo_metrics(const loss_config& cfg, const linear_dpo_options& opt) {
  return opt.metrics || cfg.use_weighting;
}

/// The row terms' arrays of a buffer's rows (none without metrics).
inline linear_row_terms ldpo_terms(const ldpo_rows& r, bool metrics) {
  linear_row_terms t;
  if (metrics) {
    t.zmean = r.zmean;
    t.wpo = r.wpo;
    t.hit = r.hit;
  }
  return t;
}

/// The start of every forward after its checks: the policy's labels into the workspace
/// and, with a reference layout, the reference's sequence log-probs (*ref_c, *ref_r then
/// point at them; else they stay the caller's).
template <class T, class L>
status ldpo_start(cublasLtHandle_t handle, const ldpo_call<T, L>& c, const linear_head<T>& head,
                  const linear_head<T>* ref_head, double ld_alpha, std::int64_t P, const linear_dpo_options& opt,
                  cudaStream_t stream, const double** ref_c, const double** ref_r) {
  const ldpo_ws& w = c.w;
  status s = launch("ldpo_labels_kernel", ldpo_labels_kernel<T, L>, 1, ldpo_block, stream, dev_of(c.pol),
                    head.vocab, 0, true, w.h, w.rows[0], w.rows[1]);
  if (!s || !c.has_ref) return s;
  ldpo_rows rr[2] = {w.ref_rows[0], w.ref_rows[1]};
  s = ldpo_logps(handle, c.ref, *ref_head, 5, false, w.h, rr, w, opt, stream);
  if (s) s = ldpo_sums(c.ref, w, rr, 0, P, ld_alpha, logp_only(w.ref), logp_only(w.ref + P), false, stream);
  *ref_c = w.ref;
  *ref_r = w.ref + P;
  return s;
}

/// The end of every forward: the logits path's pair stage (pair_kernel: WPO weights, every
/// loss type, the NLL from the plain sums, the metrics) over the whole batch into the
/// workspace, (four passes: `coefs`) each completion row's dL/dlogp, and the copy out when
/// the error word is clear.
template <class T, class L>
status ldpo_finish(const ldpo_call<T, L>& c, const linear_head<T>& head, const double* ref_c, const double* ref_r,
                   const loss_config& cfg, const forward_outputs& out, const double* grad_output, std::int64_t P,
                   bool coefs, const linear_dpo_options& opt, cudaStream_t stream) {
  const ldpo_ws& w = c.w;
  forward_outputs scratch;
  scratch.set_pair_outputs(w.pair_out, P);
  scratch.loss = w.loss;
  scratch.metrics = w.metrics;
  scratch.nll_token_grad = w.nll;
  const bool needs_ref = dpo::detail::needs_reference(cfg);
  pair_params pp;
  pp.cfg = cfg;
  pp.pairs = P;
  pp.vocab = head.vocab;
  pp.metrics = ldpo_metrics(cfg, opt);
  pp.weights = weights_from::wpo_sums;
  pp.ref_chosen = needs_ref ? ref_c : nullptr;
  pp.ref_rejected = needs_ref ? ref_r : nullptr;
  pp.out = scratch;
  status s = launch("pair_kernel", pair_kernel<pair_block>, 1, pair_block, stream, w.pw, pp);
  if (s && coefs)
    s = launch("ldpo_coef_kernel", ldpo_coef_kernel<T, L>, seq_blocks(P), ldpo_block, stream, dev_of(c.pol),
               w.rows[0], w.rows[1], std::int64_t{0}, P, cfg.ld_alpha, static_cast<const ldpo_header*>(w.h),
               static_cast<const double*>(w.pw.pairs.gc), static_cast<const double*>(w.pw.pairs.gr),
               static_cast<const double*>(w.nll), grad_output, out.row_lse, out.row_coef);
  if (!s) return s;
  return launch("ldpo_publish_kernel", ldpo_publish_kernel<ldpo_block>, seq_blocks(P), ldpo_block, stream,
                static_cast<const ldpo_header*>(w.h), scratch, out, P);
}

/// The four-pass forward after its checks: reference (from hidden states, when given),
/// policy log-probs (linear_logps), sums, the pair stage into the workspace, the
/// coefficients, the copy out. ref_c / ref_r: precomputed reference log-probs (null with a
/// reference layout).
template <class T, class L>
status ldpo_forward(cublasLtHandle_t handle, const ldpo_call<T, L>& c, const linear_head<T>& head,
                    const linear_head<T>* ref_head, const double* ref_c, const double* ref_r,
                    const loss_config& cfg, const forward_outputs& out, const double* grad_output,
                    std::int64_t P, const linear_dpo_options& opt, cudaStream_t stream) {
  const ldpo_ws& w = c.w;
  const bool metrics = ldpo_metrics(cfg, opt);
  status s = ldpo_start(handle, c, head, ref_head, cfg.ld_alpha, P, opt, stream, &ref_c, &ref_r);
  for (int k = 0; s && k < c.pol.num_buffers; ++k) {
    std::size_t bytes = w.lin_bytes;
    s = linear_logps_impl(w.lin_ws, bytes, handle, ldpo_view(c.pol, k, head, w.rows[k].label), w.rows[k].logp,
                          metrics ? w.rows[k].ent : nullptr, w.rows[k].lse, ldpo_terms(w.rows[k], metrics),
                          ldpo_linear_options(opt), stream);
  }
  if (s) s = ldpo_sums(c.pol, w, w.rows, 0, P, cfg.ld_alpha, w.pw.seqs[0], w.pw.seqs[1], metrics, stream);
  return s ? ldpo_finish(c, head, ref_c, ref_r, cfg, out, grad_output, P, true, opt, stream) : s;
}

/// The three-pass call after its checks (dpo/core/linear_plan.hpp cut the chunks of whole
/// pairs): per chunk, its two row ranges (chosen, rejected) gathered into the linear head's
/// workspace, one logits GEMM over the full vocab, the rows' statistics, the pairs' sums,
/// dL/dpi and each row's dL/dlogp, the row kernel turning the kept logits into dZ, then the
/// dHidden and dWeight GEMMs and dBias; the pair stage over the whole batch writes the
/// outputs at the end. Every GEMM's algorithm is chosen (a dry pass) before anything is
/// enqueued, so a cuBLASLt refusal leaves nothing behind.
template <class T, class L, class G>
status ldpo_three(cublasLtHandle_t handle, const ldpo_call<T, L>& c, const linear_head<T>& head,
                  const linear_head<T>* ref_head, const double* ref_c, const double* ref_r, const loss_config& cfg,
                  const forward_outputs& out, const linear_dpo_grads<T, G>& g, const double* grad_output,
                  std::int64_t P, const linear_dpo_options& opt, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int B = linear_block;
  const ldpo_ws& w = c.w;
  const ldpo_layout<T, L>& l = c.pol;
  const std::int64_t H = head.hidden, V = head.vocab;
  linear_ws<T> lw(reinterpret_cast<std::uintptr_t>(w.lin_ws), c.ch.rows > 1 ? c.ch.rows : 1, V, H, c.gemm_bytes,
                  true);
  lw.h = reinterpret_cast<linear_header*>(w.h);  // the call's error word (the same layout)
  T* gh[2] = {g.chosen_hidden, g.rejected_hidden};
  const std::int64_t gs[2] = {g.chosen_hidden_stride, g.rejected_hidden_stride};
  const bool dh = gh[0] != nullptr || gh[1] != nullptr;
  const bool metrics = ldpo_metrics(cfg, opt);
  // The sides' sequences on the host (packed: through the host copy of cu_seqlens).
  token_view<T, L> hv[2] = {l.v[0], l.v[1]};
  const std::int64_t* dev_cu = hv[0].cu_seqlens;
  if (dev_cu != nullptr) hv[0].cu_seqlens = hv[1].cu_seqlens = opt.host_cu_seqlens;
  linear_view<T, std::int64_t> view[2];
  for (int s = 0; s < 2; ++s) view[s] = ldpo_view(l, l.buffer_of[s], head, w.rows[l.buffer_of[s]].label);
  const double *rho_c = nullptr, *rho_r = nullptr;  // the reference as dL/dpi reads it (set below)
  const auto enqueue = [&](bool dry) {
    const linear_gemm gm{handle, stream, lw.gemm, static_cast<std::size_t>(lw.gemm_bytes), dry};
    status s;
    for (std::int64_t p0 = 0, p1 = 0; s && p0 < P; p0 = p1) {
      p1 = dpo::detail::linear_next_chunk(c.pair_rows.data(), P, p0, c.max_rows);
      std::int64_t r0[2], n[2];
      for (int k = 0; k < 2; ++k) {
        r0[k] = hv[k].row_begin(p0);
        n[k] = hv[k].row_end(p1 - 1) - r0[k];
      }
      const linear_ws<T> part[2] = {lw, ws_from_row(lw, n[0])};
      const std::int64_t nb = n[0] + n[1];
      const auto each_side = [&](auto&& f) {
        for (int k = 0; s && k < 2; ++k)
          if (n[k] > 0) s = f(k, w.rows[l.buffer_of[k]]);
      };
      if (!dry)
        each_side([&](int k, const ldpo_rows&) {
          return launch("linear_gather_kernel", linear_gather_kernel<B, false, T, std::int64_t>, row_blocks(n[k]), B,
                        stream, view[k], r0[k], n[k], linear_bwd_in{}, part[k]);
        });
      if (s && nb > 0) s = logits_gemm(gm, view[0], lw, nb, 0, V);
      if (!dry) {
        each_side([&](int k, const ldpo_rows& rb) {
          return metrics ? launch("linear_stats_kernel", linear_stats_kernel<B, true, T, std::int64_t>,
                                  row_blocks(n[k]), B, stream, view[k], r0[k], n[k], std::int64_t{0}, V, true,
                                  part[k], rb.logp, rb.ent, rb.lse, ldpo_terms(rb, true))
                         : launch("linear_stats_kernel", linear_stats_kernel<B, false, T, std::int64_t>,
                                  row_blocks(n[k]), B, stream, view[k], r0[k], n[k], std::int64_t{0}, V, true,
                                  part[k], rb.logp, static_cast<double*>(nullptr), rb.lse, linear_row_terms{});
        });
        const unsigned pb = seq_blocks(p1 - p0);
        if (s) s = ldpo_sums(l, w, w.rows, p0, p1, cfg.ld_alpha, w.pw.seqs[0], w.pw.seqs[1], metrics, stream);
        if (s)
          s = launch("ldpo_pair_grad_kernel", ldpo_pair_grad_kernel<ldpo_block>, pb, ldpo_block, stream, cfg,
                     static_cast<const ldpo_header*>(w.h), P, p0, p1, w.pw, rho_c, rho_r);
        if (s)
          s = launch("ldpo_coef_kernel", ldpo_coef_kernel<T, L>, pb, ldpo_block, stream, dev_of(l), w.rows[0],
                     w.rows[1], p0, p1, cfg.ld_alpha, static_cast<const ldpo_header*>(w.h),
                     static_cast<const double*>(w.pw.pairs.gc), static_cast<const double*>(w.pw.pairs.gr),
                     static_cast<const double*>(w.nll), grad_output, out.row_lse, out.row_coef);
        // The backward's row state (rows with a zero dL/dlogp are skipped as in
        // linear_logps_backward: their hidden rows become zeros), then dZ over the kept logits.
        each_side([&](int k, const ldpo_rows& rb) {
          return launch("linear_gather_kernel", linear_gather_kernel<B, true, T, std::int64_t>, row_blocks(n[k]), B,
                        stream, view[k], r0[k], n[k],
                        linear_bwd_in{rb.lse, rb.coef, static_cast<const double*>(nullptr),
                                      static_cast<const double*>(nullptr), true},
                        part[k]);
        });
        if (s && nb > 0) s = linear_dz<false>(view[0], nb, std::int64_t{0}, V, lw, g.bias, stream);
      }
      if (s && nb > 0)
        s = linear_grad_gemms(gm, head.weight, head.weight_stride, H, nb, V, lw, dh, A(0), g.weight, g.weight_stride);
      if (!dry)
        each_side([&](int k, const ldpo_rows&) {
          if (gh[k] == nullptr) return status{};
          return launch("linear_dhidden_kernel", linear_dhidden_kernel<B, T, std::int64_t>, row_blocks(n[k]), B,
                        stream, H, r0[k], n[k], part[k], gh[k], gs[k], g.accumulate_hidden);
        });
    }
    return s;
  };
  status s = enqueue(true);  // every GEMM's algorithm, before anything is enqueued
  if (s) s = ldpo_start(handle, c, head, ref_head, cfg.ld_alpha, P, opt, stream, &ref_c, &ref_r);
  // dL/dpi reads the reference only where the loss does (as the CPU's three passes).
  if (dpo::detail::needs_reference(cfg)) {
    rho_c = ref_c;
    rho_r = ref_r;
  }
  if (s && dev_cu != nullptr) {  // the plan's chunk boundaries against the device's cu_seqlens
    ldpo_cu_entries e{};
    const auto flush = [&] {
      if (e.n > 0 && s) s = launch("ldpo_host_cu_kernel", ldpo_host_cu_kernel<1>, 1, 1, stream, dev_cu, e, w.h);
      e.n = 0;
    };
    const auto check = [&](std::int64_t i) {
      e.index[e.n] = i;
      e.value[e.n] = opt.host_cu_seqlens[i];
      if (++e.n == 32) flush();
    };
    for (std::int64_t p0 = 0, p1 = 0; p0 < P; p0 = p1) {
      p1 = dpo::detail::linear_next_chunk(c.pair_rows.data(), P, p0, c.max_rows);
      for (int k = 0; k < 2; ++k) {
        check(l.v[k].first_seq + p0);
        check(l.v[k].first_seq + p1);
      }
    }
    flush();
  }
  if (s)
    s = launch("ldpo_nll_kernel", ldpo_nll_kernel<T, L>, 1, ldpo_block, stream, dev_of(l), w.rows[0], w.rows[1], P,
               cfg, static_cast<const ldpo_header*>(w.h), w.nll);
  if (s) s = enqueue(false);
  return s ? ldpo_finish(c, head, ref_c, ref_r, cfg, out, grad_output, P, false, opt, stream) : s;
}

/// The gradient buffers of a fused call as byte ranges (as ldpo_check_grads' outputs): 4.
template <class T, class L, class G>
void ldpo_grad_ranges(const ldpo_layout<T, L>& l, const linear_head<T>& head, const linear_dpo_grads<T, G>& g,
                      dpo::detail::named_range* out) {
  const std::int64_t H = head.hidden;
  out[0] = dpo::detail::range_of(g.chosen_hidden, l.rows[l.buffer_of[0]], H, g.chosen_hidden_stride,
                                 "grads.chosen_hidden");
  out[1] = dpo::detail::range_of(g.rejected_hidden, l.rows[l.buffer_of[1]], H, g.rejected_hidden_stride,
                                 "grads.rejected_hidden");
  out[2] = dpo::detail::range_of(g.weight, head.vocab, H, g.weight_stride, "grads.weight");
  out[3] = dpo::detail::range_of(g.bias, 1, head.vocab, head.vocab, "grads.bias");
}

/// Checks shared by the fused and the forward calls once the workspace is carved: the row
/// state's buffer, the reference log-probs and the aliasing rule of dpo::cpu: the forward
/// outputs (dpo::detail::forward_ranges; row_lse / row_coef over the hidden buffer's rows,
/// options.num_rows for packed views) may overlap neither each other nor the call's inputs:
/// the policy's (and the reference's) hidden rows, head, labels and mask, the reference
/// log-probs, the workspace's bytes used and `extra` (the fused call's gradient buffers).
template <class T, class L>
status ldpo_check_forward(const ldpo_call<T, L>& c, const linear_head<T>& head, const linear_head<T>* ref_head,
                          const double* ref_c, const double* ref_r, const loss_config& cfg,
                          const forward_outputs& out, std::int64_t P, const void* workspace,
                          const dpo::detail::named_range* extra = nullptr, int n_extra = 0) {
  status s = ldpo_check_row_outputs(c.pol, out);
  if (!s) return s;
  if (!c.has_ref) {
    pair_logps_in li;
    li.num_pairs = P;
    li.chosen_logps = li.rejected_logps = c.w.ref;  // placeholders: the call's own arrays
    li.ref_chosen_logps = ref_c;
    li.ref_rejected_logps = ref_r;
    s = to_status(dpo::detail::check_logps_in(li, cfg, dpo::detail::cuda_policy(-1, true)));
    if (!s) return s;
  }
  dpo::detail::named_range ins[40];
  int n = ldpo_input_ranges(c.pol, head, false, ins);
  if (c.has_ref && ref_head != nullptr) n += ldpo_input_ranges(c.ref, *ref_head, true, ins + n);
  if (!c.has_ref) {
    ins[n++] = dpo::detail::range_of(ref_c, 1, P, P, "ref_chosen_logps");
    ins[n++] = dpo::detail::range_of(ref_r, 1, P, P, "ref_rejected_logps");
  }
  ins[n++] = workspace_range(workspace, c.w.bytes);
  for (int k = 0; k < n_extra; ++k) ins[n++] = extra[k];
  const std::int64_t rows = c.pol.rows[0] > c.pol.rows[1] ? c.pol.rows[0] : c.pol.rows[1];
  return to_status(dpo::detail::check_forward_outputs(out, P, rows, ins, n));
}

/// The fused call (both reference forms: ref / ref_head null for precomputed log-probs).
template <class T, class L, class G>
status ldpo_fused(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                  const hidden_pairs<T, L>& policy, const linear_head<T>& head, const hidden_pairs<T, L>* ref,
                  const linear_head<T>* ref_head, const double* ref_c, const double* ref_r, const loss_config& cfg,
                  const forward_outputs& out, const linear_dpo_grads<T, G>& g, const linear_dpo_options& opt,
                  const double* grad_output, cudaStream_t stream) {
  ldpo_call<T, L> c;
  status s = ldpo_prologue<T, L>(workspace, workspace_bytes, handle, policy, head, ref, ref_head, &cfg, opt, &c, true);
  if (!s || c.size_only) return s;
  const std::int64_t P = policy.num_pairs();
  dpo::detail::named_range grads[4];
  ldpo_grad_ranges(c.pol, head, g, grads);
  s = ldpo_check_forward(c, head, ref_head, ref_c, ref_r, cfg, out, P, workspace, grads, 4);
  if (!s) return s;
  s = ldpo_check_grads(c.pol, head, g, workspace, static_cast<std::int64_t>(c.w.bytes));
  if (!s) return s;
  if (c.mode == linear_mode::three_pass)
    return ldpo_three<T, L, G>(handle, c, head, ref_head, ref_c, ref_r, cfg, out, g, grad_output, P, opt, stream);
  s = ldpo_forward<T, L>(handle, c, head, ref_head, ref_c, ref_r, cfg, out, grad_output, P, opt, stream);
  if (!s) return s;
  const double* lse[2] = {c.w.rows[0].lse, c.w.rows[1].lse};
  return ldpo_backward(handle, c.pol, head, lse, c.w, g, opt, stream);
}

/// The plan of a fused call (both reference forms, as ldpo_fused).
template <class T, class L>
status ldpo_plan_of(const hidden_pairs<T, L>& policy, const linear_head<T>& head, const hidden_pairs<T, L>* ref,
                    const linear_head<T>* ref_head, const loss_config& cfg, const linear_dpo_options& opt,
                    linear_dpo_plan* out) {
  if (out == nullptr) return invalid("dpo: linear_dpo_workspace_size: out is null");
  std::size_t bytes = 0;
  ldpo_call<T, L> c;
  const status s = ldpo_prologue<T, L>(nullptr, bytes, nullptr, policy, head, ref, ref_head, &cfg, opt, &c, true);
  if (!s) return s;
  out->mode = c.mode;
  out->chunk_rows = c.ch.rows;
  out->gemm_workspace_bytes = c.mode == linear_mode::three_pass ? c.gemm_bytes : opt.gemm_workspace_bytes;
  out->workspace_bytes = static_cast<std::int64_t>(bytes);
  return {};
}

}  // namespace detail

/// The plan of linear_dpo with the reference as log-probs: its mode (three or four passes,
/// dpo/core/linear_plan.hpp), the rows of its largest logits chunk and the workspace bytes
/// (what the size query of linear_dpo returns).
template <class T, class L>
status linear_dpo_workspace_size(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                                 const loss_config& cfg, const linear_dpo_options& opt, linear_dpo_plan* out) {
  return detail::ldpo_plan_of<T, L>(policy, head, nullptr, nullptr, cfg, opt, out);
}

/// The plan of linear_dpo with the reference from hidden states (its workspace also holds the
/// reference's forward).
template <class T, class L>
status linear_dpo_workspace_size(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                                 const hidden_pairs<T, L>& ref, const linear_head<T>& ref_head,
                                 const loss_config& cfg, const linear_dpo_options& opt, linear_dpo_plan* out) {
  return detail::ldpo_plan_of<T, L>(policy, head, &ref, &ref_head, cfg, opt, out);
}

/// DPO from hidden states in one call, as dpo::cpu::linear_dpo: the loss, the metrics and
/// per-pair outputs of dpo_forward in `out` (device pointers, each optional; out.row_lse /
/// row_coef, indexed by hidden row, need one hidden buffer) and the gradients of
/// grad_output * loss with respect to the hidden states, the weight and the bias (g).
/// ref_chosen / ref_rejected: the reference's sequence log-probs (device [P]; null for
/// reference-free losses). grad_output: a device scalar, null for 1. Three GEMM passes when
/// the plan allows (opt.mode), else four.
template <class T, class L, class G>
status linear_dpo(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                  const hidden_pairs<T, L>& policy, const linear_head<T>& head, const double* ref_chosen,
                  const double* ref_rejected, const loss_config& cfg, const forward_outputs& out,
                  const linear_dpo_grads<T, G>& g, const linear_dpo_options& opt = {},
                  const double* grad_output = nullptr, cudaStream_t stream = 0) {
  static_assert(std::is_same<G, T>::value || std::is_same<G, acc_t<T>>::value,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  return detail::ldpo_fused<T, L, G>(workspace, workspace_bytes, handle, policy, head, nullptr, nullptr, ref_chosen,
                                     ref_rejected, cfg, out, g, opt, grad_output, stream);
}

/// linear_dpo with the reference from hidden states: ref (same pairs and labels as policy)
/// through ref_head (same vocab), forward only; then linear_dpo with its sequence log-probs.
/// Everything is checked before anything is enqueued.
template <class T, class L, class G>
status linear_dpo(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                  const hidden_pairs<T, L>& policy, const linear_head<T>& head, const hidden_pairs<T, L>& ref,
                  const linear_head<T>& ref_head, const loss_config& cfg, const forward_outputs& out,
                  const linear_dpo_grads<T, G>& g, const linear_dpo_options& opt = {},
                  const double* grad_output = nullptr, cudaStream_t stream = 0) {
  static_assert(std::is_same<G, T>::value || std::is_same<G, acc_t<T>>::value,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  return detail::ldpo_fused<T, L, G>(workspace, workspace_bytes, handle, policy, head, &ref, &ref_head, nullptr,
                                     nullptr, cfg, out, g, opt, grad_output, stream);
}

/// The forward alone (four passes' first half), as dpo::cpu::linear_dpo_forward: writes `out`
/// as linear_dpo does; out.row_lse and out.row_coef (device, indexed by hidden row; rows of
/// the sequences that are not completion rows get 0) hold what linear_dpo_backward needs and
/// need one hidden buffer for both sides.
template <class T, class L>
status linear_dpo_forward(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                          const hidden_pairs<T, L>& policy, const linear_head<T>& head, const double* ref_chosen,
                          const double* ref_rejected, const loss_config& cfg, const forward_outputs& out,
                          const linear_dpo_options& opt = {}, cudaStream_t stream = 0) {
  detail::ldpo_call<T, L> c;
  status s = detail::ldpo_prologue<T, L>(workspace, workspace_bytes, handle, policy, head, nullptr, nullptr,
                                         &cfg, opt, &c);
  if (!s || c.size_only) return s;
  const std::int64_t P = policy.num_pairs();
  s = detail::ldpo_check_forward<T, L>(c, head, nullptr, ref_chosen, ref_rejected, cfg, out, P, workspace);
  if (!s) return s;
  return detail::ldpo_forward<T, L>(handle, c, head, nullptr, ref_chosen, ref_rejected, cfg, out, nullptr, P, opt,
                              stream);
}

/// linear_dpo_forward with the reference from hidden states.
template <class T, class L>
status linear_dpo_forward(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                          const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                          const hidden_pairs<T, L>& ref, const linear_head<T>& ref_head, const loss_config& cfg,
                          const forward_outputs& out, const linear_dpo_options& opt = {},
                          cudaStream_t stream = 0) {
  detail::ldpo_call<T, L> c;
  status s = detail::ldpo_prologue<T, L>(workspace, workspace_bytes, handle, policy, head, &ref, &ref_head, &cfg,
                                         opt, &c);
  if (!s || c.size_only) return s;
  const std::int64_t P = policy.num_pairs();
  s = detail::ldpo_check_forward(c, head, &ref_head, nullptr, nullptr, cfg, out, P, workspace);
  if (!s) return s;
  return detail::ldpo_forward<T, L>(handle, c, head, &ref_head, nullptr, nullptr, cfg, out, nullptr, P, opt, stream);
}

/// The backward of linear_dpo_forward, as dpo::cpu::linear_dpo_backward: the gradients of
/// grad_output * loss (device scalar, null for 1) from the row state it wrote (row_lse,
/// row_coef: device, indexed by hidden row), recomputing the logits. One hidden buffer.
template <class T, class L, class G>
status linear_dpo_backward(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                           const hidden_pairs<T, L>& policy, const linear_head<T>& head, const double* row_lse,
                           const double* row_coef, const linear_dpo_grads<T, G>& g,
                           const double* grad_output = nullptr, const linear_dpo_options& opt = {},
                           cudaStream_t stream = 0) {
  static_assert(std::is_same<G, T>::value || std::is_same<G, acc_t<T>>::value,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  detail::ldpo_call<T, L> c;
  status s = detail::ldpo_prologue<T, L>(workspace, workspace_bytes, handle, policy, head, nullptr, nullptr,
                                         nullptr, opt, &c);
  if (!s || c.size_only) return s;
  if (c.pol.num_buffers != 1)
    return detail::invalid("dpo: linear_dpo_backward needs one hidden buffer for both sides (padded or packed pairs)");
  // Read only on the buffer's rows: without any (T = 0) they may be null.
  if (c.pol.rows[0] > 0 && (row_lse == nullptr || row_coef == nullptr))
    return detail::invalid("dpo: %s is null", row_lse == nullptr ? "row_lse" : "row_coef");
  const std::int64_t n = c.pol.rows[0];
  const dpo::detail::named_range state[2] = {dpo::detail::range_of(row_lse, 1, n, n, "row_lse"),
                                             dpo::detail::range_of(row_coef, 1, n, n, "row_coef")};
  s = detail::ldpo_check_grads(c.pol, head, g, workspace, static_cast<std::int64_t>(c.w.bytes), state, 2);
  if (!s) return s;
  const detail::ldpo_ws& w = c.w;
  s = detail::launch("ldpo_labels_kernel", detail::ldpo_labels_kernel<T, L>, 1, detail::ldpo_block, stream,
                     detail::dev_of(c.pol), head.vocab, 0, true, w.h, w.rows[0], w.rows[1]);
  if (s)
    s = detail::launch("ldpo_scale_kernel", detail::ldpo_scale_kernel<T, L>, detail::seq_blocks(c.pol.rows[0]),
                       detail::ldpo_block, stream, detail::dev_of(c.pol), w.rows[0],
                       static_cast<const detail::ldpo_header*>(w.h), row_coef, grad_output);
  if (!s) return s;
  const double* lse[2] = {row_lse, nullptr};
  return detail::ldpo_backward(handle, c.pol, head, lse, w, g, opt, stream);
}

/// Sequence log-probs of both sides from hidden states, forward only, as
/// dpo::cpu::linear_pair_logps: chosen[i], rejected[i] (device, [P]), LD-DPO weighted when
/// ld_alpha < 1.
template <class T, class L>
status linear_pair_logps(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                         const hidden_pairs<T, L>& in, const linear_head<T>& head, double ld_alpha,
                         double* chosen, double* rejected, const linear_dpo_options& opt = {},
                         cudaStream_t stream = 0) {
  status s0 = detail::to_status(dpo::detail::check_unit(ld_alpha, "ld_alpha"));
  if (!s0) return s0;
  detail::ldpo_call<T, L> c;
  status s = detail::ldpo_prologue<T, L>(workspace, workspace_bytes, handle, in, head, nullptr, nullptr, nullptr,
                                         opt, &c);
  if (!s || c.size_only) return s;
  if (chosen == nullptr || rejected == nullptr)
    return detail::invalid("dpo: %s is null", chosen == nullptr ? "chosen" : "rejected");
  const std::int64_t P = in.num_pairs();
  {
    // The outputs may overlap neither each other nor the hidden rows, head, labels, mask or
    // the workspace's bytes used.
    dpo::detail::named_range ins[20];
    int n = detail::ldpo_input_ranges(c.pol, head, false, ins);
    ins[n++] = detail::workspace_range(workspace, c.w.bytes);
    const dpo::detail::named_range outs[2] = {dpo::detail::range_of(chosen, 1, P, P, "chosen"),
                                              dpo::detail::range_of(rejected, 1, P, P, "rejected")};
    s = detail::to_status(dpo::detail::check_no_overlap(outs, 2, ins, n));
    if (!s) return s;
  }
  const detail::ldpo_ws& w = c.w;
  detail::ldpo_rows rows[2] = {w.rows[0], w.rows[1]};
  s = detail::ldpo_logps(handle, c.pol, head, 0, true, w.h, rows, w, opt, stream);
  if (s)
    s = detail::ldpo_sums(c.pol, w, rows, 0, P, ld_alpha, detail::logp_only(w.ref), detail::logp_only(w.ref + P),
                          false, stream);
  if (!s) return s;
  // Copy out only without an error (the publish kernel's pair outputs: chosen_logps).
  forward_outputs src, dst;
  src.chosen_logps = w.ref;
  src.rejected_logps = w.ref + P;
  dst.chosen_logps = chosen;
  dst.rejected_logps = rejected;
  return detail::launch("ldpo_publish_kernel", detail::ldpo_publish_kernel<detail::ldpo_block>, detail::seq_blocks(P),
                        detail::ldpo_block, stream, static_cast<const detail::ldpo_header*>(w.h), src, dst, P);
}

}  // namespace cuda
}  // namespace dpo
