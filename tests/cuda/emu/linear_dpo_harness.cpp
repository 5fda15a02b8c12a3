// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The harness of DPO from hidden states built by the host compiler against the emulator: the
// same source as the GPU suite's.
#include "../linear_dpo_harness.cu"
