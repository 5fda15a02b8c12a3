// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The logits-path shard kernels' CUDA test harness built by the host compiler against the
// emulator: the same source as the GPU suite's.
#include "../shard_harness.cu"
