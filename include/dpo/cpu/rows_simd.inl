// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The float row kernels of dpo/cpu/rows.hpp in explicit vectors (GCC/Clang vector
// extensions). Not a header of its own: rows.hpp includes it once per instruction-set level,
// each time inside a target region and namespace DPO_ISA_NS, with DPO_ISA_BYTES the level's
// register width (16, 32 or 64), DPO_ISA_F16C set when it has the F16C conversions and
// DPO_ISA_BF16 (optional) when it has AVX512_BF16's, so the same source becomes SSE2, AVX2 and
// AVX-512 code. The 16 lanes of the row kernels are
// 64 / DPO_ISA_BYTES registers of the level's width (never wider vectors, which GCC would
// lower lane by lane).
//
// Every level computes the same 16 lanes with the same IEEE operations in the same order and
// contracts no multiply-add (GCC: fp-contract=off on the region; Clang: the pragma in each
// function body, and no a * b + c in one expression), so results are bitwise identical across
// levels. Only NaN payloads may differ (F16C conversions quiet them).
//
// NOLINT(build/header_guard): included several times on purpose.

namespace DPO_ISA_NS {

#if defined(__clang__)
#define DPO_NO_CONTRACT _Pragma("clang fp contract(off)")
#else
#define DPO_NO_CONTRACT
#endif
#define DPO_SIMD_INLINE inline __attribute__((always_inline))
#define DPO_PARTS _Pragma("GCC unroll 8")

/// One register of the level: w floats; `parts` of them hold the 16 lanes.
inline constexpr int w = DPO_ISA_BYTES / 4;
inline constexpr int parts = lanes / w;
typedef float vf __attribute__((vector_size(DPO_ISA_BYTES)));
typedef std::int32_t vi __attribute__((vector_size(DPO_ISA_BYTES)));
typedef std::uint32_t vu __attribute__((vector_size(DPO_ISA_BYTES)));
typedef std::uint16_t vh __attribute__((vector_size(DPO_ISA_BYTES / 2)));

DPO_SIMD_INLINE vf splat(float v) { return vf{} + v; }
DPO_SIMD_INLINE vu splat_u(std::uint32_t v) { return vu{} + v; }

/// m ? a : b lane by lane, m a comparison's result (all ones or all zeros per lane): a
/// blend (AVX-512: under a mask register), not a branch.
DPO_SIMD_INLINE vu select(vi m, vu a, vu b) { return m ? a : b; }
DPO_SIMD_INLINE vi select(vi m, vi a, vi b) { return m ? a : b; }
DPO_SIMD_INLINE vf select(vi m, vf a, vf b) { return m ? a : b; }

/// max(x, lo) keeping NaN (x86's max returns its second operand when either is NaN).
DPO_SIMD_INLINE vf clamp_lo(vf x, float lo) {
#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
  return (vf)_mm512_maskz_max_ps(0xffff, (__m512)splat(lo), (__m512)x);  // (maskz: GCC 12 warns on the plain form)
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 32
  return (vf)_mm256_max_ps((__m256)splat(lo), (__m256)x);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 16
  return (vf)_mm_max_ps((__m128)splat(lo), (__m128)x);
#else
  return select((vi)(x < lo), splat(lo), x);
#endif
}

/// v > mx ? v : mx lane by lane (NaN v keeps mx; of equal values, mx): x86's max returns its
/// second operand unless the first is greater, one instruction where the blend after a
/// comparison would put the comparison's latency on the running max's dependency chain.
DPO_SIMD_INLINE vf max_keep(vf v, vf mx) {
#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
  return (vf)_mm512_maskz_max_ps(0xffff, (__m512)v, (__m512)mx);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 32
  return (vf)_mm256_max_ps((__m256)v, (__m256)mx);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 16
  return (vf)_mm_max_ps((__m128)v, (__m128)mx);
#else
  return select((vi)(v > mx), v, mx);
#endif
}

/// The low 16 bits of each lane of r (all < 2^16) to p.
template <class T>
DPO_SIMD_INLINE void store_low16(T* p, vu r) {
#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
  const __m256i h = _mm512_maskz_cvtepi32_epi16(0xffff, (__m512i)r);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 32
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128((__m256i)r), _mm256_extracti128_si256((__m256i)r, 1));
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 16
  const __m128i x = _mm_srai_epi32(_mm_slli_epi32((__m128i)r, 16), 16);  // signed, so packs is exact
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(x, x));
#else
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
#endif
}

/// a * b + c: one rounding (FMA) where the level has FMA, else two.
DPO_SIMD_INLINE vf fmadd(vf a, vf b, vf c) {
#if DPO_ISA_FMA && DPO_ISA_BYTES == 64
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif DPO_ISA_FMA && DPO_ISA_BYTES == 32
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif DPO_ISA_FMA && DPO_ISA_BYTES == 16
  return (vf)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
#else
  DPO_NO_CONTRACT
  const vf p = a * b;
  return p + c;
#endif
}

/// w logits from p, converted to float exactly.
DPO_SIMD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

DPO_SIMD_INLINE vf load(const Eigen::bfloat16* p) {  // bf16 = a float's top half
#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
  __m256i h;  // (GCC widens a 16 x u16 vector in two halves: one vpmovzxwd instead)
  std::memcpy(&h, p, sizeof h);
  return (vf)((vu)_mm512_maskz_cvtepu16_epi32(0xffff, h) << 16);  // (maskz: GCC 12 warns on the plain form)
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 32
  __m128i h;
  std::memcpy(&h, p, sizeof h);
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 16
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), h);  // each u16 above a zero u16
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

DPO_SIMD_INLINE vf load(const Eigen::half* p) {
#if DPO_ISA_F16C && DPO_ISA_BYTES == 64
  __m256i h;
  std::memcpy(&h, p, sizeof h);
  return (vf)_mm512_maskz_cvtph_ps(0xffff, h);  // (the unmasked form warns in GCC 12)
#elif DPO_ISA_F16C && DPO_ISA_BYTES == 32
  __m128i h;
  std::memcpy(&h, p, sizeof h);
  return (vf)_mm256_cvtph_ps(h);
#else
  // Exact: the exponent rebiased, infinities and NaNs to the float's top exponent, zeros and
  // subnormals (exponent 0) rebuilt as (1 + m/1024) * 2^-14 - 2^-14 = m * 2^-24.
  vh raw;
  std::memcpy(&raw, p, sizeof raw);
  const vu h = __builtin_convertvector(raw, vu);
  const vu sign = (h & 0x8000u) << 16;
  vu o = (h & 0x7fffu) << 13;
  const vu e = o & (0x7c00u << 13);
  o += (127u - 15u) << 23;
  o += (vu)(e == (0x7c00u << 13)) & ((128u - 16u) << 23);
  const vf small = (vf)(o + (1u << 23)) - 6.103515625e-05f;
  o = select((vi)(e == 0u), (vu)small, o);
  return (vf)(o | sign);
#endif
}

/// w float values rounded to nearest even into p (as the scalar from_acc).
DPO_SIMD_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

DPO_SIMD_INLINE void store(Eigen::bfloat16* p, vf v) {
  const vu u = (vu)v;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  store_low16(p, select((vi)(v != v), nan, rounded));
}

DPO_SIMD_INLINE void store(Eigen::half* p, vf v) {
#if DPO_ISA_F16C && DPO_ISA_BYTES == 64
  const __m256i h = _mm512_maskz_cvtps_ph(0xffff, (__m512)v, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
#elif DPO_ISA_F16C && DPO_ISA_BYTES == 32
  const __m128i h = _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
#else
  // Round to nearest even: overflow to infinity, NaN to a quiet NaN, results below the half
  // normal range by aligning the mantissa with a float addition (itself rounded to nearest
  // even), the others by integer rounding of the mantissa.
  const vu u = (vu)v;
  const vu sign = u & 0x80000000u;
  const vu a = u ^ sign;
  const vu special = select((vi)(a > 0x7f800000u), splat_u(0x7e00u), splat_u(0x7c00u));
  const vu sub = (vu)((vf)a + 0.5f) - (126u << 23);
  const vu normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  vu r = select((vi)(a < (113u << 23)), sub, normal);
  r = select((vi)(a >= (143u << 23)), special, r) | (sign >> 16);
  store_low16(p, r);
#endif
}

/// 2w float values rounded into p: store(p, a) then store(p + w, b), in fewer instructions
/// where the level packs two registers into one.
template <class T>
DPO_SIMD_INLINE void store2(T* p, vf a, vf b) {
  store(p, a);
  store(p + w, b);
}

#if DPO_ISA_X86 && DPO_ISA_BYTES >= 32
/// store()'s bf16 rounding of v, left in the high half of each 32-bit lane.
DPO_SIMD_INLINE vu round_bf16_high(vf v) {
  const vu u = (vu)v;
#if DPO_ISA_BYTES == 64
  const vu r = u + 0x7fffu;
  const __mmask16 odd = _mm512_test_epi32_mask((__m512i)u, _mm512_set1_epi32(0x10000));
  const vu up = (vu)_mm512_mask_add_epi32((__m512i)r, odd, (__m512i)r, _mm512_set1_epi32(1));
#else
  const vu up = u + 0x7fffu + ((u >> 16) & 1u);
#endif
  return select((vi)(v != v), (u & 0x80000000u) | 0x7fc00000u, up);
}

/// Two registers of bf16 at once: one word permute (AVX-512) or one pack and one qword
/// permute (AVX2) take the high halves of both, where store() narrows each register alone.
DPO_SIMD_INLINE void store2(Eigen::bfloat16* p, vf a, vf b) {
#if DPO_ISA_BYTES == 64
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                             27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i h = _mm512_permutex2var_epi16((__m512i)round_bf16_high(a), odd_words, (__m512i)round_bf16_high(b));
#else
  const __m256i packed = _mm256_packus_epi32((__m256i)(round_bf16_high(a) >> 16), (__m256i)(round_bf16_high(b) >> 16));
  const __m256i h = _mm256_permute4x64_epi64(packed, 0xd8);  // the pack works per 128-bit half
#endif
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
}
#endif

#if DPO_ISA_X86 && DPO_ISA_BYTES >= 32
/// 2w bf16 at p as two registers of floats, exactly: the even-indexed elements (each bf16
/// word moved to its lane's high half) and the odd-indexed ones (already there, low half
/// cleared): one shift and one mask, where load() widens each register with a word
/// permute (AVX-512) or a zero extension (AVX2) and a shift. For the backward, whose
/// elements are independent: any lane order computes the same values.
DPO_SIMD_INLINE void load_bf16_pairs(const Eigen::bfloat16* p, vf& even, vf& odd) {
  vu raw;
  std::memcpy(&raw, p, sizeof raw);
  even = (vf)(raw << 16);
  odd = (vf)(raw & 0xffff0000u);
}

/// store()'s bf16 rounding of the even-indexed elements `even` and the odd-indexed `odd`,
/// interleaved back into 2w words at p, by the integer rounding of store(): no pack or
/// permute across lanes.
DPO_SIMD_INLINE void store_bf16_pairs(Eigen::bfloat16* p, vf even, vf odd) {
#if DPO_ISA_BYTES == 64
  const __m512i h = _mm512_ternarylogic_epi32((__m512i)(round_bf16_high(even) >> 16), (__m512i)round_bf16_high(odd),
                                              _mm512_set1_epi32(static_cast<int>(0xffff0000u)), 0xf8);  // a | (b & c)
#else
  const vu h = (round_bf16_high(even) >> 16) | (round_bf16_high(odd) & 0xffff0000u);
#endif
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
}
#endif

#if DPO_ISA_X86 && DPO_ISA_BYTES == 64 && defined(DPO_ISA_BF16) && DPO_ISA_BF16
/// store_bf16_pairs by one AVX512_BF16 conversion (to nearest even, as the integer rounding)
/// and one word permute, for values none of which is subnormal (the instruction flushes
/// those to zero; the caller rules them out from the exponents). A NaN stays NaN, with part
/// of its payload where the integer rounding gives the default NaN of its sign.
DPO_SIMD_INLINE void store_bf16_pairs_hw(Eigen::bfloat16* p, vf even, vf odd) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i h = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh((__m512)odd, (__m512)even));
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
}
#endif

/// The 16 lanes of p[0, n), n < 16, padded with `pad` (given as T's bits), as a buffer.
template <class T>
DPO_SIMD_INLINE void pad_tail(const T* p, std::int64_t n, std::uint32_t pad_bits, T* buf) {
  for (int l = 0; l < lanes; ++l) std::memcpy(static_cast<void*>(buf + l), &pad_bits, sizeof(T));
  std::memcpy(static_cast<void*>(buf), p, static_cast<std::size_t>(n) * sizeof(T));
}

/// Asks for the cache lines of the 2 * lanes logits at src + i (read, into L1), which may lie
/// past the end of the row or of the buffer: a prefetch never faults, and the address is
/// computed as an integer, not as a pointer past the end.
template <class T>
DPO_SIMD_INLINE void prefetch_block(const T* src, std::int64_t i) {
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(src) + static_cast<std::uintptr_t>(i) * sizeof(T);
  for (std::size_t b = 0; b < 2 * lanes * sizeof(T); b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(at + b), 0, 3);
}

/// -inf as T's bits (little-endian: the low bytes of the word).
template <class T>
constexpr std::uint32_t neg_inf_bits() {
  return std::is_same_v<T, float> ? 0xff800000u : std::is_same_v<T, Eigen::bfloat16> ? 0xff80u : 0xfc00u;
}

#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
/// The lower clamp of exp_v's argument on this level. AVX-512 scales by 2^k with vscalefps,
/// which rounds once into the subnormal range, so c * exp(x) is exact to rounding there
/// (exp alone: +0 from -104 down), and +0 at the clamp for any folded coefficient c below
/// 2^126 (2^-288 c < 2^-150): -inf and the tails' padding give exactly 0.
inline constexpr float simd_exp_lo = -200.0f;
#else
/// The lower clamp of exp_v's argument on this level: exp_lo (2^k built from its exponent
/// bits, +0 for k = -127, so exp_v is +0 below about -87.7).
inline constexpr float simd_exp_lo = exp_lo<float>;
#endif

/// The polynomial of exp_v, its coefficients times c (c = 1: exp_v's own); c1 is both the
/// linear and the constant coefficient (c * 1).
struct exp_poly {
  vf c6, c5, c4, c3, c2, c1;
};
DPO_SIMD_INLINE exp_poly exp_poly_times(float c) {
  return {splat(1.381459878757596e-3f * c), splat(8.368716575205326e-3f * c), splat(4.166838899254799e-2f * c),
          splat(1.666652113199234e-1f * c), splat(4.999999403953552e-1f * c), splat(c)};
}

/// c * exp(x) for x in [simd_exp_lo, 88] or NaN, with p = exp_poly_times(c) (c = 1: the
/// scalar exp_clamped of rows.hpp, lane by lane). Range reduction x = k ln2 + r, then
/// c (1 + r (1 + r (c2 + ...))) in Horner form with its multiply-adds fused where the level
/// has FMA (the same operations otherwise), then the scale 2^k. The levels agree bitwise
/// (where they fuse alike) except below 2^-126: AVX-512 returns exp's subnormals down to
/// 2^-149 where the other levels return 0 below 2^-127 (docs/api.md). `k` receives the
/// exponent of the scale, an integer as a float (NaN for NaN x).
DPO_SIMD_INLINE vf exp_v(vf x, const exp_poly& p, vf& k) {
  DPO_NO_CONTRACT
  const float magic = 12582912.0f;
  const vf t = fmadd(x, splat(1.44269504088896341f), splat(magic));
  k = t - magic;
  vf r = fmadd(k, splat(-0.693359375f), x);
  r = fmadd(k, splat(2.12194440e-4f), r);
  vf q = p.c6;
  q = fmadd(q, r, p.c5);
  q = fmadd(q, r, p.c4);
  q = fmadd(q, r, p.c3);
  q = fmadd(q, r, p.c2);
  q = fmadd(q, r, p.c1);
  const vf y = fmadd(q, r, p.c1);
#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
  return (vf)_mm512_maskz_scalef_ps(0xffff, (__m512)y, (__m512)k);  // (maskz: GCC 12 warns on the plain form)
#else
  const vi biased = (vi)t - (bits_as<std::int32_t>(magic) - 127);
  return y * (vf)((vu)biased << 23);
#endif
}

DPO_SIMD_INLINE vf exp_v(vf x) {
  vf k;
  return exp_v(x, exp_poly_times(1.0f), k);
}

/// The lanes of v equal to m, as the bits of a mask (bit l: lane l of the 16, v = `parts`
/// registers). NaN equals nothing.
DPO_SIMD_INLINE std::uint32_t equal_mask(const vf* v, float m) {
  std::uint32_t mask = 0;
  DPO_PARTS
  for (int j = 0; j < parts; ++j) {
#if DPO_ISA_X86 && DPO_ISA_BYTES == 64
    const std::uint32_t b = _mm512_cmp_ps_mask((__m512)v[j], _mm512_set1_ps(m), _CMP_EQ_OQ);
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 32
    const std::uint32_t b = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)v[j], _mm256_set1_ps(m), _CMP_EQ_OQ)));
#elif DPO_ISA_X86 && DPO_ISA_BYTES == 16
    const std::uint32_t b = static_cast<std::uint32_t>(_mm_movemask_ps(_mm_cmpeq_ps((__m128)v[j], _mm_set1_ps(m))));
#else
    std::uint32_t b = 0;
    for (int l = 0; l < w; ++l) b |= static_cast<std::uint32_t>(v[j][l] == m) << l;
#endif
    mask |= b << (j * w);
  }
  return mask;
}

/// The first i in [0, n) with x[i] == m, n a multiple of the 16 lanes, or n if none: the
/// argmax once the max m is known, one comparison per register up to it (the max pass then
/// tracks no index).
template <class T>
DPO_SIMD_INLINE std::int64_t first_equal(const T* x, std::int64_t n, float m) {
  for (std::int64_t i = 0; i < n; i += lanes) {
    vf v[parts];
    DPO_PARTS
    for (int j = 0; j < parts; ++j) v[j] = load(x + i + j * w);
    const std::uint32_t mask = equal_mask(v, m);
    if (mask != 0) return i + __builtin_ctz(mask);
  }
  return n;
}

/// chunk_forward of rows.hpp for float accumulation: the same lanes, in registers. Lane l of
/// the 16 is element l of register l / w.
template <bool Metrics, class T>
dpo::detail::row_stats<float> chunk_forward(const T* z, std::int64_t n, std::int64_t c0,
                                            row_scratch<float>& scratch) {
  DPO_NO_CONTRACT
  // bf16 and fp16: pass 1 keeps the converted chunk in scratch (one store per register) for
  // pass 2, which then reads floats: measured a little faster (3%, Zen 4, AVX-512 and AVX2)
  // than converting again in pass 2, where the exp arithmetic is the bound.
  constexpr bool keep = !std::is_same_v<T, float>;
  const std::int64_t full = n - n % lanes;
  vf mx[parts], zs[parts];
  vi iota[parts];
  DPO_PARTS
  for (int j = 0; j < parts; ++j) {
    mx[j] = splat(-INFINITY);
    zs[j] = splat(0.0f);
    for (int l = 0; l < w; ++l) iota[j][l] = j * w + l;
  }
  // The running max skips NaN (never greater). The argmax is found afterwards (first_equal),
  // not tracked here. The tail is padded with -inf: never a max, and kept out of the sum.
  const auto pass1 = [&](const T* src, std::int64_t at, bool tail) {
    const vi block = vi{} + static_cast<std::int32_t>(at);
    DPO_PARTS
    for (int j = 0; j < parts; ++j) {
      const vf v = load(src + j * w);
      if constexpr (keep) store(scratch.x + at + j * w, v);
      if constexpr (Metrics)
        zs[j] = zs[j] + (tail ? select((vi)(block + iota[j] < static_cast<std::int32_t>(n)), v, splat(-0.0f)) : v);
      mx[j] = max_keep(v, mx[j]);
    }
  };
  for (std::int64_t i = 0; i < full; i += lanes) pass1(z + i, i, false);
  alignas(64) T tail[lanes];
  if (full < n) {
    pad_tail(z + full, n - full, neg_inf_bits<T>(), tail);
    pass1(tail, full, true);
  }
  alignas(64) float mxl[lanes], zsl[lanes];
  DPO_PARTS
  for (int j = 0; j < parts; ++j) {
    std::memcpy(mxl + j * w, &mx[j], sizeof mx[j]);
    std::memcpy(zsl + j * w, &zs[j], sizeof zs[j]);
  }

  dpo::detail::row_stats<float> c = dpo::detail::row_stats<float>::empty();
  c.m = mxl[0];
  for (int l = 1; l < lanes; ++l) c.m = mxl[l] > c.m ? mxl[l] : c.m;
  c.argmax = c0;
  if constexpr (Metrics) {
    // The first maximum (the chunk's first element when no element is greater than -inf).
    if (c.m != -INFINITY) {
      if constexpr (keep) {
        c.argmax = c0 + first_equal(scratch.x, full + (full < n ? lanes : 0), c.m);
      } else {
        c.argmax = c0 + first_equal(z, full, c.m);
        if (c.argmax == c0 + full) c.argmax = c0 + first_equal(tail, full < n ? lanes : 0, c.m) + full;
      }
    }
    c.zsum = lane_sum(zsl);
  }
  if (c.m == -INFINITY) {
    // No finite logit: no probability mass, unless a NaN (skipped by the max) must reach s.
    for (std::int64_t i = 0; i < n; ++i) {
      const float v = to_acc<float>(z[i]);
      if (v != v) c.s = v;
    }
    return c;
  }

  // The chunk again, from L1 (bf16 and fp16: as converted by pass 1). d <= 0 (or NaN): only
  // the lower clamp. The tail's padding gives d = simd_exp_lo and e = +0 exactly, which adds
  // nothing to any sum.
  const auto* x = [&] {
    if constexpr (keep) {
      return static_cast<const float*>(scratch.x);
    } else {
      return z;
    }
  }();
  const vf m = splat(c.m);
  vf s[parts], t[parts], s2[parts];
  DPO_PARTS
  for (int j = 0; j < parts; ++j) s[j] = t[j] = s2[j] = splat(0.0f);
  const auto pass2 = [&](const auto* src) {
    DPO_NO_CONTRACT
    DPO_PARTS
    for (int j = 0; j < parts; ++j) {
      const vf d = clamp_lo(load(src + j * w) - m, simd_exp_lo);
      const vf e = exp_v(d);
      s[j] = s[j] + e;
      if constexpr (Metrics) {
        t[j] = fmadd(e, d, t[j]);
        s2[j] = fmadd(e, e, s2[j]);
      }
    }
  };
  // Two blocks per iteration: their exponentials are independent, so the two dependency
  // chains overlap; the sums still take the blocks in order.
  std::int64_t i2 = 0;
  // Each iteration also asks for the next n logits' lines (the row's next chunk, or the next
  // row's start): the max pass that reads them next then finds them in cache, where the
  // hardware prefetchers, idle during this exp pass, would leave it waiting on memory.
  for (; i2 + 2 * lanes <= full; i2 += 2 * lanes) {
    prefetch_block<T>(z + n, i2);
    pass2(x + i2);
    pass2(x + i2 + lanes);
  }
  if (i2 < full) pass2(x + i2);
  if (full < n) {
    if constexpr (keep) {
      pass2(x + full);
    } else {
      pass2(tail);
    }
  }
  alignas(64) float sl[lanes], tl[lanes], s2l[lanes];
  DPO_PARTS
  for (int j = 0; j < parts; ++j) {
    std::memcpy(sl + j * w, &s[j], sizeof s[j]);
    std::memcpy(tl + j * w, &t[j], sizeof t[j]);
    std::memcpy(s2l + j * w, &s2[j], sizeof s2[j]);
  }
  c.s = lane_sum(sl);
  if constexpr (Metrics) {
    c.t = lane_sum(tl);
    c.s2 = lane_sum(s2l);
  }
  return c;
}

/// backward_block of rows.hpp for float accumulation: g[i] = round(exp((z[i] - hi) - lo) *
/// neg) over [0, V); g may equal z (each register is read before it is written). Fold:
/// neg, a normal float below 2^126, multiplies the exp polynomial's coefficients
/// (exp_poly_times), one multiply fewer per register and one rounding fewer than exp's
/// result times neg, which the other coefficients (0, subnormal, huge, infinite, NaN) keep.
template <bool Fold, class T>
void backward_block(const T* z, T* g, std::int64_t V, float hi, float lo, float neg) {
  DPO_NO_CONTRACT
  const exp_poly p = exp_poly_times(Fold ? neg : 1.0f);
  const auto grad_k = [hi, lo, neg, &p](vf x, vf& k) {
    DPO_NO_CONTRACT
    const vf d = clamp_lo((x - hi) - lo, simd_exp_lo);
    if constexpr (Fold) {
      (void)neg;  // folded into p (clang: an unused capture in this instantiation)
      return exp_v(d, p, k);
    } else {
      return exp_v(d, p, k) * neg;
    }
  };
  const auto grad = [&grad_k](vf x) {
    vf k;
    return grad_k(x, k);
  };
  std::int64_t i = 0;
#if DPO_ISA_X86 && DPO_ISA_BYTES >= 32
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    // 32 logits per iteration as their even- and odd-indexed halves (load_bf16_pairs).
#if DPO_ISA_BYTES == 64 && defined(DPO_ISA_BF16) && DPO_ISA_BF16
    // The hardware conversion where no gradient of the 32 can be subnormal, judged from the
    // exponents the exp already has: with |neg| >= 2^e and the polynomial's |y| > |neg| / 2
    // (neg folded in: exp(r) > 1/2 times neg), |y * 2^k| > 2^(k + e - 1) >= 2^-126 when
    // k >= -125 - e (exp_v scales by 2^k exactly, vscalefps). The k of a NaN compares as
    // small (unordered): the integer rounding, right for any value. Without Fold (neg 0,
    // subnormal, huge or not finite): always the integer rounding (min_k = +inf).
    const __m512 min_k = _mm512_set1_ps(Fold ? static_cast<float>(-125 - std::ilogb(neg)) : INFINITY);
    for (; i + 2 * lanes <= V; i += 2 * lanes) {
      vf even, odd, ke, ko;
      load_bf16_pairs(z + i, even, odd);
      const vf ge = grad_k(even, ke), go = grad_k(odd, ko);
      const __m512 lowest = _mm512_maskz_min_ps(0xffff, (__m512)ke, (__m512)ko);  // (maskz: GCC 12 warns)
      const __mmask16 small = _mm512_cmp_ps_mask(lowest, min_k, _CMP_NGE_UQ);
      if (__builtin_expect(small == 0, 1)) {
        store_bf16_pairs_hw(g + i, ge, go);
      } else {
        store_bf16_pairs(g + i, ge, go);
      }
    }
#else
    for (; i + 2 * lanes <= V; i += 2 * lanes) {
      DPO_PARTS
      for (int j = 0; j < parts; ++j) {
        vf even, odd;
        load_bf16_pairs(z + i + 2 * j * w, even, odd);
        store_bf16_pairs(g + i + 2 * j * w, grad(even), grad(odd));
      }
    }
#endif
  }
#endif
  for (; i + 2 * lanes <= V; i += 2 * lanes) {  // two blocks per iteration, as chunk_forward
    DPO_PARTS
    for (int j = 0; j < 2 * parts; j += 2)
      store2(g + i + j * w, grad(load(z + i + j * w)), grad(load(z + i + (j + 1) * w)));
  }
  for (; i + lanes <= V; i += lanes) {
    DPO_PARTS
    for (int j = 0; j < parts; ++j) store(g + i + j * w, grad(load(z + i + j * w)));
  }
  if (i < V) {
    alignas(64) T in[lanes], out[lanes];
    pad_tail(z + i, V - i, 0u, in);
    DPO_PARTS
    for (int j = 0; j < parts; ++j) store(out + j * w, grad(load(in + j * w)));
    std::memcpy(static_cast<void*>(g + i), out, static_cast<std::size_t>(V - i) * sizeof(T));
  }
}

/// backward_block, folding neg into the polynomial where it is a normal float below 2^126
/// (where neg * exp(r), r <= ln2 / 2, cannot overflow).
template <class T>
void backward_block(const T* z, T* g, std::int64_t V, float hi, float lo, float neg) {
  if (std::fabs(neg) >= 1.17549435e-38f && std::fabs(neg) < 8.50705917e37f) {  // [2^-126, 2^126): no NaN
    backward_block<true>(z, g, V, hi, lo, neg);
  } else {
    backward_block<false>(z, g, V, hi, lo, neg);
  }
}

#undef DPO_NO_CONTRACT
#undef DPO_SIMD_INLINE
#undef DPO_PARTS

}  // namespace DPO_ISA_NS
