// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The linear head's CUDA test harness built by the host compiler against the emulator
// (this directory's include/, cuBLASLt included): the same source as the GPU suite's.
#include "../linear_harness.cu"
