// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU head's Eigen GEMM for AVX-512 F/BW/DQ/VL + FMA (setup.py: this file only). Eigen
// is renamed so that none of its code compiled here can replace the baseline files'
// (gemm_isa.h). No -mavx512bf16: the head's GEMMs are float or double (bf16 inputs are
// converted to float before them), so it would change nothing.
#define Eigen dpo_eigen_avx512
#include "gemm_variant.h"

DPO_KERNELS_GEMM_VARIANT(avx512)
