// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU row kernels: one logits row in, its statistics out (forward), or its gradient
// written (backward). Rows are processed in fixed chunks that stay in L1 and folded left to
// right with the shared merge of dpo/core/math.hpp, so the result of a row never depends on
// threads.
//
// Inside a chunk every loop works on `lanes` (16) independent accumulators. The lane
// structure is in the source, not chosen by the compiler, so the summation order is fixed
// and the results are reproducible. exp() is a branch-free polynomial (below) because
// std::exp does not vectorise and Eigen's one cannot be fused with the other per-element
// terms.
//
// Float accumulation (float, bf16 and fp16 logits) runs the explicit-vector kernels of
// rows_simd.inl, compiled here once per instruction-set level (SSE2 or the including file's
// flags, AVX2 + FMA, AVX-512, AVX-512 + BF16) and chosen per chunk at run time (dpo/cpu/isa.hpp), so a build
// without -march flags runs at native speed on any x86-64. The plain loops below serve double
// logits, compilers without GCC vector extensions, and the scalar reference of the exp.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dpo/core/math.hpp"
#include "dpo/cpu/isa.hpp"

// The float kernels in explicit vectors (rows_simd.inl) need GCC/Clang vector extensions;
// other compilers get the plain loops below, auto-vectorised for their flags.
#if defined(__GNUC__) && !defined(DPO_CPU_NO_SIMD)
#define DPO_CPU_SIMD 1
#else
#define DPO_CPU_SIMD 0
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// GCC fully unrolls a lane loop whose body is small and then fails to vectorise the unrolled
// statements (one scalar register per lane); kept as a loop, its loop vectoriser maps the
// lanes onto vector registers.
#if defined(__GNUC__) && !defined(__clang__)
#define DPO_LANE_LOOP _Pragma("GCC unroll 1")
#else
#define DPO_LANE_LOOP
#endif

namespace dpo {
namespace cpu {

/// The accumulation type for a logits type: double for double, float otherwise.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace detail {

/// Columns per chunk: 2048 floats = 8 KiB, so a chunk (and its bf16 source) stays in L1
/// between the max pass and the exp pass.
inline constexpr std::int64_t row_chunk = 2048;

/// Independent accumulators per loop: one 512-bit register of floats.
inline constexpr int lanes = 16;

/// Scratch for one thread: the chunk converted to the accumulation type (unused when the
/// logits already have that type).
template <class A>
struct row_scratch {
  alignas(64) A x[row_chunk];
};

template <class To, class From>
inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

/// A logit as the accumulation type. bf16 -> float is exact: the bf16 bits are the top half
/// of the float's, and the shift vectorises where Eigen's scalar conversion does not.
template <class A, class T>
inline A to_acc(T v) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    return bits_as<float>(static_cast<std::uint32_t>(v.value) << 16);
  } else {
    return static_cast<A>(v);
  }
}

/// An accumulation-type value rounded to T. For bf16: round to nearest even, NaN -> quiet
/// NaN of the same sign, the same bits as Eigen's conversion.
template <class T, class A>
inline T from_acc(A v) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    const std::uint32_t u = bits_as<std::uint32_t>(v);
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const std::uint32_t nan = (u >> 16 & 0x8000u) | 0x7fc0u;
    T out;
    out.value = static_cast<std::uint16_t>(v != v ? nan : rounded);
    return out;
  } else {
    return static_cast<T>(v);
  }
}

/// Lower clamp of exp() arguments, where exp is exactly 0 (for float: x <= -88 gives k = -127
/// below, whose scale 2^k is built as +0, so no select is needed).
template <class A>
inline constexpr A exp_lo = A(-88);
template <>
inline constexpr double exp_lo<double> = -746.0;

/// exp(x) for float, branch-free so a loop of it vectorises, for x already clamped to
/// [exp_lo, 88] (or NaN, which gives NaN). Range reduction x = k ln2 + r, |r| <= ln2/2, with
/// ln2 in two parts (Cody-Waite), then a degree-6 polynomial fitted for relative error on
/// that interval, in Horner form down to its constant term: about 1 ulp over the whole range
/// (0.88 ulp measured with FMA over [-88, 88]). The exact value is subnormal below -87.3; it
/// is returned as a subnormal down to about -87.7 and as 0 below (the AVX-512 row kernels go
/// on to -104: rows_simd.inl).
inline float exp_clamped(float x) {
  // Round x / ln2 to an integer k with the 1.5 * 2^23 trick: k sits in t's low mantissa bits.
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const float k = t - magic;
  const std::int32_t biased = bits_as<std::int32_t>(t) - (bits_as<std::int32_t>(magic) - 127);
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float q = 1.381459878757596e-3f;
  q = q * r + 8.368716575205326e-3f;
  q = q * r + 4.166838899254799e-2f;
  q = q * r + 1.666652113199234e-1f;
  q = q * r + 4.999999403953552e-1f;
  q = q * r + 1.0f;
  const float y = q * r + 1.0f;
  // 2^k from its exponent bits: k in [-127, 127], and k = -127 gives the bits of +0.
  return y * bits_as<float>(static_cast<std::uint32_t>(biased) << 23);
}

inline double exp_clamped(double x) { return std::exp(x); }

/// c ? a : b as a bitwise blend. A plain ?: here lets GCC's jump threading specialise the
/// exp() that follows for the constant branch, which turns the vector loop into masked code
/// about a third slower; the blend has no branch to thread.
inline float blend(bool c, float a, float b) {
  const std::uint32_t m = 0u - static_cast<std::uint32_t>(c);
  return bits_as<float>((bits_as<std::uint32_t>(a) & m) | (bits_as<std::uint32_t>(b) & ~m));
}
inline double blend(bool c, double a, double b) { return c ? a : b; }
inline std::int32_t blend_index(bool c, std::int32_t a, std::int32_t b) {
  const std::int32_t m = -static_cast<std::int32_t>(c);
  return (a & m) | (b & ~m);
}

/// max(x, lo) and min(x, hi) that keep NaN: the comparison is false for NaN, so x passes.
template <class A>
inline A clamp_lo(A x, A lo) {
  return blend(x < lo, lo, x);
}
template <class A>
inline A clamp_hi(A x, A hi) {
  return blend(x > hi, hi, x);
}

/// exp(x) for any x: 0 for -inf, NaN for NaN; float saturates at exp(88) above 88.
template <class A>
inline A exp_lane(A x) {
  return exp_clamped(clamp_hi(clamp_lo(x, exp_lo<A>), A(88)));
}

/// Sum of the lanes in a fixed pairwise order.
template <class A>
inline A lane_sum(const A* v) {
  A h[lanes / 2];
  for (int l = 0; l < lanes / 2; ++l) h[l] = v[l] + v[l + lanes / 2];
  for (int w = lanes / 4; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) h[l] = h[l] + h[l + w];
  return h[0];
}

/// Statistics of one chunk x[0, n) at column c0: max, and with Metrics the entropy, lse(2z),
/// logit-sum and argmax terms. Pass 1 (the only read of memory) converts, takes the max and
/// the logit sum; pass 2 reads the chunk again from L1 for the exponentials.
template <bool Metrics, class T, class A>
dpo::detail::row_stats<A> chunk_forward(const T* z, std::int64_t n, std::int64_t c0,
                                        row_scratch<A>& scratch) {
  constexpr bool convert = !std::is_same_v<T, A>;
  const std::int64_t full = n - n % lanes;
  A mx[lanes], zs[lanes];
  std::int32_t ix[lanes];
  for (int l = 0; l < lanes; ++l) {
    mx[l] = -INFINITY;
    zs[l] = A(0);
    ix[l] = l;
  }
  // Each lane keeps its first maximum (strict >), so the smallest index among the lanes
  // holding the overall max is the first maximum of the chunk. NaN never compares greater:
  // it reaches s through exp() in pass 2 instead.
  const auto pass1 = [&](std::int32_t i, int l) {
    const A v = to_acc<A>(z[i]);
    if constexpr (convert) scratch.x[i] = v;
    const bool up = v > mx[l];
    if constexpr (Metrics) {
      ix[l] = blend_index(up, i, ix[l]);
      zs[l] += v;
    }
    mx[l] = blend(up, v, mx[l]);
  };
  for (std::int32_t i = 0; i < full; i += lanes)
    DPO_LANE_LOOP
    for (int l = 0; l < lanes; ++l) pass1(i + l, l);
  for (std::int32_t i = static_cast<std::int32_t>(full); i < n; ++i) pass1(i, static_cast<int>(i - full));

  dpo::detail::row_stats<A> c = dpo::detail::row_stats<A>::empty();
  c.m = mx[0];
  for (int l = 1; l < lanes; ++l) c.m = mx[l] > c.m ? mx[l] : c.m;
  c.argmax = c0;
  if constexpr (Metrics) {
    std::int32_t first = static_cast<std::int32_t>(n);
    for (int l = 0; l < lanes; ++l)
      if (mx[l] == c.m && ix[l] < first) first = ix[l];
    c.argmax = c0 + (first < n ? first : 0);
    c.zsum = lane_sum(zs);
  }
  if (c.m == -INFINITY) {
    // No finite logit: the chunk holds no probability mass (exp(-inf - -inf) would make it
    // NaN), unless it holds a NaN, which the max skipped and which must still reach s.
    for (std::int64_t i = 0; i < n; ++i) {
      const A v = to_acc<A>(z[i]);
      if (v != v) c.s = v;
    }
    return c;
  }

  const A* x = nullptr;
  if constexpr (convert) {
    x = scratch.x;
  } else {
    x = z;
  }
  const A m = c.m;
  A s[lanes], t[lanes], s2[lanes];
  for (int l = 0; l < lanes; ++l) s[l] = t[l] = s2[l] = A(0);
  const auto pass2 = [&](std::int64_t i, int l) {
    // d <= 0 (or NaN), so only the lower clamp is needed. The entropy term uses the clamped
    // d: where it differs from d, e = 0 exactly, so a -inf logit adds 0, not 0 * -inf.
    const A d = clamp_lo(x[i] - m, exp_lo<A>);
    const A e = exp_clamped(d);
    s[l] += e;
    if constexpr (Metrics) {
      t[l] += e * d;
      s2[l] += e * e;
    }
  };
  for (std::int64_t i = 0; i < full; i += lanes)
    DPO_LANE_LOOP
    for (int l = 0; l < lanes; ++l) pass2(i + l, l);
  for (std::int64_t i = full; i < n; ++i) pass2(i, static_cast<int>(i - full));
  c.s = lane_sum(s);
  if constexpr (Metrics) {
    c.t = lane_sum(t);
    c.s2 = lane_sum(s2);
  }
  return c;
}

#if DPO_CPU_SIMD
#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
#define DPO_ISA_X86 1
#else
#define DPO_ISA_X86 0
#endif
// One copy of rows_simd.inl per level, each in its own namespace and target region. No
// multiply-add is contracted in any of them, whatever the including file's flags, so every
// level rounds the same operations.
#if !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#define DPO_ISA_NS isa_baseline
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define DPO_ISA_BYTES 64  // the including file's flags (-march=native, say) allow more than SSE2
#elif defined(__AVX2__)
#define DPO_ISA_BYTES 32
#else
#define DPO_ISA_BYTES 16
#endif
#if defined(__F16C__) && (defined(__x86_64__) || defined(__i386__))
#define DPO_ISA_F16C 1
#else
#define DPO_ISA_F16C 0
#endif
#if defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
#define DPO_ISA_FMA 1
#else
#define DPO_ISA_FMA 0
#endif
#include "dpo/cpu/rows_simd.inl"
/// Whether the baseline level fuses multiply-adds (the including file's flags allow FMA), as
/// the AVX2 and AVX-512 levels always do: levels that agree here give bitwise equal results.
inline constexpr bool baseline_fma = DPO_ISA_FMA != 0;
#undef DPO_ISA_F16C
#undef DPO_ISA_FMA
#undef DPO_ISA_BYTES
#undef DPO_ISA_NS

#if DPO_CPU_X86_DISPATCH
#define DPO_ISA_F16C 1
#define DPO_ISA_FMA 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define DPO_ISA_NS isa_avx2
#define DPO_ISA_BYTES 32
#include "dpo/cpu/rows_simd.inl"
#undef DPO_ISA_BYTES
#undef DPO_ISA_NS
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif
#define DPO_ISA_NS isa_avx512
#define DPO_ISA_BYTES 64
#include "dpo/cpu/rows_simd.inl"
#undef DPO_ISA_NS
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(                                                                       \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
#endif
// The AVX512_BF16 level differs from avx512 only in the bf16 backward (isa_avx512_bf16's
// other kernels are never instantiated).
#define DPO_ISA_NS isa_avx512_bf16
#define DPO_ISA_BF16 1
#include "dpo/cpu/rows_simd.inl"
#undef DPO_ISA_BF16
#undef DPO_ISA_BYTES
#undef DPO_ISA_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef DPO_ISA_F16C
#undef DPO_ISA_FMA
#endif  // DPO_CPU_X86_DISPATCH

#if !defined(__clang__)
#pragma GCC pop_options
#endif
#undef DPO_ISA_X86
#else
inline constexpr bool baseline_fma = false;
#endif  // DPO_CPU_SIMD

/// chunk_forward at the active instruction-set level (float accumulation), else the plain
/// loops above.
template <bool Metrics, class T, class A>
dpo::detail::row_stats<A> chunk_stats(const T* z, std::int64_t n, std::int64_t c0, row_scratch<A>& scratch) {
#if DPO_CPU_SIMD
  if constexpr (std::is_same_v<A, float>) {
#if DPO_CPU_X86_DISPATCH
    switch (active_isa()) {
      case isa::avx512_bf16:  // the forward converts bf16 to float only: exact at avx512
      case isa::avx512:
        return isa_avx512::chunk_forward<Metrics>(z, n, c0, scratch);
      case isa::avx2:
        return isa_avx2::chunk_forward<Metrics>(z, n, c0, scratch);
      default:
        break;
    }
#endif
    return isa_baseline::chunk_forward<Metrics>(z, n, c0, scratch);
  } else {
    return chunk_forward<Metrics>(z, n, c0, scratch);
  }
#else
  return chunk_forward<Metrics>(z, n, c0, scratch);
#endif
}

/// Statistics of one row (see dpo::detail::row_stats). With Metrics = false only m and s
/// (the log-sum-exp) are filled; the rest stay 0 and argmax is -1 or a chunk origin.
/// A NaN anywhere in the row makes s NaN. Chunks of only -inf add no mass (the row's s
/// stays finite when any logit is finite).
template <bool Metrics, class T, class A>
dpo::detail::row_stats<A> row_forward(const T* z, std::int64_t V, row_scratch<A>& scratch) {
  using dpo::detail::row_stats;
  row_stats<A> acc = row_stats<A>::empty();
  for (std::int64_t c0 = 0; c0 < V; c0 += row_chunk) {
    const std::int64_t n = V - c0 < row_chunk ? V - c0 : row_chunk;
    const row_stats<A> c = chunk_stats<Metrics>(z + c0, n, c0, scratch);
    if (c.m == -INFINITY && c.s == A(0) && acc.argmax >= 0) {
      // Merging would shift by -inf - m (NaN when m = -inf too); the chunk adds only its
      // logit sum and cannot move the first argmax.
      acc.zsum += c.zsum;
      continue;
    }
    dpo::detail::merge_row_stats(acc, c);
  }
  return acc;
}

/// g[i] = round(exp((z[i] - lse.hi) - lse.lo) * neg) over [0, V); g may equal z. The
/// exponent is <= 0 up to rounding (lse >= max z), so only the lower clamp of exp is needed.
template <class T, class A>
inline void backward_block(const T* z, T* g, std::int64_t V, dpo::detail::lse_parts<A> lse, A neg) {
  const A hi = lse.hi, lo = lse.lo;
  std::int64_t i = 0;
  for (; i < V; ++i) g[i] = from_acc<T>(exp_clamped(clamp_lo((to_acc<A>(z[i]) - hi) - lo, exp_lo<A>)) * neg);
}

/// backward_block for rows that do not overlap: with __restrict the compiler needs no
/// run-time alias check (which would fail for the in-place case and fall back to scalar code).
template <class T, class A>
void backward_span(const T* __restrict z, T* __restrict g, std::int64_t V, dpo::detail::lse_parts<A> lse, A neg) {
  backward_block(z, g, V, lse, neg);
}

template <class T, class A>
void backward_span_inplace(T* p, std::int64_t V, dpo::detail::lse_parts<A> lse, A neg) {
  backward_block<T, A>(p, p, V, lse, neg);
}

/// backward_block at the active instruction-set level (float accumulation), else the plain
/// loops above; g may equal z.
template <class T, class A>
void backward_row(const T* z, T* g, std::int64_t V, dpo::detail::lse_parts<A> lse, A neg) {
#if DPO_CPU_SIMD
  if constexpr (std::is_same_v<A, float>) {
#if DPO_CPU_X86_DISPATCH
    switch (active_isa()) {
      case isa::avx512_bf16:
        if constexpr (std::is_same_v<T, Eigen::bfloat16>)
          return isa_avx512_bf16::backward_block(z, g, V, lse.hi, lse.lo, neg);
        return isa_avx512::backward_block(z, g, V, lse.hi, lse.lo, neg);
      case isa::avx512:
        return isa_avx512::backward_block(z, g, V, lse.hi, lse.lo, neg);
      case isa::avx2:
        return isa_avx2::backward_block(z, g, V, lse.hi, lse.lo, neg);
      default:
        break;
    }
#endif
    return isa_baseline::backward_block(z, g, V, lse.hi, lse.lo, neg);
  }
#endif
  if (static_cast<const T*>(g) == z) {
    backward_span_inplace(g, V, lse, neg);
  } else {
    backward_span(z, g, V, lse, neg);
  }
}

/// The parts of a row's lse for the backward, from the stored double `lse`: split in two
/// (dpo::detail::split_lse), or, where the stored double is too coarse
/// (dpo::detail::lse_needs_recompute), from the row's max and sum recomputed (one more read).
template <class T, class A>
dpo::detail::lse_parts<A> backward_lse(const T* z, std::int64_t V, double lse,
                                       row_scratch<A>& scratch) {
  if (dpo::detail::lse_needs_recompute<A>(lse)) {
    const dpo::detail::row_stats<A> st = row_forward<false>(z, V, scratch);
    return dpo::detail::lse_parts_of(st.m, st.s);
  }
  return dpo::detail::split_lse<A>(lse);
}

/// row_backward from the row's lse already split (hi + lo), for coef != 0: the vocabulary
/// shard's backward (dpo/cpu/shard.hpp) has it exactly from the combined record. y outside
/// [0, V) (a label on another shard) writes only the softmax term.
template <class T, class A>
void row_backward_parts(const T* z, T* g, std::int64_t V, dpo::detail::lse_parts<A> lse, A coef,
                        std::int64_t y) {
  const bool has_label = y >= 0 && y < V;
  const A zy = has_label ? to_acc<A>(z[y]) : A(0);  // read before an in-place write
  const A neg = -coef;
  backward_row(z, g, V, lse, neg);
  if (has_label) g[y] = from_acc<T>(exp_lane((zy - lse.hi) - lse.lo) * neg + coef);
}

/// Writes the gradient of one row: g[v] = coef * (1[v == y] - exp(z[v] - lse)), with lse the
/// row's stored double log-sum-exp (see backward_lse). coef == 0 (a masked row) writes exact
/// zeros without reading z. g may equal z (in place); any other overlap of the two rows is not
/// allowed (dpo_backward rejects it).
template <class T, class A>
void row_backward(const T* z, T* g, std::int64_t V, double row_lse, A coef, std::int64_t y,
                  row_scratch<A>& scratch) {
  if (coef == A(0)) {
    for (std::int64_t i = 0; i < V; ++i) g[i] = from_acc<T>(A(0));
    return;
  }
  row_backward_parts(z, g, V, backward_lse(z, V, row_lse, scratch), coef, y);
}

}  // namespace detail
}  // namespace cpu
}  // namespace dpo

#undef DPO_LANE_LOOP
