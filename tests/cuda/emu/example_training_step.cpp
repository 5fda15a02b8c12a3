// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// examples/cuda/training_step.cu built by the host compiler against the emulator's runtime
// and run as a test: the documented example runs on every machine, GPU or not.
#include "../../../examples/cuda/training_step.cu"
