// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU head's Eigen GEMM for AVX2 + FMA (setup.py: -mavx2 -mfma -mf16c, this file only).
// Eigen is renamed so that none of its code compiled here can replace the baseline files'
// (gemm_isa.h).
#define Eigen dpo_eigen_avx2
#include "gemm_variant.h"

DPO_KERNELS_GEMM_VARIANT(avx2)
