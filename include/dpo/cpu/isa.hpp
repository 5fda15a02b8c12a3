// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The instruction sets the CPU row kernels (dpo/cpu/rows.hpp) are compiled for, and the
// choice among them at run time. The library is header-only and compiled with its user's
// flags, so the kernels are compiled once per level with GCC/Clang target attributes, and the
// best level the running CPU supports is chosen once (cpuid). Every level computes the same
// lanes in the same order without contracted multiply-adds: results are bitwise identical
// across levels (docs/performance.md, "Instruction sets").
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "dpo/error.hpp"

// x86-64 with GCC or Clang: the AVX2 and AVX-512 variants exist. Elsewhere (other
// architectures, other compilers) only the portable variant does.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DPO_CPU_NO_DISPATCH)
#define DPO_CPU_X86_DISPATCH 1
#else
#define DPO_CPU_X86_DISPATCH 0
#endif

#if DPO_CPU_X86_DISPATCH
#include <cpuid.h>
#endif

namespace dpo {
namespace cpu {

/// An instruction-set level of the CPU row kernels, lowest first.
enum class isa {
  /// What the compiler flags of the including file allow (x86-64: SSE2 unless -m flags or
  /// -march say more); the only level on other architectures.
  baseline = 0,
  /// AVX2 + FMA + F16C (Haswell, Zen and later).
  avx2 = 1,
  /// AVX-512 F/BW/DQ/VL + AVX2 + FMA + F16C (Skylake-X, Ice Lake, Zen 4 and later).
  avx512 = 2,
  /// avx512 + AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later): bf16 gradients
  /// are rounded by the hardware's conversion, to the same bits.
  avx512_bf16 = 3,
};

/// The level's name as DPO_CPU_ISA spells it: "baseline", "avx2", "avx512" or "avx512_bf16".
inline const char* isa_name(isa level) {
  switch (level) {
    case isa::avx2:
      return "avx2";
    case isa::avx512:
      return "avx512";
    case isa::avx512_bf16:
      return "avx512_bf16";
    default:
      return "baseline";
  }
}

namespace detail {

/// The best level this CPU (and its operating system, which must save the wide registers)
/// supports, from cpuid and xgetbv. Always baseline without x86 dispatch.
inline isa detect_isa() {
#if DPO_CPU_X86_DISPATCH
  static const isa best = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7 || !__get_cpuid(1, &a, &b, &c, &d)) return isa::baseline;
    const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, f16c = (c >> 29) & 1u;
    if (!(osxsave && avx && fma && f16c)) return isa::baseline;
    unsigned xcr0 = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0 & 0x6u) != 0x6u) return isa::baseline;  // the OS saves no YMM state
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned subleaves = a;
    const bool avx2 = (b >> 5) & 1u;
    const bool avx512 = ((b >> 16) & 1u) && ((b >> 17) & 1u) && ((b >> 30) & 1u) && ((b >> 31) & 1u) &&
                        (xcr0 & 0xe0u) == 0xe0u;  // F, DQ, BW, VL; opmask and ZMM state saved
    if (!avx2) return isa::baseline;
    if (!avx512) return isa::avx2;
    if (subleaves < 1) return isa::avx512;
    __cpuid_count(7, 1, a, b, c, d);
    return (a >> 5) & 1u ? isa::avx512_bf16 : isa::avx512;
  }();
  return best;
#else
  return isa::baseline;
#endif
}

/// The level DPO_CPU_ISA asks for, or the detected one when it is unset or empty. Throws
/// dpo::error for an unknown name or a level this CPU lacks.
inline isa isa_from_env() {
  const char* s = std::getenv("DPO_CPU_ISA");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return detect_isa();
  for (isa level : {isa::baseline, isa::avx2, isa::avx512, isa::avx512_bf16}) {
    if (std::strcmp(s, isa_name(level)) != 0) continue;
    if (static_cast<int>(level) > static_cast<int>(detect_isa()))
      dpo::detail::fail("DPO_CPU_ISA=", s, " is not supported by this CPU (best: ", isa_name(detect_isa()), ")");
    return level;
  }
  dpo::detail::fail("DPO_CPU_ISA=", s, " is invalid: must be auto, baseline, avx2, avx512 or avx512_bf16");
}

/// The level in use, -1 until the first kernel call reads DPO_CPU_ISA.
inline std::atomic<int> active_isa_level{-1};

/// The level the kernels run at (read at the first call: DPO_CPU_ISA, else detection).
inline isa active_isa() {
  const int level = active_isa_level.load(std::memory_order_relaxed);
  if (level >= 0) return static_cast<isa>(level);
  const isa chosen = isa_from_env();  // throws, leaving the level unset, on a bad value
  int expected = -1;
  active_isa_level.compare_exchange_strong(expected, static_cast<int>(chosen), std::memory_order_relaxed);
  return static_cast<isa>(active_isa_level.load(std::memory_order_relaxed));
}

}  // namespace detail

/// The best instruction-set level this CPU supports.
inline isa cpu_isa_supported() { return detail::detect_isa(); }

/// The level the CPU row kernels use: DPO_CPU_ISA (baseline, avx2, avx512, avx512_bf16 or auto) when set,
/// else the best one this CPU supports, or what set_cpu_isa chose last. Throws dpo::error when
/// DPO_CPU_ISA names an unknown level or one this CPU lacks.
inline isa cpu_isa() { return detail::active_isa(); }

/// Makes the CPU row kernels use `level` from now on (for tests and benchmarks: every level
/// gives bitwise the same results). Throws dpo::error, changing nothing, for a level this CPU
/// does not support. Not to be called while another thread runs a kernel.
inline void set_cpu_isa(isa level) {
  const int l = static_cast<int>(level);
  if (l < 0 || l > static_cast<int>(isa::avx512_bf16))
    dpo::detail::fail("set_cpu_isa: level = ", l, " is invalid: must be a dpo::cpu::isa");
  if (l > static_cast<int>(detail::detect_isa()))
    dpo::detail::fail("set_cpu_isa: level = ", isa_name(level), " is not supported by this CPU (best: ",
                      isa_name(detail::detect_isa()), ")");
  detail::active_isa_level.store(l, std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace dpo
