// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The one place that checks what compiles dpo/cuda/*.cuh: nvcc (or another CUDA compiler),
// or the test suite's host emulation of the CUDA runtime (DPO_CUDA_EMULATION, tests/cuda/emu).
// Every CUDA header includes this first.
#pragma once

#if !defined(__CUDACC__) && !defined(DPO_CUDA_EMULATION)
#error "dpo/cuda/*.cuh need a CUDA compiler; a g++-only program includes <dpo/dpo.hpp>"
#endif
