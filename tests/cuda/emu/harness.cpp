// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA test harness, built by the host compiler against the emulator's runtime (this
// directory's include/) instead of nvcc and a device: the same source, so the emulated
// suite runs exactly what the GPU suite runs.
#include "../harness.cu"
