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
int main() { return 0; }
#endif
