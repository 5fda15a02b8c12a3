// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The kernels of the CUDA pipeline (internal; the API is dpo/cuda/dpo.cuh). One call runs
//   check_kernel     1 block: resets the error word, checks cu_seqlens (device data)
//   rows_kernel      a row per block iteration: one read of the row -> lse, label log-prob,
//                    metric terms; checks the label
//   sequence_kernel  a block per sequence: completion-token counts, LD-DPO weights (block
//                    scan of the completion flags), fixed-order sums
//   pair_kernel      1 block, one device function per phase: WPO weights and batch totals,
//                    the aot sorts, dpo::detail::contribution per pair, dpo::finalize
//   backward_kernel  a row per block iteration: one more read and one write; in
//                    dpo_forward_backward also the token metrics' row terms (the forward
//                    then skips them), summed after it by sequence_kernel (metrics_only)
//                    and metrics_kernel
// A kernel that finds the error word set returns at once, so invalid data writes nothing.
// No float atomics anywhere: every sum is a fixed tree, so results are bitwise reproducible.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "dpo/core/layout.hpp"
#include "dpo/core/metrics.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/pair_batch.hpp"
#include "dpo/cuda/block.cuh"
#include "dpo/cuda/status.cuh"

namespace dpo {
namespace cuda {

/// The metrics TRL's DPOTrainer logs: the core's unit, as on the CPU.
using metrics = dpo::metrics;

/// Where dpo_forward writes its results (device pointers): the core's struct, as on the CPU.
using forward_outputs = dpo::forward_outputs;

namespace detail {

inline constexpr int rows_block = 256;
inline constexpr int seq_block = 256;
inline constexpr int pair_block = 256;
inline constexpr std::int32_t state_magic = 0x44504f31;  // "DPO1": dpo_forward finished
inline constexpr unsigned long long no_label_error = ~0ull;

/// The workspace header. device_error first: its offset (0) is public.
struct ws_header {
  device_error err;
  unsigned long long label_key;  // min over out-of-range labels of (side << 62 | row)
  std::int32_t magic;            // state_magic once dpo_forward's pair stage has run
  std::int32_t reserved;
  std::int64_t sig_pairs;        // what that dpo_forward was called with
  std::int64_t sig_vocab;
  std::int64_t sig_rows[2];     // rows per side, written by sequence_kernel
  double nll_token_grad;
};

/// Per-row values of one side, indexed from the side's first row.
struct row_arrays {
  double* lse;
  double* logp;  // 0 for masked rows
  double* ent;
  double* zmean;
  double* wpo;
  double* hit;
  double* ldw;         // LD-DPO weight of the row (0 for masked rows)
  std::int32_t* seq;   // sequence of the row, -1 for masked rows
};

/// Per-sequence sums of one side.
struct seq_arrays {
  double* logp;   // LD-weighted
  double* plain;  // unweighted
  double* ent;
  double* zmean;
  double* wpo;
  double* hit;
  double* count;
};

/// One batch term's sort (aot or aot_unpaired): keys, sorted keys, ranks.
struct sort_arrays {
  double* a;
  double* b;
  double* sa;
  double* sb;
  std::int64_t* ra;
  std::int64_t* rb;
};

struct pair_arrays {
  double* weights;
  sort_arrays sorts[2];  // aot, aot_unpaired (dpo::detail::batch_sort_index)
  double* gc;
  double* gr;
};

struct ws_ptrs {
  ws_header* h;
  row_arrays rows[2];
  seq_arrays seqs[2];
  pair_arrays pairs;
};

/// Lays the workspace out from `base` (0 to only measure it) and returns its size. The same
/// sizes give the same layout, which is how dpo_backward finds dpo_forward's state.
inline std::size_t carve(std::uintptr_t base, const std::int64_t cap[2], std::int64_t seqs,
                         std::int64_t pairs, ws_ptrs* out) {
  std::size_t off = 0;
  // Points p at the next n elements of its type, 256-byte aligned.
  const auto take = [&](auto*& p, std::size_t n) {
    using E = std::remove_reference_t<decltype(*p)>;
    p = reinterpret_cast<E*>(base + off);
    off += (n * sizeof(E) + 255) / 256 * 256;
  };
  take(out->h, 1);
  for (int s = 0; s < 2; ++s) {
    const std::size_t n = static_cast<std::size_t>(cap[s]);
    row_arrays& r = out->rows[s];
    for (double** f : {&r.lse, &r.logp, &r.ent, &r.zmean, &r.wpo, &r.hit, &r.ldw}) take(*f, n);
    take(r.seq, n);
    const std::size_t m = static_cast<std::size_t>(seqs);
    seq_arrays& q = out->seqs[s];
    for (double** f : {&q.logp, &q.plain, &q.ent, &q.zmean, &q.wpo, &q.hit, &q.count}) take(*f, m);
  }
  const std::size_t p = static_cast<std::size_t>(pairs);
  pair_arrays& a = out->pairs;
  take(a.weights, p);
  for (sort_arrays& q : a.sorts) {
    for (double** f : {&q.a, &q.b, &q.sa, &q.sb}) take(*f, p);
    take(q.ra, p);
    take(q.rb, p);
  }
  take(a.gc, p);
  take(a.gr, p);
  return off;
}

/// The views of one call: one side (sequence_logps) or two (chosen, rejected).
template <class T, class L>
struct views {
  token_view<T, L> v[2];
  int num_sides;
  std::int64_t num_rows;  // packed views: rows of the buffer (cu_seqlens must stay within)
};

/// Rows [row_begin(0), row_end(last)) of a view, read on the device.
template <class T, class L>
__device__ __forceinline__ std::int64_t side_rows(const token_view<T, L>& v) {
  return v.num_seqs > 0 ? v.row_end(v.num_seqs - 1) - v.row_begin(0) : 0;
}

__device__ __forceinline__ bool has_error(const ws_header* h) {
  return h->err.code != 0 || h->label_key != no_label_error;
}

/// Records an out-of-range label at `row` of `side`: the lowest (side, row) wins, so the
/// report does not depend on timing.
__device__ __forceinline__ void record_label_error(ws_header* h, int side, std::int64_t row) {
  atomicMin(&h->label_key,
            (static_cast<unsigned long long>(side) << 62) | static_cast<unsigned long long>(row));
}

/// Turns a recorded label error into the error word, unless an earlier error is there.
/// One thread calls it. `bound`: the vocabulary the labels were checked against (-1: the
/// view's; a vocabulary shard's check passes the global one).
template <class T, class L>
__device__ void report_label_error(const views<T, L>& vs, ws_header* h, std::int64_t bound = -1) {
  if (h->err.code != 0) return;
  const unsigned long long key = h->label_key;
  const int side = static_cast<int>(key >> 62);
  const std::int64_t row = static_cast<std::int64_t>(key & ((1ull << 62) - 1));
  h->err = device_error{static_cast<std::int32_t>(device_error_code::label_out_of_range), side, row,
                        static_cast<std::int64_t>(vs.v[side].labels[row]), bound >= 0 ? bound : vs.v[side].vocab};
}

/// The error of cu_seqlens[q] (cu: a side's cu_seqlens from its first sequence, q its first
/// bad entry: negative, decreasing, or past the num_rows rows of the buffer).
__device__ inline device_error cu_seqlens_error(const std::int64_t* cu, std::int64_t q, std::int64_t num_rows,
                                                std::int32_t side, std::int64_t first_seq) {
  device_error e{0, side, first_seq + q, cu[q], 0};
  if (cu[q] < 0) {
    e.code = static_cast<std::int32_t>(device_error_code::cu_seqlens_negative);
  } else if (q > 0 && cu[q] < cu[q - 1]) {
    e.code = static_cast<std::int32_t>(device_error_code::cu_seqlens_decreasing);
    e.bound = cu[q - 1];
  } else {
    e.code = static_cast<std::int32_t>(device_error_code::cu_seqlens_past_rows);
    e.bound = num_rows;
  }
  return e;
}

/// Resets the error word and the forward state (the rows arrays are about to be rewritten)
/// and checks cu_seqlens. `after_reference`: the reference pass of the same call (the
/// reference-logits overloads) ran on this workspace just before and left a valid error
/// word; an error there is kept, as the reference's (sides 2 and 3), and stops the call.
template <class T, class L>
__global__ void check_kernel(views<T, L> vs, ws_header* h, bool after_reference) {
  __shared__ long long first_bad;
  const int tid = static_cast<int>(threadIdx.x);
  if (after_reference) {
    const bool stop = h->err.code != 0;  // read by every thread before thread 0 writes
    __syncthreads();
    if (stop) {
      if (tid == 0) {
        h->err.side += 2;
        h->magic = 0;
      }
      return;
    }
  }
  if (tid == 0) {
    h->err = device_error{0, 0, 0, 0, 0};
    h->label_key = no_label_error;
    h->magic = 0;
  }
  for (int side = 0; side < vs.num_sides; ++side) {
    const token_view<T, L>& v = vs.v[side];
    if (v.cu_seqlens == nullptr || v.num_seqs == 0) continue;
    if (tid == 0) first_bad = LLONG_MAX;
    __syncthreads();
    const std::int64_t* cu = v.cu_seqlens + v.first_seq;
    for (std::int64_t s = tid; s <= v.num_seqs; s += blockDim.x) {
      const bool bad = cu[s] < 0 || (s > 0 && cu[s] < cu[s - 1]) || cu[s] > vs.num_rows;
      if (bad) atomicMin(&first_bad, static_cast<long long>(s));
    }
    __syncthreads();
    const long long s = first_bad;
    if (s != LLONG_MAX) {
      if (tid == 0) {
        h->err = cu_seqlens_error(cu, s, vs.num_rows, side, v.first_seq);
      }
      return;
    }
    __syncthreads();  // first_bad is reset for the next side
  }
}

/// Forward over the rows of every side: one read of each completion row. Metrics: entropy,
/// logit mean and argmax hits; Lse2 (with Metrics): WPO's per-token term, which needs
/// lse(2z), only when the loss uses WPO weights.
template <int BLOCK, bool Metrics, bool Lse2, class T, class L>
__global__ void __launch_bounds__(BLOCK) rows_kernel(views<T, L> vs, ws_ptrs w) {
  using A = acc_t<T>;
  ws_header* h = w.h;
  if (h->err.code != 0) return;
  const std::int64_t n0 = side_rows(vs.v[0]);
  const std::int64_t n = n0 + (vs.num_sides > 1 ? side_rows(vs.v[1]) : 0);
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int side = i >= n0 ? 1 : 0;
    const std::int64_t local = side ? i - n0 : i;
    const token_view<T, L>& v = vs.v[side];
    const row_arrays& ra = w.rows[side];
    const std::int64_t r = v.row_begin(0) + local;
    if (!v.in_sequence(r)) continue;  // a gap row (block-uniform): never read, never used
    const std::int64_t y = v.target(r);
    if (y < 0 || y >= v.vocab) {  // block-uniform: y is the same in every thread
      if (threadIdx.x == 0) {
        ra.lse[local] = 0.0;
        ra.logp[local] = 0.0;
        ra.ent[local] = 0.0;
        ra.zmean[local] = 0.0;
        ra.wpo[local] = 0.0;
        ra.hit[local] = 0.0;
        if (y != token_view<T, L>::masked) record_label_error(h, side, r);
      }
      continue;
    }
    const T* row = v.logits + r * v.row_stride;
    // The label's logit, loaded before the row is streamed so the load's latency hides
    // behind it instead of following the block reduction.
    T zy{};
    if (threadIdx.x == 0) zy = row[y];
    const dpo::detail::row_stats<A> st = block_row_stats<BLOCK, Metrics, T, Lse2>(row, v.vocab);
    if (threadIdx.x == 0) {
      // Both from m and log(s) apart, never z - lse: lse rounds at the scale of m.
      const double lp = st.log_softmax(to_acc(zy));
      ra.lse[local] = st.logsumexp_double();
      ra.logp[local] = lp;
      if (Metrics) {
        ra.ent[local] = static_cast<double>(st.entropy());
        ra.zmean[local] = static_cast<double>(st.zsum / static_cast<A>(v.vocab));
        // WPO's per-token term: logp - log sum_v p_v^2 = logp - (lse(2z) - 2 lse(z)).
        ra.wpo[local] = Lse2 ? lp - st.log_sum_p2() : 0.0;
        ra.hit[local] = st.argmax == y ? 1.0 : 0.0;
      } else {
        // sequence_kernel sums these whatever the mode: never let it read unwritten memory.
        ra.ent[local] = ra.zmean[local] = ra.wpo[local] = ra.hit[local] = 0.0;
      }
    }
  }
}

/// Sums of one sequence's row values.
struct seq_acc {
  double logp, plain, ent, zmean, wpo, hit;
};

struct seq_acc_sum {
  __device__ seq_acc operator()(const seq_acc& a, const seq_acc& b) const {
    return {a.logp + b.logp, a.plain + b.plain, a.ent + b.ent,
            a.zmean + b.zmean, a.wpo + b.wpo, a.hit + b.hit};
  }
};

struct sequence_params {
  std::int64_t seqs;             // sequences per side
  bool ld;                       // LD-DPO: the pair's shared length needs the partner's count
  double ld_alpha;
  double* out_logp[2];           // optional: LD-weighted sums per side
  std::int64_t* out_count;       // optional: side 0's completion-token counts
  double* token_logps;           // optional: side 0's row log-probs
  double* row_lse;               // optional: side 0's row log-sum-exp, by buffer row
  bool metrics_only;             // after backward_kernel<Metrics>: re-sum only the metric
                                 // terms (ent, zmean, hit), writing nothing else
};

/// Completion tokens of sequence s of v, summed in a fixed tree.
template <int BLOCK, class T, class L, class Storage>
__device__ std::int64_t count_tokens(const token_view<T, L>& v, std::int64_t s, Storage& tmp) {
  std::int64_t c = 0;
  const std::int64_t e = v.row_end(s);
  for (std::int64_t r = v.row_begin(s) + threadIdx.x; r < e; r += BLOCK) c += v.target(r) >= 0 ? 1 : 0;
  __syncthreads();
  c = cub::BlockReduce<std::int64_t, BLOCK>(tmp).Sum(c);
  __shared__ std::int64_t total;
  if (threadIdx.x == 0) total = c;
  __syncthreads();
  const std::int64_t out = total;
  __syncthreads();
  return out;
}

/// Per-sequence sums and LD-DPO row weights; block b handles sequence b % seqs of side
/// b / seqs. Also turns a recorded label error into the error word.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) sequence_kernel(views<T, L> vs, ws_ptrs w,
                                                         sequence_params p) {
  ws_header* h = w.h;
  if (h->label_key != no_label_error) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report_label_error(vs, h);
    return;
  }
  if (h->err.code != 0) return;
  using scan_t = cub::BlockScan<int, BLOCK>;
  using reduce_t = cub::BlockReduce<seq_acc, BLOCK>;
  using count_t = cub::BlockReduce<std::int64_t, BLOCK>;
  __shared__ union {
    typename scan_t::TempStorage scan;
    typename reduce_t::TempStorage reduce;
    typename count_t::TempStorage count;
  } tmp;
  const int side = static_cast<int>(blockIdx.x / p.seqs);
  const std::int64_t s = static_cast<std::int64_t>(blockIdx.x % p.seqs);
  const token_view<T, L>& v = vs.v[side];
  const row_arrays& ra = w.rows[side];
  double shared_len = INFINITY;
  if (p.ld && !p.metrics_only) {
    const double own = static_cast<double>(count_tokens<BLOCK>(v, s, tmp.count));
    const double other = static_cast<double>(count_tokens<BLOCK>(vs.v[1 - side], s, tmp.count));
    shared_len = own < other ? own : other;
  }
  const std::int64_t row0 = v.row_begin(0);
  const std::int64_t rb = v.row_begin(s), re = v.row_end(s);
  seq_acc acc{0, 0, 0, 0, 0, 0};
  std::int64_t running = 0;
  for (std::int64_t t0 = rb; t0 < re; t0 += BLOCK) {
    const std::int64_t r = t0 + threadIdx.x;
    const bool in = r < re;
    const int flag = in && v.target(r) >= 0 ? 1 : 0;
    int j = 0, tile = 0;
    if (!p.metrics_only) {  // the count and LD positions (block-uniform)
      scan_t(tmp.scan).ExclusiveSum(flag, j, tile);
      __syncthreads();
    }
    if (in && p.metrics_only) {
      const std::int64_t idx = r - row0;
      if (flag) {  // the same terms in the same order as the full pass
        acc.ent += ra.ent[idx];
        acc.zmean += ra.zmean[idx];
        acc.hit += ra.hit[idx];
      }
    } else if (in) {
      const std::int64_t idx = r - row0;
      if (flag) {
        // LD-DPO: the j-th completion token counts fully inside the pair's shared length.
        const double wt = static_cast<double>(running + j) < shared_len ? 1.0 : p.ld_alpha;
        const double lp = ra.logp[idx];
        acc.logp += dpo::detail::times(wt, lp);  // ld_alpha = 0 drops even a -inf log-prob
        acc.plain += lp;
        acc.ent += ra.ent[idx];
        acc.zmean += ra.zmean[idx];
        acc.wpo += ra.wpo[idx];
        acc.hit += ra.hit[idx];
        ra.ldw[idx] = wt;
        ra.seq[idx] = static_cast<std::int32_t>(s);
      } else {
        ra.ldw[idx] = 0.0;
        ra.seq[idx] = -1;
      }
      if (side == 0 && p.token_logps != nullptr) p.token_logps[idx] = ra.logp[idx];
      if (side == 0 && p.row_lse != nullptr) p.row_lse[r] = ra.lse[idx];
    }
    running += tile;
  }
  acc = reduce_t(tmp.reduce).Reduce(acc, seq_acc_sum());
  if (threadIdx.x == 0 && p.metrics_only) {
    const seq_arrays& q = w.seqs[side];
    q.ent[s] = acc.ent;
    q.zmean[s] = acc.zmean;
    q.hit[s] = acc.hit;
  } else if (threadIdx.x == 0) {
    if (s == 0) h->sig_rows[side] = side_rows(v);  // for dpo_backward's state check
    const seq_arrays& q = w.seqs[side];
    q.logp[s] = acc.logp;
    q.plain[s] = acc.plain;
    q.ent[s] = acc.ent;
    q.zmean[s] = acc.zmean;
    q.wpo[s] = acc.wpo;
    q.hit[s] = acc.hit;
    q.count[s] = static_cast<double>(running);
    double* const out_logp = side ? p.out_logp[1] : p.out_logp[0];  // no local copy of p
    if (out_logp != nullptr) out_logp[s] = acc.logp;
    if (side == 0 && p.out_count != nullptr) p.out_count[s] = running;
  }
}

/// Where the pair stage's WPO weights come from.
enum class weights_from : int {
  wpo_sums,   // dpo_forward: exp of the mean WPO terms when use_weighting, else 1
  workspace,  // dpo_loss: the caller's weights, copied to pairs.weights
  ones,       // dpo_loss without weights
};

struct pair_params {
  loss_config cfg;
  std::int64_t pairs;
  std::int64_t vocab;
  bool metrics;
  weights_from weights;
  const double* ref_chosen;  // null for reference-free losses
  const double* ref_rejected;
  forward_outputs out;
};

/// The pair stage's first sums: the token totals and the sum of the WPO weights.
struct batch_totals {
  token_totals tokens;
  double weights;

  DPO_HOST_DEVICE batch_totals operator+(const batch_totals& o) const {
    return {tokens + o.tokens, weights + o.weights};
  }
};

/// Pair i's terms of the token totals (pair_kernel and metrics_kernel).
__device__ __forceinline__ token_totals token_terms(const seq_arrays& sc, const seq_arrays& sr,
                                                    std::int64_t i) {
  token_totals t;
  t.chosen_tokens = sc.count[i];
  t.rejected_tokens = sr.count[i];
  t.chosen_logps = sc.plain[i];
  t.logits_chosen = sc.zmean[i];
  t.logits_rejected = sr.zmean[i];
  t.entropy = sc.ent[i] + sr.ent[i];
  t.chosen_hits = sc.hit[i];
  return t;
}

/// Whether the pair stage's weights are per-pair values (else every W_i is 1).
__device__ __forceinline__ bool has_weights(const pair_params& p) {
  return p.weights == weights_from::workspace ||
         (p.weights == weights_from::wpo_sums && p.cfg.use_weighting);
}

/// Phase 1: each pair's WPO weight (into pairs.weights) and the batch totals, the same in
/// every thread on return.
template <int BLOCK, class Storage>
__device__ batch_totals pair_weights_and_totals(const ws_ptrs& w, const pair_params& p,
                                                Storage& tmp) {
  __shared__ batch_totals totals;
  const seq_arrays& sc = w.seqs[0];
  const seq_arrays& sr = w.seqs[1];
  batch_totals acc{};
  for (std::int64_t i = threadIdx.x; i < p.pairs; i += BLOCK) {
    double W = 1.0;
    if (p.weights == weights_from::workspace) {
      W = w.pairs.weights[i];
    } else if (p.weights == weights_from::wpo_sums && p.cfg.use_weighting) {
      W = dpo::detail::wpo_weight(sc.wpo[i], sc.count[i], sr.wpo[i], sr.count[i]);
    }
    w.pairs.weights[i] = W;
    acc.tokens += token_terms(sc, sr, i);
    acc.weights += W;
  }
  acc = cub::BlockReduce<batch_totals, BLOCK>(tmp).Reduce(acc, totals_sum());
  if (threadIdx.x == 0) totals = acc;
  __syncthreads();
  return totals;
}

/// Phase 2: each batch term type present (aot, aot_unpaired) sorts its own keys, a stable
/// ascending sort of a and b as ranks (O(P^2 / BLOCK) per thread), into in.sorts. The
/// condition is block-uniform (c is a kernel parameter).
template <int BLOCK>
__device__ void sort_batch_terms(const loss_config& c, const pair_arrays& pa,
                                 dpo::detail::pair_batch_in& in) {
  const std::int64_t P = in.num_pairs;
  for (int q = 0; q < 2; ++q) {
    const dpo::loss_type t = q == 0 ? dpo::loss_type::aot : dpo::loss_type::aot_unpaired;
    if (!dpo::detail::has_term(c, t)) continue;
    const sort_arrays& so = pa.sorts[q];
    for (std::int64_t i = threadIdx.x; i < P; i += BLOCK)
      dpo::detail::aot_keys(c, dpo::detail::pair_at(in, i), t, &so.a[i], &so.b[i]);
    __syncthreads();
    for (std::int64_t i = threadIdx.x; i < P; i += BLOCK) {
      const std::int64_t ka = dpo::detail::stable_rank(so.a, P, i);
      const std::int64_t kb = dpo::detail::stable_rank(so.b, P, i);
      so.ra[i] = ka;
      so.rb[i] = kb;
      so.sa[ka] = so.a[i];
      so.sb[kb] = so.b[i];
    }
    __syncthreads();
    dpo::detail::batch_sort& bs = in.sorts[dpo::detail::batch_sort_index(t)];
    bs.sorted_a = so.sa;
    bs.sorted_b = so.sb;
    bs.rank_a = so.ra;
    bs.rank_b = so.rb;
  }
}

/// Phase 3: every pair's contribution (dpo::detail::contribution, as the CPU) and outputs;
/// returns the pair totals, valid in thread 0.
template <int BLOCK, class Storage>
__device__ pair_totals pair_contributions(const loss_config& c,
                                          const dpo::detail::pair_batch_in& in,
                                          const ws_ptrs& w, const forward_outputs& o,
                                          Storage& tmp) {
  const seq_arrays& sc = w.seqs[0];
  const seq_arrays& sr = w.seqs[1];
  const pair_arrays& pa = w.pairs;
  pair_totals sums{};
  for (std::int64_t i = threadIdx.x; i < in.num_pairs; i += BLOCK) {
    const dpo::detail::pair_contribution pc = dpo::detail::contribution(c, in, i);
    double rc = 0.0, rr = 0.0;
    dpo::detail::pair_rewards(c, dpo::detail::pair_at(in, i), &rc, &rr);
    pa.gc[i] = pc.g_c;
    pa.gr[i] = pc.g_r;
    if (o.losses) o.losses[i] = pc.loss;
    if (o.chosen_rewards) o.chosen_rewards[i] = rc;
    if (o.rejected_rewards) o.rejected_rewards[i] = rr;
    if (o.chosen_logps) o.chosen_logps[i] = sc.logp[i];
    if (o.rejected_logps) o.rejected_logps[i] = sr.logp[i];
    if (o.chosen_tokens) o.chosen_tokens[i] = sc.count[i];
    if (o.rejected_tokens) o.rejected_tokens[i] = sr.count[i];
    if (o.weights) o.weights[i] = pa.weights[i];
    if (o.grad_chosen) o.grad_chosen[i] = pc.g_c;
    if (o.grad_rejected) o.grad_rejected[i] = pc.g_r;
    sums.add_pair(pc.loss, rc, rr, sc.logp[i], sr.logp[i]);
  }
  __syncthreads();  // tmp was phase 1's
  return cub::BlockReduce<pair_totals, BLOCK>(tmp).Reduce(sums, totals_sum());
}

/// Phase 4, one thread: the batch loss, the NLL's token gradient, the metrics
/// (dpo::finalize, as the CPU) and, after a dpo_forward, the state dpo_backward checks.
__device__ __forceinline__ void finalize_pairs(const pair_params& p, ws_header* h,
                                               const dpo::detail::pair_batch_in& in,
                                               const pair_totals& pt, const token_totals& tt) {
  const double inv_p = 1.0 / static_cast<double>(p.pairs);
  const double nll_grad = dpo::detail::nll_token_grad(p.cfg, in.mean_weight, tt.chosen_tokens);
  const forward_outputs& o = p.out;
  if (o.loss) *o.loss = pt.loss * inv_p;
  if (o.nll_token_grad) *o.nll_token_grad = nll_grad;
  if (o.metrics) *o.metrics = dpo::finalize(pt, tt, p.pairs, p.metrics);
  if (p.weights == weights_from::wpo_sums) {  // a dpo_forward: dpo_backward may follow
    h->nll_token_grad = nll_grad;
    h->sig_pairs = p.pairs;
    h->sig_vocab = p.vocab;
    h->magic = state_magic;
  }
}

/// The pair stage in one block: the same core pipeline (weights, pair_batch_in,
/// contribution, finalize) as the CPU path. Independent of the logits type, so one
/// instantiation serves every dtype.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) pair_kernel(ws_ptrs w, pair_params p) {
  if (has_error(w.h)) return;
  __shared__ union {
    typename cub::BlockReduce<batch_totals, BLOCK>::TempStorage batch;
    typename cub::BlockReduce<pair_totals, BLOCK>::TempStorage pairs;
  } tmp;
  const batch_totals tot = pair_weights_and_totals<BLOCK>(w, p, tmp.batch);
  const seq_arrays& sc = w.seqs[0];
  const seq_arrays& sr = w.seqs[1];
  dpo::detail::pair_batch_in in = dpo::detail::make_pair_batch(
      p.pairs, sc.logp, sr.logp, p.ref_chosen, p.ref_rejected, sc.count, sr.count,
      has_weights(p) ? w.pairs.weights : nullptr, tot.tokens, tot.weights);
  sort_batch_terms<BLOCK>(p.cfg, w.pairs, in);
  const pair_totals pt = pair_contributions<BLOCK>(p.cfg, in, w, p.out, tmp.pairs);
  if (threadIdx.x == 0) finalize_pairs(p, w.h, in, pt, tot.tokens);
}

/// dpo_forward_backward's token metrics, after backward_kernel<Metrics> wrote the row terms
/// and sequence_kernel (metrics_only) summed them: pair_kernel's token totals, in its order,
/// into the metrics it wrote without them.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) metrics_kernel(ws_ptrs w, std::int64_t P, metrics* out) {
  if (has_error(w.h)) return;
  using reduce_t = cub::BlockReduce<token_totals, BLOCK>;
  __shared__ typename reduce_t::TempStorage tmp;
  token_totals acc{};
  for (std::int64_t i = threadIdx.x; i < P; i += BLOCK) acc += token_terms(w.seqs[0], w.seqs[1], i);
  acc = reduce_t(tmp).Reduce(acc, totals_sum());
  if (threadIdx.x == 0) dpo::set_token_metrics(*out, acc);
}

/// Sequence-level inputs of dpo_loss (device pointers; null tokens mean 1, null weights 1).
struct loss_inputs {
  const double* chosen_logps;
  const double* rejected_logps;
  const double* chosen_tokens;
  const double* rejected_tokens;
  const double* weights;
};

/// dpo_loss's first kernel: resets the header and lays the caller's per-pair arrays out as
/// the sequence stage would have, so pair_kernel runs unchanged.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) loss_inputs_kernel(ws_ptrs w, loss_inputs in, std::int64_t P) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    w.h->err = device_error{0, 0, 0, 0, 0};
    w.h->label_key = no_label_error;
    w.h->magic = 0;
  }
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(BLOCK) + threadIdx.x; i < P;
       i += static_cast<std::int64_t>(gridDim.x) * BLOCK) {
    for (int side = 0; side < 2; ++side) {
      const seq_arrays& q = w.seqs[side];
      const double* lp = side == 0 ? in.chosen_logps : in.rejected_logps;
      const double* n = side == 0 ? in.chosen_tokens : in.rejected_tokens;
      q.logp[i] = lp[i];
      q.plain[i] = lp[i];
      q.count[i] = n != nullptr ? n[i] : 1.0;
      q.ent[i] = q.zmean[i] = q.wpo[i] = q.hit[i] = 0.0;
    }
    w.pairs.weights[i] = in.weights != nullptr ? in.weights[i] : 1.0;
  }
}

/// dL/dlogp of row `local` of a side, from the pair stage's per-sequence gradients.
__device__ __forceinline__ double row_coefficient(const ws_ptrs& w, const ws_header* h, int side,
                                                  std::int64_t local) {
  const std::int32_t s = w.rows[side].seq[local];
  if (s < 0) return 0.0;
  const double g = side == 0 ? w.pairs.gc[s] : w.pairs.gr[s];
  // An LD-DPO weight of 0 drops the token even where g is infinite.
  return dpo::detail::times(w.rows[side].ldw[local], g) + (side == 0 ? h->nll_token_grad : 0.0);
}

/// Copies the per-row backward state to forward_outputs::row_lse / row_coef.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) row_state_kernel(views<T, L> vs, ws_ptrs w, double* lse,
                                                          double* coef) {
  const ws_header* h = w.h;
  if (has_error(h) || h->magic != state_magic) return;
  const std::int64_t n0 = side_rows(vs.v[0]);
  const std::int64_t n = n0 + side_rows(vs.v[1]);
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(BLOCK) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * BLOCK) {
    const int side = i >= n0 ? 1 : 0;
    const std::int64_t local = side ? i - n0 : i;
    const std::int64_t r = vs.v[side].row_begin(0) + local;
    if (!vs.v[side].in_sequence(r)) continue;
    if (lse) lse[r] = w.rows[side].lse[local];
    if (coef) coef[r] = row_coefficient(w, h, side, local);
  }
}

template <class T>
struct backward_params {
  T* grad[2];
  std::int64_t grad_stride[2];
  const double* grad_output;  // device scalar, null means 1
  std::int64_t pairs;

  /// Row r of a side's gradient. Selects with a branch: indexing the arrays by a run-time
  /// side would copy the kernel parameters to local memory.
  __device__ __forceinline__ T* row(int side, std::int64_t r) const {
    return side ? grad[1] + r * grad_stride[1] : grad[0] + r * grad_stride[0];
  }
};

/// Backward into the logits: coef * (onehot - softmax) per row, from the forward state.
/// Metrics (dpo_forward_backward after a forward without them): each completion row's
/// entropy, logit mean and argmax hit from the same read, into the row arrays, for
/// sequence_kernel (metrics_only) and metrics_kernel to sum.
template <int BLOCK, bool Metrics, class T, class L>
__device__ __forceinline__ void backward_body(const views<T, L>& vs, const ws_ptrs& w,
                                              const backward_params<T>& p) {
  using A = acc_t<T>;
  ws_header* h = w.h;
  // A forward that found invalid data leaves magic 0 and its error word: keep that report.
  // (The error word, not label_key: a zero-filled workspace has label_key 0, which is not
  // no_label_error, and must still be reported as holding no forward state.)
  if (h->magic == 0 && h->err.code != 0) return;
  const std::int64_t n0 = side_rows(vs.v[0]);
  const std::int64_t n1 = side_rows(vs.v[1]);
  if (h->magic != state_magic || h->sig_pairs != p.pairs || h->sig_vocab != vs.v[0].vocab ||
      h->sig_rows[0] != n0 || h->sig_rows[1] != n1) {
    // Also a workspace that never saw a dpo_forward (its header is garbage).
    if (blockIdx.x == 0 && threadIdx.x == 0)
      h->err = device_error{static_cast<std::int32_t>(device_error_code::no_forward_state), 0, 0,
                            p.pairs, vs.v[0].vocab};
    return;
  }
  const double go = p.grad_output != nullptr ? *p.grad_output : 1.0;
  for (std::int64_t i = blockIdx.x; i < n0 + n1; i += gridDim.x) {
    const int side = i >= n0 ? 1 : 0;
    const std::int64_t local = side ? i - n0 : i;
    const token_view<T, L>& v = vs.v[side];
    const row_arrays& ra = w.rows[side];
    const std::int64_t r = v.row_begin(0) + local;
    if (!v.in_sequence(r)) continue;  // gap rows are not written (block-uniform)
    const std::int32_t s = ra.seq[local];
    const double coef = row_coefficient(w, h, side, local);
    if (Metrics && s >= 0) {  // block-uniform
      const std::int64_t y = v.target(r);
      const T* row = v.logits + r * v.row_stride;
      const row_metrics<A> rm = block_row_grad_metrics<BLOCK>(
          row, p.row(side, r), v.vocab, block_backward_lse<BLOCK>(row, v.vocab, ra.lse[local]),
          static_cast<A>(dpo::detail::times(coef, go)), y);
      if (threadIdx.x == 0) {
        ra.ent[local] = static_cast<double>(rm.entropy);
        ra.zmean[local] = static_cast<double>(rm.zsum / static_cast<A>(v.vocab));
        ra.hit[local] = rm.argmax == y ? 1.0 : 0.0;
      }
      continue;
    }
    const T* row = v.logits + r * v.row_stride;
    // Masked rows get exact zeros whatever grad_output holds (times(0, NaN) is NaN), as in
    // backward_rows_kernel.
    const double go_coef = s >= 0 ? dpo::detail::times(coef, go) : 0.0;
    block_row_grad<BLOCK>(row, p.row(side, r), v.vocab,
                          go_coef != 0.0 ? block_backward_lse<BLOCK>(row, v.vocab, ra.lse[local])
                                         : dpo::detail::lse_parts<A>(A(0)),
                          static_cast<A>(go_coef), s >= 0 ? v.target(r) : -1);
  }
}

template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) backward_kernel(views<T, L> vs, ws_ptrs w,
                                                         backward_params<T> p) {
  backward_body<BLOCK, false>(vs, w, p);
}

/// backward_kernel with the metrics' row terms. At most 64 registers (4 blocks of 256 per
/// SM, as backward_kernel): left alone, ptxas takes 76 for bf16 and only 3 blocks fit.
/// Not for double, which would spill at 64 (fp64 logits are for tests, not speed).
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK, std::is_same<T, double>::value ? 2 : 4)
    backward_metrics_kernel(views<T, L> vs, ws_ptrs w,
                                                                    backward_params<T> p) {
  backward_body<BLOCK, true>(vs, w, p);
}

/// Backward from caller-held per-row state (forward_outputs::row_lse / row_coef, indexed by
/// the logits' row): coef * grad_output * (onehot - softmax) per row, zeros where coef is 0.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) backward_rows_kernel(views<T, L> vs, ws_ptrs w,
                                                              backward_params<T> p,
                                                              const double* row_lse,
                                                              const double* row_coef) {
  using A = acc_t<T>;
  if (w.h->err.code != 0) return;
  const double go = p.grad_output != nullptr ? *p.grad_output : 1.0;
  const std::int64_t n0 = side_rows(vs.v[0]);
  const std::int64_t n = n0 + side_rows(vs.v[1]);
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int side = i >= n0 ? 1 : 0;
    const token_view<T, L>& v = vs.v[side];
    const std::int64_t r = v.row_begin(0) + (side ? i - n0 : i);
    if (!v.in_sequence(r)) continue;  // gap rows are not written (block-uniform)
    const std::int64_t y = v.target(r);
    const double coef = y >= 0 ? dpo::detail::times(row_coef[r], go) : 0.0;
    const T* row = v.logits + r * v.row_stride;
    block_row_grad<BLOCK>(row, p.row(side, r), v.vocab,
                          coef != 0.0 ? block_backward_lse<BLOCK>(row, v.vocab, row_lse[r])
                                      : dpo::detail::lse_parts<A>(A(0)),
                          static_cast<A>(coef), y);
  }
}

/// The check of the labels of every sequence row of every side (the error word's label_key,
/// as rows_kernel): sequence_logps_backward's, before backward_sequences_kernel writes
/// anything, and shard_check's. `bound`: the vocabulary the labels must lie in (-1: each
/// view's own; a vocabulary shard's check passes the global one).
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) label_check_kernel(views<T, L> vs, ws_header* h, std::int64_t bound) {
  if (h->err.code != 0) return;
  for (int side = 0; side < vs.num_sides; ++side) {
    const token_view<T, L>& v = vs.v[side];
    const std::int64_t vocab = bound >= 0 ? bound : v.vocab;
    const std::int64_t n = side_rows(v);
    const std::int64_t r0 = n > 0 ? v.row_begin(0) : 0;
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(BLOCK) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * BLOCK) {
      const std::int64_t r = r0 + i;
      if (!v.in_sequence(r)) continue;
      const std::int64_t y = v.target(r);
      if (y != token_view<T, L>::masked && (y < 0 || y >= vocab)) record_label_error(h, side, r);
    }
  }
}

/// sequence_logps_backward: seq_grad[s] * (onehot - softmax) on the completion rows of
/// sequence s, zeros on its other rows, gap rows untouched. Block-per-row, as backward_kernel.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) backward_sequences_kernel(views<T, L> vs, ws_header* h,
                                                                   const double* row_lse,
                                                                   const double* seq_grad, T* grad,
                                                                   std::int64_t grad_stride) {
  using A = acc_t<T>;
  if (h->err.code != 0) return;
  if (h->label_key != no_label_error) {
    // Every block returns here, so nothing is written; the first reports the lowest row.
    if (blockIdx.x == 0 && threadIdx.x == 0) report_label_error(vs, h);
    return;
  }
  const token_view<T, L>& v = vs.v[0];
  const std::int64_t n = side_rows(v);
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int64_t r = v.row_begin(0) + i;
    if (!v.in_sequence(r)) continue;  // block-uniform
    const std::int64_t y = v.target(r);
    const double coef = y >= 0 ? seq_grad[v.seq_of_row(r)] : 0.0;
    const T* row = v.logits + r * v.row_stride;
    block_row_grad<BLOCK>(row, grad + r * grad_stride, v.vocab,
                          coef != 0.0 ? block_backward_lse<BLOCK>(row, v.vocab, row_lse[r])
                                      : dpo::detail::lse_parts<A>(A(0)),
                          static_cast<A>(coef), y);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dpo
