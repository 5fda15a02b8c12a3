// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The GEMM of the CPU fused head (dpo/cpu/gemm.hpp) at the best instruction set of the
// running CPU. The extension is built without -march=native (a wheel runs on any x86-64), so
// the library's default GEMM, Eigen compiled with the extension's flags, is SSE2. setup.py
// compiles the same Eigen GEMM (dpo::cpu::detail::eigen_gemm) twice more, in gemm_avx2.cpp
// (-mavx2 -mfma -mf16c) and gemm_avx512.cpp (-mavx512f/bw/dq/vl as well), and cpu_gemm()
// picks one by dpo::cpu::cpu_isa(): the level the row kernels run at (cpuid, or DPO_CPU_ISA).
//
// Why each variant file renames Eigen (`#define Eigen dpo_eigen_avx2` before including it):
// Eigen is templates and inline functions, emitted in every file that uses them as weak
// symbols under one linker name, of which the linker keeps ONE copy for the whole library.
// Were the AVX-512 file's Eigen named as the baseline files' is, the linker could keep its
// copy of, say, Eigen's GEMM kernel for every caller, and the baseline path would run AVX-512
// instructions: a crash (SIGILL) on a CPU without them, chosen silently at link time. With
// the namespace renamed, every Eigen symbol of a variant file has its own name, and so does
// eigen_gemm itself (its default template argument is an Eigen type; dpo/cpu/gemm.hpp). A
// variant file therefore includes nothing but Eigen and dpo/cpu/gemm.hpp, uses nothing of
// them but eigen_gemm's address, and exports one gemm_pair of plain data.
#pragma once

#include "dpo/cpu/gemm.hpp"

namespace dpo_kernels {

/// The two GEMMs of one variant (plain data: no code of a variant file is shared).
struct gemm_pair {
  dpo::cpu::gemm_fn<float> sgemm;
  dpo::cpu::gemm_fn<double> dgemm;
};

/// The CPU head's GEMM hook for the level the row kernels run at (dpo::cpu::cpu_isa()): the
/// AVX2 or AVX-512 variant when built (x86-64 with GCC or Clang) and supported, else the
/// library's default. Throws c10::ValueError (the library's message, naming DPO_CPU_ISA) when
/// DPO_CPU_ISA is invalid, as the row kernels' ops do.
dpo::cpu::linear_gemm cpu_gemm();

}  // namespace dpo_kernels
