// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CPU benchmarks: the fused path (dpo::cpu::dpo_forward, + dpo_backward in and out of place)
// against a naive materializing one written here (full log-softmax to a float buffer, gather,
// sigmoid pair loss, then softmax - onehot materialized and scaled into the gradient), and a
// large memcpy as this machine's memory-bandwidth floor. All in one run, so the ratios in the
// summary printed at the end compare numbers taken under the same load.
//
// Bytes are the logical traffic of docs/performance.md: N*V*sizeof(T) for a forward pass,
// 3*N*V*sizeof(T) for forward + backward, read + written bytes for the copy.
//
// Two floors for forward + backward: the copy's (3*N*V*sizeof(T) bytes at the copy's
// read + written bandwidth, docs/performance.md's definition) and the memory pattern's: the
// same logits buffer and threads, rows shared out the same way, read once and then
// read-modified-written in place, with no arithmetic ("read+rmw"). On this project's VM the
// in-place pattern moves its bytes about 1.5x faster than a large memcpy (which may also read
// each destination line before writing it), so the copy floor is the more lenient of the
// two; both are printed.
//
// Instruction sets (docs/performance.md, "Instruction sets"): the fused paths run at the best
// level this CPU has (what a build without -march flags gets at run time: the "native"
// speed), and the forward and the in-place forward + backward with metrics also at every
// lower level ("/isa:baseline" = the portable SSE2 code, "/isa:avx2", "/isa:avx512"), all in the same run:
// their "base/ours" column is time(best level) / time(this level).
//
// rows/: each row kernel alone on one core, in L2, in that core's CPU time (see
// register_rows): where the fused path's time goes, per pass and level.
//
// Defaults: 5 repetitions, aggregates only, repetitions randomly interleaved across all
// benchmarks (so a burst of load from other processes spreads over every path instead of
// hitting one); every --benchmark_* flag overrides them.
// --dpo_threads=N sets the worker threads of every path (default 2).

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <time.h>

#include "bench_common.hpp"
#include "dpo/cpu/dpo.hpp"

namespace {

using label_t = std::int64_t;

struct shape {
  std::int64_t pairs, tokens, vocab;
  const char* name;
  std::int64_t rows() const { return 2 * pairs * tokens; }
};
const shape shapes[] = {{2, 256, 32000, "2x256xV32000"}, {1, 512, 128256, "1x512xV128256"}};

int g_threads = 2;
constexpr std::size_t copy_bytes = std::size_t{512} << 20;

template <class T>
const char* dtype_name();
template <>
const char* dtype_name<float>() {
  return "f32";
}
template <>
const char* dtype_name<Eigen::bfloat16>() {
  return "bf16";
}
template <>
const char* dtype_name<Eigen::half>() {
  return "f16";
}

/// The instruction-set levels this CPU supports, best last.
std::vector<dpo::cpu::isa> levels() {
  std::vector<dpo::cpu::isa> v;
  for (dpo::cpu::isa l :
       {dpo::cpu::isa::baseline, dpo::cpu::isa::avx2, dpo::cpu::isa::avx512, dpo::cpu::isa::avx512_bf16})
    if (static_cast<int>(l) <= static_cast<int>(dpo::cpu::cpu_isa_supported())) v.push_back(l);
  return v;
}

using dpo_bench::splitmix;
using dpo_bench::uniform;

/// memcpy in 64 blocks claimed one at a time by the threads, as the fused paths share their
/// rows out (dpo::cpu::detail::parallel_blocks), so that load from other processes slows
/// the floor and the kernels alike.
void parallel_copy(void* dst, const void* src, std::size_t bytes) {
  const std::int64_t blocks = 64;
  dpo::cpu::detail::parallel_blocks(
      blocks, g_threads,
      [&](std::int64_t b, std::int64_t e) {
        const std::size_t lo = bytes * static_cast<std::size_t>(b) / blocks;
        const std::size_t hi = bytes * static_cast<std::size_t>(e) / blocks;
        std::memcpy(static_cast<char*>(dst) + lo, static_cast<const char*>(src) + lo, hi - lo);
      },
      1);
}

/// 64-byte aligned storage, as torch gives tensors (malloc's 16 bytes would split every
/// 512-bit load across two cache lines).
template <class T>
struct aligned64 {
  using value_type = T;
  aligned64() = default;
  template <class U>
  aligned64(const aligned64<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const aligned64<U>&) const {
    return true;
  }
  template <class U>
  bool operator!=(const aligned64<U>&) const {
    return false;
  }
};
template <class T>
using buffer = std::vector<T, aligned64<T>>;

/// The buffers of one shape x dtype group, built once and shared by its benchmarks.
template <class T>
struct dataset {
  shape s{};
  buffer<T> logits;  // never written
  buffer<T> work;    // in-place runs: restored from logits before each iteration
  buffer<T> grad;    // out-of-place gradient (ours and naive)
  std::vector<label_t> labels;
  std::vector<double> ref_c, ref_r;
  buffer<float> logp, dsoft;  // the naive path's materialized [N, V] tensors
  std::vector<double> coef;        // the naive path's dL/dlogp per row
};

// Every group's buffers, built on first use and kept (about 5.5 GB in all) so that
// repetitions can be interleaved across groups without rebuilding them.
std::map<std::string, std::shared_ptr<void>> g_datasets;

dpo::loss_config bench_config() { return dpo::loss_config::of(dpo::loss_type::sigmoid); }

template <class T>
dpo::pair_view<T, label_t> view_of(const dataset<T>& d, const T* logits) {
  return dpo::padded_pairs(logits, d.labels.data(), 2 * d.s.pairs, d.s.tokens, d.s.vocab,
                           d.s.vocab);
}

/// The naive forward: log_softmax(x.float()) materialized, gather, sigmoid loss and dL/dlogp.
template <class T>
double naive_forward(dataset<T>& d) {
  const std::int64_t N = d.s.rows(), V = d.s.vocab, P = d.s.pairs, L = d.s.tokens;
  dpo::cpu::detail::parallel_for(N, g_threads, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      const auto x = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(d.logits.data() + r * V, V)
                         .template cast<float>();
      const float m = x.maxCoeff();
      const float lse = m + std::log((x - m).exp().sum());
      Eigen::Map<Eigen::ArrayXf>(d.logp.data() + r * V, V) = x - lse;
    }
  });
  std::vector<double> seq(static_cast<std::size_t>(2 * P), 0.0);
  for (std::int64_t r = 0; r < N; ++r) {
    const label_t y = d.labels[r];
    if (y != -100) seq[r / L] += d.logp[r * V + y];
  }
  const double beta = bench_config().beta;
  double loss = 0;
  for (std::int64_t i = 0; i < P; ++i) {
    const double h = beta * ((seq[i] - d.ref_c[i]) - (seq[P + i] - d.ref_r[i]));
    loss += -dpo::detail::log_sigmoid(h);
    const double g = -beta * dpo::detail::sigmoid(-h) / static_cast<double>(P);
    for (std::int64_t t = 0; t < L; ++t) {
      d.coef[i * L + t] = g;
      d.coef[(P + i) * L + t] = -g;
    }
  }
  return loss / static_cast<double>(P);
}

/// The naive backward: dsoft = exp(logp) - onehot materialized, then grad = -coef * dsoft.
template <class T>
void naive_backward(dataset<T>& d) {
  const std::int64_t N = d.s.rows(), V = d.s.vocab;
  dpo::cpu::detail::parallel_for(N, g_threads, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      Eigen::Map<Eigen::ArrayXf> p(d.dsoft.data() + r * V, V);
      p = Eigen::Map<const Eigen::ArrayXf>(d.logp.data() + r * V, V).exp();
      if (d.labels[r] != -100) p(d.labels[r]) -= 1.0f;
    }
  });
  dpo::cpu::detail::parallel_for(N, g_threads, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r) {
      const float c = static_cast<float>(-d.coef[r]);
      Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>(d.grad.data() + r * V, V) =
          (Eigen::Map<const Eigen::ArrayXf>(d.dsoft.data() + r * V, V) * c).template cast<T>();
    }
  });
}

/// Compares ours with the naive path once per group, so a fast wrong kernel shows up.
template <class T>
void check_against_naive(dataset<T>& d) {
  const std::int64_t V = d.s.vocab, N = d.s.rows();
  dpo::cpu::options opt;
  opt.num_threads = g_threads;
  const auto view = view_of(d, d.logits.data());
  const dpo::pair_grad_view<T> gv{d.grad.data(), V, d.grad.data(), V};
  const double ours = dpo::cpu::dpo_forward_backward(view, d.ref_c.data(), d.ref_r.data(),
                                                     bench_config(), gv, opt)
                          .loss;
  std::vector<float> sample;
  const std::int64_t rows[] = {0, N / 2 - 1, N / 2, N - 1};
  for (std::int64_t r : rows)
    for (std::int64_t v = 0; v < V; ++v) sample.push_back(static_cast<float>(d.grad[r * V + v]));
  const double naive = naive_forward(d);
  naive_backward(d);
  double max_diff = 0, max_abs = 0;
  std::size_t k = 0;
  for (std::int64_t r : rows)
    for (std::int64_t v = 0; v < V; ++v, ++k) {
      const double g = static_cast<float>(d.grad[r * V + v]);
      max_diff = std::max(max_diff, std::abs(g - sample[k]));
      max_abs = std::max(max_abs, std::abs(g));
    }
  std::fprintf(stderr, "check %s/%s: loss ours %.9g naive %.9g; grad max |diff| %.3g (max |g| %.3g)\n",
               dtype_name<T>(), d.s.name, ours, naive, max_diff, max_abs);
}

template <class T>
dataset<T>& get_dataset(int si) {
  const std::string key = std::string(dtype_name<T>()) + shapes[si].name;
  std::shared_ptr<void>& slot = g_datasets[key];
  if (!slot) {
    auto d = std::make_shared<dataset<T>>();
    d->s = shapes[si];
    const std::int64_t N = d->s.rows(), V = d->s.vocab, P = d->s.pairs;
    const std::size_t n = static_cast<std::size_t>(N * V);
    d->logits.resize(n);
    dpo::cpu::detail::parallel_for(N, g_threads, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b * V; i < e * V; ++i)
        d->logits[i] = T(6.0f * uniform(static_cast<std::uint64_t>(i)));
    });
    d->work = d->logits;
    d->grad.assign(n, T(0.0f));
    d->logp.assign(n, 0.0f);
    d->dsoft.assign(n, 0.0f);
    d->coef.assign(static_cast<std::size_t>(N), 0.0);
    d->labels.resize(static_cast<std::size_t>(N));
    for (std::int64_t r = 0; r < N; ++r)
      d->labels[r] = static_cast<label_t>(splitmix(~static_cast<std::uint64_t>(r)) % V);
    // References near the policy log-probs keep the pair loss away from saturation, so every
    // row has a non-zero gradient scale and the backward pass does its full work.
    std::vector<double> pc(static_cast<std::size_t>(P)), pr(pc.size());
    dpo::cpu::pair_logps(view_of(*d, d->logits.data()), 1.0, pc.data(), pr.data());
    d->ref_c.resize(pc.size());
    d->ref_r.resize(pc.size());
    for (std::int64_t i = 0; i < P; ++i) {
      d->ref_c[i] = pc[i] - 1.0 - 0.5 * i;
      d->ref_r[i] = pr[i] + 1.0;
    }
    check_against_naive(*d);
    slot = d;
  }
  return *static_cast<dataset<T>*>(slot.get());
}

// What the summary needs to know about each registered benchmark.
struct entry {
  std::string group, name, baseline;  // baseline: the naive benchmark of the same pass
  double bytes = 0;                   // logical bytes per iteration
  double floor_factor = 0;            // time floor = floor_factor * bytes / copy bandwidth
  std::string pattern;                // the read+rmw row of the same group (forward + backward)
};
std::vector<entry> g_entries;

double stat_min(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
double stat_max(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

benchmark::internal::Benchmark* configure(benchmark::internal::Benchmark* b) {
  return b->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->ComputeStatistics("min", stat_min)
      ->ComputeStatistics("max", stat_max);
}

void register_copy(const std::string& group) {
  const std::string name = group + "/copy_512MiB";
  g_entries.push_back({group, name, "", 2.0 * copy_bytes, 0, ""});
  configure(benchmark::RegisterBenchmark(name.c_str(), [](benchmark::State& state) {
    static buffer<char> src(copy_bytes, 1), dst(copy_bytes, 0);
    for (auto _ : state) {
      parallel_copy(dst.data(), src.data(), copy_bytes);
      benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(2 * copy_bytes));
  }));
}

/// CPU time of the whole process (every thread of the pool), in seconds.
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

/// Adds the counter "cpu ns/logit": the process's CPU time (all threads) per logit, summed
/// over the timed calls only. Load from other processes inflates it far less than wall time
/// (it takes time slices, not CPU time of ours), so it is the measure for A/B comparisons of
/// the kernels on a shared machine.
void report_cpu_per_logit(benchmark::State& state, double cpu_seconds, double logits) {
  state.counters["cpu ns/logit"] =
      benchmark::Counter(cpu_seconds * 1e9 / (logits * static_cast<double>(state.iterations())));
}

/// Restores d.work from the logits outside the timing, as the in-place runs do, so that
/// every in-place run starts from the same cache state.
template <class T>
void restore_work(benchmark::State& state, dataset<T>& d) {
  state.PauseTiming();
  parallel_copy(d.work.data(), d.logits.data(), d.logits.size() * sizeof(T));
  state.ResumeTiming();
}

/// The memory traffic of an in-place forward + backward without its arithmetic, rows shared
/// out as the fused path does: the threads read the work buffer's rows (an XOR of their
/// 64-bit words), then flip a bit of every word in place.
template <class T>
std::uint64_t read_then_rmw(dataset<T>& d) {
  const std::int64_t row_words = d.s.vocab * static_cast<std::int64_t>(sizeof(T)) / 8;
  auto* words = reinterpret_cast<std::uint64_t*>(d.work.data());
  std::atomic<std::uint64_t> sum{0};
  dpo::cpu::detail::parallel_blocks(d.s.rows(), g_threads, [&](std::int64_t b, std::int64_t e) {
    std::uint64_t acc = 0;
    for (std::int64_t i = b * row_words; i < e * row_words; ++i) acc ^= words[i];
    sum.fetch_xor(acc, std::memory_order_relaxed);
  });
  dpo::cpu::detail::parallel_blocks(d.s.rows(), g_threads, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b * row_words; i < e * row_words; ++i) words[i] ^= 1u;
  });
  return sum.load();
}

template <class T>
void register_pattern(int si, const std::string& group, const std::string& name, double bytes) {
  g_entries.push_back({group, name, "", bytes, 3, ""});
  configure(benchmark::RegisterBenchmark(name.c_str(), [si, bytes](benchmark::State& state) {
    dataset<T>& d = get_dataset<T>(si);
    for (auto _ : state) {
      restore_work(state, d);
      benchmark::DoNotOptimize(read_then_rmw(d));
      benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  }));
}

enum class path { naive, ours_out, ours_in };

template <class T>
void register_group(int si) {
  const shape& s = shapes[si];
  const std::string group = std::string(dtype_name<T>()) + "/" + s.name;
  const double nv = static_cast<double>(s.rows() * s.vocab * static_cast<std::int64_t>(sizeof(T)));
  register_copy(group);
  const std::string pattern = group + "/fwdbwd/read+rmw";
  if ((s.vocab * static_cast<std::int64_t>(sizeof(T))) % 8 == 0) register_pattern<T>(si, group, pattern, 3 * nv);

  const std::string naive_fwd = group + "/fwd/naive";
  g_entries.push_back({group, naive_fwd, "", nv, 0, ""});
  configure(benchmark::RegisterBenchmark(naive_fwd.c_str(), [si, nv](benchmark::State& state) {
    dataset<T>& d = get_dataset<T>(si);
    for (auto _ : state) benchmark::DoNotOptimize(naive_forward(d));
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * nv));
  }));
  const dpo::cpu::isa best = dpo::cpu::cpu_isa_supported();
  // (level, metrics): every level with metrics, the best one without too.
  std::vector<std::pair<dpo::cpu::isa, bool>> fwd_runs{{best, false}, {best, true}};
  for (dpo::cpu::isa l : levels())
    if (l != best) fwd_runs.push_back({l, true});
  for (const auto& [level, metrics] : fwd_runs) {
    const std::string best_name = group + "/fwd/ours/metrics:" + (metrics ? "1" : "0");
    const std::string name = best_name + (level == best ? "" : std::string("/isa:") + dpo::cpu::isa_name(level));
    g_entries.push_back({group, name, level == best ? naive_fwd : best_name, nv, 1, ""});
    configure(benchmark::RegisterBenchmark(name.c_str(), [si, nv, metrics, level = level](benchmark::State& state) {
      dataset<T>& d = get_dataset<T>(si);
      dpo::cpu::set_cpu_isa(level);
      dpo::cpu::options opt;
      opt.num_threads = g_threads;
      opt.metrics = metrics;
      const auto view = view_of(d, d.logits.data());
      double cpu = 0;
      for (auto _ : state) {
        const double c0 = process_cpu_seconds();
        const auto r = dpo::cpu::dpo_forward(view, d.ref_c.data(), d.ref_r.data(), bench_config(), opt);
        benchmark::DoNotOptimize(r.loss);
        cpu += process_cpu_seconds() - c0;
      }
      report_cpu_per_logit(state, cpu, static_cast<double>(d.s.rows() * d.s.vocab));
      state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * nv));
    }));
  }

  const std::string naive_fb = group + "/fwdbwd/naive";
  g_entries.push_back({group, naive_fb, "", 3 * nv, 0, ""});
  configure(benchmark::RegisterBenchmark(naive_fb.c_str(), [si, nv](benchmark::State& state) {
    dataset<T>& d = get_dataset<T>(si);
    for (auto _ : state) {
      benchmark::DoNotOptimize(naive_forward(d));
      naive_backward(d);
      benchmark::ClobberMemory();
    }
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * 3 * nv));
  }));
  struct fb_run {
    path p;
    bool metrics;
    dpo::cpu::isa level;
  };
  std::vector<fb_run> fb_runs;
  for (path p : {path::ours_out, path::ours_in})
    for (bool metrics : {false, true}) fb_runs.push_back({p, metrics, best});
  for (dpo::cpu::isa l : levels())
    if (l != best) fb_runs.push_back({path::ours_in, true, l});
  for (const fb_run& run : fb_runs) {
    {
      const path p = run.p;
      const bool metrics = run.metrics;
      const dpo::cpu::isa level = run.level;
      const std::string best_name = group + "/fwdbwd/ours/" + (p == path::ours_in ? "inplace" : "out") +
                                    "/metrics:" + (metrics ? "1" : "0");
      const std::string name =
          best_name + (level == best ? "" : std::string("/isa:") + dpo::cpu::isa_name(level));
      g_entries.push_back({group, name, level == best ? naive_fb : best_name, 3 * nv, 3, pattern});
      configure(benchmark::RegisterBenchmark(name.c_str(), [si, nv, metrics, p, level](benchmark::State& state) {
        dataset<T>& d = get_dataset<T>(si);
        dpo::cpu::set_cpu_isa(level);
        dpo::cpu::options opt;
        opt.num_threads = g_threads;
        opt.metrics = metrics;
        const std::int64_t V = d.s.vocab;
        T* x = p == path::ours_in ? d.work.data() : d.logits.data();
        T* g = p == path::ours_in ? d.work.data() : d.grad.data();
        const auto view = view_of(d, x);
        const dpo::pair_grad_view<T> gv{g, V, g, V};
        double cpu = 0;
        for (auto _ : state) {
          if (p == path::ours_in) restore_work(state, d);
          const double c0 = process_cpu_seconds();
          const auto r = dpo::cpu::dpo_forward_backward(view, d.ref_c.data(), d.ref_r.data(),
                                                        bench_config(), gv, opt);
          benchmark::DoNotOptimize(r.loss);
          benchmark::ClobberMemory();
          cpu += process_cpu_seconds() - c0;
        }
        report_cpu_per_logit(state, cpu, static_cast<double>(d.s.rows() * V));
        state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * 3 * nv));
      }));
    }
  }
}

// Per-core cost of the row kernels: the forward of one row (max pass, then the exp pass) and
// its backward (exp, scale, round to T, in place), on 8 rows of the first shape that stay in
// L2, on the calling thread alone, timed in that thread's CPU time. The machine's other load
// barely moves these (it takes time slices, not cycles of ours), so they say where the time of
// the fused path goes; on this VM a core streams these kernels from memory at about the same
// speed, so the fused path is compute-bound where this cost exceeds the floor's.
constexpr std::int64_t row_set = 8;

template <class T>
void register_rows() {
  const std::int64_t V = shapes[0].vocab;
  for (dpo::cpu::isa level : levels()) {
    for (const char* pass : {"fwd/metrics:1", "fwd/metrics:0", "bwd"}) {
      const std::string name =
          std::string("rows/") + dtype_name<T>() + "/" + pass + "/isa:" + dpo::cpu::isa_name(level);
      benchmark::RegisterBenchmark(name.c_str(), [V, level, pass = std::string(pass)](benchmark::State& state) {
        buffer<T> z(static_cast<std::size_t>(row_set * V));
        for (std::size_t i = 0; i < z.size(); ++i) z[i] = T(6.0f * uniform(i));
        dpo::cpu::set_cpu_isa(level);
        dpo::cpu::detail::row_scratch<float> scratch;
        const dpo::detail::lse_parts<float> lse(3.5f, 0.0f);
        for (auto _ : state) {
          for (std::int64_t r = 0; r < row_set; ++r) {
            T* row = z.data() + r * V;
            if (pass == "bwd") {
              dpo::cpu::detail::backward_row(row, row, V, lse, -0.01f);  // values change, never to NaN
            } else if (pass == "fwd/metrics:1") {
              benchmark::DoNotOptimize(dpo::cpu::detail::row_forward<true>(row, V, scratch).s);
            } else {
              benchmark::DoNotOptimize(dpo::cpu::detail::row_forward<false>(row, V, scratch).s);
            }
          }
          benchmark::ClobberMemory();
        }
        state.counters["ns/logit"] = benchmark::Counter(static_cast<double>(row_set * V) * 1e-9,
                                                        benchmark::Counter::kIsIterationInvariantRate |
                                                            benchmark::Counter::kInvert);
      })->Unit(benchmark::kMicrosecond);
    }
  }
}

/// The console output, plus a summary of the medians (ratios within this run) at the end.
class summary_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const double sec = r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      const double cpu = r.GetAdjustedCPUTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
      stat& st = stats_[r.run_name.function_name];
      if (r.run_type == Run::RT_Iteration) {
        if (st.median == 0) st = {sec, 0, 0, cpu};  // no repetitions: the single run
      } else if (r.aggregate_name == "median") {
        st.median = sec;
        st.cpu_median = cpu;
      } else if (r.aggregate_name == "min") {
        st.min = sec;
      } else if (r.aggregate_name == "max") {
        st.max = sec;
      }
    }
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf("\nSummary (medians; threads = %d; best instruction set here: %s; spread = (max - min) / "
                "median over the repetitions;\nGB/s of logical bytes; share = GB/s / copy GB/s; floor = time / "
                "(bytes / copy bandwidth);\nx r+rmw = time / time of read+rmw (the in-place memory pattern, "
                "no arithmetic) on the same buffer;\nbase/ours = time of the naive path, or for /isa: rows of the best "
                "level, / time of this one)\n",
                g_threads, dpo::cpu::isa_name(dpo::cpu::cpu_isa_supported()));
    std::string group;
    double copy_bw = 0;
    for (const entry& e : g_entries) {
      const auto it = stats_.find(e.name);
      if (it == stats_.end() || it->second.median <= 0) continue;
      const stat& st = it->second;
      if (e.group != group) {
        group = e.group;
        copy_bw = 0;
        std::printf("\n%-48s %9s %7s %8s %11s %7s %7s %8s\n", e.group.c_str(), "ms", "spread",
                    "GB/s", "base/ours", "share", "floor", "x r+rmw");
      }
      const double gbs = e.bytes / st.median / 1e9;
      if (e.floor_factor == 0 && e.baseline.empty() && e.name.find("copy") != std::string::npos)
        copy_bw = gbs;
      char ratio[32] = "-", share[32] = "-", floor[32] = "-";
      const auto base = e.baseline.empty() ? stats_.end() : stats_.find(e.baseline);
      if (base != stats_.end() && base->second.median > 0)
        std::snprintf(ratio, sizeof ratio, "%.2fx", base->second.median / st.median);
      if (e.floor_factor > 0 && copy_bw > 0) {
        std::snprintf(share, sizeof share, "%.0f%%", 100.0 * gbs / copy_bw);
        std::snprintf(floor, sizeof floor, "%.2fx", copy_bw / gbs);
      }
      char pattern[32] = "-";
      const auto pat = e.pattern.empty() ? stats_.end() : stats_.find(e.pattern);
      if (pat != stats_.end() && pat->second.median > 0)
        std::snprintf(pattern, sizeof pattern, "%.2fx", st.median / pat->second.median);
      char spread[32] = "-";
      if (st.max > 0) std::snprintf(spread, sizeof spread, "%.0f%%", 100.0 * (st.max - st.min) / st.median);
      std::printf("  %-46s %9.2f %7s %8.2f %11s %7s %7s %8s\n",
                  e.name.substr(e.group.size() + 1).c_str(), st.median * 1e3, spread, gbs, ratio,
                  share, floor, pattern);
    }
    print_rows();
    std::fflush(stdout);
  }

 private:
  struct stat {
    double median = 0, min = 0, max = 0, cpu_median = 0;
  };

  /// The rows/ benchmarks: ns of one core's CPU time per logit, each pass and their sum.
  void print_rows() const {
    const double logits = static_cast<double>(row_set * shapes[0].vocab);
    bool header = false;
    for (const char* dtype : {"f32", "bf16", "f16"}) {
      for (dpo::cpu::isa level : levels()) {
        double ns[3] = {0, 0, 0};
        int k = 0;
        for (const char* pass : {"fwd/metrics:1", "fwd/metrics:0", "bwd"}) {
          const auto it = stats_.find(std::string("rows/") + dtype + "/" + pass + "/isa:" + dpo::cpu::isa_name(level));
          ns[k++] = it == stats_.end() ? 0 : it->second.cpu_median / logits * 1e9;
        }
        if (ns[0] == 0 || ns[1] == 0 || ns[2] == 0) continue;
        if (!header) {
          std::printf("\nPer core (rows/: %d rows of %s in L2, one thread, its CPU time), ns per logit\n"
                      "%-24s %9s %9s %9s %13s\n",
                      static_cast<int>(row_set), shapes[0].name, "", "fwd m:1", "fwd m:0", "bwd", "fwd m:1 + bwd");
          header = true;
        }
        const std::string label = std::string(dtype) + " " + dpo::cpu::isa_name(level);
        std::printf("  %-22s %9.3f %9.3f %9.3f %13.3f\n", label.c_str(), ns[0], ns[1], ns[2], ns[0] + ns[2]);
      }
    }
  }
  std::map<std::string, stat> stats_;
};

}  // namespace

int main(int argc, char** argv) {
  if (!dpo_bench::initialize(argc, argv, 5, &g_threads)) return 1;
  for (int si = 0; si < 2; ++si) {
    register_group<float>(si);
    register_group<Eigen::bfloat16>(si);
    if (si == 0) register_group<Eigen::half>(si);  // fp16 at the first shape only (memory)
  }
  register_rows<float>();
  register_rows<Eigen::bfloat16>();
  register_rows<Eigen::half>();
  summary_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
