// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA path against the memory-bandwidth limit (docs/performance.md), Google Benchmark
// with manual time from CUDA events. For each shape, in one run on one device:
//   copy      cudaMemcpyAsync device to device of the logits' bytes (1 read + 1 write)
//   forward   sequence_logps (the reference pass): 1 read          bytes = N*V*b
//   fused     dpo_forward_backward in place: 2 reads + 1 write    bytes = 3*N*V*b
// Counters: TB_s (bytes / median time) and copy_share (TB_s over the copy's TB/s, measured
// first for the same shape). The logits are refilled with random values (outside the
// timed region) before every fused run, so in-place gradients never become the input.
// Without a device it prints "SKIPPED: no CUDA device" and exits 0.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <dpo/cuda/dpo.cuh>

namespace {

#define DPO_BENCH_CK(x)                                                                   \
  do {                                                                                    \
    const cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_));                \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

struct shape {
  const char* name;
  std::int64_t pairs, seq_len, vocab;
  int dtype;  // 0 bf16, 1 fp32
};

const shape shapes[] = {
    {"8x1024_v128256_bf16", 8, 1024, 128256, 0},
    {"4x512_v32000_bf16", 4, 512, 32000, 0},
    {"2x512_v128256_fp32", 2, 512, 128256, 1},
};

/// TB/s of the copy per shape, measured by the copy benchmark (registered first).
std::map<std::string, double> copy_tbs;

/// Keeps one SM busy for about `cycles` clock cycles.
__global__ void spin_kernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

template <class T>
__global__ void fill_kernel(T* x, std::int64_t n, unsigned seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    unsigned long long h = (static_cast<unsigned long long>(i) + seed) * 0x9e3779b97f4a7c15ull;
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    const float u = static_cast<float>(h & 0xffffff) / 16777216.0f * 10.0f - 5.0f;
    x[i] = static_cast<T>(u);
  }
}

/// Everything one shape needs on the device.
template <class T>
struct setup {
  std::int64_t S, N, V;
  std::size_t bytes;
  T* logits = nullptr;
  T* copy_dst = nullptr;
  std::int64_t* labels = nullptr;
  double* scratch = nullptr;  // refs, sums, outputs
  std::int64_t* counts = nullptr;
  void* ws = nullptr;
  std::size_t ws_bytes = 0;
  cudaEvent_t start, stop;

  explicit setup(const shape& s, bool with_copy) {
    S = 2 * s.pairs;
    N = S * s.seq_len;
    V = s.vocab;
    bytes = static_cast<std::size_t>(N * V) * sizeof(T);
    DPO_BENCH_CK(cudaMalloc(&logits, bytes));
    if (with_copy) DPO_BENCH_CK(cudaMalloc(&copy_dst, bytes));
    refill(1);
    std::vector<std::int64_t> h(static_cast<std::size_t>(N));
    for (std::int64_t r = 0; r < N; ++r)
      h[r] = r % s.seq_len < 16 ? -100 : (r * 2654435761ll) % V;  // a 16-token prompt
    DPO_BENCH_CK(cudaMalloc(&labels, h.size() * sizeof(std::int64_t)));
    DPO_BENCH_CK(cudaMemcpy(labels, h.data(), h.size() * sizeof(std::int64_t), cudaMemcpyHostToDevice));
    DPO_BENCH_CK(cudaMalloc(&scratch, sizeof(double) * (16 * S + 32)));
    DPO_BENCH_CK(cudaMemset(scratch, 0, sizeof(double) * (16 * S + 32)));
    DPO_BENCH_CK(cudaMalloc(&counts, sizeof(std::int64_t) * S));
    std::size_t a = 0, b = 0;
    dpo::cuda::sequence_logps(nullptr, a, all(), scratch, counts);
    dpo::cuda::dpo_forward_backward(nullptr, b, pairs(), scratch, scratch + S, dpo::loss_config{}, {},
                                    grad());
    ws_bytes = std::max(a, b);
    DPO_BENCH_CK(cudaMalloc(&ws, ws_bytes));
    DPO_BENCH_CK(cudaEventCreate(&start));
    DPO_BENCH_CK(cudaEventCreate(&stop));
  }
  ~setup() {
    cudaFree(logits);
    cudaFree(copy_dst);
    cudaFree(labels);
    cudaFree(scratch);
    cudaFree(counts);
    cudaFree(ws);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  void refill(unsigned seed) {
    fill_kernel<<<4096, 256>>>(logits, static_cast<std::int64_t>(N * V), seed);
    DPO_BENCH_CK(cudaGetLastError());
  }
  dpo::pair_view<T, std::int64_t> pairs() const {
    return dpo::padded_pairs<T, std::int64_t>(logits, labels, S, N / S, V, V);
  }
  dpo::token_view<T, std::int64_t> all() const {
    dpo::token_view<T, std::int64_t> v = pairs().chosen;
    v.num_seqs = S;
    return v;
  }
  dpo::pair_grad_view<T> grad() const { return {logits, V, logits, V}; }

  /// Times fn with events; returns milliseconds. A 100 us spin kernel goes first, so the GPU
  /// is busy while the host enqueues fn's work (argument checks, occupancy query, launches):
  /// the events then time the device work, not the host's enqueue.
  template <class Fn>
  float time(Fn&& fn) {
    spin_kernel<<<1, 1>>>(200000);
    DPO_BENCH_CK(cudaGetLastError());
    DPO_BENCH_CK(cudaEventRecord(start));
    fn();
    DPO_BENCH_CK(cudaEventRecord(stop));
    DPO_BENCH_CK(cudaEventSynchronize(stop));
    float ms = 0;
    DPO_BENCH_CK(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

void check(const dpo::cuda::status& s) {
  if (!s) {
    std::fprintf(stderr, "%s\n", s.message);
    std::exit(1);
  }
}

template <class T>
void run(benchmark::State& state, const shape& sh, int what) {
  setup<T> d(sh, what == 0);
  std::vector<double> times;
  double moved = 0;
  const auto one = [&]() -> float {
    switch (what) {
      case 0:
        moved = 2.0 * static_cast<double>(d.bytes);
        return d.time([&] {
          DPO_BENCH_CK(cudaMemcpyAsync(d.copy_dst, d.logits, d.bytes, cudaMemcpyDeviceToDevice));
        });
      case 1:
        moved = static_cast<double>(d.bytes);
        return d.time([&] {
          check(dpo::cuda::sequence_logps(d.ws, d.ws_bytes, d.all(), d.scratch, d.counts));
        });
      default: {
        moved = 3.0 * static_cast<double>(d.bytes);
        d.refill(static_cast<unsigned>(times.size()) + 2);
        dpo::cuda::forward_outputs out;
        out.loss = d.scratch + 2 * d.S;
        return d.time([&] {
          check(dpo::cuda::dpo_forward_backward(d.ws, d.ws_bytes, d.pairs(), d.scratch,
                                                d.scratch + d.S / 2, dpo::loss_config{}, out,
                                                d.grad()));
        });
      }
    }
  };
  for (int i = 0; i < 3; ++i) one();  // warm-up: module load, clocks
  for (auto _ : state) {
    const float ms = one();
    times.push_back(ms);
    state.SetIterationTime(ms / 1000.0);
  }
  std::sort(times.begin(), times.end());
  const double median_s = times[times.size() / 2] / 1000.0;
  const double tbs = moved / median_s / 1e12;
  state.counters["median_ms"] = median_s * 1000.0;
  state.counters["TB_s"] = tbs;
  if (what == 0) {
    copy_tbs[sh.name] = tbs;
  } else if (copy_tbs.count(sh.name)) {
    state.counters["copy_share"] = tbs / copy_tbs[sh.name];
  }
}

}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp p{};
  DPO_BENCH_CK(cudaGetDeviceProperties(&p, 0));
  std::printf("device: %s\n", p.name);
  const char* what_name[3] = {"copy", "forward", "fused_inplace"};
  for (const shape& sh : shapes) {
    for (int what = 0; what < 3; ++what) {
      const std::string name = std::string(what_name[what]) + "/" + sh.name;
      benchmark::RegisterBenchmark(name.c_str(), [sh, what](benchmark::State& st) {
        if (sh.dtype == 0) {
          run<__nv_bfloat16>(st, sh, what);
        } else {
          run<float>(st, sh, what);
        }
      })->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.3);
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
