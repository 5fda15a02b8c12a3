// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused head shard's CUDA test harness built by the host compiler against the emulator:
// the same source as the GPU suite's.
#include "../shard_linear_harness.cu"
