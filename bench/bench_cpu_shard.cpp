// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The cost of the vocabulary-parallel path's bookkeeping (dpo/cpu/shard.hpp) on the CPU:
// the sharded forward + backward at world size 1 (no communication: what the partial
// records, the rebase and phase 2 add) against dpo_forward + dpo_backward_rows on the same
// batch, and two shards of half the vocabulary run one after the other (the work of a
// 2-rank group, minus the all-reduces). Report ratios from one run (docs/performance.md).
//
//   dpo_bench_cpu_shard [--dpo_threads=N] [--benchmark_filter=...]
#include <cstdint>
#include <vector>

#include "bench_common.hpp"
#include "dpo/cpu/shard.hpp"

namespace {

constexpr std::int64_t P = 4, T = 128, V = 32000;
int g_threads = 1;

struct data {
  std::vector<float> logits, grad;
  std::vector<std::int64_t> labels;
  std::vector<double> ref_c, ref_r, row_lse, row_coef;
  data() : logits(2 * P * T * V), grad(logits.size()), labels(2 * P * T), ref_c(P, -900.0), ref_r(P, -905.0) {
    for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = 4.0f * dpo_bench::uniform(i);
    for (std::int64_t r = 0; r < 2 * P * T; ++r)
      labels[r] = r % T < 16 ? -100 : static_cast<std::int64_t>(dpo_bench::splitmix(r) % V);
    row_lse.resize(labels.size());
    row_coef.resize(labels.size());
  }
  dpo::pair_view<float, std::int64_t> view(std::int64_t start = 0, std::int64_t end = V) const {
    dpo::pair_view<float, std::int64_t> p = dpo::padded_pairs(logits.data() + start, labels.data(), 2 * P, T,
                                                              end - start, V);
    return p;
  }
};

data& get() {
  static data d;
  return d;
}

const dpo::loss_config& config() {
  static const dpo::loss_config c = dpo::loss_config::of(dpo::loss_type::sigmoid);
  return c;
}

void bm_unsharded(benchmark::State& state) {
  data& d = get();
  dpo::cpu::options o;
  o.num_threads = g_threads;
  double loss = 0;
  dpo::forward_outputs out;
  out.loss = &loss;
  out.row_lse = d.row_lse.data();
  out.row_coef = d.row_coef.data();
  const auto v = d.view();
  float* g = d.grad.data();
  for (auto _ : state) {
    dpo::cpu::dpo_forward(v, d.ref_c.data(), d.ref_r.data(), config(), out, o);
    dpo::cpu::dpo_backward_rows(v, d.row_lse.data(), d.row_coef.data(), {g, V, g, V}, 1.0, o);
    benchmark::ClobberMemory();
  }
}

/// range(0) shards of the vocabulary, run one after the other, without the all-reduces (with
/// more than one shard each result is then that shard's own: the work is what is measured).
void bm_sharded(benchmark::State& state) {
  data& d = get();
  const int W = static_cast<int>(state.range(0));
  dpo::cpu::options o;
  o.num_threads = g_threads;
  double loss = 0;
  dpo::forward_outputs out;
  out.loss = &loss;
  float* g = d.grad.data();
  std::vector<dpo::cpu::shard_state> st(W);
  for (auto _ : state) {
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, V * t / W, V * (t + 1) / W};
      dpo::cpu::dpo_forward_sharded(d.view(sh.start, sh.end), sh, d.ref_c.data(), d.ref_r.data(), config(), {},
                                    out, st[t], o);
    }
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, V * t / W, V * (t + 1) / W};
      dpo::cpu::dpo_backward_sharded(d.view(sh.start, sh.end), sh, st[t], {g + sh.start, V, g + sh.start, V}, 1.0,
                                     o);
    }
    benchmark::ClobberMemory();
  }
}

}  // namespace

BENCHMARK(bm_unsharded)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(bm_sharded)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  if (!dpo_bench::initialize(argc, argv, 5, &g_threads)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
