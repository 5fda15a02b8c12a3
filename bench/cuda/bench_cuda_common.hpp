// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// What the CUDA benchmarks share: the exit on a failed CUDA call or library status, the
// device check that prints SKIPPED without a device, and the Google Benchmark main. Also
// compiled on the test emulator (bench_cuda_linear_emulated), so nothing here uses <<<>>>.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include <dpo/cuda/status.cuh>

/// Exits with the failed call and CUDA's message.
#define DPO_BENCH_CK(x)                                                      \
  do {                                                                       \
    const cudaError_t e_ = (x);                                              \
    if (e_ != cudaSuccess) {                                                 \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_));   \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

namespace dpo_bench {

/// Exits with the message of a library status that is not ok.
inline void check(const dpo::cuda::status& s) {
  if (!s) {
    std::fprintf(stderr, "%s\n", s.message);
    std::exit(1);
  }
}

/// Prints device 0's name; without a device prints "SKIPPED: no CUDA device" and returns false.
inline bool print_device() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    std::printf("SKIPPED: no CUDA device\n");
    return false;
  }
  cudaDeviceProp p{};
  DPO_BENCH_CK(cudaGetDeviceProperties(&p, 0));
  std::printf("device: %s\n", p.name);
  return true;
}

/// Two events that time the device work a function enqueues on the default stream.
struct event_timer {
  cudaEvent_t start{}, stop{};
  event_timer() {
    DPO_BENCH_CK(cudaEventCreate(&start));
    DPO_BENCH_CK(cudaEventCreate(&stop));
  }
  ~event_timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  event_timer(const event_timer&) = delete;
  event_timer& operator=(const event_timer&) = delete;

  /// Milliseconds between an event before fn's work and one after it (waits for the second).
  template <class Fn>
  float time(Fn&& fn) {
    DPO_BENCH_CK(cudaEventRecord(start));
    fn();
    DPO_BENCH_CK(cudaEventRecord(stop));
    DPO_BENCH_CK(cudaEventSynchronize(stop));
    float ms = 0;
    DPO_BENCH_CK(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

/// Runs the registered benchmarks with the command line's options.
inline void run_registered(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
}

}  // namespace dpo_bench
