// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA path against the memory-bandwidth limit (docs/performance.md), Google Benchmark
// with manual time from CUDA events. For each shape, in one run on one device:
//   copy          cudaMemcpyAsync device to device of the logits' bytes (1 read + 1 write)
//   forward       sequence_logps (the reference pass): 1 read          bytes = N*V*b
//   dpo_forward   dpo_forward with metrics (the policy pass): 1 read   bytes = N*V*b
//   backward      dpo_backward in place after a dpo_forward: 1 read + 1 write
//   fused_inplace dpo_forward_backward in place: 2 reads + 1 write    bytes = 3*N*V*b
//                 (its token metrics come from the backward's read)
//   fwd_then_bwd  dpo_forward then dpo_backward in place (the PyTorch op's path: metrics in
//                 the forward's read)                                bytes = 3*N*V*b
//   fused_outofplace  dpo_forward_backward into a second buffer (a read-modify-write in
//                 place is slower than a copy: rw_floor)             bytes = 3*N*V*b
// and, at the first shape only, what bounds each pass (same grid, same row loop):
//   rw_floor      an in-place 16-byte read-modify-write of every row (no arithmetic)
//   grad_U<u>_<hint>  block_row_grad's loop with u vectors in flight and the cache hint
//   grad_metrics_U<u> the fused call's metrics backward loop (block_row_grad_metrics'
//                 per-thread part) with u vectors in flight, in place
//   stats_lse     block_row_stats without metrics (the reference pass's row work)
//   stats_metrics block_row_stats with metrics and lse(2z) (the policy pass's row work with
//                 WPO weights)
//   stats_metrics_nolse2  the same without lse(2z): dpo_forward's row work without WPO
//   stats_metrics_loop  its per-thread loop alone, without the block reduction
// Counters: TB_s (bytes / median time) and copy_share (TB_s over the copy's TB/s, measured
// first for the same shape). The logits are refilled with random values (outside the
// timed region) before every fused run, so in-place gradients never become the input.
// Without a device it prints "SKIPPED: no CUDA device" and exits 0. DPO_BENCH_MIN_TIME
// (seconds, default 0.3) sets every benchmark's minimum time (shorter under a profiler).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <dpo/cuda/dpo.cuh>

#include "bench_cuda_common.hpp"

namespace {


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
  dpo_bench::event_timer timer;

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
  }
  ~setup() {
    cudaFree(logits);
    cudaFree(copy_dst);
    cudaFree(labels);
    cudaFree(scratch);
    cudaFree(counts);
    cudaFree(ws);
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
  /// Out of place: the gradient into the second buffer (copy_dst).
  dpo::pair_grad_view<T> grad_out() const { return {copy_dst, V, copy_dst, V}; }

  /// Times fn with events; returns milliseconds. A 100 us spin kernel goes first, so the GPU
  /// is busy while the host enqueues fn's work (argument checks, occupancy query, launches):
  /// the events then time the device work, not the host's enqueue.
  template <class Fn>
  float time(Fn&& fn) {
    spin_kernel<<<1, 1>>>(200000);
    DPO_BENCH_CK(cudaGetLastError());
    return timer.time(fn);
  }
};

/// rw_floor: every row read and rewritten in place in 16-byte vectors, UNROLL in flight, by
/// the backward's grid (one block per row at a time); the floor of any in-place backward.
template <int BLOCK, int UNROLL>
__global__ void __launch_bounds__(BLOCK) rw_floor_kernel(uint4* z, std::int64_t rows, int row_vecs) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    uint4* row = z + r * row_vecs;
    for (int k0 = threadIdx.x; k0 < row_vecs; k0 += BLOCK * UNROLL) {
      uint4 b[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (k0 + u * BLOCK < row_vecs) b[u] = row[k0 + u * BLOCK];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (k0 + u * BLOCK < row_vecs) row[k0 + u * BLOCK] = make_uint4(b[u].x ^ 1u, b[u].y, b[u].z, b[u].w);
    }
  }
}

/// block_row_grad's loop (thread_row_grad) with U vectors in flight and cache hint H, in place
/// over every row (lse and coef fixed: the arithmetic per element is the backward's).
template <int BLOCK, int U, dpo::cuda::detail::cache_hint H, class T>
__global__ void __launch_bounds__(BLOCK) grad_variant_kernel(T* z, const std::int64_t* labels,
                                                             std::int64_t rows, std::int64_t V) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    dpo::cuda::detail::thread_row_grad<BLOCK, T, U, H>(z + r * V, z + r * V, V, 10.0f, 1e-3f, labels[r],
                                                       static_cast<int>(threadIdx.x));
}

/// block_row_grad_metrics' per-thread loop (thread_row_grad with Stats) with U vectors in
/// flight, in place over every row: the fused call's metrics backward without its block
/// reduction. The never-taken store keeps the compiler from dropping the terms.
template <int BLOCK, int U, class T>
__global__ void __launch_bounds__(BLOCK, 4) grad_metrics_variant_kernel(T* z, const std::int64_t* labels,
                                                                        std::int64_t rows, std::int64_t V,
                                                                        float* sink) {
  using dpo::cuda::detail::cache_hint;
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    dpo::cuda::detail::thread_grad_stats<float> st;
    dpo::cuda::detail::thread_row_grad<BLOCK, T, U, cache_hint::normal, true>(
        z + r * V, z + r * V, V, 10.0f, 1e-3f, labels[r], static_cast<int>(threadIdx.x), &st);
    if (st.t2 == -1.0f) sink[0] = st.m + st.zsum + float(st.argmax);
  }
}

/// block_row_stats over every row, as the forward's rows_kernel reads them, with or without
/// the metrics' statistics; Reduce = false times the per-thread loop alone (no block
/// reduction). The never-taken store keeps the compiler from dropping the work.
template <int BLOCK, bool Metrics, bool Reduce, class T, bool Lse2 = Metrics>
__global__ void __launch_bounds__(BLOCK) stats_variant_kernel(const T* z, std::int64_t rows, std::int64_t V,
                                                              float* sink) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if constexpr (Reduce) {
      const auto st = dpo::cuda::block_row_stats<BLOCK, Metrics, T, Lse2>(z + r * V, V);
      if (threadIdx.x == 0 && st.s == -1.0f) sink[0] = st.m + st.t + st.s2 + st.zsum + float(st.argmax);
    } else {
      const auto st =
          dpo::cuda::detail::thread_row_stats<BLOCK, Metrics, T, Lse2>(z + r * V, V, static_cast<int>(threadIdx.x));
      if (st.s == -1.0f) sink[0] = st.m + st.t2 + st.s2 + st.zsum + float(st.argmax);
    }
  }
}

/// Blocks of a persistent grid for `kernel`: SMs x resident blocks per SM.
template <class K>
int full_grid(K kernel, int block) {
  int dev = 0, sms = 0, per_sm = 0;
  DPO_BENCH_CK(cudaGetDevice(&dev));
  DPO_BENCH_CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  DPO_BENCH_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0));
  return sms * std::max(per_sm, 1);
}

enum what_t { w_copy, w_forward, w_dpo_forward, w_backward, w_fused, w_fwd_bwd, w_fused_out, w_rw_floor, w_grad_u4,
              w_grad_u4_stream, w_grad_u8, w_grad_u8_stream, w_grad_metrics_u4, w_grad_metrics_u2,
              w_stats, w_stats_metrics, w_stats_metrics_nolse2, w_stats_metrics_loop, w_count };
const char* what_name[w_count] = {"copy", "forward", "dpo_forward", "backward", "fused_inplace",
                                  "fwd_then_bwd", "fused_outofplace", "rw_floor", "grad_U4_normal", "grad_U4_streaming",
                                  "grad_U8_normal", "grad_U8_streaming", "grad_metrics_U4",
                                  "grad_metrics_U2", "stats_lse", "stats_metrics",
                                  "stats_metrics_nolse2", "stats_metrics_loop"};
/// Passes over the logits each workload makes (reads + writes): its bytes moved / bytes.
const int what_passes[w_count] = {2, 1, 1, 2, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1};

template <bool Metrics, bool Reduce, class T, bool Lse2 = Metrics>
void launch_stats_variant(const setup<T>& d) {
  const auto k = stats_variant_kernel<256, Metrics, Reduce, T, Lse2>;
  k<<<full_grid(k, 256), 256>>>(d.logits, d.N, d.V, reinterpret_cast<float*>(d.scratch));
  DPO_BENCH_CK(cudaGetLastError());
}

template <int U, dpo::cuda::detail::cache_hint H, class T>
void launch_grad_variant(const setup<T>& d) {
  const auto k = grad_variant_kernel<256, U, H, T>;
  k<<<full_grid(k, 256), 256>>>(d.logits, d.labels, d.N, d.V);
  DPO_BENCH_CK(cudaGetLastError());
}

template <int U, class T>
void launch_grad_metrics_variant(const setup<T>& d) {
  const auto k = grad_metrics_variant_kernel<256, U, T>;
  k<<<full_grid(k, 256), 256>>>(d.logits, d.labels, d.N, d.V, reinterpret_cast<float*>(d.scratch));
  DPO_BENCH_CK(cudaGetLastError());
}

using dpo_bench::check;

template <class T>
void run(benchmark::State& state, const shape& sh, int what) {
  setup<T> d(sh, what == w_copy || what == w_fused_out);
  std::vector<double> times;
  using dpo::cuda::detail::cache_hint;
  const double b = static_cast<double>(d.bytes);
  dpo::cuda::forward_outputs out;
  out.loss = d.scratch + 2 * d.S;
  // TRL's metrics requested, as a trainer that logs them would.
  out.metrics = reinterpret_cast<dpo::cuda::metrics*>(d.scratch + 2 * d.S + 2);
  const auto forward = [&] {
    check(dpo::cuda::dpo_forward(d.ws, d.ws_bytes, d.pairs(), d.scratch, d.scratch + d.S / 2,
                                 dpo::loss_config{}, out));
  };
  const double moved = what_passes[what] * b;
  const auto one = [&]() -> float {
    switch (what) {
      case w_copy:
        return d.time([&] {
          DPO_BENCH_CK(cudaMemcpyAsync(d.copy_dst, d.logits, d.bytes, cudaMemcpyDeviceToDevice));
        });
      case w_forward:
        return d.time([&] {
          check(dpo::cuda::sequence_logps(d.ws, d.ws_bytes, d.all(), d.scratch, d.counts));
        });
      case w_dpo_forward:
        return d.time(forward);
      case w_backward:
        d.refill(static_cast<unsigned>(times.size()) + 2);
        forward();
        return d.time([&] { check(dpo::cuda::dpo_backward(d.ws, d.ws_bytes, d.pairs(), d.grad())); });
      case w_fused:
        d.refill(static_cast<unsigned>(times.size()) + 2);
        return d.time([&] {
          check(dpo::cuda::dpo_forward_backward(d.ws, d.ws_bytes, d.pairs(), d.scratch,
                                                d.scratch + d.S / 2, dpo::loss_config{}, out,
                                                d.grad()));
        });
      case w_fused_out:
        return d.time([&] {
          check(dpo::cuda::dpo_forward_backward(d.ws, d.ws_bytes, d.pairs(), d.scratch,
                                                d.scratch + d.S / 2, dpo::loss_config{}, out,
                                                d.grad_out()));
        });
      case w_fwd_bwd:
        d.refill(static_cast<unsigned>(times.size()) + 2);
        return d.time([&] {
          forward();
          check(dpo::cuda::dpo_backward(d.ws, d.ws_bytes, d.pairs(), d.grad()));
        });
      case w_rw_floor: {
        const int row_vecs = static_cast<int>(d.V * sizeof(T) / 16);
        const auto k = rw_floor_kernel<256, 4>;
        return d.time([&] {
          k<<<full_grid(k, 256), 256>>>(reinterpret_cast<uint4*>(d.logits), d.N, row_vecs);
          DPO_BENCH_CK(cudaGetLastError());
        });
      }
      case w_grad_u4:
        return d.time([&] { launch_grad_variant<4, cache_hint::normal>(d); });
      case w_grad_u4_stream:
        return d.time([&] { launch_grad_variant<4, cache_hint::streaming>(d); });
      case w_grad_u8:
        return d.time([&] { launch_grad_variant<8, cache_hint::normal>(d); });
      case w_grad_u8_stream:
        return d.time([&] { launch_grad_variant<8, cache_hint::streaming>(d); });
      case w_grad_metrics_u4:
        return d.time([&] { launch_grad_metrics_variant<4>(d); });
      case w_grad_metrics_u2:
        return d.time([&] { launch_grad_metrics_variant<2>(d); });
      case w_stats:
        return d.time([&] { launch_stats_variant<false, true>(d); });
      case w_stats_metrics:
        return d.time([&] { launch_stats_variant<true, true>(d); });
      case w_stats_metrics_nolse2:
        return d.time([&] { launch_stats_variant<true, true, T, false>(d); });
      default:
        return d.time([&] { launch_stats_variant<true, false>(d); });
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
  if (what == w_copy) {
    copy_tbs[sh.name] = tbs;
  } else if (copy_tbs.count(sh.name)) {
    state.counters["copy_share"] = tbs / copy_tbs[sh.name];
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!dpo_bench::print_device()) return 0;
  // DPO_BENCH_MIN_TIME (seconds, default 0.3): shorter runs under a profiler.
  const char* mt = std::getenv("DPO_BENCH_MIN_TIME");
  const double min_time = mt != nullptr && std::atof(mt) > 0 ? std::atof(mt) : 0.3;
  for (const shape& sh : shapes) {
    const int whats = &sh == &shapes[0] ? w_count : w_rw_floor;
    for (int what = 0; what < whats; ++what) {
      const std::string name = std::string(what_name[what]) + "/" + sh.name;
      benchmark::RegisterBenchmark(name.c_str(), [sh, what](benchmark::State& st) {
        if (sh.dtype == 0) {
          run<__nv_bfloat16>(st, sh, what);
        } else {
          run<float>(st, sh, what);
        }
      })->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(min_time);
    }
  }
  dpo_bench::run_registered(argc, argv);
  return 0;
}
