// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Block-level building blocks over one logits row, for the library's kernels and for custom
// kernels: block_row_stats (one read of the row: log-sum-exp, entropy, lse(2z), logit sum,
// argmax), block_row_grad (one read and one write: coef * (onehot(y) - softmax)) and
// block_row_grad_metrics (block_row_grad that also returns the entropy, logit sum and argmax,
// so a fused forward + backward can leave the metrics to its second read).
//
// Each thread reads 16-byte vectors (a scalar head up to the first 16-byte boundary, then a
// scalar tail), so any vocab and any row alignment work. Threads accumulate their columns in
// increasing order with the online update of dpo/core/math.hpp's row_stats, then the block
// merges the threads in a fixed tree: the result depends only on the row and BLOCK, never
// on timing, so it is bitwise reproducible.
#pragma once

#include "dpo/cuda/compiler.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dpo/core/math.hpp"

namespace dpo {
namespace cuda {

/// Accumulation type of a logits type: double for double, float otherwise (as the CPU path).
template <class T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

namespace detail {

using dpo::detail::row_stats;

// The per-thread parts are __host__ __device__ so tests can run them on the host, one
// emulated thread at a time, without a GPU.
#define DPO_CUDA_HD __host__ __device__ __forceinline__

/// Bit cast between same-size types (memcpy: valid on host and device, free in registers).
template <class To, class From>
DPO_CUDA_HD To bit_cast(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

template <class T>
DPO_CUDA_HD acc_t<T> to_acc(T v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(v);
  } else {
    return v;
  }
}

/// Round to nearest even, as the CPU path.
template <class T>
DPO_CUDA_HD T from_acc(acc_t<T> v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else {
    return v;
  }
}

/// Elements of T per 16-byte vector.
template <class T>
inline constexpr int vec_width = static_cast<int>(16 / sizeof(T));

/// The W = vec_width<T> values of a 16-byte vector, in column order.
template <class T>
DPO_CUDA_HD void unpack(const uint4& u, acc_t<T>* x) {
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    // bf16 -> float is exact: the bf16 bits are the float's top half.
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = bit_cast<float>(w[k] << 16);
      x[2 * k + 1] = bit_cast<float>(w[k] & 0xffff0000u);
    }
  } else if constexpr (std::is_same<T, __half>::value) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(bit_cast<__half2>(w[k]));
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  } else if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int k = 0; k < 4; ++k) x[k] = bit_cast<float>(w[k]);
  } else {
    static_assert(std::is_same<T, double>::value, "logits must be bf16, fp16, fp32 or fp64");
    x[0] = bit_cast<double>(make_uint2(w[0], w[1]));
    x[1] = bit_cast<double>(make_uint2(w[2], w[3]));
  }
}

/// W accumulation-type values rounded to T and packed in a 16-byte vector.
template <class T>
DPO_CUDA_HD uint4 pack(const acc_t<T>* x) {
  unsigned w[4];
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = bit_cast<unsigned>(__floats2bfloat162_rn(x[2 * k], x[2 * k + 1]));
    }
  } else if constexpr (std::is_same<T, __half>::value) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = bit_cast<unsigned>(__floats2half2_rn(x[2 * k], x[2 * k + 1]));
    }
  } else if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = bit_cast<unsigned>(x[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint2 b = bit_cast<uint2>(x[k]);
      w[2 * k] = b.x;
      w[2 * k + 1] = b.y;
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

/// 2^x: one MUFU.EX2 for float (relative error about 2^-22; results below 2^-126 flush to
/// 0, which no sum here can see), the accurate exp2 for double.
DPO_CUDA_HD float exp2_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
DPO_CUDA_HD double exp2_fast(double x) { return exp2(x); }

template <class A>
struct log2e {
  static constexpr A value = A(1.4426950408889634);
};
template <class A>
struct ln2 {
  static constexpr A value = A(0.6931471805599453);
};

/// A thread's running statistics. Same meaning as row_stats, except that t is kept in base-2
/// units (sum e * log2(e)) so every element's exponential is one EX2 of (z - m) log2(e); it
/// is converted to row_stats' natural units once per thread. The difference comes first so
/// that z == m gives exactly 1: a row whose mass is all on one logit (or a one-column row)
/// gets lse == that logit and a gradient of exactly 0, as on the CPU.
template <class A>
struct thread_stats {
  A m;     // running max
  A s;
  A t2;
  A s2;
  A zsum;
  std::int64_t argmax;
};

template <class A>
DPO_CUDA_HD thread_stats<A> thread_empty() {
  return {-INFINITY, A(0), A(0), A(0), A(0), -1};
}

/// The max of N values ignoring NaN (fmax returns the other operand): one FMNMX per value;
/// -inf when every value is -inf or NaN.
template <int N, class A>
DPO_CUDA_HD A vector_max(const A* x) {
  A vm = -INFINITY;
#pragma unroll
  for (int k = 0; k < N; ++k) vm = fmax(vm, x[k]);
  return vm;
}

/// The first k with x[k] == vm (vm one of the N values).
template <int N, class A>
DPO_CUDA_HD int first_index(const A* x, A vm) {
  int first = 0;
#pragma unroll
  for (int k = N - 1; k >= 0; --k) first = x[k] == vm ? k : first;
  return first;
}

/// The argmax of a thread that has seen only -inf and NaN: its first column (as
/// torch.argmax), -1 if it has none. The columns as thread_row_stats / thread_row_grad lay
/// them out: `head` scalar columns, `nvec` W-wide vectors, then the tail column `tail`.
DPO_CUDA_HD std::int64_t first_column(int tid, int head, int nvec, int W, int tail, int V) {
  return tid < head ? tid
                    : (tid < nvec ? head + static_cast<std::int64_t>(tid) * W : (tail < V ? tail : -1));
}

/// The argmax of two disjoint column sets with maxima ma, mb and argmaxes ia, ib (-1: none):
/// the larger max wins, ties go to the lower column.
template <class A>
DPO_CUDA_HD std::int64_t merged_argmax(A ma, std::int64_t ia, A mb, std::int64_t ib) {
  if (mb > ma) return ib;
  if (mb == ma) return ia < 0 ? ib : (ib < 0 ? ia : (ib < ia ? ib : ia));
  return ia;
}

/// Folds N values at columns col0, col0 + 1, ... (all above the thread's earlier columns).
/// Same result, up to rounding, as N calls of dpo::detail::push_logit, except that a thread
/// that has seen only -inf and NaN keeps argmax -1 (thread_row_stats then sets its first
/// column, outside the per-vector path). Lse2 = false leaves s2 at 0 (no lse(2z)).
template <bool Metrics, int N, class A, bool Lse2 = Metrics>
DPO_CUDA_HD void push_values(thread_stats<A>& st, const A* x, std::int64_t col0) {
  // The vector's max ignores NaN (NaN reaches s through exp below).
  const A vm = vector_max<N>(x);
  if (vm > st.m) {
    if (st.m > -INFINITY) {
      // Rescale the terms taken relative to the old max (t2 shifts by d2 * s).
      const A d2 = (st.m - vm) * log2e<A>::value;
      const A f = exp2_fast(d2);
      if (Metrics) st.t2 = f * (st.t2 + d2 * st.s);
      if (Metrics && Lse2) st.s2 = st.s2 * f * f;
      st.s = st.s * f;
    }
    st.m = vm;
    if (Metrics) st.argmax = col0 + first_index<N>(x, vm);
  }
  if (st.m == -INFINITY) {
    // No finite value yet: no probability mass (exp(-inf - -inf) would be NaN), except
    // that a NaN must still reach s.
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (x[k] != x[k]) st.s = x[k];
      if (Metrics) st.zsum += x[k];
    }
    return;
  }
  const A m = st.m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A d2 = (x[k] - m) * log2e<A>::value;
    const A e = exp2_fast(d2);
    st.s += e;
    if (Metrics) {
      // A -inf logit has e = 0: clamp d2 so it adds 0 * finite, not 0 * -inf.
      st.t2 = fma(e, fmax(d2, A(-1e30)), st.t2);
      if (Lse2) st.s2 = fma(e, e, st.s2);
      st.zsum += x[k];
    }
  }
}

template <class A>
DPO_CUDA_HD row_stats<A> to_row_stats(const thread_stats<A>& t) {
  row_stats<A> r;
  r.m = t.m;
  r.s = t.s;
  r.t = t.t2 * ln2<A>::value;
  r.s2 = t.s2;
  r.zsum = t.zsum;
  r.argmax = t.argmax;
  return r;
}

/// Merges the statistics of two disjoint column sets in any order (unlike
/// dpo::detail::merge_row_stats, which needs b's columns above a's): ties of the max go to
/// the lower column, chunks with no finite value add no mass.
template <bool Metrics, class A>
DPO_CUDA_HD row_stats<A> merge_unordered(const row_stats<A>& a,
                                                        const row_stats<A>& b) {
  row_stats<A> r;
  const bool b_wins = b.m > a.m;
  r.m = b_wins ? b.m : a.m;
  if (Metrics) {
    r.argmax = merged_argmax(a.m, a.argmax, b.m, b.argmax);
    r.zsum = a.zsum + b.zsum;
  } else {
    r.argmax = -1;
    r.zsum = A(0);
  }
  if (r.m == -INFINITY) {
    r.s = a.s + b.s;  // 0, or NaN when either side saw a NaN
    r.t = A(0);
    r.s2 = A(0);
    return r;
  }
  const A da = a.m - r.m;
  const A db = b.m - r.m;
  const A fa = exp(da);
  const A fb = exp(db);
  r.s = a.s * fa + b.s * fb;
  if (Metrics) {
    r.t = fa * a.t + dpo::detail::exp_times(fa, da) * a.s + fb * b.t +
          dpo::detail::exp_times(fb, db) * b.s;
    r.s2 = a.s2 * fa * fa + b.s2 * fb * fb;
  } else {
    r.t = A(0);
    r.s2 = A(0);
  }
  return r;
}

template <bool Metrics, class A>
__device__ __forceinline__ row_stats<A> warp_reduce_stats(row_stats<A> st) {
  constexpr unsigned full = 0xffffffffu;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    row_stats<A> o;
    o.m = __shfl_down_sync(full, st.m, off);
    o.s = __shfl_down_sync(full, st.s, off);
    if (Metrics) {
      o.t = __shfl_down_sync(full, st.t, off);
      o.s2 = __shfl_down_sync(full, st.s2, off);
      o.zsum = __shfl_down_sync(full, st.zsum, off);
      o.argmax = static_cast<std::int64_t>(
          __shfl_down_sync(full, static_cast<long long>(st.argmax), off));
    } else {
      o.t = o.s2 = o.zsum = A(0);
      o.argmax = -1;
    }
    st = merge_unordered<Metrics>(st, o);
  }
  return st;
}

/// Reduces one S per thread over a block of BLOCK threads in a fixed tree: warp_reduce within
/// each warp, then over the warps' results in warp 0 (`empty` for the missing lanes); every
/// thread gets the result. Uses static shared memory (one set per S and warp_reduce); safe
/// to call repeatedly.
template <int BLOCK, class S, class WarpReduce>
__device__ __forceinline__ S block_reduce_tree(S st, const S& empty, WarpReduce warp_reduce) {
  static_assert(BLOCK % 32 == 0 && BLOCK >= 32 && BLOCK <= 1024, "BLOCK: a multiple of 32, <= 1024");
  constexpr int warps = BLOCK / 32;
  __shared__ S partial[warps];
  __shared__ S result;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  st = warp_reduce(st);
  if (warps == 1) {
    if (lane == 0) result = st;
    __syncthreads();
    const S r = result;
    __syncthreads();
    return r;
  }
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    S w = empty;
    if (lane < warps) w = partial[lane];
    w = warp_reduce(w);
    if (lane == 0) result = w;
  }
  __syncthreads();
  // A later call writes `partial` only after every thread passed the barrier above, and
  // `result` only after its own first barrier, which every thread reaches after this read.
  return result;
}

/// Reduces one row_stats per thread over a block of BLOCK threads in a fixed tree; every
/// thread gets the result. Safe to call repeatedly.
template <int BLOCK, bool Metrics, class A>
__device__ __forceinline__ row_stats<A> block_reduce_stats(row_stats<A> st) {
  return block_reduce_tree<BLOCK>(st, row_stats<A>::empty(),
                                  [](row_stats<A> v) { return warp_reduce_stats<Metrics>(v); });
}

/// Vectors loaded before the first is used: enough bytes in flight to cover DRAM latency.
inline constexpr int unroll = 4;

/// Cache policy of block_row_grad's 16-byte loads and stores: `normal`, or `streaming`
/// (ld/st.global.cs, evict first: the logits and the gradient are touched once).
enum class cache_hint { normal, streaming };

template <cache_hint H>
DPO_CUDA_HD uint4 load_vec(const uint4* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (H == cache_hint::streaming) return __ldcs(p);
#endif
  return *p;
}

template <cache_hint H>
DPO_CUDA_HD void store_vec(uint4* p, const uint4& v) {
#if defined(__CUDA_ARCH__)
  if constexpr (H == cache_hint::streaming) {
    __stcs(p, v);
    return;
  }
#endif
  *p = v;
}

}  // namespace detail

/// The conversions of the public building blocks (documented in docs/cuda.md): a logit to
/// acc_t<T>, and back with round to nearest even (as the CPU path).
using detail::from_acc;
using detail::to_acc;

namespace detail {

/// Thread `tid`'s share of block_row_stats: its columns, in increasing order.
template <int BLOCK, bool Metrics, class T, bool Lse2 = Metrics>
DPO_CUDA_HD thread_stats<acc_t<T>> thread_row_stats(const T* row, std::int64_t vocab, int tid) {
  using A = acc_t<T>;
  constexpr int W = vec_width<T>;
  constexpr int U = unroll;
  const int V = static_cast<int>(vocab);
  thread_stats<A> st = thread_empty<A>();
  // Scalar head up to the first 16-byte boundary (rows of a strided buffer need not be
  // aligned), one element per thread.
  const int mis = static_cast<int>((reinterpret_cast<std::uintptr_t>(row) & 15u) / sizeof(T));
  int head = mis == 0 ? 0 : W - mis;
  head = head < V ? head : V;
  if (tid < head) {
    const A x = to_acc(row[tid]);
    push_values<Metrics, 1, A, Lse2>(st, &x, tid);
  }
  const int nvec = (V - head) / W;
  const uint4* vp = reinterpret_cast<const uint4*>(row + head);
  for (int k0 = tid; k0 < nvec; k0 += BLOCK * U) {
    uint4 buf[U];
#if !defined(__CUDA_ARCH__)
    // Host builds (the test emulator) only: g++ cannot pair the two `k < nvec` tests and
    // warns that buf may be used uninitialized. The device code is left without the stores.
    for (int u = 0; u < U; ++u) buf[u] = uint4{};
#endif
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * BLOCK;
      if (k < nvec) buf[u] = vp[k];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * BLOCK;
      if (k < nvec) {
        A x[W];
        unpack<T>(buf[u], x);
        push_values<Metrics, W, A, Lse2>(st, x, head + static_cast<std::int64_t>(k) * W);
      }
    }
  }
  const int tail = head + nvec * W + tid;  // fewer than W tail elements, W <= BLOCK
  if (tail < V) {
    const A x = to_acc(row[tail]);
    push_values<Metrics, 1, A, Lse2>(st, &x, tail);
  }
  // Only -inf or NaN seen: the argmax is the thread's first column (as torch.argmax).
  if (Metrics && st.argmax < 0) st.argmax = first_column(tid, head, nvec, W, tail, V);
  return st;
}

}  // namespace detail

/// Statistics of one logits row (see dpo::detail::row_stats): log-sum-exp, and with Metrics
/// the entropy, lse(2z), logit sum and argmax (first index of the max, as torch.argmax).
///
/// Call from every thread of a 1-D block of BLOCK threads (block-uniform control flow: it
/// synchronizes the block); every thread gets the result. `row` points at vocab values of
/// type T (bf16, fp16, fp32, fp64), any alignment of T; it is read once, with 16-byte loads
/// where aligned. Accumulates in acc_t<T>. Deterministic: the result depends only on the row
/// and BLOCK. With Metrics = false only m and s are set (t, s2, zsum = 0, argmax = -1);
/// Lse2 = false skips lse(2z) (s2 = 0: one multiply-add less per logit). Requires
/// vocab < 2^31.
template <int BLOCK, bool Metrics = true, class T, bool Lse2 = Metrics>
__device__ dpo::detail::row_stats<acc_t<T>> block_row_stats(const T* row, std::int64_t vocab) {
  const auto st = detail::thread_row_stats<BLOCK, Metrics, T, Lse2>(row, vocab, static_cast<int>(threadIdx.x));
  return detail::block_reduce_stats<BLOCK, Metrics>(detail::to_row_stats(st));
}

namespace detail {

/// A thread's share of the metric terms block_row_grad_metrics gathers on the way: the max
/// and its first column (argmax), sum of p * (z - lse) in base-2 units (t2), and the sum of z.
template <class A>
struct thread_grad_stats {
  A m;
  A t2;
  A zsum;
  std::int64_t argmax;
};

/// Folds N values at columns col0, col0 + 1, ... (above the thread's earlier columns) whose
/// d2 = (z - lse) log2 e and e = 2^d2 the gradient computed anyway. The max and argmax as
/// push_values (fmax ignores NaN, ties keep the first column); a -inf logit has e = 0 and its
/// clamped d2 adds 0 * finite, as in push_values.
template <int N, class A>
DPO_CUDA_HD void push_grad_stats(thread_grad_stats<A>& st, const A* x, const A* d2, const A* e,
                                 std::int64_t col0) {
  const A vm = vector_max<N>(x);
  if (vm > st.m) {
    st.m = vm;
    st.argmax = col0 + first_index<N>(x, vm);
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    st.t2 = fma(e[k], fmax(d2[k], A(-1e30)), st.t2);
    st.zsum += x[k];
  }
}

/// Thread `tid`'s share of block_row_grad (Stats = false) or block_row_grad_metrics
/// (Stats = true: `st` gets the thread's metric terms, and z is read even when coef is 0).
/// U vectors in flight per thread and the cache hint H are tuning knobs (bench/cuda times
/// them); block_row_grad uses the defaults.
template <int BLOCK, class T, int U = unroll, cache_hint H = cache_hint::normal, bool Stats = false>
DPO_CUDA_HD void thread_row_grad(const T* z, T* g, std::int64_t vocab,
                                 dpo::detail::lse_parts<acc_t<T>> lse, acc_t<T> coef,
                                 std::int64_t y, int tid,
                                 thread_grad_stats<acc_t<T>>* st = nullptr) {
  using A = acc_t<T>;
  // (z - hi) - lo: z - hi is exact for the logits near the max, so a lse far from 0 (given
  // as hi + lo) does not round their probabilities at its own scale.
  const A lse_hi = lse.hi, lse_lo = lse.lo;
  constexpr int W = vec_width<T>;
  const int V = static_cast<int>(vocab);
  // exp(z - lse) as 2^((z - lse) log2 e): the difference first, so that z == lse (the only
  // column of a one-column row, or a row whose mass is all on one logit) gives exactly 1 and a
  // gradient of exactly 0, as the CPU path; z * log2 e - lse * log2 e would leave a residue.
  const A neg = -coef;
  const bool zero = coef == A(0);
  // coef == 0 without Stats writes zeros and reads nothing.
  const bool skip = zero && !Stats;
  thread_grad_stats<A> acc{-INFINITY, A(0), A(0), -1};
  // One column: its gradient value, folding it into the metric terms with Stats.
  const auto value = [&](A x, std::int64_t col) {  // (never called when skip)
    const A d2 = ((x - lse_hi) - lse_lo) * log2e<A>::value;
    const A e = exp2_fast(d2);
    if (Stats) push_grad_stats<1>(acc, &x, &d2, &e, col);
    if (zero) return A(0);
    const A v = neg * e;
    return col == y ? v + coef : v;
  };
  const std::uintptr_t gmis = reinterpret_cast<std::uintptr_t>(g) & 15u;
  if (!skip && (reinterpret_cast<std::uintptr_t>(z) & 15u) != gmis) {
    for (int c = tid; c < V; c += BLOCK) g[c] = from_acc<T>(value(to_acc(z[c]), c));
    if (Stats) {
      if (acc.argmax < 0) acc.argmax = tid < V ? tid : -1;
      *st = acc;
    }
    return;
  }
  int head = gmis == 0 ? 0 : W - static_cast<int>(gmis / sizeof(T));
  head = head < V ? head : V;
  if (tid < head) g[tid] = from_acc<T>(skip ? A(0) : value(to_acc(z[tid]), tid));
  const int nvec = (V - head) / W;
  const uint4* zp = reinterpret_cast<const uint4*>(z + head);
  uint4* gp = reinterpret_cast<uint4*>(g + head);
  for (int k0 = tid; k0 < nvec; k0 += BLOCK * U) {
    uint4 buf[U];
    if (!skip) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + u * BLOCK;
        if (k < nvec) buf[u] = load_vec<H>(zp + k);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * BLOCK;
      if (k < nvec) {
        A x[W];
        if (skip) {
#pragma unroll
          for (int j = 0; j < W; ++j) x[j] = A(0);
        } else {
          unpack<T>(buf[u], x);
          const std::int64_t col0 = head + static_cast<std::int64_t>(k) * W;
          if (Stats) {
            A d2[W], e[W];
#pragma unroll
            for (int j = 0; j < W; ++j) {
              d2[j] = ((x[j] - lse_hi) - lse_lo) * log2e<A>::value;
              e[j] = exp2_fast(d2[j]);
            }
            push_grad_stats<W>(acc, x, d2, e, col0);
#pragma unroll
            for (int j = 0; j < W; ++j) x[j] = zero ? A(0) : neg * e[j];
          } else {
#pragma unroll
            for (int j = 0; j < W; ++j) x[j] = neg * exp2_fast(((x[j] - lse_hi) - lse_lo) * log2e<A>::value);
          }
          // y may be token_view::masked (INT64_MIN): compare, never subtract first.
          // (Stats only: coef == 0 reaches here and adds no one-hot term.)
          if ((!Stats || !zero) && y >= col0 && y < col0 + W) {
            const std::int64_t o = y - col0;
#pragma unroll
            for (int j = 0; j < W; ++j) x[j] = j == o ? x[j] + coef : x[j];
          }
        }
        store_vec<H>(gp + k, pack<T>(x));
      }
    }
  }
  const int tail = head + nvec * W + tid;
  if (tail < V) g[tail] = from_acc<T>(skip ? A(0) : value(to_acc(z[tail]), tail));
  if (Stats) {
    // Only -inf or NaN seen: the argmax is the thread's first column (as thread_row_stats).
    if (acc.argmax < 0) acc.argmax = first_column(tid, head, nvec, W, tail, V);
    *st = acc;
  }
}

/// Merges the metric terms of two disjoint column sets: ties of the max go to the lower
/// column, as merge_unordered.
template <class A>
DPO_CUDA_HD thread_grad_stats<A> merge_grad_stats(const thread_grad_stats<A>& a,
                                                  const thread_grad_stats<A>& b) {
  thread_grad_stats<A> r;
  r.m = b.m > a.m ? b.m : a.m;
  r.argmax = merged_argmax(a.m, a.argmax, b.m, b.argmax);
  r.t2 = a.t2 + b.t2;
  r.zsum = a.zsum + b.zsum;
  return r;
}

template <class A>
__device__ __forceinline__ thread_grad_stats<A> warp_reduce_grad_stats(thread_grad_stats<A> st) {
  constexpr unsigned full = 0xffffffffu;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    thread_grad_stats<A> o;
    o.m = __shfl_down_sync(full, st.m, off);
    o.t2 = __shfl_down_sync(full, st.t2, off);
    o.zsum = __shfl_down_sync(full, st.zsum, off);
    o.argmax = static_cast<std::int64_t>(
        __shfl_down_sync(full, static_cast<long long>(st.argmax), off));
    st = merge_grad_stats(st, o);
  }
  return st;
}

/// block_reduce_stats' fixed tree for thread_grad_stats; every thread gets the result.
template <int BLOCK, class A>
__device__ __forceinline__ thread_grad_stats<A> block_reduce_grad_stats(thread_grad_stats<A> st) {
  return block_reduce_tree<BLOCK>(st, thread_grad_stats<A>{-INFINITY, A(0), A(0), -1},
                                  [](thread_grad_stats<A> v) { return warp_reduce_grad_stats(v); });
}

}  // namespace detail

/// Writes the gradient of one row: g[v] = coef * (1[v == y] - exp(z[v] - lse)), rounded to T;
/// coef == 0 writes zeros without reading z. y outside [0, vocab) adds no one-hot term.
/// `lse` is a value of acc_t<T> or, for a lse far from 0, the parts hi + lo of one (see
/// block_backward_lse): the exponent is formed as (z - hi) - lo.
///
/// Call from every thread of a 1-D block of BLOCK threads (no synchronization inside). g may
/// equal z (in place: each element is read before the same thread writes it); any other
/// overlap of the two rows is not allowed. 16-byte loads and stores when z and g have the
/// same alignment modulo 16 bytes, scalar ones otherwise. Deterministic.
template <int BLOCK, class T>
__device__ void block_row_grad(const T* z, T* g, std::int64_t vocab,
                               dpo::detail::lse_parts<acc_t<T>> lse, acc_t<T> coef, std::int64_t y) {
  detail::thread_row_grad<BLOCK>(z, g, vocab, lse, coef, y, static_cast<int>(threadIdx.x));
}

/// The lse of one row for block_row_grad, from the row's stored double log-sum-exp `lse`
/// (forward_outputs::row_lse, sequence_logps' row_lse): split into hi + lo
/// (dpo::detail::split_lse), or, where a double is too coarse to hold it
/// (dpo::detail::lse_needs_recompute: |lse| >= 2^10 for fp64 rows, 2^26 for the others),
/// from the row's max and sum recomputed with block_row_stats (one more read of such rows
/// only). Call from every thread of the block with the same `lse` (block-uniform: it may
/// synchronize the block); every thread gets the result. Deterministic.
template <int BLOCK, class T>
__device__ dpo::detail::lse_parts<acc_t<T>> block_backward_lse(const T* row, std::int64_t vocab,
                                                               double lse) {
  using A = acc_t<T>;
  if (dpo::detail::lse_needs_recompute<A>(lse)) {
    const dpo::detail::row_stats<A> st = block_row_stats<BLOCK, false>(row, vocab);
    return dpo::detail::lse_parts_of(st.m, st.s);
  }
  return dpo::detail::split_lse<A>(lse);
}

/// The per-token metrics of a row, from the backward's read (block_row_grad_metrics).
template <class A>
struct row_metrics {
  A entropy;             // -sum_v p_v log p_v, with p = exp(z - lse)
  A zsum;                // sum_v z_v
  std::int64_t argmax;   // first index of the max (as torch.argmax; -inf / NaN as block_row_stats)
};

/// block_row_grad plus, from the same read, the row's entropy, logit sum and argmax: the
/// metrics of block_row_stats without a second pass, given the row's lse (from a forward
/// block_row_stats<BLOCK, false>, say). Reads z even when coef is 0 (then writes zeros).
/// Call from every thread of a 1-D block of BLOCK threads (block-uniform control flow: it
/// synchronizes the block); every thread gets the result. Same aliasing rules as
/// block_row_grad. Deterministic: depends only on the row, lse and BLOCK. The logit sum and
/// argmax are bitwise those of block_row_stats when z and g have the same alignment; the
/// entropy agrees with it to rounding (it sums p (z - lse) with the given lse instead of
/// rescaling online).
template <int BLOCK, class T>
__device__ row_metrics<acc_t<T>> block_row_grad_metrics(const T* z, T* g, std::int64_t vocab,
                                                        dpo::detail::lse_parts<acc_t<T>> lse,
                                                        acc_t<T> coef, std::int64_t y) {
  using A = acc_t<T>;
  detail::thread_grad_stats<A> st;
  detail::thread_row_grad<BLOCK, T, detail::unroll, detail::cache_hint::normal, true>(
      z, g, vocab, lse, coef, y, static_cast<int>(threadIdx.x), &st);
  st = detail::block_reduce_grad_stats<BLOCK>(st);
  return {-(st.t2 * detail::ln2<A>::value), st.zsum, st.argmax};
}

}  // namespace cuda
}  // namespace dpo
