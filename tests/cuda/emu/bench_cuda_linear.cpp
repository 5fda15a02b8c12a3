// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused head's CUDA benchmark (bench/cuda/bench_cuda_linear.cu) built by the host compiler
// against the emulator and run at a tiny shape by ctest: every benchmarked path (the GEMM
// floors, the head, the materializing path) makes its calls once, so a wrong argument fails
// here instead of on a device. Its times mean nothing.
#include "../../../bench/cuda/bench_cuda_linear.cu"
