// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA fused LM head (dpo/cuda/linear.cuh) against its GEMM floor and the materializing
// path, Google Benchmark with manual time from CUDA events, all in one run on one device, at
// N = 8192 (4 pairs x 2 x 1024 tokens), H = 4096, V = 128256, bf16 (issue 12):
//   gemm_floor_fwd      the forward's cuBLASLt GEMMs alone (same chunks, same calls): 1 pass
//   linear_fwd          linear_logps (with entropy)
//   gemm_floor_4pass    the GEMMs of forward + backward alone: logits, recompute, dHidden,
//                       dWeight (4 passes over the weight)
//   linear_fwd_bwd      linear_logps then linear_logps_backward (dWeight / dBias in fp32)
//   materializing       one GEMM to the full bf16 logits [N, V], the logits path's
//                       sequence_logps + sequence_logps_backward in place, two GEMMs
//                       (dHidden, dWeight): 2.1 GB of logits
//   gemm_floor_3pass    logits, dHidden, dWeight GEMMs alone (the three-pass floor)
//   gemm_floor_3pass_ref / gemm_floor_4pass_ref   the same plus one more logits pass (a
//                       reference model's forward)
//   dpo_3pass_ref{logps,hidden}   dpo::cuda::linear_dpo (dpo/cuda/linear_dpo.cuh), sigmoid loss,
//                       padded pairs, three passes (one pair per chunk: its workspace is set
//                       to fit 2 x seq_len full-vocab rows), the reference as precomputed
//                       log-probs or from hidden states through a reference head
//   dpo_4pass_ref{logps,hidden}   the same in four passes at the default budget
// Counters: median_ms, floor_ratio (ms over its floor's ms, measured first in the same run),
// extra_GiB (device memory beyond inputs and gradient buffers: the workspace, or the full
// logits plus the logits path's workspace). Without a device it prints "SKIPPED: no CUDA
// device" and exits 0. DPO_BENCH_LINEAR_N / _H / _V override the shape (smaller runs); the
// emulator builds and runs it at a tiny shape in ctest (bench_cuda_linear_emulated), so every
// path's calls are checked before a device sees them.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <dpo/cuda/dpo.cuh>
#include <dpo/cuda/linear.cuh>
#include <dpo/cuda/linear_dpo.cuh>

#include "bench_cuda_common.hpp"

namespace {


using T = __nv_bfloat16;
using L = std::int64_t;

std::int64_t env_or(const char* name, std::int64_t dflt) {
  const char* v = std::getenv(name);
  return v != nullptr && std::atoll(v) > 0 ? std::atoll(v) : dflt;
}

__global__ void fill_kernel(T* x, std::int64_t n, unsigned seed, float amp) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    unsigned long long h = (static_cast<unsigned long long>(i) + seed) * 0x9e3779b97f4a7c15ull;
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    x[i] = __float2bfloat16_rn((static_cast<float>(h & 0xffffff) / 16777216.0f * 2.0f - 1.0f) * amp);
  }
}

/// fill_kernel through cudaLaunchKernelEx (the emulator has no <<<>>>).
void fill(T* x, std::int64_t n, unsigned seed, float amp) {
  cudaLaunchConfig_t c = {};
  const std::int64_t blocks = (n + 255) / 256;
  c.gridDim = dim3(static_cast<unsigned>(blocks < 4096 ? blocks : 4096));
  c.blockDim = dim3(256);
  c.stream = 0;
  DPO_BENCH_CK(cudaLaunchKernelEx(&c, fill_kernel, x, n, seed, amp));
}

using dpo_bench::check;

struct head {
  std::int64_t N, H, V, seq_len = 1024;
  T *hidden = nullptr, *weight = nullptr, *dhidden = nullptr;
  float* dweight = nullptr;
  L* labels = nullptr;
  double *logps = nullptr, *entropy = nullptr, *lse = nullptr, *gl = nullptr, *ge = nullptr;
  void* ws = nullptr;
  std::size_t ws_bytes = 0;
  cublasLtHandle_t handle = nullptr;
  dpo::cuda::linear_options opt;
  dpo::cuda::linear_chunking ch;
  dpo_bench::event_timer timer;

  head() {
    N = env_or("DPO_BENCH_LINEAR_N", 8192);
    H = env_or("DPO_BENCH_LINEAR_H", 4096);
    V = env_or("DPO_BENCH_LINEAR_V", 128256);
    seq_len = std::min<std::int64_t>(seq_len, std::max<std::int64_t>(N / 2, 1));  // 2 sequences at least
    DPO_BENCH_CK(cudaMalloc(&hidden, N * H * sizeof(T)));
    DPO_BENCH_CK(cudaMalloc(&weight, V * H * sizeof(T)));
    DPO_BENCH_CK(cudaMalloc(&dhidden, N * H * sizeof(T)));
    DPO_BENCH_CK(cudaMalloc(&dweight, V * H * sizeof(float)));
    DPO_BENCH_CK(cudaMemset(dweight, 0, V * H * sizeof(float)));
    fill(hidden, N * H, 1, 2.0f);
    fill(weight, V * H, 2, 2.0f / 64.0f);
    DPO_BENCH_CK(cudaGetLastError());
    std::vector<L> h(static_cast<std::size_t>(N));
    for (std::int64_t r = 0; r < N; ++r) h[r] = r % seq_len < 16 ? -100 : (r * 2654435761ll) % V;
    DPO_BENCH_CK(cudaMalloc(&labels, N * sizeof(L)));
    DPO_BENCH_CK(cudaMemcpy(labels, h.data(), N * sizeof(L), cudaMemcpyHostToDevice));
    for (double** p : {&logps, &entropy, &lse, &gl, &ge}) DPO_BENCH_CK(cudaMalloc(p, N * sizeof(double)));
    std::vector<double> g(static_cast<std::size_t>(N), 1.0 / static_cast<double>(N));
    DPO_BENCH_CK(cudaMemcpy(gl, g.data(), N * sizeof(double), cudaMemcpyHostToDevice));
    DPO_BENCH_CK(cudaMemcpy(ge, g.data(), N * sizeof(double), cudaMemcpyHostToDevice));
    if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasLtCreate failed\n");
      std::exit(1);
    }
    check(dpo::cuda::linear_workspace_size(view(), opt, &ch));
    ws_bytes = static_cast<std::size_t>(ch.workspace_bytes);
    DPO_BENCH_CK(cudaMalloc(&ws, ws_bytes));
    DPO_BENCH_CK(cudaMemset(ws, 0, ws_bytes));  // gemms() reads the chunk buffers as they are
    std::printf("linear head: N=%lld H=%lld V=%lld bf16, chunk %lld x %lld, workspace %.1f MiB\n",
                (long long)N, (long long)H, (long long)V, (long long)ch.rows, (long long)ch.vocab,
                ws_bytes / 1048576.0);
  }

  ~head() {
    cublasLtDestroy(handle);
    for (void* p : {static_cast<void*>(hidden), static_cast<void*>(weight), static_cast<void*>(dhidden),
                    static_cast<void*>(dweight), static_cast<void*>(labels), static_cast<void*>(logps),
                    static_cast<void*>(entropy), static_cast<void*>(lse), static_cast<void*>(gl),
                    static_cast<void*>(ge), ws})
      cudaFree(p);
  }
  head(const head&) = delete;
  head& operator=(const head&) = delete;

  dpo::cuda::linear_view<T, L> view() const {
    return dpo::linear_view_of(static_cast<const T*>(hidden), N, H, dpo::make_linear_head<T>(weight, V, H, H),
                               static_cast<const L*>(labels));
  }

  void forward() {
    std::size_t b = ws_bytes;
    check(dpo::cuda::linear_logps(ws, b, handle, view(), logps, entropy, lse, opt));
  }
  void backward() {
    dpo::cuda::linear_grads<T, float> g;
    g.hidden = dhidden;
    g.hidden_stride = H;
    g.weight = dweight;
    g.weight_stride = H;
    std::size_t b = ws_bytes;
    check(dpo::cuda::linear_logps_backward(ws, b, handle, view(), lse, gl, entropy, ge, g, opt));
  }

  /// The call's GEMMs alone, on the same chunk buffers: passes = 1 (forward), 3 (logits,
  /// dHidden, dWeight) or 4 (with the recompute); ref: one more logits pass (a reference).
  void gemms(int passes, bool ref = false) {
    namespace d = dpo::cuda::detail;
    const d::linear_ws<T> w(reinterpret_cast<std::uintptr_t>(ws), ch.rows, ch.vocab, H, opt.gemm_workspace_bytes,
                            ch.vocab >= V);
    const d::linear_gemm g{handle, 0, w.gemm, static_cast<std::size_t>(w.gemm_bytes), false};
    const dpo::cuda::linear_view<T, L> v = view();
    for (std::int64_t r0 = 0; r0 < N; r0 += ch.rows) {
      const std::int64_t nb = std::min(ch.rows, N - r0);
      for (std::int64_t v0 = 0; v0 < V; v0 += ch.vocab) {
        const std::int64_t nv = std::min(ch.vocab, V - v0);
        check(d::logits_gemm(g, v, w, nb, v0, nv));
        if (ref) check(d::logits_gemm(g, v, w, nb, v0, nv));
        if (passes == 1) continue;
        if (passes == 4) check(d::logits_gemm(g, v, w, nb, v0, nv));
        check(d::linear_grad_gemms(g, weight + v0 * H, H, H, nb, nv, w, true, v0 == 0 ? 0.0f : 1.0f, dweight + v0 * H,
                                   H));
      }
    }
  }

  template <class Fn>
  float time(Fn&& fn) {
    return timer.time(fn);
  }
};

head* the_head = nullptr;

/// The materializing path's extra buffers: the full bf16 logits and the logits path's
/// workspace, allocated for its benchmark only.
struct materializing {
  head& h;
  T* logits = nullptr;
  double *sums = nullptr, *seq_grad = nullptr, *row_lse = nullptr;
  std::int64_t* counts = nullptr;
  void* ws = nullptr;
  std::size_t ws_bytes = 0;
  std::int64_t S;

  explicit materializing(head& hd) : h(hd), S(hd.N / hd.seq_len) {
    DPO_BENCH_CK(cudaMalloc(&logits, h.N * h.V * sizeof(T)));
    DPO_BENCH_CK(cudaMalloc(&sums, S * sizeof(double)));
    DPO_BENCH_CK(cudaMalloc(&seq_grad, S * sizeof(double)));
    DPO_BENCH_CK(cudaMalloc(&row_lse, h.N * sizeof(double)));
    DPO_BENCH_CK(cudaMalloc(&counts, S * sizeof(std::int64_t)));
    std::vector<double> g(static_cast<std::size_t>(S), 1.0 / static_cast<double>(h.N));
    DPO_BENCH_CK(cudaMemcpy(seq_grad, g.data(), S * sizeof(double), cudaMemcpyHostToDevice));
    std::size_t a = 0, b = 0;
    check(dpo::cuda::sequence_logps(nullptr, a, view(), sums, counts, nullptr, row_lse));
    check(dpo::cuda::sequence_logps_backward(nullptr, b, view(), row_lse, seq_grad, logits, h.V));
    ws_bytes = std::max(a, b);
    DPO_BENCH_CK(cudaMalloc(&ws, ws_bytes));
  }
  ~materializing() {
    cudaFree(logits);
    cudaFree(sums);
    cudaFree(seq_grad);
    cudaFree(row_lse);
    cudaFree(counts);
    cudaFree(ws);
  }
  dpo::token_view<T, L> view() const {
    dpo::token_view<T, L> v = dpo::padded_pairs<T, L>(logits, h.labels, S, h.seq_len, h.V, h.V).chosen;
    v.num_seqs = S;
    return v;
  }
  double extra_gib() const { return (h.N * h.V * sizeof(T) + ws_bytes) / 1073741824.0; }
  void run() {
    namespace d = dpo::cuda::detail;
    // cuBLASLt's workspace: the head's (not in use meanwhile).
    const d::linear_ws<T> w(reinterpret_cast<std::uintptr_t>(h.ws), h.ch.rows, h.ch.vocab, h.H,
                            h.opt.gemm_workspace_bytes, h.ch.vocab >= h.V);
    const d::linear_gemm g{h.handle, 0, w.gemm, static_cast<std::size_t>(w.gemm_bytes), false};
    // logits^T [V, N] = W [V, H] . hidden^T (column-major: op_T(W^T) . hidden^T).
    check(d::gemm<float>(g, "logits", true, false, h.V, h.N, h.H, h.weight, CUDA_R_16BF, h.H, h.hidden, CUDA_R_16BF,
                         h.H, 0.0f, logits, CUDA_R_16BF, h.V));
    std::size_t b = ws_bytes;
    check(dpo::cuda::sequence_logps(ws, b, view(), sums, counts, nullptr, row_lse));
    check(dpo::cuda::sequence_logps_backward(ws, b, view(), row_lse, seq_grad, logits, h.V));
    check(d::gemm<float>(g, "dH", false, false, h.H, h.N, h.V, h.weight, CUDA_R_16BF, h.H, logits, CUDA_R_16BF, h.V,
                         0.0f, h.dhidden, CUDA_R_16BF, h.H));
    check(d::gemm<float>(g, "dW", false, true, h.H, h.V, h.N, h.hidden, CUDA_R_16BF, h.H, logits, CUDA_R_16BF, h.V,
                         1.0f, h.dweight, CUDA_R_32F, h.H));
  }
};

/// DPO from hidden states (dpo::cuda::linear_dpo) on the head's buffers: padded pairs of
/// seq_len rows (2P = N / seq_len sequences), sigmoid loss, the reference as log-probs or as
/// hidden states through a reference head (the head's own buffers: timing only).
struct dpo_call {
  head& h;
  bool three, ref_hidden;
  std::int64_t P;
  double *ref = nullptr, *loss = nullptr;
  dpo::metrics* metrics = nullptr;
  void* ws = nullptr;
  std::size_t ws_bytes = 0;
  dpo::cuda::linear_dpo_options opt;
  dpo::loss_config cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);

  dpo_call(head& hd, bool three_pass, bool from_hidden)
      : h(hd), three(three_pass), ref_hidden(from_hidden), P(hd.N / hd.seq_len / 2) {
    DPO_BENCH_CK(cudaMalloc(&ref, 2 * P * sizeof(double)));
    DPO_BENCH_CK(cudaMalloc(&loss, sizeof(double)));
    DPO_BENCH_CK(cudaMalloc(&metrics, sizeof(dpo::metrics)));
    const std::vector<double> r(static_cast<std::size_t>(2 * P), -5.0 * static_cast<double>(h.seq_len));
    DPO_BENCH_CK(cudaMemcpy(ref, r.data(), r.size() * sizeof(double), cudaMemcpyHostToDevice));
    opt.mode = three ? dpo::linear_mode::three_pass : dpo::linear_mode::four_pass;
    if (three) {  // one pair (2 x seq_len rows over the full vocab) per chunk
      opt.workspace_bytes = std::int64_t{64} << 30;
      opt.chunk_rows = 2 * h.seq_len;
    }
    check(call(nullptr, ws_bytes));
    DPO_BENCH_CK(cudaMalloc(&ws, ws_bytes));
  }
  ~dpo_call() {
    for (void* p : {static_cast<void*>(ref), static_cast<void*>(loss), static_cast<void*>(metrics), ws}) cudaFree(p);
  }
  dpo_call(const dpo_call&) = delete;
  dpo_call& operator=(const dpo_call&) = delete;

  dpo::cuda::status call(void* w, std::size_t& bytes) {
    const auto pairs = dpo::cuda::linear_padded_pairs<T, L>(h.hidden, h.H, h.H, h.labels, 2 * P, h.seq_len);
    dpo::cuda::linear_head<T> hd = dpo::make_linear_head<T>(h.weight, h.V, h.H, h.H);
    dpo::cuda::linear_dpo_grads<T, float> g;
    g.chosen_hidden = g.rejected_hidden = h.dhidden;
    g.chosen_hidden_stride = g.rejected_hidden_stride = h.H;
    g.weight = h.dweight;
    g.weight_stride = h.H;
    dpo::forward_outputs out;
    out.loss = loss;
    out.metrics = metrics;
    return ref_hidden ? dpo::cuda::linear_dpo(w, bytes, h.handle, pairs, hd, pairs, hd, cfg, out, g, opt)
                      : dpo::cuda::linear_dpo(w, bytes, h.handle, pairs, hd, ref, ref + P, cfg, out, g, opt);
  }
  void run() {
    std::size_t b = ws_bytes;
    check(call(ws, b));
  }
  double extra_gib() const { return ws_bytes / 1073741824.0; }
};

enum what {
  w_floor_fwd, w_fwd, w_floor_4, w_fwd_bwd, w_materializing,
  w_floor_3, w_floor_3r, w_floor_4r, w_dpo3_logps, w_dpo3_hidden, w_dpo4_logps, w_dpo4_hidden, w_count
};
const char* const what_name[w_count] = {"gemm_floor_fwd",       "linear_fwd",           "gemm_floor_4pass",
                                        "linear_fwd_bwd",       "materializing",        "gemm_floor_3pass",
                                        "gemm_floor_3pass_ref", "gemm_floor_4pass_ref", "dpo_3pass_reflogps",
                                        "dpo_3pass_refhidden",  "dpo_4pass_reflogps",   "dpo_4pass_refhidden"};
/// Each timed row's floor (itself for the floors).
const int floor_of[w_count] = {w_floor_fwd, w_floor_fwd, w_floor_4, w_floor_4, w_floor_4, w_floor_3,
                               w_floor_3r,  w_floor_4r,  w_floor_3, w_floor_3r, w_floor_4, w_floor_4r};
std::map<int, double> floor_ms;

void run(benchmark::State& state, int what) {
  head& h = *the_head;
  materializing* m = what == w_materializing ? new materializing(h) : nullptr;
  dpo_call* dc = what >= w_dpo3_logps ? new dpo_call(h, what <= w_dpo3_hidden, what == w_dpo3_hidden ||
                                                                                    what == w_dpo4_hidden)
                                      : nullptr;
  const auto once = [&] {
    switch (what) {
      case w_floor_fwd: h.gemms(1); break;
      case w_fwd: h.forward(); break;
      case w_floor_4: h.gemms(4); break;
      case w_fwd_bwd:
        h.forward();
        h.backward();
        break;
      case w_materializing: m->run(); break;
      case w_floor_3: h.gemms(3); break;
      case w_floor_3r: h.gemms(3, true); break;
      case w_floor_4r: h.gemms(4, true); break;
      default: dc->run(); break;
    }
  };
  h.time(once);  // warm-up (cuBLASLt's heuristics, caches)
  std::vector<double> ms;
  for (auto _ : state) {
    const float t = h.time(once);
    ms.push_back(t);
    state.SetIterationTime(t / 1000.0);
  }
  std::sort(ms.begin(), ms.end());
  const double median = ms.empty() ? 0.0 : ms[ms.size() / 2];
  state.counters["median_ms"] = median;
  const int floor = floor_of[what];
  if (floor == what) floor_ms[what] = median;
  if (floor != what && floor_ms.count(floor) && floor_ms[floor] > 0)
    state.counters["floor_ratio"] = median / floor_ms[floor];
  state.counters["extra_GiB"] = m != nullptr    ? m->extra_gib()
                                : dc != nullptr ? dc->extra_gib()
                                                : h.ws_bytes / 1073741824.0;
  delete m;
  delete dc;
}

}  // namespace

int main(int argc, char** argv) {
  if (!dpo_bench::print_device()) return 0;
  the_head = new head();
  const std::string shape = "N" + std::to_string(the_head->N) + "_H" + std::to_string(the_head->H) + "_V" +
                            std::to_string(the_head->V) + "_bf16";
  for (int what = 0; what < w_count; ++what) {
    const std::string name = std::string(what_name[what]) + "/" + shape;
    benchmark::RegisterBenchmark(name.c_str(), [what](benchmark::State& st) { run(st, what); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(5);
  }
  dpo_bench::run_registered(argc, argv);
  delete the_head;
  return 0;
}
