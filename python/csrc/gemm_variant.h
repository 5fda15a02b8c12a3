// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The body of a GEMM variant file (gemm_avx2.cpp, gemm_avx512.cpp): it defines
// dpo_kernels::gemm_<level>, the addresses of the library's Eigen GEMM compiled with that
// file's instruction-set flags (setup.py). The file defines `Eigen` as its own namespace name
// before including this; why: gemm_isa.h.
#pragma once

#ifndef Eigen
#error "a GEMM variant file must rename Eigen before including gemm_variant.h (gemm_isa.h says why)"
#endif

#include <Eigen/Core>

#include "gemm_isa.h"

// Constant data, initialised at load time without code: nothing of this file runs before
// cpu_gemm() has checked that the CPU has the instruction set.
#define DPO_KERNELS_GEMM_VARIANT(level)                                                       \
  namespace dpo_kernels {                                                                     \
  extern const gemm_pair gemm_##level;                                                        \
  const gemm_pair gemm_##level = {&dpo::cpu::detail::eigen_gemm<float>, &dpo::cpu::detail::eigen_gemm<double>}; \
  }
