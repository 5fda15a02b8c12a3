// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Every public CUDA header, included by this file, which the build compiles twice (as two
// translation units, DPO_HEADERS_LINK_MAIN defined in one) and links into one program. A
// header-only library must define nothing twice: a kernel that is not a template (nvcc ignores
// `inline` on __global__, and its host stub is then a strong symbol) or a host function that
// is not inline links once but not twice. This program failing to link is the test; it runs
// without a device.
#include "dpo/cuda/dpo.cuh"
#include "dpo/cuda/linear.cuh"
#include "dpo/cuda/linear_dpo.cuh"
#include "dpo/cuda/linear_shard.cuh"
#include "dpo/cuda/shard.cuh"

#ifdef DPO_HEADERS_LINK_MAIN
#include <type_traits>

// The conversions docs/cuda.md lists among the public building blocks are in dpo::cuda.
static_assert(std::is_same<decltype(dpo::cuda::to_acc(__nv_bfloat16())), float>::value, "to_acc(bf16) is float");
static_assert(std::is_same<decltype(dpo::cuda::from_acc<__half>(0.0f)), __half>::value, "from_acc<half> is half");
static_assert(std::is_same<dpo::cuda::acc_t<double>, double>::value, "acc_t<double> is double");

int main() { return 0; }
#endif
